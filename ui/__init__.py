"""Gradio live webcam demo (built on the live engine in a later issue; imports ``model`` and ``streamer``)."""

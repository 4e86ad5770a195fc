"""The gradio live webcam demo (``vl3live demo``), on the live engine; imports ``model`` and ``streamer``."""

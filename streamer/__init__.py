"""Streaming layer: video sources, orchestration and the ``vl3live`` CLI (imports ``model``, never the reverse)."""

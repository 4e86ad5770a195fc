"""Checkpoint tooling: loading a model by spec (``loading.py``: the tiny and random-weight models built in code,
``tiny.py``; local directories; hub ids through ``hub.py``), converting the official remote-code checkpoints
(``convert.py``), speech recognition models (``asr.py``), and the synthetic camera benchmarks and tests
stream (``synthetic.py``). The runtime (the session, executor, KV pool and budget) is the rest of ``model/``."""

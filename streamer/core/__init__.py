"""The engine core: the one owner of the model, the KV pool and every session's live state, driven by
commands and publishing outputs (``commands.py``); ``engine_core.py`` runs it, ``process.py`` runs it
in a child process. Front ends never import this package's state: they talk to an
:class:`streamer.engine.EngineClient`."""

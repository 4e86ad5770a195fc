"""The engine floor: video sources, the engine client and its core (``streamer/core/``), the event bus,
and the websocket API (``streamer/websocket/``). Imports ``model``; never ``ui``, ``training`` or a command."""

"""The engine floor: video sources, the live engine and its model worker, the event bus, and the websocket
API (``streamer/websocket/``). Imports ``model``; never ``ui``, ``training`` or a command."""

"""The websocket API: protocol models (pure), the event translation (pure), image decoding, access
rules, the server, the client library and metrics."""

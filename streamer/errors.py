"""What the engine refuses, and the one check of a question's text."""

from __future__ import annotations


class EngineError(ValueError):
    """A request the engine refuses (unknown session, full question queue, too long a question).

    ``code`` is the websocket protocol's error code for it (``streamer/websocket/protocol.py``)."""

    def __init__(self, message: str, code: str = "invalid_field"):
        super().__init__(message)
        self.code = code


def check_text(text: object, limit: int, what: str = "question") -> None:
    """The one check of a question's (or a standing instruction's) text: ``EngineError`` unless it is
    non-empty text of at most ``limit`` characters. Inside the engine and the session it is trusted."""
    if not isinstance(text, str) or not text.strip():
        raise EngineError(f"{what} must be a non-empty string")
    if len(text) > limit:
        raise EngineError(f"{what} is {len(text)} characters; the limit is {limit}", "question_too_long")

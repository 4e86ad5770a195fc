"""The protocol's stable error codes (``error.code``) and close codes, each with what it means
(``docs/protocol.md`` lists the same; a test checks that every one is documented there)."""

# Stable error codes (``error.code``), documented in docs/protocol.md.
ERROR_CODES = {
    "invalid_json": "a text message that is not a JSON object",
    "invalid_text": "a string that is not valid Unicode (a lone surrogate escape)",
    "unknown_type": "no type, or a type this protocol version does not have",
    "invalid_field": "a field missing, unknown, of the wrong type or out of range",
    "frame_too_large": "an encoded frame over server.max_frame_bytes",
    "frame_too_many_pixels": "a frame over server.max_frame_pixels",
    "bad_image": "not a decodable JPEG or PNG: wrong magic, truncated, zero size, bad base64",
    "rate_limited": "more messages per second than server.max_messages_per_second",
    "source_forbidden": "source.attach to a URL that is not on the server's allow-list",
    "source_busy": "frames sent while a source is attached, or a second source",
    "session_started": "layout, budget or frame size changed after the first frame or question",
    "queue_full": "more questions waiting than engine.max_queued_questions",
    "question_too_long": "a question or instruction over engine.max_question_chars",
    "nothing_to_cancel": "response.cancel while no answer is being generated",
    "bad_frame": "the model session refused a decoded frame (e.g. an extreme aspect ratio)",
    "bad_question": "the model session refused a question",
    "cache_limit": "the KV cache cannot take more (no budget, or a question larger than it)",
    "source": "the attached source cannot be opened or broke off (the server keeps retrying)",
    "subscriber_overflow": "this connection fell too far behind on answer events",
    "too_many_sessions": "server.max_sessions reached, or the KV pool cannot hold another session's budget "
                         "(the message says which; the connection is closed, code 1013)",
    "resume_failed": "an empty, malformed, unknown or expired resume token (the connection is closed, code 4001)",
    "worker_lost": "the engine core serving this session is gone (its process died)",
    "internal": "a bug on the server; the session goes on",
}

# Close codes the server uses (besides what the websocket library sends by itself).
CLOSE_CODES = {
    1000: "normal closure: the client closed (its session ends at once), or the session ended (session.close)",
    1001: "the server is shutting down (from the client: going away, the session waits for a resume)",
    1002: "protocol violation: a malformed websocket frame (sent by the websocket library); the session can be "
          "resumed",
    1007: "a text message that is not UTF-8 (RFC 6455 requires closing); the session can be resumed",
    1009: "a message over the transport limit (about 4/3 x server.max_frame_bytes + 64 KiB)",
    1011: "internal error",
    1013: "server.max_sessions reached; try again later",
    4001: "resume_failed: unknown or expired resume token",
    4002: "subscriber_overflow: the client read events too slowly; the session can be resumed",
    4003: "the session was resumed on another connection",
}

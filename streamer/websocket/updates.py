"""``session.update``: every setting checked before any is applied, all or nothing."""

from __future__ import annotations

import dataclasses

from streamer.engine import EngineClient, SessionHandle

from . import protocol as P


async def apply_update(engine: EngineClient, session: SessionHandle, new: P.SessionSettings, max_fps: float,
                       max_frame_pixels: int) -> None:
    """Apply ``new`` to ``session`` (``ProtocolError`` / ``EngineError`` / ``ValueError`` refuse all of it).
    ``max_fps`` and ``max_frame_pixels`` are the server's limits on what a client may ask for."""
    gen = new.generation
    if new.fps is not None and new.fps > max_fps:
        raise P.ProtocolError("invalid_field", f"session.fps: the server allows at most {max_fps}")
    if new.frame_pixels is not None and new.frame_pixels > max_frame_pixels:
        raise P.ProtocolError("invalid_field", f"session.frame_pixels: the server allows at most "
                                               f"{max_frame_pixels} (server.max_session_frame_pixels)")
    instruction = new.instruction or None
    if "instruction" in new.model_fields_set:
        engine.check_instruction(session, instruction)
    fields = {k: getattr(new, k) for k in ("fps", "proactive_threshold", "proactive_cooldown", "proactive_every")
              if getattr(new, k) is not None}
    sampling = None
    if gen is not None:
        sampling = session.sampling.replace(**gen.model_dump(exclude_none=True))  # ValueError: invalid_field
    threshold = new.diffp_threshold if "diffp_threshold" in new.model_fields_set else ...
    engine.check_update(session, diffp_threshold=threshold, sampling=sampling, **fields)
    old = session.config
    shaped = dataclasses.replace(
        old, layout=new.layout or old.layout, frame_pixels=new.frame_pixels or old.frame_pixels,
        budget=dataclasses.replace(old.budget, max_tokens=new.memory_budget or old.budget.max_tokens))
    if shaped != old:
        await engine.reconfigure(session, shaped)
    engine.update(session, diffp_threshold=threshold, sampling=sampling, **fields)
    if "instruction" in new.model_fields_set:
        engine.set_instruction(session, instruction)

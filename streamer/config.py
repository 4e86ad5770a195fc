"""Settings of the live engine (``engine.*``) and of spoken questions (``audio.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from model.configtree import setting

from .core.commands import SessionSettings


@dataclass(frozen=True)
class CoreConfig:
    """The engine-wide settings the core runs with (``EngineConfig.core()``: defaults and checks are there)."""

    batching: bool
    max_step_tokens: int
    min_chunk_tokens: int
    max_queued_questions: int
    max_new_tokens: int
    prep_threads: int
    attention: str | None = None


@dataclass
class EngineConfig:
    """The live engine (``streamer/``): sampling, answers, proactive mode, event delivery."""

    fps: float = setting("frames per second sampled from each source (by pts)", default=1.0)
    max_new_tokens: int = setting("answer length limit in tokens", default=256)
    max_queued_questions: int = setting("questions waiting per session; more are refused", default=8)
    max_question_chars: int = setting("longest question accepted", default=2000)
    proactive_threshold: float = setting(
        "stream layout: answer by itself when respond_probability() >= this after a frame", default=0.5)
    proactive_cooldown: float = setting("seconds of stream time between proactive answers to one instruction", default=10.0)
    proactive_every: float = setting(
        "video-turn layout: re-ask the standing instruction every N seconds of stream time", default=10.0)
    proactive_max_new_tokens: int = setting("length limit of a proactive answer", default=64)
    subscriber_queue: int = setting("events buffered per subscriber; stats are dropped first", default=256)
    batching: bool = setting("pack every session's work into one forward per step; off = one session per step "
                           "(the same code; for comparison and as a fallback)", default=True)
    max_step_tokens: int = setting("new tokens one step runs over all sessions; longer prefills are chunked",
                                 default=2048)
    min_chunk_tokens: int = setting("the smallest piece of a frame or prefill a step runs (each waiting one gets "
                                  "this much before the rest of the budget tops them up)", default=64)
    kv_pool_tokens: int | None = setting(
        "KV pool size in tokens, shared by all sessions (each reserves its session.budget.max_tokens); None = "
        "kv_pool_memory of free GPU memory on CUDA, server.max_sessions budgets on CPU", default=None)
    kv_pool_memory: float = setting("fraction of free GPU memory the KV pool takes when kv_pool_tokens is null",
                                  default=0.85)
    kv_page_tokens: int = setting("tokens per KV page (the block-table granularity)", default=16)
    prep_threads: int = setting("threads that preprocess frames (resize, normalize, patchify) as they arrive",
                              default=2)
    attention: str | None = setting(
        "how a packed step attends: flex (one FlexAttention call per layer over the KV pool; CPU), segments (SDPA "
        "per session on its slice of the pool: the reference), paged (one flash varlen call per layer reading the "
        "pool through a block table; CUDA, pages of 256), masked (gathered keys, block-diagonal mask; "
        "eager), varlen (flash-attn); None = segments (varlen with flash_attention_2, masked with eager)",
        default=None)
    transport: str = setting('where the engine core runs: "thread" (a thread of this process) or "process" (a '
                             'child process that loads the model, over a pipe)', default="thread")

    def __post_init__(self) -> None:
        if min(self.max_step_tokens, self.min_chunk_tokens, self.kv_page_tokens, self.prep_threads) < 1 or (
                self.kv_pool_tokens is not None and self.kv_pool_tokens < self.kv_page_tokens):
            raise ValueError("engine: max_step_tokens, min_chunk_tokens, kv_page_tokens and prep_threads must be "
                             ">= 1, kv_pool_tokens >= kv_page_tokens")
        if self.attention not in (None, "flex", "paged", "segments", "masked", "varlen"):
            raise ValueError("engine.attention must be flex, paged, segments, masked, varlen or null, got "
                             f"{self.attention!r}")
        if self.transport not in ("thread", "process"):
            raise ValueError(f"engine.transport must be thread or process, got {self.transport!r}")
        if not 0.0 < self.kv_pool_memory <= 1.0:
            raise ValueError("engine.kv_pool_memory must be in (0, 1]")
        if min(self.max_new_tokens, self.max_queued_questions, self.max_question_chars) < 1 \
                or self.subscriber_queue < 8:
            raise ValueError("engine: token, question and queue limits must be >= 1 (subscriber_queue >= 8)")
        try:  # the per-session defaults: SessionSettings holds their rules (session.update checks the same)
            self.session_defaults()
        except ValueError as exc:
            raise ValueError(f"engine.{exc}") from None

    def session_defaults(self) -> SessionSettings:
        """A new session's live settings (``session.update`` changes them per session)."""
        return SessionSettings(self.fps, self.proactive_threshold, self.proactive_cooldown, self.proactive_every,
                               self.proactive_max_new_tokens)

    def core(self) -> CoreConfig:
        """The engine-wide settings the core runs with."""
        return CoreConfig(self.batching, self.max_step_tokens, self.min_chunk_tokens, self.max_queued_questions,
                          self.max_new_tokens, self.prep_threads, self.attention)


@dataclass
class AudioConfig:
    """Spoken questions (``vl3live live --mic``): microphone, voice activity detection, speech recognition."""

    asr: str = setting('speech recognition checkpoint: a Whisper-style dir or hub id, or "tiny" (random weights)',
                     default="openai/whisper-small")
    language: str | None = setting("language of the questions (Whisper code, e.g. en); None = detect", default="en")
    device: str | None = setting("sounddevice input device (name or index); None = the system default",
                               default=None)
    vad_threshold_db: float = setting("speech when a 30 ms frame is louder than this (dBFS) ...", default=-45.0)
    vad_margin_db: float = setting("... and this much louder than the running noise floor", default=10.0)
    vad_end_silence: float = setting("seconds of quiet that end an utterance", default=0.6)
    vad_min_speech: float = setting("utterances shorter than this (seconds) are ignored (clicks, coughs)",
                                  default=0.3)
    vad_max_speech: float = setting("an utterance is cut after this many seconds", default=15.0)
    queue_seconds: float = setting("audio buffered between the microphone and the detector; older audio is "
                                 "dropped (counted) if recognition falls behind", default=30.0)

    def __post_init__(self) -> None:
        if min(self.vad_end_silence, self.vad_min_speech, self.vad_max_speech, self.queue_seconds) <= 0:
            raise ValueError("audio: vad_end_silence, vad_min_speech, vad_max_speech and queue_seconds must be > 0")
        if self.vad_min_speech >= self.vad_max_speech:
            raise ValueError("audio.vad_min_speech must be below audio.vad_max_speech")

"""The one config tree: dataclasses loaded from ``configs/*.yaml`` plus dotted overrides.

Every field is documented once, in its ``metadata["help"]``; the CLI builds its flags and help
from these dataclasses, so nothing is re-declared by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LAYOUTS = ("video-turn", "stream")
DIFFP_REFERENCES = ("previous", "last_kept")
# Paper / transformers threshold: mean |diff| of normalized pixels x 255 (not grey levels).
DIFFP_PREVIOUS_THRESHOLD = 0.1
# Grey levels of the 0-255 image, measured on noisy static footage (README "DiffFP threshold").
DIFFP_LAST_KEPT_THRESHOLD = 6.0


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    spec: str = _help(
        '"tiny" (random weights built in code), a local checkpoint directory, or a hub id (official '
        'DAMO-NLP-SG/VideoLLaMA3-* checkpoints are converted once, on first use; README "Which checkpoint")',
        default="DAMO-NLP-SG/VideoLLaMA3-2B",
    )
    device: str | None = _help("torch device; None = cuda if available, else cpu", default=None)
    dtype: str | None = _help("float32|bfloat16|float16; None = bfloat16 on cuda, float32 on cpu", default=None)
    attn: str | None = _help("attention backend: flash_attention_2|sdpa|eager; None = auto", default=None)
    seed: int = _help("seed for the tiny random-weight model", default=0)
    quant: str | None = _help('"8bit" | "4bit": the LLM through bitsandbytes (CUDA; vision stays bf16); None = off',
                              default=None)
    trust_pickle: bool = _help("allow pickled .bin weights (can run code when loaded); safetensors otherwise",
                               default=False)

    def __post_init__(self) -> None:
        if self.quant not in (None, "8bit", "4bit"):
            raise ValueError(f"model.quant must be 8bit, 4bit or null, got {self.quant!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attn not in (None, "flash_attention_2", "sdpa", "eager"):
            raise ValueError(f"model.attn must be flash_attention_2, sdpa or eager, got {self.attn!r}")


RECALL_MODES = ("off", "on")


@dataclass
class BudgetConfig:
    """The KV budget: evict whole frames from the middle so a stream can run for hours (README "KV budget")."""

    max_tokens: int | None = _help(
        "KV cache budget in tokens; None = no eviction (the cache grows to the model's positions, then refuses)",
        default=16384,
    )
    sink_tokens: int | None = _help(
        "tokens at the start never evicted (units overlapping them are kept whole); None = the system prompt",
        default=None,
    )
    recent_tokens: int | None = _help("tokens at the end never evicted; None = max_tokens // 4", default=None)
    recent_seconds: float | None = _help(
        "also keep frames (and exchanges) from the last N seconds of stream time; None = off", default=None)
    evict_margin_tokens: int | None = _help(
        "when eviction runs, free this much extra room so it runs rarely; None = max_tokens // 8", default=None)
    reserve_tokens: int = _help("room for one question and its answer, part of the minimum budget", default=256)
    recall: str = _help('"on": keep evicted frames in CPU memory and bring the most relevant back for each '
                        'question; "off": evicted frames are gone', default="on")
    recall_top_k: int = _help("frames recalled per question", default=4)
    recall_memory_mb: float = _help("CPU memory for evicted frames; the oldest are dropped past it", default=1024.0)

    def __post_init__(self) -> None:
        recall = str(self.recall).lower()
        self.recall = {"true": "on", "1": "on", "false": "off", "0": "off"}.get(recall, recall)
        if self.recall not in RECALL_MODES:
            raise ValueError(f"session.budget.recall must be one of {RECALL_MODES}, got {self.recall!r}")
        for name in ("max_tokens", "sink_tokens", "recent_tokens", "evict_margin_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"session.budget.{name} must be >= 0, got {value}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("session.budget.max_tokens must be >= 1")
        if self.recent_seconds is not None and self.recent_seconds < 0:
            raise ValueError("session.budget.recent_seconds must be >= 0")
        if self.reserve_tokens < 1 or self.recall_top_k < 1 or self.recall_memory_mb <= 0:
            raise ValueError("session.budget: reserve_tokens and recall_top_k must be >= 1, recall_memory_mb > 0")

    @property
    def recent(self) -> int:
        """The recent window in force, in tokens."""
        if self.recent_tokens is not None:
            return self.recent_tokens
        return (self.max_tokens or 0) // 4

    @property
    def margin(self) -> int:
        """Extra room freed by each eviction."""
        if self.evict_margin_tokens is not None:
            return self.evict_margin_tokens
        return (self.max_tokens or 0) // 8


@dataclass
class SessionConfig:
    layout: str = _help('token layout: "video-turn" (any checkpoint) or "stream" (stream tokens)',
                        default="video-turn")
    frame_pixels: int = _help("per-frame pixel budget (max pixels after smart_resize)", default=448 * 336)
    min_pixels: int = _help("per-frame minimum pixels after smart_resize", default=28 * 28)
    diffp_reference: str = _help('DiffFP reference: "last_kept" (live default) or "previous" (paper)',
                                 default="last_kept")
    diffp_threshold: float | None = _help(
        "DiffFP threshold; None = mode default (previous: 0.1 normalized x 255; last_kept: grey levels)",
        default=None,
    )
    diffp_min_tokens: int = _help("tokens kept at least per frame", default=1)
    system_prompt: str | None = _help("system prompt; None = the checkpoint chat template's", default=None)
    max_cache_tokens: int | None = _help(
        "without a budget: refuse to grow the KV cache past this; None = model max positions", default=None)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"session.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.diffp_reference not in DIFFP_REFERENCES:
            raise ValueError(f"session.diffp_reference must be one of {DIFFP_REFERENCES}, got {self.diffp_reference!r}")
        if self.frame_pixels < 28 * 28:
            raise ValueError(f"session.frame_pixels must be >= {28 * 28}, got {self.frame_pixels}")
        if not 28 * 28 <= self.min_pixels <= self.frame_pixels:
            raise ValueError("session.min_pixels must be in [784, frame_pixels]")
        if self.diffp_min_tokens < 1:
            raise ValueError("session.diffp_min_tokens must be >= 1")
        if self.diffp_threshold is not None and self.diffp_threshold < 0:
            raise ValueError("session.diffp_threshold must be >= 0")

    @property
    def threshold(self) -> float:
        """The DiffFP threshold in force (the mode's default when unset)."""
        if self.diffp_threshold is not None:
            return float(self.diffp_threshold)
        return DIFFP_PREVIOUS_THRESHOLD if self.diffp_reference == "previous" else DIFFP_LAST_KEPT_THRESHOLD


@dataclass
class EngineConfig:
    """The live engine (``streamer/``): sampling, answers, proactive mode, event delivery."""

    fps: float = _help("frames per second sampled from each source (by pts)", default=1.0)
    max_new_tokens: int = _help("answer length limit in tokens", default=256)
    max_queued_questions: int = _help("questions waiting per session; more are refused", default=8)
    max_question_chars: int = _help("longest question accepted", default=2000)
    proactive_threshold: float = _help(
        "stream layout: answer by itself when respond_probability() >= this after a frame", default=0.5)
    proactive_cooldown: float = _help("seconds of stream time between proactive answers", default=10.0)
    proactive_every: float = _help(
        "video-turn layout: re-ask the standing instruction every N seconds of stream time", default=10.0)
    proactive_max_new_tokens: int = _help("length limit of a proactive answer", default=64)
    subscriber_queue: int = _help("events buffered per subscriber; stats are dropped first", default=256)
    batching: bool = _help("pack every session's work into one forward per step; off = one session per step "
                           "(the same code; for comparison and as a fallback)", default=True)
    max_step_tokens: int = _help("new tokens one step runs over all sessions; longer prefills are chunked",
                                 default=2048)
    min_chunk_tokens: int = _help("the smallest piece of a frame or prefill a step runs (each waiting one gets "
                                  "this much before the rest of the budget tops them up)", default=64)
    kv_pool_tokens: int | None = _help(
        "KV pool size in tokens, shared by all sessions (each reserves its session.budget.max_tokens); None = "
        "kv_pool_memory of free GPU memory on CUDA, server.max_sessions budgets on CPU", default=None)
    kv_pool_memory: float = _help("fraction of free GPU memory the KV pool takes when kv_pool_tokens is null",
                                  default=0.85)
    kv_page_tokens: int = _help("tokens per KV page (the block-table granularity)", default=16)
    prep_threads: int = _help("threads that preprocess frames (resize, normalize, patchify) as they arrive",
                              default=2)

    def __post_init__(self) -> None:
        if min(self.max_step_tokens, self.min_chunk_tokens, self.kv_page_tokens, self.prep_threads) < 1 or (
                self.kv_pool_tokens is not None and self.kv_pool_tokens < self.kv_page_tokens):
            raise ValueError("engine: max_step_tokens, min_chunk_tokens, kv_page_tokens and prep_threads must be "
                             ">= 1, kv_pool_tokens >= kv_page_tokens")
        if not 0.0 < self.kv_pool_memory <= 1.0:
            raise ValueError("engine.kv_pool_memory must be in (0, 1]")
        if self.fps <= 0 or self.proactive_every <= 0 or self.proactive_cooldown < 0:
            raise ValueError("engine.fps and engine.proactive_every must be > 0, proactive_cooldown >= 0")
        if min(self.max_new_tokens, self.max_queued_questions, self.max_question_chars,
               self.proactive_max_new_tokens) < 1 or self.subscriber_queue < 8:
            raise ValueError("engine: token, question and queue limits must be >= 1 (subscriber_queue >= 8)")
        if not 0.0 <= self.proactive_threshold <= 1.0:
            raise ValueError("engine.proactive_threshold must be in [0, 1]")


@dataclass
class AudioConfig:
    """Spoken questions (``vl3live live --mic``): microphone, voice activity detection, speech recognition."""

    asr: str = _help('speech recognition checkpoint: a Whisper-style dir or hub id, or "tiny" (random weights)',
                     default="openai/whisper-small")
    language: str | None = _help("language of the questions (Whisper code, e.g. en); None = detect", default="en")
    device: str | None = _help("sounddevice input device (name or index); None = the system default",
                               default=None)
    vad_threshold_db: float = _help("speech when a 30 ms frame is louder than this (dBFS) ...", default=-45.0)
    vad_margin_db: float = _help("... and this much louder than the running noise floor", default=10.0)
    vad_end_silence: float = _help("seconds of quiet that end an utterance", default=0.6)
    vad_min_speech: float = _help("utterances shorter than this (seconds) are ignored (clicks, coughs)",
                                  default=0.3)
    vad_max_speech: float = _help("an utterance is cut after this many seconds", default=15.0)
    queue_seconds: float = _help("audio buffered between the microphone and the detector; older audio is "
                                 "dropped (counted) if recognition falls behind", default=30.0)

    def __post_init__(self) -> None:
        if min(self.vad_end_silence, self.vad_min_speech, self.vad_max_speech, self.queue_seconds) <= 0:
            raise ValueError("audio: vad_end_silence, vad_min_speech, vad_max_speech and queue_seconds must be > 0")
        if self.vad_min_speech >= self.vad_max_speech:
            raise ValueError("audio.vad_min_speech must be below audio.vad_max_speech")


MODULES = ("vision", "projector", "llm")


@dataclass
class TrainConfig:
    """Fine-tuning (``vl3live train``; stages in ``configs/train/``, README "Training")."""

    data: list[str] = _help("training data: JSON / JSONL files (README \"Training data\")", default_factory=list)
    output_dir: str = _help("checkpoints and the final model go here", default="runs/train")
    stage: int = _help("VideoLLaMA3 stage 1-4 (documentation; what trains is set by trainable/lr_*)", default=4)
    trainable: list[str] = _help("modules that train: vision, projector, llm", default_factory=lambda: list(MODULES))
    lr_vision: float = _help("learning rate of the vision encoder", default=2e-6)
    lr_projector: float = _help("learning rate of the projector", default=1e-5)
    lr_llm: float = _help("learning rate of the language model", default=1e-5)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_ratio: float = _help("share of the steps spent warming the learning rate up (then cosine)", default=0.03)
    epochs: float = _help("passes over the data", default=1.0)
    max_steps: int = _help("stop after this many optimizer steps; -1 = epochs decide", default=-1)
    batch_size: int = _help("samples per device per step", default=1)
    grad_accum: int = _help("gradient accumulation steps", default=1)
    max_length: int = _help("longest sample in tokens; longer ones are skipped (counted)", default=16384)
    fps: float = _help("frames per second sampled from videos", default=1.0)
    max_frames: int = _help("most frames per sample (evenly resampled beyond)", default=180)
    clip_seconds: float = _help("stream-from-captions: clip length", default=120.0)
    decision_ratio: float = _help("stream layout: keep-watching decision labels per speak-now label", default=1.0)
    bf16: bool | None = _help("bfloat16 mixed precision; None = on when CUDA is present", default=None)
    gradient_checkpointing: bool = _help("recompute activations in the backward pass", default=True)
    logging_steps: int = _help("log every N steps", default=10)
    save_steps: int = _help("checkpoint every N steps", default=500)
    save_total_limit: int | None = _help("keep at most N checkpoints", default=3)
    seed: int = _help("seed of data order, sampling and init", default=42)
    skip_bad_samples: bool = _help("skip (and count) samples that fail to load; false = stop at the first",
                                   default=True)
    num_workers: int = _help("data loader worker processes", default=2)
    lora: bool = _help("train LoRA adapters on the LLM instead of its weights", default=False)
    lora_r: int = _help("LoRA rank", default=64)
    lora_alpha: int = _help("LoRA alpha", default=128)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_targets: list[str] = _help("LLM linear layers that get adapters", default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quant: str | None = _help('QLoRA: "4bit" loads the LLM in 4-bit (bitsandbytes, CUDA) under LoRA', default=None)
    deepspeed: str | None = _help("DeepSpeed config JSON (configs/deepspeed/); None = off", default=None)
    fsdp: str | None = _help('FSDP spec for transformers, e.g. "full_shard auto_wrap"; None = off', default=None)
    fsdp_config: str | None = _help("FSDP config JSON (configs/fsdp/)", default=None)

    def __post_init__(self) -> None:
        unknown = set(self.trainable) - set(MODULES)
        if unknown:
            raise ValueError(f"train.trainable: unknown modules {sorted(unknown)}; known: {MODULES}")
        if self.stage not in (1, 2, 3, 4):
            raise ValueError("train.stage must be 1, 2, 3 or 4")
        if self.quant not in (None, "4bit"):
            raise ValueError('train.quant must be null or "4bit"')
        if self.quant and not self.lora:
            raise ValueError("train.quant (QLoRA) needs train.lora: true")
        if min(self.batch_size, self.grad_accum, self.max_length, self.max_frames, self.logging_steps,
               self.save_steps) < 1 or self.fps <= 0 or self.decision_ratio < 0:
            raise ValueError("train: sizes and steps must be >= 1, fps > 0, decision_ratio >= 0")


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServerConfig:
    """The websocket API (``vl3live serve``, ``streamer/server.py``; protocol in docs/protocol.md)."""

    host: str = _help("address to bind; anything but loopback requires a token", default="127.0.0.1")
    port: int = _help("port to bind (0 = any free port)", default=8765)
    token: str | None = _help("bearer token clients must present (Authorization header or ?token=); "
                              "None = $VL3LIVE_TOKEN if set, else no auth (loopback only)", default=None)
    allowed_origins: list[str] | None = _help(
        "browser Origin values allowed to connect (\"*\" = any); None = pages served from loopback only. "
        "Handshakes without an Origin (programs, not browsers) are always accepted", default=None)
    source_allow: list[str] = _help(
        "what source.attach may pull from: scheme://host[:port] patterns matched on the parsed host; * is a "
        "whole IPv4 octet or part of one DNS label (rtsp://192.168.1.*, rtsp://cam-*.local); without a port "
        "only the scheme's default port (:* = any); empty = source.attach disabled", default_factory=list)
    max_sessions: int = _help("sessions at once, connected or awaiting resume; more are refused", default=16)
    max_session_frame_pixels: int | None = _help(
        "largest session.frame_pixels a client may ask for (each frame costs about frame_pixels / 784 "
        "tokens of model work, which every other session waits for); None = 4 x session.frame_pixels",
        default=None)
    max_pts_jump: float = _help("a client's frame pts may be at most this many seconds past the session's "
                                "newest frame (past 0 for the first); larger jumps are refused", default=3600.0)
    recall_memory_mb: float = _help(
        "host memory for the recall stores of all sessions together: each session's store is capped at "
        "min(session.budget.recall_memory_mb, this / max_sessions); past its cap a session drops its oldest "
        "evicted frames (counted in recall_dropped)", default=8192.0)
    resume_failures_per_minute: float = _help(
        "failed resume attempts allowed per client address and minute (bursts of 10); more get HTTP 429",
        default=10.0)
    max_fps: float = _help("frames per second a client may send; faster ones are dropped (counted)",
                           default=30.0)
    max_frame_bytes: int = _help("largest encoded frame (JPEG/PNG) accepted", default=4 * 1024 * 1024)
    max_frame_pixels: int = _help("largest frame accepted, width x height", default=3840 * 2160)
    max_messages_per_second: float = _help(
        "messages per second per connection (burst 2x); more get a rate_limited error", default=200.0)
    resume_seconds: float = _help(
        "a disconnected session waits this long for its client to resume it; 0 = closed at once", default=30.0)
    ack_interval: float = _help("seconds between coalesced frame.ack events", default=0.5)
    stats_interval: float = _help("seconds between stats events", default=2.0)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        if min(self.max_sessions, self.max_frame_bytes, self.max_frame_pixels) < 1:
            raise ValueError("server.max_sessions, max_frame_bytes and max_frame_pixels must be >= 1")
        if self.max_session_frame_pixels is not None and self.max_session_frame_pixels < 28 * 28:
            raise ValueError(f"server.max_session_frame_pixels must be >= {28 * 28}")
        if self.max_pts_jump <= 0 or self.recall_memory_mb <= 0 or self.resume_failures_per_minute <= 0:
            raise ValueError("server.max_pts_jump, recall_memory_mb and resume_failures_per_minute must be > 0")
        if self.max_fps <= 0 or self.max_messages_per_second <= 0:
            raise ValueError("server.max_fps and server.max_messages_per_second must be > 0")
        if self.resume_seconds < 0 or self.ack_interval <= 0 or self.stats_interval <= 0:
            raise ValueError("server.resume_seconds must be >= 0, ack_interval and stats_interval > 0")
        for pattern in self.source_allow:  # fully parsed by streamer.access when the server starts
            scheme, sep, rest = pattern.partition("://")
            if not sep or not scheme or not rest or "/" in rest:
                raise ValueError(f"server.source_allow entries look like rtsp://host[:port], got {pattern!r}")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


@dataclass
class Config:
    """Root of the config tree (``configs/default.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp`` (dataclasses recurse)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: comma separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message
            raise ValueError(errors[0] + (" (or null)" if type(None) in args else ""))
        raise ValueError(f"{where}: cannot read {value!r} as {tp}")
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}")
    prefix = where if where in ("", "--") else f"{where}."
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return " ".join(str(getattr(exc, "problem", None) or exc).split())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``configs/default.yaml`` (or ``path``) and apply dotted overrides."""
    path = Path(path) if path is not None else CONFIG_DIR / "default.yaml"
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def add_dataclass_arguments(parser: Any, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one CLI flag per dataclass field (``--max-new-tokens``), help text from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if f.name in positional:
            parser.add_argument(f.name, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, metavar=f.name.upper(),
                                help=f"{help_text} (default: {default})")


def dataclass_from_args(cls: type, args: Any) -> Any:
    """Build ``cls`` from parsed CLI args, coercing each value to its field type."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return from_dict(cls, values, where="--")

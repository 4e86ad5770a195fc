"""Model and session settings (``model.*``, ``session.*`` of the config tree; README "Configs")."""

from __future__ import annotations

from dataclasses import dataclass, field

from .configtree import setting

LAYOUTS = ("video-turn", "stream")
DIFFP_REFERENCES = ("previous", "last_kept")
# Paper / transformers threshold: mean |diff| of normalized pixels x 255 (not grey levels).
DIFFP_PREVIOUS_THRESHOLD = 0.1
# Grey levels of the 0-255 image, measured on noisy static footage (README "DiffFP threshold").
DIFFP_LAST_KEPT_THRESHOLD = 6.0


@dataclass
class ModelConfig:
    """Which checkpoint, on which device, in which dtype and attention backend (``model.*``)."""

    spec: str = setting(
        '"tiny" (random weights built in code), a local checkpoint directory, or a hub id (official '
        'DAMO-NLP-SG/VideoLLaMA3-* checkpoints are converted once, on first use; README "Which checkpoint")',
        default="DAMO-NLP-SG/VideoLLaMA3-2B",
    )
    device: str | None = setting("torch device; None = cuda if available, else cpu", default=None)
    dtype: str | None = setting("float32|bfloat16|float16; None = bfloat16 on cuda, float32 on cpu", default=None)
    attn: str | None = setting("attention backend: flash_attention_2|sdpa|eager; None = auto", default=None)
    seed: int = setting("seed for the tiny random-weight model", default=0)
    quant: str | None = setting('"8bit" | "4bit": the LLM through bitsandbytes (CUDA; vision stays bf16); None = off',
                              default=None)
    trust_pickle: bool = setting("allow pickled .bin weights (can run code when loaded); safetensors otherwise",
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

    max_tokens: int | None = setting(
        "KV cache budget in tokens; None = no eviction (the cache grows to the model's positions, then refuses)",
        default=16384,
    )
    sink_tokens: int | None = setting(
        "tokens at the start never evicted (units overlapping them are kept whole); None = the system prompt",
        default=None,
    )
    recent_tokens: int | None = setting("tokens at the end never evicted; None = max_tokens // 4", default=None)
    recent_seconds: float | None = setting(
        "also keep frames (and exchanges) from the last N seconds of stream time; None = off", default=None)
    evict_margin_tokens: int | None = setting(
        "when eviction runs, free this much extra room so it runs rarely; None = max_tokens // 8", default=None)
    reserve_tokens: int = setting("room for one question and its answer, part of the minimum budget", default=256)
    recall: str = setting('"on": keep evicted frames in CPU memory and bring the most relevant back for each '
                        'question; "off": evicted frames are gone', default="on")
    recall_top_k: int = setting("frames recalled per question", default=4)
    recall_memory_mb: float = setting("CPU memory for evicted frames; the oldest are dropped past it", default=1024.0)

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
    """How one stream's session is built: token layout, frame size, DiffFP, system prompt, KV budget
    (``session.*``)."""

    layout: str = setting('token layout: "video-turn" (any checkpoint) or "stream" (stream tokens)',
                        default="video-turn")
    stream_timestamps: bool = setting(
        'stream layout: write each frame\'s time before it ("Time 3.0s:"), as models trained here learn it; false '
        "= exactly what the released checkpoints were trained on (the official code never rendered it)",
        default=True)
    frame_pixels: int = setting("per-frame pixel budget (max pixels after smart_resize)", default=448 * 336)
    min_pixels: int = setting("per-frame minimum pixels after smart_resize", default=28 * 28)
    diffp_reference: str = setting('DiffFP reference: "last_kept" (live default) or "previous" (paper)',
                                 default="last_kept")
    diffp_threshold: float | None = setting(
        "DiffFP threshold; None = mode default (previous: 0.1 normalized x 255; last_kept: grey levels)",
        default=None,
    )
    diffp_min_tokens: int = setting("tokens kept at least per frame", default=1)
    system_prompt: str | None = setting("system prompt; None = the checkpoint chat template's", default=None)
    max_cache_tokens: int | None = setting(
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

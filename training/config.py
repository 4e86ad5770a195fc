"""Fine-tuning settings (``train.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from model.configtree import setting

MODULES = ("vision", "projector", "llm")


@dataclass
class TrainConfig:
    """Fine-tuning (``vl3live train``; stages in ``configs/train/``, README "Training")."""

    data: list[str] = setting("training data: JSON / JSONL files (README \"Training data\")", default_factory=list)
    output_dir: str = setting("checkpoints and the final model go here", default="runs/train")
    stage: int = setting("VideoLLaMA3 stage 1-4 (documentation; what trains is set by trainable/lr_*)", default=4)
    trainable: list[str] = setting("modules that train: vision, projector, llm", default_factory=lambda: list(MODULES))
    freeze_embeddings: bool = setting("keep the LLM's input token embeddings (vocabulary x hidden) as they are "
                                      "while the rest of the LLM trains; the LM head trains unless it is the same "
                                      "matrix (tied embeddings, as on the 2B)", default=False)
    lr_vision: float = setting("learning rate of the vision encoder", default=2e-6)
    lr_projector: float = setting("learning rate of the projector", default=1e-5)
    lr_llm: float = setting("learning rate of the language model", default=1e-5)
    weight_decay: float = setting("AdamW weight decay", default=0.0)
    warmup_ratio: float = setting("share of the steps spent warming the learning rate up (then cosine)", default=0.03)
    epochs: float = setting("passes over the data", default=1.0)
    max_steps: int = setting("stop after this many optimizer steps; -1 = epochs decide", default=-1)
    batch_size: int = setting("samples per device per step", default=1)
    grad_accum: int = setting("gradient accumulation steps", default=1)
    group_by_length: bool = setting("batch samples of about the same length together (less padding, faster "
                                    "steps; batches still come in random order)", default=False)
    max_length: int = setting("longest sample in tokens; longer ones are skipped (counted)", default=16384)
    fps: float = setting("frames per second sampled from videos", default=1.0)
    max_frames: int = setting("most frames per sample (evenly resampled beyond)", default=180)
    clip_seconds: float = setting("stream-from-captions: clip length", default=120.0)
    decision_ratio: float = setting("stream layout: keep-watching decision labels per speak-now label", default=1.0)
    decision_changed: float = setting(
        "stream layout: share of the keep-watching labels given first to the frames that changed most (the most "
        "tokens DiffFP kept), where speaking up is tempting; the rest at random", default=0.0)
    bf16: bool | None = setting("bfloat16 mixed precision; None = on when CUDA is present", default=None)
    gradient_checkpointing: bool = setting("recompute activations in the backward pass", default=True)
    logging_steps: int = setting("log every N steps", default=10)
    save_steps: int = setting("checkpoint every N steps", default=500)
    save_total_limit: int | None = setting("keep at most N checkpoints", default=3)
    seed: int = setting("seed of data order, sampling and init", default=42)
    skip_bad_samples: bool = setting("skip (and count) samples that fail to load; false = stop at the first",
                                   default=True)
    num_workers: int = setting("data loader worker processes", default=2)
    frame_cache_mb: int = setting("decoded video frames kept for the next sample of the same video, MiB per data "
                                  "loader worker (least recently used go first; 0 = decode every time)", default=256)
    lora: bool = setting("train LoRA adapters on the LLM instead of its weights", default=False)
    lora_r: int = setting("LoRA rank", default=64)
    lora_alpha: int = setting("LoRA alpha", default=128)
    lora_dropout: float = setting("LoRA dropout", default=0.05)
    lora_targets: list[str] = setting("LLM linear layers that get adapters", default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quant: str | None = setting('QLoRA: "4bit" loads the LLM in 4-bit (bitsandbytes, CUDA) under LoRA', default=None)
    deepspeed: str | None = setting("DeepSpeed config JSON (configs/deepspeed/); None = off", default=None)
    fsdp: str | None = setting('FSDP spec for transformers, e.g. "full_shard auto_wrap"; None = off', default=None)
    fsdp_config: str | None = setting("FSDP config JSON (configs/fsdp/)", default=None)

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
               self.save_steps) < 1 or self.fps <= 0 or self.decision_ratio < 0 or self.frame_cache_mb < 0 \
                or not 0 <= self.decision_changed <= 1:
            raise ValueError("train: sizes and steps must be >= 1, fps > 0, decision_ratio and frame_cache_mb >= 0, "
                             "decision_changed in [0, 1]")

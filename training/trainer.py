"""Fine-tuning on transformers' ``Trainer`` (single GPU, ``torchrun`` multi-GPU / multi-node,
DeepSpeed ZeRO or FSDP through its arguments), with the stream data path of ``training/data``.

The model is the native ``VideoLlama3ForConditionalGeneration``. Each step embeds the text,
runs the vision encoder + projector on every frame, keeps the tokens DiffFP kept (exactly as the
live session does) and scatters them into the ``<|video_pad|>`` positions; the loss is the
model's own cross-entropy, with the LM head run on the labelled positions only. Checkpoints are
written to a staging folder and renamed into place, so a crash never leaves a half-written
``checkpoint-N`` for ``--resume`` to pick.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from model import load_model
from model.config import ModelConfig, SessionConfig
from model.frames import MERGE
from training.config import TrainConfig

from .data.dataset import Collator, StreamDataset
from .data.render import IGNORE

log = logging.getLogger(__name__)


def module_of(name: str) -> str | None:
    """Which of vision / projector / llm a parameter belongs to."""
    if ".vision_model." in f".{name}":
        return "vision"
    if ".projector." in f".{name}":
        return "projector"
    if ".language_model." in f".{name}" or name.startswith(("lm_head", "base_model.model.lm_head")) or \
            ".lm_head." in f".{name}":
        return "llm"
    return None


def prepare_model(model, cfg: TrainConfig):
    """Freeze what does not train; wrap the LLM in LoRA adapters when asked."""
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        kept_whole = {"vision": "vision_model", "projector": "projector"}  # trained fully, saved with the adapter
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=rf".*language_model.*\.({'|'.join(cfg.lora_targets)})",
                          modules_to_save=[kept_whole[m] for m in cfg.trainable if m in kept_whole] or None)
        model = get_peft_model(model, lora)
        if "llm" not in cfg.trainable:
            log.warning("train.lora with llm not in train.trainable: the adapters train anyway")
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(module_of(name) in cfg.trainable)
    if cfg.freeze_embeddings:  # their backward and AdamW update: a third of a step on the proof's small model
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stream_loss(model, batch: dict, video_token_id: int, num_items_in_batch=None) -> torch.Tensor:
    """The loss of one collated batch (see the module docstring): the mean over its labelled tokens, or
    with ``num_items_in_batch`` (the labelled tokens of every micro-batch of one optimizer step under
    gradient accumulation) their sum divided by it, so the step's loss is the true per-token mean."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in batch:
        vlm = base_of(model).model
        grid = batch["grid_thw"]
        feats = vlm.get_video_features(pixel_values_videos=batch["pixel_values"].to(embeds.dtype), video_grid_thw=grid,
                                       video_merge_sizes=torch.full((len(grid),), MERGE, device=grid.device))
        vis = torch.cat(list(feats.pooler_output))[batch["keep"]]
        slots = (ids == video_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, vis.to(embeds.dtype))
    base = base_of(model)
    hidden = base.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False,
                        return_dict=True)[0]
    # the LM head only where a label is: a stream sample labels a few dozen of its hundreds of positions,
    # and logits over the whole vocabulary at every position would be most of the step's time and memory
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE
    logits = base.lm_head(hidden[:, :-1][labelled]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[labelled], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labelled.sum().clamp(min=1)
    return loss / count


class StreamTrainer(Trainer):
    """transformers' ``Trainer`` with one parameter group per module at its stage's learning rate, and the
    bookkeeping of the stream format: tokens/s, DiffFP's kept share, skipped samples."""

    def __init__(self, *args, train_config: TrainConfig, video_token_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config = train_config
        self.video_token_id = video_token_id
        self.tokens = self.kept = self.total = self.skipped = 0
        self.used_samples = 0  # samples that reached the loss
        self.step_lrs: dict[str, float] = {}  # module -> learning rate of the last optimizer step
        self._t0 = time.monotonic()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped += int(inputs.pop("skipped", 0))
        if "input_ids" not in inputs:  # every sample of this batch was bad: a zero loss keeps ranks in step
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        self.tokens += int(inputs["attention_mask"].sum())
        self.used_samples += int(inputs["input_ids"].shape[0])
        self.kept += int(inputs.pop("tokens_kept"))
        self.total += int(inputs.pop("tokens_total"))
        loss = stream_loss(model, inputs, self.video_token_id, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """``train.group_by_length``: transformers' length-grouped sampler on the dataset's estimated
        lengths (it would otherwise render every sample once to measure it)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.train_config.group_by_length and isinstance(dataset, StreamDataset):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self):
        """AdamW with one parameter group per module, each at its own learning rate."""
        if self.optimizer is None:
            cfg = self.train_config
            lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "llm": cfg.lr_llm}
            groups: dict[str, list] = {}
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    groups.setdefault(module_of(name) or "llm", []).append(p)
            params = [{"params": ps, "lr": lrs[m], "weight_decay": cfg.weight_decay, "name": m}
                      for m, ps in groups.items() if lrs[m] > 0]
            # fused: one kernel updates each tensor in place. The foreach kernels allocate every intermediate at
            # full size: on CPU, for the proof's small model and its two 151,936-row vocabulary matrices, their
            # update was a third of a stage 4 step (374 ms of 1.25 s; fused: 23 ms)
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr_llm, betas=(0.9, 0.999), eps=1e-8, fused=True)
        return self.optimizer

    def log(self, logs: dict, *args, **kwargs) -> None:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        if "loss" in logs and self.step_lrs:  # the rate each module trained at in the last step, not the
            logs.pop("learning_rate", None)  # first group's (a module can be frozen, or at its own rate)
            logs.update({f"lr_{m}": lr for m, lr in self.step_lrs.items()})
        logs.update(tokens_per_s=round(self.tokens / elapsed, 1), skipped_samples=self.skipped)
        if self.total:
            logs["diffp_kept"] = round(self.kept / self.total, 4)
        self.tokens, self._t0 = 0, time.monotonic()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Write into a staging folder, then rename it into place (atomic on one filesystem)."""
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, f".staging-{self.state.global_step}")
        real = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = real
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            limit = self.args.save_total_limit
            if limit:
                for old in sorted(Path(run_dir).glob("checkpoint-*"), key=_step)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)


class _StepLearningRates(TrainerCallback):
    """Records each module's learning rate right after the optimizer step used it (the schedule moves
    on before the step is logged)."""

    def __init__(self, trainer: StreamTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        self.trainer.step_lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class _Progress(TrainerCallback):
    def __init__(self, say):
        self.say = say

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items()}
            self.say(f"step {state.global_step}/{state.max_steps}: {shown}")


def _step(path: Path) -> int:
    tail = path.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint (staging folders are never picked)."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and _step(p) >= 0]
    return str(max(done, key=_step)) if done else None


def run_train(model_config: ModelConfig, session_config: SessionConfig, cfg: TrainConfig, resume: bool | str = False,
              say=print, callbacks: list | None = None) -> dict:
    """Train as ``cfg`` (``train.*``) says, on ``model_config``'s checkpoint rendered with ``session_config``; returns a summary (final loss, steps, skipped samples, output).

    ``callbacks`` are extra ``transformers.TrainerCallback``s (e.g. to stop early)."""
    if not cfg.data:
        raise ValueError("train.data is empty: give JSON / JSONL files (train.data=[...])")
    if cfg.quant and not torch.cuda.is_available():
        raise ValueError("train.quant=4bit (QLoRA) needs CUDA: bitsandbytes 4-bit runs on NVIDIA GPUs")
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    m = model_config
    say(f"loading {m.spec} ...")
    if cfg.quant:
        lm = _load_4bit(m.spec)
    else:
        lm = load_model(m.spec, device=m.device or ("cuda" if cuda else "cpu"),
                        dtype="float32" if not cuda else (m.dtype or "bfloat16"), attn=m.attn, seed=m.seed)
    model = lm.model
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = prepare_model(model, cfg)
    dataset = StreamDataset(lm.processor, session_config, cfg)
    say(f"{len(dataset)} samples ({len(dataset.parse_errors)} unreadable lines skipped)")
    _first_usable(dataset, say)
    args = TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        learning_rate=cfg.lr_llm,
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, bf16=bf16,
        dataloader_num_workers=cfg.num_workers, remove_unused_columns=False,
        dataloader_persistent_workers=cfg.num_workers > 0,  # their frame caches last from one epoch to the next
        report_to=[],
        deepspeed=cfg.deepspeed, fsdp=cfg.fsdp or "", fsdp_config=cfg.fsdp_config,
        disable_tqdm=False, use_cpu=not cuda,
    )
    pad = lm.processor.tokenizer.pad_token_id
    trainer = StreamTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=Collator(pad if pad is not None else 0),
                            train_config=cfg, video_token_id=lm.model.config.video_token_id,
                            callbacks=[_Progress(say), *(callbacks or [])])
    trainer.add_callback(_StepLearningRates(trainer))
    checkpoint = resume if isinstance(resume, str) else (latest_checkpoint(cfg.output_dir) if resume else None)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.output_dir}")
    if checkpoint:
        say(f"resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.used_samples == 0 and trainer.state.global_step > 0:  # never a "trained" model from nothing
        raise ValueError(f"no sample reached the loss in {trainer.state.global_step} steps ({trainer.skipped} "
                         "skipped as bad): nothing was trained and no model was saved")
    final = Path(cfg.output_dir) / "final"
    base_of(trainer.model).config.use_cache = True  # off for training only
    trainer.model.save_pretrained(final, safe_serialization=True)
    lm.processor.save_pretrained(final)
    say(f"saved {'LoRA adapter' if cfg.lora else 'model'} to {final}")
    return {"steps": trainer.state.global_step, "train_loss": result.training_loss, "output": str(final),
            "skipped_samples": trainer.skipped + len(dataset.parse_errors),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "trainer": trainer}


PREFLIGHT_SAMPLES = 200


def _first_usable(dataset: StreamDataset, say) -> None:
    """Stop before training when not one of the first samples renders (every one bad: missing or
    corrupt files, too long...), naming the first problems, instead of "training" on nothing."""
    errors = []
    for i in range(min(len(dataset), PREFLIGHT_SAMPLES)):
        item = dataset[i]
        if not isinstance(item, Exception):
            return
        errors.append(str(item))
    shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
    raise ValueError(f"none of the first {len(errors)} samples can be used, so nothing would be trained: {shown}")


def _load_4bit(spec: str):
    """QLoRA: the LLM in 4-bit NF4, the vision encoder and projector in bf16."""
    from transformers import AutoProcessor, BitsAndBytesConfig, VideoLlama3ForConditionalGeneration

    from model.checkpoints.hub import resolve
    from model.checkpoints.loading import LoadedModel

    spec = resolve(spec)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["vision_model", "projector",
                                                                                    "lm_head"])
    model = VideoLlama3ForConditionalGeneration.from_pretrained(spec, quantization_config=bnb, dtype=torch.bfloat16,
                                                                device_map={"": 0}, use_safetensors=True)
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    processor = AutoProcessor.from_pretrained(spec)
    return LoadedModel(model=model, processor=processor, device=torch.device("cuda"), dtype=torch.bfloat16,
                       attn="sdpa", spec=spec)


def merge_lora(adapter: str | Path, out: str | Path, base: str | None = None, say=print) -> Path:
    """Merge a LoRA adapter into its base model and write a plain checkpoint ``load_model`` loads."""
    from peft import PeftConfig, PeftModel

    adapter = Path(adapter)
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise ValueError("the adapter does not name its base model: pass --base")
    say(f"merging {adapter} into {base} ...")
    lm = load_model(base, device="cpu", dtype="float32")
    merged = PeftModel.from_pretrained(lm.model, adapter).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    lm.processor.save_pretrained(out)
    return out

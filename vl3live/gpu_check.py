"""``vl3live gpu-check``: everything only a GPU can show, in one command of at most eight minutes.

On random-weight models at real size built from config (``random-2b``, ``random-7b``: no download),
in bf16, it measures and writes one JSON (``--out``), printing a table row per figure as it goes so
that a run cut off still says what it measured:

1. **environment**: GPU, memory, versions, the attention each path picked, and whether transformers'
   flash entry point names the varlen keywords the executor passes;
2. **one session** (2B, 7B): per-frame ingest p50/p99, TTFT at 60 and 180 frames and with a full 16k
   budget, decode tokens/s over 128 tokens, each against stock ``generate`` on the same clip; peak memory;
3. **many sessions** (2B): ms per step and answer tokens/s at 1-128 sessions all decoding, the GPU-busy
   share and kernel launches of a step (``torch.profiler``), per-frame latency with N cameras at 1 fps;
4. **fidelity** in bf16: streamed vs offline logits, packed vs alone, keys after 40 evictions vs a fresh
   prefill, the device resize against the CPU path;
5. **memory and faults**: the default KV pool and what it took from free memory; an out-of-memory step
   in one session while others run.

``--quick`` halves everything (2B only, about four minutes). Without CUDA it refuses in one line, except
``--cpu-smoke``: every part on the tiny model on the CPU in about a minute (the test suite runs it).
Each section stops starting new measurements once the time limit is near; an error in one is recorded
in the JSON and the others still run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .config import add_dataclass_arguments, dataclass_from_args

HELP = "measure on a CUDA GPU what only a GPU can show (random weights at real size; --cpu-smoke on a CPU)"


@dataclass
class GpuCheckConfig:
    """``vl3live gpu-check`` options."""

    out: str = field(default="gpu-check.json", metadata={"help": "the JSON report (written after every section)"})
    quick: bool = field(default=False, metadata={"help": "half of everything, 2B only (about 4 minutes)"})
    cpu_smoke: bool = field(default=False, metadata={
        "help": "run every part on the tiny model on the CPU (about a minute): the check of the command itself"})
    seconds: float | None = field(default=None, metadata={
        "help": "time limit; past it no new measurement starts (default 480, 240 with --quick)"})


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run (full, quick or CPU smoke)."""

    mode: str
    models: tuple[str, ...]  # the first gets every section; the others one session only
    height: int = 336
    width: int = 448
    ttft_frames: tuple[int, ...] = (60, 180)
    budget_tokens: int = 16384  # the "full budget" TTFT point, the pool sizing's session budget
    decode_tokens: int = 128
    repeats: int = 3  # TTFT samples (the median is reported)
    sessions: tuple[int, ...] = (1, 4, 16, 64, 128)
    session_budget: int = 2048  # each of the many sessions (one frame, a question, an answer)
    step_tokens: int = 32  # answer tokens per session in a many-sessions round
    profile_tokens: int = 6
    stream_seconds: float = 4.0  # cameras at 1 fps, per N
    fidelity_frames: int = 16
    eviction_budget: int = 4096
    evictions: int = 40
    pool_sessions: int = 16  # CPU pool sizing: sessions at budget_tokens (CUDA: free memory decides)
    oom_headroom_mib: int = 512  # memory left free while the victim's 4K frame runs
    seconds: float = 480.0
    started: float = field(default_factory=time.monotonic)

    @property
    def smoke(self) -> bool:
        return self.mode == "cpu-smoke"

    def out_of_time(self, need: float = 0.0) -> bool:
        return time.monotonic() - self.started + need > self.seconds


def make_plan(cfg: GpuCheckConfig) -> Plan:
    if cfg.cpu_smoke:
        plan = Plan("cpu-smoke", ("tiny",), height=112, width=112, ttft_frames=(2, 4), budget_tokens=600,
                    decode_tokens=8, repeats=2, sessions=(1, 2, 4), session_budget=600, step_tokens=4,
                    profile_tokens=3, stream_seconds=1.5, fidelity_frames=3, eviction_budget=600, evictions=40,
                    pool_sessions=4, seconds=300.0)
    elif cfg.quick:
        plan = Plan("quick", ("random-2b",), ttft_frames=(30, 90), budget_tokens=8192, decode_tokens=64, repeats=2,
                    sessions=(1, 4, 16, 64), step_tokens=16, stream_seconds=2.0, fidelity_frames=8, evictions=20,
                    seconds=240.0)
    else:
        plan = Plan("full", ("random-2b", "random-7b"))
    return dataclasses.replace(plan, seconds=cfg.seconds) if cfg.seconds else plan


class Report:
    """The JSON report, rewritten after every section, and the table printed as figures come in."""

    def __init__(self, path: Path, plan: Plan):
        self.path, self.plan = path, plan
        self.data: dict = {"command": "vl3live gpu-check", "mode": plan.mode,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": {
                               k: v for k, v in dataclasses.asdict(plan).items() if k not in ("started",)},
                           "models": {}, "errors": {}, "skipped": []}

    def say(self, section: str, what: str, value: object) -> None:
        print(f"{time.monotonic() - self.plan.started:6.1f}s  {section:<12} {what:<52} {value}", file=sys.stderr,
              flush=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.plan.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def section(self, where: dict, label: str, name: str, fn, lm) -> None:
        """Run one section ``fn(lm, plan, say)`` into ``where[name]``; an error is recorded and the run goes on."""
        label = f"{label}/{name}"
        if self.plan.out_of_time():
            self.data["skipped"].append(label)
            self.say(name, "skipped", "time limit reached")
            return
        t0 = time.monotonic()
        try:
            where[name] = fn(lm, self.plan, self.say)
            where[name]["section_s"] = round(time.monotonic() - t0, 1)
        except Exception as exc:  # one failing section must not cost the figures of the others
            self.data["errors"][label] = f"{type(exc).__name__}: {exc}"
            self.say(name, "FAILED", f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
        self.write()


def run_check(cfg: GpuCheckConfig) -> dict:
    """Run every section of the plan; the report's data."""
    import torch

    from model.checkpoints.loading import load_model

    from . import gpu_probes as probes
    from .gpu_attention import one_call_attention

    plan = make_plan(cfg)
    if plan.smoke:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = Report(Path(cfg.out), plan)
    device = "cuda" if not plan.smoke else "cpu"
    dev = torch.device(device)
    report.data["environment"] = env = probes.environment(dev)
    report.say("environment", "device", env.get("gpu") or env.get("cpu"))
    report.say("environment", "torch / transformers / flash-attn / bitsandbytes",
               f"{env['torch']} / {env['transformers']} / {env['flash_attn']} / {env['bitsandbytes']}")
    fk = env["flash_varlen"]
    report.say("environment", "flash entry point names the varlen keywords", f"{fk['all_named']} {fk['keywords']}")
    report.write()
    for k, spec in enumerate(plan.models):
        if plan.out_of_time(30):
            report.data["skipped"].append(spec)
            report.say(spec, "skipped", "time limit reached")
            continue
        t0 = time.monotonic()
        lm = load_model(spec, device=device, dtype="bfloat16" if not plan.smoke else "float32")
        where = report.data["models"].setdefault(spec, {"load_s": round(time.monotonic() - t0, 1)})
        report.say(spec, "loaded", f"{where['load_s']} s, attention {lm.attn}")
        sections = [("attention", probes.attention_paths), ("single_session", probes.single_session)]
        if k == 0:  # the 2B (or the tiny model): everything
            sections += [("one_call_attention", one_call_attention), ("many_sessions", probes.many_sessions),
                         ("fidelity", probes.fidelity),
                         ("memory", probes.memory_faults)]
        for name, fn in sections:
            report.section(where, spec, name, fn, lm)
        del lm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report.write()
    report.say("done", f"report in {report.path}", f"{report.data['elapsed_s']} s, "
               f"{len(report.data['errors'])} errors, {len(report.data['skipped'])} skipped")
    return report.data


def add_arguments(p) -> None:
    add_dataclass_arguments(p, GpuCheckConfig)


def run(args) -> int:
    cfg = dataclass_from_args(GpuCheckConfig, args)
    if not cfg.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("vl3live gpu-check: no CUDA device here (it measures what only a GPU can show); "
                  "--cpu-smoke runs every part on the tiny model on this CPU", file=sys.stderr)
            return 2
    data = run_check(cfg)
    return 1 if data["errors"] else 0

"""The measurements of ``vl3live gpu-check`` (``vl3live/gpu_check.py`` runs them and writes the report).

Each probe takes a loaded model and a :class:`~vl3live.gpu_check.Plan` (sizes and counts) and returns
one JSON-able dict. On a CPU (``--cpu-smoke``) the same code runs on the tiny model, so the command
cannot rot where CI has no GPU; figures that only a GPU has (kernel time, free device memory) have a
CPU stand-in named in the README.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from model import upstream
from model.checkpoints.synthetic import SyntheticCamera
from model.config import BudgetConfig, SessionConfig
from model.driver import DONE, FORWARD, advance
from model.executor import Executor, Forward
from model.frames import PATCH, FramePreprocessor, stock_clip_pixels
from model.kvpool import KVPool, pool_size
from model.sampling import Sampling
from model.session import StreamSession

from .bench import _ask_timed, _stateless, peak_rss_mb, percentile, sync

QUESTION = "What happened in the video so far?"


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def noise_frames(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Frames DiffFP keeps whole (every token changes): they fill a budget at the full token rate."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory(dev: torch.device) -> dict:
    """Peak device memory since :func:`reset_peak` (GiB; CUDA), or the process's peak RSS (MB; CPU)."""
    if dev.type == "cuda":
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)}
    return {"peak_rss_mb": round(peak_rss_mb(), 1)}


# -- running operations of several sessions together ----------------------------------------------
def _next_forward(op, item: Forward | None) -> Forward | None:
    """Run ``op`` (the one driver, :func:`model.driver.advance`) to its next forward (None: it ended)."""
    while True:
        kind, out = advance(op, item)
        if kind == DONE:
            return None
        if kind == FORWARD:
            return out
        item = None  # a token: nothing to hand back


def lockstep(ops: list, executor: Executor, dev: torch.device) -> list[tuple[float, int, bool]]:
    """Run session operations together, one packed step at a time with every operation's next forward
    (the engine's worker without its token cap): (ms, items, all rows decode) per step."""
    live = {i: w for i, w in ((i, _next_forward(op, None)) for i, op in enumerate(ops)) if w is not None}
    steps = []
    while live:
        items = list(live.values())
        sync(dev)
        t0 = time.perf_counter()
        executor.run(items)
        sync(dev)
        steps.append((_ms(t0), len(items), all(it.kind == "decode" for it in items)))
        for i, it in list(live.items()):
            if it.finished:
                nxt = _next_forward(ops[i], it)
                if nxt is None:
                    del live[i]
                else:
                    live[i] = nxt
    return steps


# -- 1. environment --------------------------------------------------------------------------------
def flash_keywords() -> dict:
    """Whether transformers' flash-attn entry point names the varlen arguments the executor passes.

    It takes ``**kwargs``, so a misspelt name is swallowed and the call attends across sessions."""
    import inspect

    from transformers import modeling_flash_attention_utils as fa

    from model.executor import VARLEN_KEYWORDS

    params = inspect.signature(fa._flash_attention_forward).parameters
    named = {k: k in params for k in VARLEN_KEYWORDS}
    return {"entry_point": "transformers.modeling_flash_attention_utils._flash_attention_forward",
            "keywords": named, "all_named": all(named.values())}


def environment(dev: torch.device) -> dict:
    import importlib.metadata as md

    import transformers

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None
    out = {"device": dev.type, "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "flash_attn": version("flash-attn"),
           "bitsandbytes": version("bitsandbytes"), "cuda": torch.version.cuda}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_gib=round(total / 2**30, 2),
                   gpu_free_gib=round(free / 2**30, 2), capability=f"{props.major}.{props.minor}",
                   sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                   sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())
    else:
        import platform

        out.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    out["flash_varlen"] = flash_keywords()
    return out


def attention_paths(lm, plan, say) -> dict:
    """The attention each path picked: the model's layers (stock ``generate``), the vision tower, and
    the engine's packed steps."""
    out = {"model": lm.attn, "vision": getattr(lm.model.config.vision_config, "_attn_implementation", None),
            "engine_step": Executor(lm).attention, "stock_generate": lm.attn}
    say("environment", "attention: model / vision / engine step", f"{out['model']} / {out['vision']} / "
        f"{out['engine_step']}")
    return out


# -- 2. one session --------------------------------------------------------------------------------
def single_session(lm, plan, say: Callable[[str, str, object], None]) -> dict:
    """Per-frame ingest, TTFT at each of ``plan.ttft_frames`` and at a full budget, decode tokens/s, peak
    memory; the stock ``generate`` path on the same clip at each frame count."""
    dev, h, w = lm.device, plan.height, plan.width
    fp = h * w
    cfg = SessionConfig(frame_pixels=fp, budget=BudgetConfig(max_tokens=None))
    cam = SyntheticCamera(h, w)
    n = max(plan.ttft_frames)
    frames = [cam.frame(float(i)) for i in range(n)]
    warm = StreamSession(lm, cfg)  # kernels, allocator, tokenizer caches
    wmasks = [torch.from_numpy(warm.add_frame(frames[i], float(i)).keep_mask.reshape(-1)) for i in range(2)]
    _stateless(lm, frames[:2], _ask_timed(warm, QUESTION, 2)[2], wmasks, fp, 2)
    warm.close()
    reset_peak(dev)
    s = StreamSession(lm, cfg)
    ingest, masks, points = [], [], []
    for i, f in enumerate(frames):
        sync(dev)
        t0 = time.perf_counter()
        r = s.add_frame(f, float(i))
        sync(dev)
        ingest.append(_ms(t0))
        masks.append(torch.from_numpy(r.keep_mask.reshape(-1)))
        k = i + 1
        if k not in plan.ttft_frames:
            continue
        ttft, rate, prompt = _ask_timed(s, QUESTION, plan.decode_tokens)
        ttfts = [ttft * 1e3] + [_ask_timed(s, QUESTION, 2)[0] * 1e3 for _ in range(plan.repeats - 1)]
        st_ttft, st_rate = _stateless(lm, frames[:k], prompt, masks[:k], fp, plan.decode_tokens)
        p = {"frames": k, "prompt_tokens": len(prompt), "ttft_ms": round(statistics.median(ttfts), 2),
             "ttft_stock_ms": round(st_ttft * 1e3, 2), "decode_tok_s": round(rate, 2),
             "decode_tok_s_stock": round(st_rate, 2)}
        p["ttft_ratio"] = round(p["ttft_stock_ms"] / max(p["ttft_ms"], 1e-9), 2)
        p["decode_ratio"] = round(p["decode_tok_s"] / max(p["decode_tok_s_stock"], 1e-9), 3)
        points.append(p)
        say("one session", f"{k} frames ({len(prompt)} tok): TTFT / stock", f"{p['ttft_ms']:.1f} / "
            f"{p['ttft_stock_ms']:.1f} ms; decode {p['decode_tok_s']:.1f} / {p['decode_tok_s_stock']:.1f} tok/s")
    out = {"frame_size": [h, w], "frames": n, "ingest_ms_p50": percentile(ingest, 50),
           "ingest_ms_p99": percentile(ingest, 99), "decode_tokens": plan.decode_tokens, "points": points,
           "tokens_kept_ratio": round(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 4)}
    say("one session", f"ingest p50 / p99 at {w}x{h}", f"{out['ingest_ms_p50']} / {out['ingest_ms_p99']} ms")
    s.close()
    out["full_budget"] = full_budget(lm, plan, say)
    out.update(peak_memory(dev))
    return out


def full_budget(lm, plan, say) -> dict:
    """Stream frames DiffFP keeps whole until the budget evicts, then ask: TTFT with a full cache."""
    dev, h, w = lm.device, plan.height, plan.width
    s = StreamSession(lm, SessionConfig(frame_pixels=h * w, budget=BudgetConfig(max_tokens=plan.budget_tokens)))
    ingest, evicting, i = [], [], 0
    extra = 0
    rng = np.random.default_rng(7)
    while extra < 10 and i < 10_000:  # ten frames more once it evicts
        f = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sync(dev)
        t0 = time.perf_counter()
        s.add_frame(f, float(i))
        sync(dev)
        (evicting if s.evicted_frames else ingest).append(_ms(t0))
        extra += bool(s.evicted_frames)
        i += 1
    cache = s.cache_len
    ttfts = [_ask_timed(s, QUESTION, 2)[0] * 1e3 for _ in range(plan.repeats)]
    out = {"budget_tokens": plan.budget_tokens, "frames": i, "cache_len_at_question": cache,
           "evicted_frames": s.evicted_frames, "ttft_ms": round(statistics.median(ttfts), 2),
           "ingest_ms_p50": percentile(ingest, 50), "ingest_evicting_ms_p50": percentile(evicting, 50),
           "ingest_evicting_ms_p99": percentile(evicting, 99)}
    say("one session", f"full budget ({cache} of {plan.budget_tokens} tok): TTFT",
        f"{out['ttft_ms']:.1f} ms; ingest while evicting p50 {out['ingest_evicting_ms_p50']} ms")
    s.close()
    return out


# -- 3. many sessions ------------------------------------------------------------------------------
def _profile_round(sessions, executor, dev, tokens: int) -> dict:
    """Kernel time over wall time and kernel launches per step, over a short decode round of every session.
    On a CPU: aten op time over wall time and aten op calls per step (its stand-ins)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        steps = lockstep([s.begin_answer(QUESTION, Sampling(max_new_tokens=tokens, ignore_eos=True))
                          for s in sessions], executor, dev)
    decode = [ms for ms, _, d in steps if d] or [ms for ms, _, _ in steps]
    events = prof.events()
    wall_us = sum(decode) * 1e3
    if dev.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        launches = sum(1 for e in events if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
        per_step = len(kernels) / len(steps)
    else:  # the CPU's stand-ins: time inside aten ops (self time, no double counting), aten op calls
        aten = [e for e in events if e.name.startswith("aten::")]
        busy_us = sum(e.self_cpu_time_total for e in aten)
        launches = len(aten)
        per_step = launches / len(steps)
    total_us = sum(ms for ms, _, _ in steps) * 1e3
    return {"steps": len(steps), "busy_share": round(min(1.0, busy_us / max(total_us, 1e-9)), 4),
            "kernels_per_step": round(per_step, 1), "launches_per_step": round(launches / len(steps), 1),
            "profiled_decode_ms": round(wall_us / 1e3 / max(len(decode), 1), 3)}


def many_sessions(lm, plan, say) -> dict:
    """ms per step and answer tokens/s with N sessions all decoding (one packed step each), the GPU-busy
    share and kernel launches of a step, and per-frame latency with N cameras at 1 fps in the engine."""
    dev, h, w = lm.device, plan.height, plan.width
    cfg = SessionConfig(frame_pixels=h * w, budget=BudgetConfig(max_tokens=plan.session_budget, recall="off"))
    nmax = max(plan.sessions)
    page = 16
    pool = KVPool(lm.model.config.text_config, nmax * (plan.session_budget + page), dev, lm.dtype, page)
    executor = Executor(lm)
    cam = SyntheticCamera(h, w)
    frames = [cam.frame(t) for t in range(8)]
    runs = []
    warm = StreamSession(lm, cfg, pool, executor)
    lockstep([warm.begin_frame(frames[0], 0.0)], executor, dev)
    lockstep([warm.begin_answer(QUESTION, Sampling(max_new_tokens=2))], executor, dev)
    warm.close()
    for n in plan.sessions:
        if plan.out_of_time():
            runs.append({"sessions": n, "skipped": "deadline"})
            continue
        sessions = [StreamSession(lm, cfg, pool, executor) for _ in range(n)]
        frame_steps = []
        for a in range(0, n, 8):  # frames eight sessions at a time (a step's vision call stays small)
            frame_steps += lockstep([s.begin_frame(frames[(a + j) % 8], 0.0)
                                     for j, s in enumerate(sessions[a:a + 8])], executor, dev)
        t0 = time.perf_counter()
        steps = lockstep([s.begin_answer(QUESTION, Sampling(max_new_tokens=plan.step_tokens, ignore_eos=True))
                          for s in sessions], executor, dev)
        wall = time.perf_counter() - t0
        decode = [ms for ms, items, d in steps if d and items == n]
        step_ms = statistics.median(decode) if decode else None
        run = {"sessions": n, "decode_step_ms": round(step_ms, 3) if step_ms else None,
               "decode_step_ms_p99": percentile(decode, 99),
               "answer_tok_s": round(n * 1e3 / step_ms, 1) if step_ms else None,
               "answer_tok_s_wall": round(n * plan.step_tokens / wall, 1),
               "frame_step_ms_8": round(statistics.median(ms for ms, _, _ in frame_steps), 2)}
        run.update(_profile_round(sessions, executor, dev, plan.profile_tokens))
        for s in sessions:
            s.close()
        runs.append(run)
        say("many", f"{n} sessions decoding: ms/step, tok/s", f"{run['decode_step_ms']} ms, {run['answer_tok_s']} "
            f"tok/s; busy {run['busy_share']:.0%}, {run['kernels_per_step']:.0f} kernels/step")
    del pool
    streaming = streaming_latency(lm, plan, say)
    return {"session_budget": plan.session_budget, "decode_tokens": plan.step_tokens, "runs": runs,
            "streaming": streaming}


def streaming_latency(lm, plan, say) -> list[dict]:
    """Per-frame latency (arrival to its stats event) with N cameras at 1 fps through the live engine."""
    from streamer.config import EngineConfig
    from streamer.engine import Engine

    from .bench import BenchConfig
    from .bench_sessions import drive_cameras

    nmax = max(plan.sessions)
    bcfg = BenchConfig(height=plan.height, width=plan.width, question=QUESTION, max_new_tokens=8)
    ecfg = EngineConfig(fps=1e6, kv_pool_tokens=nmax * (plan.session_budget + 16))
    scfg = SessionConfig(frame_pixels=plan.height * plan.width,
                         budget=BudgetConfig(max_tokens=plan.session_budget, recall="off"))
    out = []

    async def run_all() -> None:
        async with Engine(lm, ecfg, scfg, nmax) as eng:
            for n in plan.sessions:
                if plan.out_of_time():
                    out.append({"sessions": n, "skipped": "deadline"})
                    continue
                r = await drive_cameras(eng, n, bcfg, plan.stream_seconds, 1.0, asking=False)
                row = {k: r[k] for k in ("sessions", "frames_offered", "frames_processed", "frame_latency_ms_p50",
                                         "frame_latency_ms_p99", "kept_up")}
                out.append(row)
                say("many", f"{n} cameras at 1 fps: frame latency p50 / p99",
                    f"{row['frame_latency_ms_p50']} / {row['frame_latency_ms_p99']} ms")
    asyncio.run(run_all())
    return out


# -- 4. fidelity -----------------------------------------------------------------------------------
def _sig(x: float) -> float:
    """``x`` to three significant digits (differences span 1e-7 in fp32 to 1e-1 in bf16)."""
    return float(f"{x:.3g}")


def _logit_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    diff = (a - b).abs().max().item()
    top_a, top_b = set(a.topk(5).indices.tolist()), set(b.topk(5).indices.tolist())
    return {"max_abs": _sig(diff), "relative": _sig(diff / max(b.abs().max().item(), 1e-9)),
            "argmax_equal": int(a.argmax()) == int(b.argmax()), "top5_overlap": len(top_a & top_b)}


def streamed_vs_offline(lm, plan) -> dict:
    """The first answer token's logits, streamed frame by frame vs one offline forward of the same clip."""
    fp = plan.height * plan.width
    s = StreamSession(lm, SessionConfig(frame_pixels=fp, budget=BudgetConfig(max_tokens=None)))
    cam = SyntheticCamera(plan.height, plan.width, seed=3)
    frames = [cam.frame(float(i)) for i in range(plan.fidelity_frames)]
    masks = [torch.from_numpy(s.add_frame(f, float(i)).keep_mask.reshape(-1)) for i, f in enumerate(frames)]
    gen = s.ask(QUESTION, Sampling(max_new_tokens=2))
    next(gen)
    ids, streamed = s.token_ids(), s.next_logits()
    gen.close()
    s.close()
    pix = stock_clip_pixels(lm.processor, frames, fp)
    dev = lm.device
    with torch.inference_mode():
        offline = lm.model(input_ids=torch.tensor([ids], device=dev),
                           pixel_values_videos=pix["pixel_values_videos"].to(dev, lm.dtype),
                           video_grid_thw=pix["video_grid_thw"].to(dev), video_merge_sizes=pix["video_merge_sizes"].to(dev),
                           video_compression_mask=torch.cat(masks).to(dev)).logits[0, -1]
    return {"frames": len(frames), "tokens": len(ids), **_logit_diff(streamed, offline)}


def batched_vs_alone(lm, plan) -> dict:
    """Two sessions' first answer logits from one packed step vs each alone: a varlen call that attends
    across sessions (a misnamed keyword) shows here."""
    dev = lm.device
    cfg = SessionConfig(frame_pixels=plan.height * plan.width, budget=BudgetConfig(max_tokens=4096, recall="off"))
    executor = Executor(lm)
    pool = KVPool(lm.model.config.text_config, 2 * (4096 + 16), dev, lm.dtype)
    logits = {}
    for packed in (True, False):
        sessions = [StreamSession(lm, cfg, pool, executor) for _ in range(2)]
        for j, s in enumerate(sessions):
            cam = SyntheticCamera(plan.height, plan.width, seed=10 + j)
            for i in range(3):
                s.add_frame(cam.frame(float(i) * 7), float(i))
        for s in sessions:
            s.logit_log = []  # each answer token's logits
        ops = [s.begin_answer(QUESTION, Sampling(max_new_tokens=2, ignore_eos=True)) for s in sessions]
        if packed:
            lockstep(ops, executor, dev)
        else:
            for op in ops:
                lockstep([op], executor, dev)
        logits[packed] = [torch.stack(s.logit_log) for s in sessions]  # the prefill's and one decode step's
        for s in sessions:
            s.close()
    diffs = [_logit_diff(x, y) for a, b in zip(logits[True], logits[False]) for x, y in zip(a, b)]
    return {"attention": executor.attention, "max_abs": max(d["max_abs"] for d in diffs),
            "argmax_equal": all(d["argmax_equal"] for d in diffs)}


def eviction_drift(lm, plan) -> dict:
    """Keys after ``plan.evictions`` evictions (each moved key re-rotated and rounded again in place)
    against the keys a fresh prefill of the same tokens holds: the same key projections rotated once, by
    the stock layers' RoPE, at the positions the tokens have now; and the next-token logits through
    either cache. The same once the budget is 60 % full with nothing evicted yet, as the baseline."""
    h, w = plan.height, plan.width
    decoder = upstream.text_model(lm.model)
    layers = decoder.layers
    proj: list[tuple[list, list]] = [([], []) for _ in layers]  # per layer: key and value projections
    capturing = [True]

    def hook(store: list):
        return lambda _m, _i, out: store.append(out[0].detach().clone()) if capturing[0] else None
    hooks = [m.register_forward_hook(hook(store)) for layer, pair in zip(layers, proj)
             for m, store in ((layer.self_attn.k_proj, pair[0]), (layer.self_attn.v_proj, pair[1]))]
    try:
        budget = BudgetConfig(max_tokens=plan.eviction_budget, recall="off")
        s = StreamSession(lm, SessionConfig(frame_pixels=h * w, budget=budget))
        origin = list(range(s.cache_len))  # each cache position's row among those forwarded
        total, events, baseline, i = s.cache_len, 0, None, 0
        rng = np.random.default_rng(11)
        while events < plan.evictions:
            if baseline is None and not s.evicted_frames and s.cache_len > 0.6 * plan.eviction_budget:
                capturing[0] = False
                baseline = _against_fresh(lm, decoder, s, proj, origin)
                capturing[0] = True
            owners = s.token_units()
            r = s.add_frame(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), float(i))
            i += 1
            if r.evicted_frames:
                events += 1
                remaining = set(s.token_units())
                origin = [o for o, u in zip(origin, owners) if u in remaining]
            added = r.cache_len - len(origin)
            origin += list(range(total, total + added))
            total += added
            if sum(x.shape[0] for x in proj[0][0]) != total:
                raise RuntimeError("eviction probe: the rows forwarded and the cache do not add up")
        capturing[0] = False
        after = _against_fresh(lm, decoder, s, proj, origin)
    finally:
        for hk in hooks:
            hk.remove()
    s.close()
    return {"evictions": events, "frames": i, "cache_len": len(origin), "budget_tokens": plan.eviction_budget,
            "no_eviction": baseline, "after": after}


def _against_fresh(lm, decoder, s, proj, origin: list[int]) -> dict:
    """The session's cached keys vs its tokens' key projections rotated once at positions 0..n-1 (what a
    fresh prefill caches), and the logits of one more token through each cache."""
    from transformers import DynamicCache
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    n, dev = len(origin), lm.device
    pos = torch.arange(n, device=dev)[None]
    idx = torch.tensor(origin, device=dev)
    tc = decoder.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    ours, fresh = DynamicCache(config=tc), DynamicCache(config=tc)
    key_err = val_err = 0.0
    with torch.inference_mode():
        for layer, (ks, vs) in enumerate(proj):
            raw_k = torch.cat(ks)[idx].view(1, n, -1, head_dim).transpose(1, 2)  # (1, kv_heads, n, head_dim)
            raw_v = torch.cat(vs)[idx].view(1, n, -1, head_dim).transpose(1, 2)
            cos, sin = decoder.rotary_emb(raw_k, pos)
            ref_k, _ = apply_rotary_pos_emb(raw_k, raw_k, cos, sin)
            got_k, got_v = s.cached_kv(layer)
            key_err = max(key_err, ((got_k.float() - ref_k.float()).norm() / ref_k.float().norm()).item())
            val_err = max(val_err, (got_v.float() - raw_v.float()).abs().max().item())
            ours.update(got_k, got_v, layer)
            fresh.update(ref_k, raw_v, layer)
        probe = lm.model.get_input_embeddings()(torch.tensor([[lm.tokenizer.convert_tokens_to_ids("<|im_start|>")]], device=dev))
        logits = []
        for cache in (ours, fresh):
            out = decoder(inputs_embeds=probe, position_ids=torch.tensor([[n]], device=dev), use_cache=True,
                          **{upstream.cache_keyword(decoder): cache})
            logits.append(upstream.lm_head(lm.model)(out.last_hidden_state[0, -1]))
    res = {"tokens": n, "key_rel_err": _sig(key_err), "value_max_abs": _sig(val_err)}
    res.update({f"logits_{k}": v for k, v in _logit_diff(*logits).items()})
    return res


def resize_vs_cpu(lm, plan) -> dict:
    """The preprocessing on the model's device against the CPU path: max grey-level difference."""
    cases = {"4k_to_frame": (2160, 3840, plan.height * plan.width), "extreme_downscale": (2160, 3840, 28 * 28 * 2)}
    if plan.smoke:  # the tiny run: a smaller source, the same two ratios' spirit
        cases = {"4k_to_frame": (540, 960, plan.height * plan.width), "extreme_downscale": (540, 960, 28 * 28 * 2)}
    out = {}
    for name, (sh, sw, pixels) in cases.items():
        frame = SyntheticCamera(sh, sw, seed=5).frame(3.0)
        here, cpu = FramePreprocessor(pixels, device=lm.device)(frame), FramePreprocessor(pixels, device="cpu")(frame)
        std = FramePreprocessor(pixels).std.view(3, 1).expand(3, PATCH * PATCH).reshape(-1)  # per patch element
        grey = (here.pixel_values.float().cpu() - cpu.pixel_values).abs() * std
        out[name] = {"source": [sh, sw], "size": list(cpu.size), "max_grey_diff": round(grey.max().item(), 4),
                     "mean_grey_diff": round(grey.mean().item(), 5)}
    return out


def fidelity(lm, plan, say) -> dict:
    out = {"streamed_vs_offline": streamed_vs_offline(lm, plan)}
    d = out["streamed_vs_offline"]
    say("fidelity", "streamed vs offline logits", f"max {d['max_abs']} (rel {d['relative']}), argmax "
        f"{'same' if d['argmax_equal'] else 'DIFFERS'}")
    out["batched_vs_alone"] = b = batched_vs_alone(lm, plan)
    say("fidelity", f"packed vs alone ({b['attention']})", f"max {b['max_abs']}, argmax "
        f"{'same' if b['argmax_equal'] else 'DIFFERS'}")
    out["eviction"] = e = eviction_drift(lm, plan)
    say("fidelity", f"after {e['evictions']} evictions vs fresh prefill",
        f"keys rel {e['after']['key_rel_err']} (no eviction {e['no_eviction']['key_rel_err']}), "
        f"logits max {e['after']['logits_max_abs']}")
    out["resize"] = r = resize_vs_cpu(lm, plan)
    say("fidelity", "device resize vs CPU (grey levels)",
        ", ".join(f"{k} {v['max_grey_diff']}" for k, v in r.items()))
    return out


# -- 5. memory and faults --------------------------------------------------------------------------
def pool_sizing(lm, plan) -> dict:
    """The KV pool the engine would allocate by default, and what it took from free memory."""
    import gc

    from streamer.config import EngineConfig

    dev, defaults = lm.device, EngineConfig()  # the engine's own defaults: what `vl3live serve` would take
    page = defaults.kv_page_tokens
    tokens, _ = pool_size(lm, plan.budget_tokens, plan.pool_sessions, page, defaults.kv_pool_memory)
    free0 = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    t0 = time.perf_counter()
    pool = KVPool(lm.model.config.text_config, tokens, dev, lm.dtype, page)
    sync(dev)
    out = {"tokens": pool.tokens, "gib": round(pool.nbytes / 2**30, 3), "bytes_per_token": pool.bytes_per_token,
           "sessions_at_budget": pool.tokens // (plan.budget_tokens + page), "budget_tokens": plan.budget_tokens,
           "alloc_ms": round(_ms(t0), 1)}
    if free0 is not None:
        free1 = torch.cuda.mem_get_info(dev)[0]
        out.update(free_before_gib=round(free0 / 2**30, 2), free_after_gib=round(free1 / 2**30, 2),
                   took_share_of_free=round((free0 - free1) / free0, 4))
    del pool
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def memory_faults(lm, plan, say) -> dict:
    out = {"pool": pool_sizing(lm, plan)}
    p = out["pool"]
    say("memory", "default KV pool", f"{p['tokens']} tokens = {p['gib']} GiB, {p['sessions_at_budget']} sessions "
        f"at {p['budget_tokens']}")
    out["oom"] = o = oom_in_one_session(lm, plan)
    say("memory", f"OOM in one session ({o['mode']}) while {o['others']} run",
        f"victim error {o['victim_error']!r}; others went on: {o['others_went_on']}; victim recovered: "
        f"{o['victim_recovered']}")
    return out


def oom_in_one_session(lm, plan) -> dict:
    """A frame too big for the memory left, in one session of the live engine while others stream and
    answer: does its error stay its own, and does the session take frames again after?

    On CUDA the memory runs out for real (a hog leaves ``plan.oom_headroom_mib`` free and the victim sends
    a 4K frame at a 4K pixel budget); on a CPU an out-of-memory error is raised in the vision tower for
    the victim's frame (the same error type, the same path through the engine)."""
    from streamer.config import EngineConfig
    from streamer.engine import Engine
    from streamer.events import Error, FrameStats, ResponseDone
    from streamer.sources import Frame

    dev, h, w = lm.device, plan.height, plan.width
    big = (2160, 3840) if not plan.smoke else (448, 448)
    others = 4
    budget, vbudget = (plan.session_budget, 24576) if not plan.smoke else (plan.session_budget, 1200)
    scfg = SessionConfig(frame_pixels=h * w, budget=BudgetConfig(max_tokens=budget, recall="off"))
    vcfg = SessionConfig(frame_pixels=big[0] * big[1], budget=BudgetConfig(max_tokens=vbudget, recall="off"))
    ecfg = EngineConfig(fps=1e6, kv_pool_tokens=others * (budget + 16) + vbudget + 16)
    cams = [SyntheticCamera(h, w, seed=20 + j) for j in range(others)]
    big_frame = SyntheticCamera(*big, seed=30).frame(1.0)
    big_patches = (big[0] // 28 * 2) * (big[1] // 28 * 2) // 2  # fewer patches than the big frame makes
    result = {"mode": "real" if dev.type == "cuda" else "injected", "others": others}

    def inject(_m, args, kwargs):
        pix = kwargs.get("pixel_values") if kwargs else (args[0] if args else None)
        if pix is not None and pix.shape[0] >= big_patches:
            raise torch.OutOfMemoryError("injected: CUDA out of memory (vl3live gpu-check --cpu-smoke)")

    async def scenario() -> None:
        async with Engine(lm, ecfg, scfg, others + 1) as eng:
            sessions = [await eng.open_session() for _ in range(others)]
            victim = await eng.open_session(session_config=vcfg)
            seen: dict[str, list] = {}
            eng.bus.observe(lambda ev: seen.setdefault(ev.session, []).append(ev))
            for k in range(2):
                for j, s in enumerate(sessions):
                    eng.push_frame(s, Frame(float(k), cams[j].frame(float(k))))
            eng.push_frame(victim, Frame(0.0, cams[0].frame(0.0)))
            for s in sessions + [victim]:
                await eng.settled(s, timeout=300)
            hog, hook = None, None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info(dev)[0]
                hog = torch.empty(max(0, free - plan.oom_headroom_mib * 2**20), dtype=torch.uint8, device=dev)
            else:
                vision = lm.model.model.vision_model
                hook = vision.register_forward_pre_hook(inject, with_kwargs=True)
            try:
                mark = {sid: len(v) for sid, v in seen.items()}
                eng.push_frame(victim, Frame(1.0, big_frame))  # in the same steps as the others' work
                eng.ask(sessions[0], QUESTION, Sampling(max_new_tokens=4))
                for k in range(2, 4):
                    for j, s in enumerate(sessions):
                        eng.push_frame(s, Frame(float(k), cams[j].frame(float(k))))
                    for s in sessions + [victim]:
                        await eng.settled(s, timeout=300)
            finally:
                del hog
                if hook is not None:
                    hook.remove()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            new = {sid: seen.get(sid, [])[mark.get(sid, 0):] for sid in [s.id for s in sessions] + [victim.id]}
            errs = [ev for ev in new[victim.id] if isinstance(ev, Error)]
            result["victim_error"] = errs[0].message[:160] if errs else None
            result["victim_error_code"] = errs[0].code if errs else None
            result["oom_raised"] = bool(errs) and "out of memory" in errs[0].message.lower()
            result["others_frames_after"] = sum(isinstance(ev, FrameStats) for s in sessions for ev in new[s.id])
            result["others_answered"] = any(isinstance(ev, ResponseDone) for ev in new[sessions[0].id])
            result["others_errors"] = sum(isinstance(ev, Error) for s in sessions for ev in new[s.id])
            result["others_went_on"] = result["others_frames_after"] == 2 * others and result["others_answered"] \
                and result["others_errors"] == 0
            mark = len(seen.get(victim.id, []))
            eng.push_frame(victim, Frame(2.0, cams[0].frame(2.0)))
            await eng.settled(victim, timeout=300)
            result["victim_recovered"] = any(isinstance(ev, FrameStats) for ev in seen[victim.id][mark:])
            result["engine_alive"] = eng.alive
    asyncio.run(scenario())
    return result

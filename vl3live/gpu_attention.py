"""``vl3live gpu-check``'s attention rows: the one-call-per-layer path against the per-session reference.

On the same pool state, N sessions each with a history of keys, one decode step of every session is run
with ``segments`` (SDPA per session: the reference) and with the path that attends once per layer for the
whole step (``paged`` on CUDA, ``flex`` on CPU): the largest logit difference, whether the greedy tokens
agree, and the step's time on each (median of a few). The steps are probes (they keep nothing), so both
paths see exactly the same cache. Decode as a CUDA graph is not built yet: the report says so.
"""

from __future__ import annotations

import statistics
import time

import torch

from model.attention import PAGED_PAGE
from model.executor import Executor, Forward
from model.kvpool import KVPool

from .bench import sync


def one_call_attention(lm, plan, say) -> dict:
    dev = lm.device
    path = "paged" if dev.type == "cuda" else "flex"
    tc = lm.model.config.text_config
    history = max(16, plan.session_budget // 2)
    budget = -(-(history + 16) // PAGED_PAGE) * PAGED_PAGE
    emb = lm.model.get_input_embeddings()
    executors = {mode: Executor(lm, attention=mode) for mode in ("segments", path)}
    runs = []
    for n in plan.sessions:
        if plan.out_of_time(20):
            runs.append({"sessions": n, "skipped": "deadline"})
            continue
        pool = KVPool(tc, n * budget, dev, lm.dtype, page_size=PAGED_PAGE)
        executors[path].warm_up(pool)
        seqs = [pool.open(budget) for _ in range(n)]
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(100, 5000, (n, history), generator=gen)
        executors["segments"].run([Forward(q, history, lambda _, x=x: emb(x.to(dev))) for q, x in zip(seqs, ids)])
        out, times = {}, {}
        for mode, ex in executors.items():
            samples = []
            for _ in range(plan.repeats + 1):
                items = [Forward(q, 1, lambda _, k=k: emb(torch.tensor([17 + k], device=dev)), kind="decode",
                                 probe=True) for k, q in enumerate(seqs)]
                sync(dev)
                t0 = time.perf_counter()
                ex.run(items)
                sync(dev)
                samples.append((time.perf_counter() - t0) * 1e3)
                errors = [it.error for it in items if it.error is not None]
                if errors:
                    raise errors[0]
            out[mode] = torch.stack([it.out_logits.float() for it in items])
            times[mode] = round(statistics.median(samples[1:]), 3)  # (the first: warm-up)
        diff = float((out[path] - out["segments"]).abs().max())
        run = {"sessions": n, "history_tokens": history, "step_ms": times,
               "speedup": round(times["segments"] / times[path], 3) if times[path] else None,
               "max_abs_logit_diff": diff,
               "greedy_equal": bool(torch.equal(out[path].argmax(-1), out["segments"].argmax(-1)))}
        runs.append(run)
        say("attention", f"{n} sessions decoding: {path} vs segments", f"{times[path]} / {times['segments']} ms, "
            f"max |dlogit| {diff:.2e}, greedy equal {run['greedy_equal']}")
        del pool
    return {"path": path, "reference": "segments", "runs": runs, "cuda_graphs": "not built yet"}

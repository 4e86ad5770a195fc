"""``vl3live bench --cluster local:W --sessions N``: the engine on Ray workers against the in-process engine,
in the same run.

Runs on the same model and inputs, each ``--seconds`` of wall time: the in-process engine (the core in a
thread), then a local Ray cluster with 1 worker and, for W > 1, with W workers (each a Ray actor that
loads the model itself), behind the same client a front door uses. Three loads each, as in
``--sessions``: ``frames`` (every camera floods at ``--flood-fps``), ``answers`` (cameras at ``--fps``,
every session asks again as soon as its answer ends) and ``paced`` (cameras at ``--fps``, no
questions: what the transport adds to a frame). Reports aggregate frames/s and answer tokens/s, TTFT
p50/p99 and frame latency per run, what Ray adds per frame and per answer token (1 worker against the
in-process engine), and the throughput of W workers over 1.
"""

from __future__ import annotations

import asyncio
import dataclasses

from model.config import ModelConfig

from .bench import BenchConfig, device_name
from .bench_sessions import drive_cameras
from .config import Config

LOADS = ("frames", "answers", "paced")


async def _run(eng, n: int, cfg: BenchConfig, load: str) -> dict:
    async with eng:
        if load == "frames":
            return await drive_cameras(eng, n, cfg, cfg.seconds, cfg.flood_fps, False, asking=False)
        if load == "answers":
            return await drive_cameras(eng, n, cfg, cfg.seconds, cfg.fps, True, asking=True)
        return await drive_cameras(eng, n, cfg, cfg.seconds, cfg.fps, False, asking=False)


def run_cluster_bench(cfg: BenchConfig, config: Config, progress=None) -> dict:
    """The ``--cluster`` benchmark (module doc); one JSON-able dict."""
    import torch

    from model.checkpoints.loading import load_model
    from streamer.cluster.config import check_address, local_workers
    from streamer.cluster.door import ClusterEngine
    from streamer.engine import Engine

    say = progress or (lambda _msg: None)
    workers = local_workers(check_address(cfg.cluster))
    if not workers:
        raise ValueError("bench --cluster takes local:W (it starts its own Ray cluster to compare with)")
    n = cfg.sessions
    spec = f"random-{cfg.size}" if cfg.size else cfg.model
    say(f"bench: loading {spec} ...")
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, attn=cfg.attn, quant=cfg.quant)
    engine_cfg = dataclasses.replace(config.engine, fps=1e6)
    model = ModelConfig(spec=lm.spec, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
                        attn=cfg.attn, quant=cfg.quant)
    out: dict = {"model": spec, "device": device_name(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
                 "sessions": n, "fps": cfg.fps, "flood_fps": cfg.flood_fps, "seconds": cfg.seconds,
                 "max_new_tokens": cfg.max_new_tokens, "workers": workers, "torch": torch.__version__}
    setups = [("in_process", None)] + [(f"ray_{w}", w) for w in sorted({1, workers})]
    for name, w in setups:
        for load in LOADS:
            say(f"bench: {n} sessions, {load}-bound, {'the core in a thread' if w is None else f'{w} Ray worker(s)'}, "
                f"{cfg.seconds:g} s ...")
            if w is None:
                eng = Engine(lm, engine_cfg, config.session, max(n, config.server.max_sessions))
            else:
                cluster = dataclasses.replace(config.cluster, address=f"local:{w}")
                eng = ClusterEngine(cluster, engine_cfg, config.session, max(n, config.server.max_sessions),
                                    model=model)
            out.setdefault(name, {})[load] = asyncio.run(_run(eng, n, cfg, load))
    local, one, many = out["in_process"], out["ray_1"], out[f"ray_{workers}"]

    def added(load: str, key: str) -> float | None:
        x, y = one[load][key], local[load][key]
        return round(x - y, 3) if x is not None and y is not None else None

    def ratio(a: dict, b: dict, load: str, key: str) -> float | None:
        x, y = a[load][key], b[load][key]
        return round(x / y, 3) if x and y else None
    out["ray_adds_ms"] = {"per_frame_latency_p50": added("paced", "frame_latency_ms_p50"),
                          "per_frame_latency_p50_flooded": added("frames", "frame_latency_ms_p50"),
                          "per_answer_token_p50": added("answers", "token_interval_ms_p50"),
                          "ttft_p50": added("answers", "ttft_ms_p50")}
    out["ratios"] = {"ray_1_over_in_process": {"frames_per_s": ratio(one, local, "frames", "frames_per_s"),
                                               "answer_tokens_per_s": ratio(one, local, "answers",
                                                                            "answer_tokens_per_s")},
                     f"ray_{workers}_over_ray_1": {"frames_per_s": ratio(many, one, "frames", "frames_per_s"),
                                                   "answer_tokens_per_s": ratio(many, one, "answers",
                                                                                "answer_tokens_per_s")}}
    return out

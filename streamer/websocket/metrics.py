"""Prometheus metrics of the websocket server (``GET /metrics``), from engine events and server counters.

Each server has its own registry (so several can run in one process). Gauges and the frame
counts are read at scrape time (the engine's totals, taken under its lock, so
``accepted = sampled_out + dropped + processed + refused + pending`` holds in every scrape);
the other counters and the histograms are fed by the event bus as events happen.
"""

from __future__ import annotations

import dataclasses
from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streamer.engine import EngineStats, SessionHandle
from streamer.events import Error, Event, FrameCounts, FrameStats, ResponseDone

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _SessionGauges(Collector):
    def __init__(self, sessions: Callable[[], list[tuple[SessionHandle, bool]]]):
        self._sessions = sessions

    def collect(self):
        pairs = self._sessions()
        sessions = GaugeMetricFamily("vl3live_sessions", "sessions by state", labels=["state"])
        sessions.add_metric(["connected"], sum(1 for _, connected in pairs if connected))
        sessions.add_metric(["detached"], sum(1 for _, connected in pairs if not connected))
        fps = GaugeMetricFamily("vl3live_fps", "frames per second over all sessions", labels=["stage"])
        fps.add_metric(["in"], sum(session.counts.fps_in for session, _ in pairs))
        fps.add_metric(["processed"], sum(session.counts.fps_processed for session, _ in pairs))
        cache = GaugeMetricFamily("vl3live_cache_tokens", "KV cache tokens over all sessions")
        cache.add_metric([], sum(session.state.cache_len for session, _ in pairs))
        waiting = GaugeMetricFamily("vl3live_questions_waiting", "questions queued over all sessions")
        waiting.add_metric([], sum(session.counts.questions_waiting for session, _ in pairs))
        return [sessions, fps, cache, waiting]


SERVER_FRAME_OUTCOMES = ("received", "rate_dropped", "rejected")  # counted by the server, before the engine
ENGINE_FRAME_COUNTS = ("accepted", "source_frames", "sampled_out", "dropped", "processed", "refused")


class _FrameCounts(Collector):
    def __init__(self, engine_counts: Callable[[], FrameCounts], server_counts: Tally):
        self._engine, self._server = engine_counts, server_counts

    def collect(self):
        engine = self._engine()
        frames = CounterMetricFamily("vl3live_frames", "frames by outcome: received (from clients) = accepted - "
                                     "source_frames + rate_dropped + rejected; accepted = sampled_out + dropped + "
                                     "processed + refused + pending", labels=["outcome"])
        for name in SERVER_FRAME_OUTCOMES:
            frames.add_metric([name], self._server[name])
        for name in ENGINE_FRAME_COUNTS:
            frames.add_metric([name], getattr(engine, name))
        pending = GaugeMetricFamily("vl3live_frames_pending", "accepted frames without an outcome yet (in a "
                                    "session's latest-frame slot or inside a model step)")
        pending.add_metric([], engine.pending)
        return [frames, pending]


class _PoolGauges(Collector):
    """The engine's KV pool (sizes and use) and its steps, read at scrape time."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self._stats = engine_stats

    def collect(self):
        stats = self._stats()
        st = dataclasses.asdict(stats.pool) if stats.pool is not None else {}
        docs = {"pool_tokens": "KV pool size in tokens (all sessions share it)",
                "bytes_per_token": "KV bytes per cached token (keys and values, all layers)",
                "pool_bytes": "KV pool size in bytes", "page_tokens": "tokens per KV page",
                "pages_total": "KV pages in the pool", "tokens_used": "KV slots holding tokens now",
                "pages_reserved": "KV pages reserved by admitted sessions' budgets",
                "sessions": "sessions holding a reservation in the KV pool"}
        out = []
        for key, doc in docs.items():
            if key in st:
                g = GaugeMetricFamily(f"vl3live_kv_{key}", doc)
                g.add_metric([], st[key])
                out.append(g)
        for key, doc in (("steps", "packed model steps run"), ("step_items", "session forwards run in steps")):
            c = CounterMetricFamily(f"vl3live_engine_{key}", doc)
            c.add_metric([], getattr(stats, key))
            out.append(c)
        return out


class _WorkerGauges(Collector):
    """Each worker of a cluster (none for a local engine), labelled by its name: up, sessions, KV pool, frames."""

    def __init__(self, workers: Callable[[], list[dict]]):
        self._workers = workers

    def collect(self):
        workers = self._workers()
        if not workers:
            return []
        up = GaugeMetricFamily("vl3live_worker_up", "1 while the worker runs", labels=["worker"])
        sessions = GaugeMetricFamily("vl3live_worker_sessions", "sessions on the worker", labels=["worker"])
        pool = GaugeMetricFamily("vl3live_worker_kv_tokens", "the worker's KV pool in tokens: size, reserved by "
                                 "sessions' budgets, holding tokens", labels=["worker", "state"])
        frames = CounterMetricFamily("vl3live_worker_frames", "frames by outcome on the worker",
                                     labels=["worker", "outcome"])
        steps = CounterMetricFamily("vl3live_worker_steps", "packed model steps the worker ran", labels=["worker"])
        for w in workers:
            name = w["name"]
            up.add_metric([name], 1.0 if w["alive"] else 0.0)
            sessions.add_metric([name], w["sessions"])
            p = w["pool"]
            if p is not None:
                pool.add_metric([name, "size"], p.pool_tokens)
                pool.add_metric([name, "reserved"], p.pages_reserved * p.page_tokens)
                pool.add_metric([name, "used"], p.tokens_used)
            for outcome in ENGINE_FRAME_COUNTS:
                frames.add_metric([name, outcome], getattr(w["frames"], outcome))
            steps.add_metric([name], w["steps"])
        return [up, sessions, pool, frames, steps]


class Metrics:
    """The server's Prometheus metrics (``GET /metrics``): sessions, frames by outcome, errors, latencies,
    the KV pool."""

    def __init__(self, sessions: Callable[[], list[tuple[SessionHandle, bool]]],
                 frame_counts: Callable[[], FrameCounts], engine_stats: Callable[[], EngineStats] | None = None,
                 workers: Callable[[], list[dict]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("vl3live_connections", "websocket connections accepted", registry=r)
        self.frames = Tally()  # the server's own frame outcomes (SERVER_FRAME_OUTCOMES)
        self.handshakes_refused = Counter("vl3live_handshakes_refused", "websocket handshakes refused, by reason",
                                          ["reason"], registry=r)
        self.errors = Counter("vl3live_errors", "error events sent, by code", ["code"], registry=r)
        self.responses = Counter("vl3live_responses", "answers finished", ["kind"], registry=r)
        self.frame_latency = Histogram("vl3live_frame_latency_seconds", "frame arrival to in the KV cache",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ingest = Histogram("vl3live_frame_ingest_seconds", "model time per frame", buckets=LATENCY_BUCKETS,
                                registry=r)
        self.ttft = Histogram("vl3live_ttft_seconds", "question start to first answer token",
                              buckets=LATENCY_BUCKETS, registry=r)
        r.register(_SessionGauges(sessions))
        r.register(_FrameCounts(frame_counts, self.frames))
        if engine_stats is not None:
            r.register(_PoolGauges(engine_stats))
        if workers is not None:
            r.register(_WorkerGauges(workers))

    def observe(self, ev: Event) -> None:
        """Bus observer: runs on the event loop for every published event."""
        match ev:
            case FrameStats():
                self.frame_latency.observe(ev.latency_ms / 1e3)
                self.ingest.observe(ev.ingest_ms / 1e3)
            case ResponseDone():
                self.responses.labels("proactive" if ev.proactive else "question").inc()
                if ev.ttft_ms is not None:
                    self.ttft.observe(ev.ttft_ms / 1e3)
            case Error():
                self.errors.labels(ev.code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of the websocket server (``GET /metrics``), from engine events and server counters.

Each server has its own registry (so several can run in one process). Gauges are read from the
live sessions at scrape time; counters and histograms are fed by the event bus as events happen.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .bus import Event
from .live import LiveSession

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _SessionGauges(Collector):
    def __init__(self, sessions: Callable[[], list[tuple[LiveSession, bool]]]):
        self._sessions = sessions

    def collect(self):
        pairs = self._sessions()
        sessions = GaugeMetricFamily("vl3live_sessions", "sessions by state", labels=["state"])
        sessions.add_metric(["connected"], sum(1 for _, connected in pairs if connected))
        sessions.add_metric(["detached"], sum(1 for _, connected in pairs if not connected))
        fps = GaugeMetricFamily("vl3live_fps", "frames per second over all sessions", labels=["stage"])
        fps.add_metric(["in"], sum(ls.fps_in.rate() for ls, _ in pairs))
        fps.add_metric(["processed"], sum(ls.fps_processed.rate() for ls, _ in pairs))
        cache = GaugeMetricFamily("vl3live_cache_tokens", "KV cache tokens over all sessions")
        cache.add_metric([], sum(ls.session.cache_len for ls, _ in pairs))
        waiting = GaugeMetricFamily("vl3live_questions_waiting", "questions queued over all sessions")
        waiting.add_metric([], sum(len(ls.questions) for ls, _ in pairs))
        return [sessions, fps, cache, waiting]


class Metrics:
    def __init__(self, sessions: Callable[[], list[tuple[LiveSession, bool]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("vl3live_connections", "websocket connections accepted", registry=r)
        self.frames = Counter("vl3live_frames", "frames by outcome", ["outcome"], registry=r)
        self.errors = Counter("vl3live_errors", "error events sent, by code", ["code"], registry=r)
        self.responses = Counter("vl3live_responses", "answers finished", ["kind"], registry=r)
        self.frame_latency = Histogram("vl3live_frame_latency_seconds", "frame arrival to in the KV cache",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ingest = Histogram("vl3live_frame_ingest_seconds", "model time per frame", buckets=LATENCY_BUCKETS,
                                registry=r)
        self.ttft = Histogram("vl3live_ttft_seconds", "question start to first answer token",
                              buckets=LATENCY_BUCKETS, registry=r)
        r.register(_SessionGauges(sessions))
        self._seen: dict[str, tuple[int, int]] = {}  # session -> (sampled_out, dropped) last seen

    def observe(self, ev: Event) -> None:
        """Bus observer: runs on the event loop for every published event."""
        d = ev.data
        if ev.type == "stats":
            self.frames.labels("processed").inc()
            if d.get("latency_ms") is not None:
                self.frame_latency.observe(d["latency_ms"] / 1e3)
            if d.get("ingest_ms") is not None:
                self.ingest.observe(d["ingest_ms"] / 1e3)
            self._counters(ev.session, d)
        elif ev.type == "response.done":
            self.responses.labels("proactive" if d.get("proactive") else "question").inc()
            if d.get("ttft_ms") is not None:
                self.ttft.observe(d["ttft_ms"] / 1e3)
        elif ev.type == "error":
            self.errors.labels(d.get("code", "internal")).inc()
        elif ev.type == "session.closed":
            self._counters(ev.session, d)
            self._seen.pop(ev.session, None)

    def _counters(self, sid: str, d: dict) -> None:
        sampled, dropped = int(d.get("sampled_out", 0)), int(d.get("dropped", 0))
        old_sampled, old_dropped = self._seen.get(sid, (0, 0))
        self.frames.labels("sampled_out").inc(max(0, sampled - old_sampled))
        self.frames.labels("dropped").inc(max(0, dropped - old_dropped))
        self._seen[sid] = (sampled, dropped)

    def render(self) -> bytes:
        return generate_latest(self.registry)

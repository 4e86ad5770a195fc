"""WebRTC ingest: an aiortc answerer that takes a browser's (or any peer's) video track.

Signaling is plain HTTP on the same server, as in aiortc's examples: the peer POSTs its offer
(``{"sdp": ..., "type": "offer"}``) to ``/offer`` and gets the answer back with the id of the
session its video feeds. ``GET /`` serves a minimal page that sends the browser's camera. No
public STUN server is contacted unless ICE servers are configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .base import FpsSampler, Frame

log = logging.getLogger(__name__)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Live VideoLLaMA3</title></head>
<body><h1>Live VideoLLaMA3</h1><video id="v" autoplay muted playsinline width="320"></video>
<p id="status">starting camera...</p><script>
async function start() {
  const stream = await navigator.mediaDevices.getUserMedia({video: {width: 640, height: 480}});
  document.getElementById("v").srcObject = stream;
  const pc = new RTCPeerConnection({iceServers: ICE_SERVERS});
  stream.getTracks().forEach(t => pc.addTrack(t, stream));
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === "complete") r();
    else pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && r()); });
  const res = await fetch("offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  const answer = await res.json();
  await pc.setRemoteDescription(answer);
  document.getElementById("status").textContent = "streaming to session " + answer.session;
  window.vl3liveSession = answer.session;
}
start().catch(e => document.getElementById("status").textContent = "error: " + e);
</script></body></html>"""


async def track_frames(track: MediaStreamTrack, fps: float | None = None) -> AsyncIterator[Frame]:
    """A received video track as frames, timed by the track's own pts (from its first frame).

    With ``fps``, frames closer than ``1/fps`` to the last one are skipped before RGB conversion.
    """
    first = None
    sampler = FpsSampler(fps) if fps is not None else None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if frame.pts is None or frame.time_base is None:
            continue
        pts = float(frame.pts * frame.time_base)
        first = pts if first is None else first
        t = pts - first
        if sampler is not None and not sampler.accept(t):
            continue
        yield Frame(t, frame.to_ndarray(format="rgb24"))


class WebRTCIngest:
    """The ``/`` page and ``/offer`` endpoint; each peer's video feeds a new engine session."""

    def __init__(self, engine, ice_servers: list[str] | None = None, max_peers: int = 16):
        self.engine = engine
        self.ice_servers = list(ice_servers or [])
        self.max_peers = max_peers
        self.peers: dict[str, RTCPeerConnection] = {}
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_post("/offer", self._offer)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> int:
        """Serve on ``host:port`` (0 = any free port); returns the port."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await asyncio.gather(*(pc.close() for pc in self.peers.values()), return_exceptions=True)
        self.peers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _page(self, request: web.Request) -> web.Response:
        import json

        page = PAGE.replace("ICE_SERVERS", json.dumps([{"urls": u} for u in self.ice_servers]))
        return web.Response(text=page, content_type="text/html")

    async def _offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            offer = RTCSessionDescription(sdp=str(body["sdp"]), type=str(body["type"]))
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad offer: {exc}"}, status=400)
        if offer.type != "offer":
            return web.json_response({"error": "type must be 'offer'"}, status=400)
        if "\nm=video " not in "\n" + offer.sdp.replace("\r\n", "\n"):
            return web.json_response({"error": "the offer has no video to send"}, status=400)
        if len(self.peers) >= self.max_peers:
            return web.json_response({"error": f"{self.max_peers} peers are connected already"}, status=503)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in self.ice_servers]))
        session = await self.engine.open_session()
        self.peers[session.id] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self.engine.attach(session, track_frames(track, session.settings.fps))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):  # the peer left: free its session too
                self.peers.pop(session.id, None)
                await pc.close()
                await self.engine.close_session(session.id)

        try:
            await pc.setRemoteDescription(offer)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # a malformed SDP
            self.peers.pop(session.id, None)
            await pc.close()
            await self.engine.close_session(session.id)
            return web.json_response({"error": f"cannot answer this offer: {exc}"}, status=400)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": session.id})

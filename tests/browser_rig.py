"""A real browser streaming its (fake) camera over WebRTC into the engine; run by tests/test_webrtc.py.

Meant to run inside a loopback-only network namespace (``unshare -n``), so Chromium offers only
127.0.0.1 and nothing leaves the machine. Prints one JSON line with what reached the session and
saves a screenshot of the page to ``argv[1]``.
"""

import asyncio
import json
import sys
import tempfile
import time

import aioice.ice

from model import load_model
from streamer.sources.webrtc import WebRTCIngest
from tests.engines import engine_for
from vl3live.config import Config

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream=fps=30", "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


async def main(screenshot: str) -> dict:
    from playwright.async_api import async_playwright

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # loopback-only host
    cfg = Config()
    cfg.engine.fps = 2.0
    cfg.session.frame_pixels = 28 * 28 * 12
    async with engine_for(load_model("tiny", device="cpu"), cfg) as engine:
        ingest = WebRTCIngest(engine)
        port = await ingest.start("127.0.0.1", 0)
        async with async_playwright() as pw:
            with tempfile.TemporaryDirectory() as profile:
                browser = await pw.chromium.launch_persistent_context(
                    profile, executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS, headless=True)
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{port}/")
                await page.wait_for_function("window.vl3liveSession !== undefined", timeout=30000)
                sid = await page.evaluate("window.vl3liveSession")
                session = engine.get(sid)
                end = time.monotonic() + 30
                while session.processed < 4 and time.monotonic() < end:
                    await asyncio.sleep(0.2)
                await page.screenshot(path=screenshot)
                status = await page.inner_text("#status")
                snap = await engine.snapshot(session)
                await browser.close()
        await ingest.close()
        return {"session": sid, "processed": snap.state.counts.processed, "cache_len": snap.stats.cache_len,
                "last_t": snap.state.last_t, "errors": snap.state.counts.errors, "status": status}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)

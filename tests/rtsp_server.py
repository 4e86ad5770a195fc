"""A real RTSP camera for tests: GStreamer's RTSP server serving a live H.264 test pattern.

Run with Debian's ``/usr/bin/python3`` (GstRtspServer's bindings do not import inside a venv):
``/usr/bin/python3 tests/rtsp_server.py PORT``; it prints ``ready`` once it listens on
``rtsp://127.0.0.1:PORT/cam``. Needs the GStreamer packages listed in ``.ci/run``.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1 "
            "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )")


def main() -> None:
    port = sys.argv[1]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on port {port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()

"""Run a blocking frame reader (PyAV) in a thread and hand its frames to asyncio one at a time.

The reader blocks while the consumer has not taken the previous frame, so nothing queues up
here; the engine's latest-frame slot decides what is dropped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make: Callable[[Callable[[], bool]], Iterator[T]],
                            name: str = "vl3live-reader") -> AsyncIterator[T]:
    """Yield what ``make(stopped)``'s iterator yields; its exceptions are raised here. Closing stops
    the thread: ``stopped()`` turns true, so a reader waiting (e.g. to reconnect) can return early."""
    loop = asyncio.get_running_loop()
    box: asyncio.Queue = asyncio.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object) -> bool:
        if stop.is_set() or loop.is_closed():
            return False
        fut = asyncio.run_coroutine_threadsafe(box.put(item), loop)
        while not stop.is_set():
            try:
                fut.result(timeout=0.2)
                return True
            except TimeoutError:
                continue
        fut.cancel()
        return False

    def run() -> None:
        try:
            it = make(stop.is_set)
            try:
                for item in it:
                    if stop.is_set() or not put(item):
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer
            put(exc)
            return
        put(_END)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await box.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not box.empty():
            box.get_nowait()
        await asyncio.to_thread(thread.join, 5.0)

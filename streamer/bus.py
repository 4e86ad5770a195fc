"""The in-process event bus: the engine publishes, the servers and the demo subscribe.

Each subscriber has its own bounded buffer. When it is full, the oldest *droppable* event (a
:class:`FrameStats`) is discarded and counted; answers, alerts and errors are never discarded: a
subscriber so far behind that its buffer holds nothing but those is closed (it gets one final
``error`` event with code ``subscriber_overflow``) instead of being fed silently less. The
engine never waits for a subscriber.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from .events import Error, Event, FrameStats


class Subscription:
    """A subscriber's bounded buffer; iterate it (``async for ev in sub``) or ``await sub.get()``."""

    def __init__(self, bus: EventBus, session: str | None, maxsize: int):
        self._bus = bus
        self.session = session
        self.maxsize = maxsize
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0  # stats events discarded because this subscriber was behind
        self.closed = False
        self.overflowed = False

    def _offer(self, ev: Event) -> None:
        if self.closed or (self.session is not None and ev.session != self.session):
            return
        if len(self._events) >= self.maxsize:
            victim = next((i for i, e in enumerate(self._events) if isinstance(e, FrameStats)), None)
            if victim is None and isinstance(ev, FrameStats):
                self.dropped += 1
                return
            if victim is None:
                self.overflowed = True
                self._events.append(Error(session=ev.session, code="subscriber_overflow",
                                          message=f"subscriber fell {self.maxsize} answer events behind and was closed"))
                self.close()
                return
            del self._events[victim]
            self.dropped += 1
        self._events.append(ev)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None once the subscription is closed and drained, or when ``timeout``
        seconds pass first. (Not ``asyncio.wait_for``: up to Python 3.11 its timeout can swallow a
        cancellation, and a cancelled reader then loops for ever, holding its connection open.)"""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while not self._events:
            if self.closed:
                return None
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return None
            self._ready.clear()
            timer = None if left is None else loop.call_later(left, self._ready.set)
            try:
                await self._ready.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        return self._events.popleft()

    def get_nowait(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def peek(self) -> list[Event]:
        """The events buffered now, oldest first, without taking them."""
        return list(self._events)

    def close(self) -> None:
        self.closed = True
        self._bus._subs.discard(self)
        self._ready.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        ev = await self.get()
        if ev is None:
            raise StopAsyncIteration
        return ev


class EventBus:
    """Fan-out of :class:`Event` to subscriptions; ``publish`` must run on the event loop's thread."""

    def __init__(self, default_maxsize: int = 256):
        self.default_maxsize = default_maxsize
        self._subs: set[Subscription] = set()
        self._observers: list = []
        self._seq = itertools.count(1)

    def observe(self, fn) -> None:
        """Call ``fn(event)`` for every event as it is published (metrics); it must not block."""
        self._observers.append(fn)

    def subscribe(self, session: str | None = None, maxsize: int | None = None) -> Subscription:
        """Events of one session (or of all with ``None``)."""
        sub = Subscription(self, session, maxsize or self.default_maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, ev: Event) -> None:
        ev.seq = next(self._seq)
        for fn in self._observers:
            fn(ev)
        for sub in list(self._subs):
            sub._offer(ev)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()

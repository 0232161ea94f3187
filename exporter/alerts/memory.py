"""Exactly once within a window, and at most so many per minute: the two memories of a receiver.

`DeliveryMemory` remembers which deliveries succeeded (a key per target: the chat message
of one notification, or one person's notification about some alerts) for `window`
seconds, so that Alertmanager's repeats and retries are not delivered again. A delivery
in flight holds its key: an identical one arriving meanwhile (a retry, or the second
Alertmanager of a pair) waits for it and then counts as a duplicate instead of sending a
second message. The memory lives in the process: a restart forgets it, and one
notification may then be delivered once more.

`MinuteCap` lets at most `per_minute` deliveries through in any 60 seconds and says how
long until the next one may go.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable

# A day: Alertmanager repeats a notification every repeat_interval (4 h by default, 24 h
# for the workload digest in alertmanager/alertmanager.yml), so an alert that keeps firing
# is said again at most once a day.
DEFAULT_WINDOW = 24 * 3600.0
# Keys kept at most per receiver; the oldest go first. A key is a few hundred bytes.
DEFAULT_CAPACITY = 10_000


class DeliveryMemory:
    """Deliveries that succeeded within the last `window` seconds, by key."""

    def __init__(
        self,
        window: float = DEFAULT_WINDOW,
        *,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._clock = clock
        self._done: OrderedDict[Hashable, float] = OrderedDict()  # key -> when, oldest first
        self._in_flight: dict[Hashable, asyncio.Event] = {}

    def __len__(self) -> int:
        self._expire()
        return len(self._done)

    def delivered(self, key: Hashable) -> bool:
        """Whether `key` was delivered within the window."""
        self._expire()
        return key in self._done

    def remember(self, key: Hashable) -> None:
        self._done[key] = self._clock()
        self._done.move_to_end(key)
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)

    async def once(self, key: Hashable, send: Callable[[], Awaitable[object]]) -> bool:
        """Run `send` unless `key` was delivered: True if it ran now, False for a duplicate.

        An exception from `send` propagates and leaves `key` undelivered (a retry sends).
        """
        while True:
            if self.delivered(key):
                return False
            pending = self._in_flight.get(key)
            if pending is None:
                break
            await pending.wait()
        done = asyncio.Event()
        self._in_flight[key] = done
        try:
            await send()
            self.remember(key)
            return True
        finally:
            del self._in_flight[key]
            done.set()

    def _expire(self) -> None:
        horizon = self._clock() - self.window
        while self._done:
            key, at = next(iter(self._done.items()))
            if at > horizon:
                break
            del self._done[key]


class MinuteCap:
    """At most `per_minute` deliveries in any 60 seconds."""

    PERIOD = 60.0

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._sent: deque[float] = deque()

    def wait(self) -> float:
        """Seconds until one more delivery may go (0 when it may go now)."""
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.PERIOD:
            self._sent.popleft()
        if len(self._sent) < self.per_minute:
            return 0.0
        return max(self._sent[0] + self.PERIOD - now, 0.0)

    def take(self) -> bool:
        """Count one delivery if the cap allows it now."""
        if self.wait() > 0:
            return False
        self._sent.append(self._clock())
        return True

    def retry_after(self) -> int:
        """`wait()` in whole seconds, at least 1, for a Retry-After header."""
        return max(1, math.ceil(self.wait()))

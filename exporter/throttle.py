"""The client side of the portal's leaky bucket: requests per second and burst.

Bitrix24 admits a request while its bucket for the portal and source address holds fewer
than `burst` requests, and the bucket drains `requests_per_second`. The portal counts a
request when it arrives, which is a little after the client sent it, by a delay that
varies; so the client never knows the portal's level exactly. It can bound it from above: a
request arrives no earlier than it was sent, no later than its answer came back, and (the
one assumption) no later than `JITTER` seconds after it was sent. Counting every request at
the latest moment it may have arrived, and every request still unanswered as arriving right
now, gives the highest level the portal's bucket can have; a request leaves only when that
level has room for it.

Against a portal that answers within milliseconds the bound is close to the truth, so a
cycle ends within a fraction of a request of the limit's minimum; against a slow one each
request counts up to `JITTER` late, which is the second of headroom a fixed client bucket
would keep. The bound rises with every request that cannot yet have drained, so bunched
arrivals never tip the portal's bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

# How late after sending a request the portal may count it, at most (network and proxies).
JITTER = 1.0
# Float noise in the drain arithmetic must not round a full bucket down to "room for one".
_EPSILON = 1e-9
# Waiting is re-checked at least this often (an answer may make room sooner).
_MAX_NAP = 0.5


class _Stats(Protocol):
    rate_limit_wait: float


class PortalThrottle:
    """Holds requests back until the portal's bucket surely has room; shared per portal."""

    def __init__(self, requests_per_second: float, burst: int, stats: _Stats) -> None:
        self.requests_per_second = requests_per_second
        self.burst = burst
        self._stats = stats
        # The bucket as it was after the last request whose arrival is settled: level, time.
        self._level = 0.0
        self._at = -float("inf")
        # Requests without an answer yet: ticket -> time sent.
        self._unanswered: dict[int, float] = {}
        self._tickets = 0
        self._answered = asyncio.Event()
        self._paused_until = 0.0

    async def acquire(self) -> int:
        """Wait until a request may leave; returns the ticket to hand to `answered`."""
        loop = asyncio.get_running_loop()
        started = now = loop.time()
        while True:
            if (pause := self._paused_until - now) > 0:
                await asyncio.sleep(pause)
            elif (wait := self._room_in(now)) > 0:
                self._answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered.wait(), min(wait, _MAX_NAP))
            else:
                break
            now = loop.time()
        self._tickets += 1
        self._unanswered[self._tickets] = now
        self._stats.rate_limit_wait += now - started
        return self._tickets

    def answered(self, ticket: int) -> None:
        """The request of `ticket` got an answer or failed: the portal has counted it by now."""
        now = asyncio.get_running_loop().time()
        self._settle(now)
        sent = self._unanswered.pop(ticket, None)
        if sent is not None:
            self._count(min(now, sent + JITTER))
        self._answered.set()

    def pause(self, seconds: float) -> None:
        """After QUERY_LIMIT_EXCEEDED: hold every request of the portal back for `seconds`.

        The portal's bucket was full when it refused, whoever else filled it (another client
        from the same address): from now on it counts as full and drains from there.
        """
        now = asyncio.get_running_loop().time()
        self._paused_until = max(self._paused_until, now + seconds)
        self._settle(now)
        drained = max(0.0, self._level - (now - self._at) * self.requests_per_second)
        self._level = max(drained, self.burst - len(self._unanswered))
        self._at = now

    def level(self, now: float) -> float:
        """The highest level the portal's bucket may have at `now` (loop time)."""
        self._settle(now)
        drained = max(0.0, self._level - (now - self._at) * self.requests_per_second)
        return drained + len(self._unanswered)

    def _room_in(self, now: float) -> float:
        """0 if a request may leave at `now`, else how long until there may be room."""
        if self.level(now) + 1 <= self.burst + _EPSILON:
            return 0.0
        # Unanswered requests do not drain until answered (or JITTER after they left).
        free = self.burst - 1 - len(self._unanswered)
        waits = [JITTER + min(self._unanswered.values()) - now] if self._unanswered else []
        if free >= 0:
            waits.append(self._at + (self._level - free) / self.requests_per_second - now)
        return max(min(waits, default=_MAX_NAP), 0.001)

    def _settle(self, now: float) -> None:
        """Requests sent more than JITTER ago have arrived by assumption: count them."""
        late = sorted(
            (sent, ticket) for ticket, sent in self._unanswered.items() if sent + JITTER <= now
        )
        for sent, ticket in late:
            del self._unanswered[ticket]
            self._count(sent + JITTER)

    def _count(self, arrived: float) -> None:
        # Arrivals are counted in time order: each is at or after every one counted before,
        # because a request still unanswered at a count arrives at that count's time or later.
        drained = max(0.0, self._level - (arrived - self._at) * self.requests_per_second)
        self._level = drained + 1
        self._at = arrived

"""The load a config puts on a portal, as doctor counts it: pure arithmetic.

`request_load`: the requests of one cycle (the sources' plans, 50 commands to a `batch`)
and the shortest cycle the portal's leaky bucket allows for them, from idle and sustained.
`MethodLoad`: one method's share of the operating budget, from the cost one real call of
it reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from exporter.bitrix import MAX_BATCH
from exporter.sources import Source

# Bitrix24 sums operating time over ten minutes.
WINDOW: Final = 600.0


@dataclass(frozen=True)
class RequestLoad:
    """Requests of one cycle and the shortest cycles the portal's bucket allows for them."""

    commands: int
    requests: int
    idle: float  # seconds, starting from an empty bucket
    sustained: float  # seconds, cycle after cycle


def request_load(
    sources: Sequence[Source],
    users: Sequence[int],
    own_user: int,
    *,
    callers: int,
    requests_per_second: float,
    burst: int,
) -> RequestLoad:
    """What one cycle costs in requests, and how fast the portal's bucket lets it go.

    The commands are the sources' plans, as the poller makes them; they go 50 to a `batch`,
    and each extra per-user webhook (`callers`) sends one request of its own. From an idle
    bucket the first `burst` requests leave at once; cycle after cycle the bucket drains
    only `requests_per_second`.
    """
    commands = sum(len(s.plan([own_user] if s.caller_only else users)) for s in sources)
    extra = callers if any(s.caller_only for s in sources) else 0
    requests = math.ceil(commands / MAX_BATCH) + extra
    return RequestLoad(
        commands=commands,
        requests=requests,
        idle=max(0, requests - burst) / requests_per_second,
        sustained=requests / requests_per_second,
    )


@dataclass(frozen=True)
class MethodLoad:
    """One method's share of the operating budget, from one real call of it."""

    method: str
    calls: int  # per period
    period: float  # seconds between the rounds of calls
    cost: float | None  # seconds per call, from the answer's time block
    operating: float | None  # seconds already used in the current window, from the answer
    failure: str = ""  # the call failed: how
    skipped: str = ""  # the call was not made: why

    @property
    def per_window(self) -> float:
        """Seconds of operating time per 10 minutes at this rate."""
        return (self.cost or 0.0) * self.calls * WINDOW / self.period

    def shortest_period(self, usable: float) -> float:
        """The shortest period at which the calls stay within `usable` seconds per window."""
        return (self.cost or 0.0) * self.calls * WINDOW / usable

"""The per-method operating budget, paced on what the portal counts.

Bitrix24 sums each method's execution time per webhook (or OAuth application) in one-minute
buckets; a bucket leaves the window `window` seconds (10 minutes) after it opened, and a
call made while the sum is over `limit` gets 429 OPERATION_TIME_LIMIT, for every
integration on that webhook, until enough buckets have left. Every answer tells the sum as
the portal counts it: `time.operating` (after each command of a batch, in `result_time`)
and `operating_reset_at`, when the oldest bucket leaves.

`OperatingBudget` paces each method on those numbers alone:
- the cost of a call is the growth of the running total between answers: between the
  commands of one batch, or between two requests when nothing else of ours ran in between.
  Growth we did not cause (another integration on the same webhook, a portal under load)
  is in the total and in that growth, so it counts as spent. Until then, a call costs at most
  the total right after it; `duration` (what the portal says the call took) is no measure;
- a request leaves only if what is in flight and what it may charge, at the learned cost,
  fit under the limit less `HEADROOM`. Near the limit that means one request at a time, each
  answer telling the new total; when not even a small one fits, none until the oldest bucket
  leaves. After that the total is lower by an amount only the next answer tells, so one
  request goes alone, sized so that it stays under the limit even if nothing had left. A
  total read more than a few seconds ago is read again the same way, by one request alone,
  since others may have spent meanwhile.

`load_warning` says whether the configured load fits the budget at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Bitrix24 sums each method's execution time over this many seconds (operating_limit).
OPERATING_WINDOW = 600.0
# The most commands one `batch` request may carry.
MAX_BATCH = 50
# How often to look again while requests of a method are in flight.
_RECHECK = 0.5
# `operating_reset_at` is a whole second; the bucket may leave up to a second after it.
_RESET_MARGIN = 1.0
# An answer older than this share of the window (5 s of 10 minutes) no longer tells the
# total, as others may have spent since: one request alone reads it again before several
# rely on it.
_FRESH = 1 / 120


@dataclass(frozen=True)
class Reading:
    """What one answer (or one command of a batch) says about its method's budget."""

    operating: float | None
    reset_at: float | None  # unix time, by the portal's clock
    start: float | None  # unix time the call started, by the portal's clock

    @classmethod
    def of(cls, block: object) -> Reading | None:
        """The reading of a `time` block, or None if it is not one."""
        if not isinstance(block, dict):
            return None
        return cls(
            operating=finite(block.get("operating")),
            reset_at=finite(block.get("operating_reset_at")),
            start=finite(block.get("start")),
        )


@dataclass(frozen=True, eq=False)
class Reservation:
    """Calls of one method in one request, from the moment they are planned to the answer."""

    method: str
    calls: int
    alone: bool  # nothing else of this method was in flight when it was planned
    planned_at: float  # unix time


@dataclass
class _Method:
    total: float | None = None  # the portal's running total after its latest call
    latest: float = -math.inf  # when that call started, by the portal's clock
    seen_at: float = -math.inf  # unix time the newest answer came back
    uncounted: bool = False  # answers come without `operating`: the portal has no limiter
    reset_at: float = 0.0  # when the oldest bucket leaves, by our clock (0: unknown)
    cost: float | None = None  # seconds charged per call, learned from growth
    # No call costs more than the total right after it: the least total seen bounds the
    # cost of a call until its growth is learned.
    bound: float | None = None
    in_flight: list[Reservation] = field(default_factory=list)
    paused_until: float = 0.0  # unix time
    expected: tuple[int, float, Callable[[str], None]] | None = None  # calls, every, warn
    warned: bool = False


class OperatingBudget:
    """Keeps each method of one credential under the portal's operating limit."""

    # Readings go stale and costs vary; the pacing stays this far below the limit.
    HEADROOM = 0.05

    def __init__(
        self,
        limit: float,
        *,
        window: float = OPERATING_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window = window
        self._methods: dict[str, _Method] = {}
        self._clock = clock

    def _method(self, method: str) -> _Method:
        return self._methods.setdefault(method, _Method())

    def operating(self, method: str) -> float | None:
        """The portal's running total for `method` at its newest answer."""
        state = self._methods.get(method)
        return None if state is None else state.total

    def cost_of(self, method: str) -> float | None:
        """Seconds the portal charges per call of `method`, once learned from its growth."""
        state = self._methods.get(method)
        return None if state is None else state.cost

    def cost_bound(self, method: str) -> float | None:
        """The cost per call once learned, else the most a call can have cost: the smallest
        total an answer reported (what one call tells, as `doctor` makes it)."""
        state = self._methods.get(method)
        if state is None:
            return None
        return state.cost if state.cost is not None else state.bound

    # -- deciding ---------------------------------------------------------------

    def calls_that_fit(self, method: str, wanted: int) -> tuple[int, float]:
        """How many of `wanted` calls may start now in one request, or (0, seconds to wait)."""
        state = self._method(method)
        now = self._clock()
        if state.paused_until > now:
            return 0, state.paused_until - now
        wanted = min(wanted, MAX_BATCH)
        if state.uncounted and state.total is None:
            return wanted, 0.0  # no limiter on this portal (self-hosted)
        cost = state.cost if state.cost is not None else state.bound
        if cost is None:
            # Nothing known yet: learn the cost from one request before sending more.
            return (0, _RECHECK) if state.in_flight else (wanted, 0.0)
        if state.in_flight and now - state.seen_at > self.window * _FRESH:
            return 0, _RECHECK  # the request in flight reads the total again
        total = state.total or 0.0
        planned = sum(r.calls for r in state.in_flight) * cost
        room = self.limit * (1 - self.HEADROOM) - total - planned
        if cost <= 0 or room >= wanted * cost:
            return wanted, 0.0
        if state.in_flight:
            return 0, _RECHECK  # one request at a time: the next answer tells the total
        if room >= cost:
            return math.floor(room / cost), 0.0
        if state.cost is None and room > 0:
            return 1, 0.0  # the bound is loose; one call alone tells what a call costs
        if state.reset_at and now >= state.reset_at:
            # The oldest bucket left since the latest answer, taking an amount only the next
            # answer tells: one request, under the limit even if that amount was nothing.
            under = self.limit * (1 - self.HEADROOM / 2) - total
            return max(1, min(wanted, math.floor(under / cost))), 0.0
        # Full until the oldest bucket leaves; never wait longer than the window.
        until = state.reset_at if state.reset_at else now + self.window / 10
        return 0, min(until - now, self.window) + _RESET_MARGIN

    def reserve(self, method: str, calls: int) -> Reservation:
        """Count `calls` of `method` as in flight until `release`."""
        state = self._method(method)
        reservation = Reservation(
            method, calls, alone=not state.in_flight, planned_at=self._clock()
        )
        state.in_flight.append(reservation)
        return reservation

    def release(self, reservation: Reservation) -> None:
        state = self._method(reservation.method)
        if reservation in state.in_flight:
            state.in_flight.remove(reservation)

    # -- learning ---------------------------------------------------------------

    def record(
        self, method: str, blocks: Sequence[object], reservation: Reservation | None = None
    ) -> None:
        """Learn from one answer: the `time` block of each call of `method`, in call order.

        `reservation` is the request's, if it was planned through this budget; a request
        that went alone tells the growth since the answer before it.
        """
        readings = [r for r in map(Reading.of, blocks) if r is not None]
        if not readings:
            return
        state = self._method(method)
        now = self._clock()
        counted = [r for r in readings if r.operating is not None]
        if not counted:
            state.uncounted = True
        totals = [r.operating for r in counted if r.operating is not None]
        for sample in self._samples(state, totals, reservation, now):
            self._learn(state, sample)
        if totals and min(totals) >= 0:
            state.bound = min(totals) if state.bound is None else min(state.bound, *totals)
        last = counted[-1] if counted else None
        if totals:
            state.seen_at = now
        if last is not None and (last.start is None or last.start >= state.latest):
            # Answers of concurrent requests come back in any order; the call that started
            # last saw the most.
            state.total = last.operating
            state.latest = last.start if last.start is not None else state.latest
            if last.reset_at is not None:
                state.reset_at = self._local_reset(last, now)
        self._maybe_warn(method, state)

    def _samples(
        self,
        state: _Method,
        totals: list[float],
        reservation: Reservation | None,
        now: float,
    ) -> list[float]:
        """Per-call costs that one answer's totals show."""
        if not totals:
            return []
        if len(totals) >= 2 and totals[-1] > totals[0]:
            # Calls of one batch run one after another: the growth between them is theirs,
            # and anyone else's that ran meanwhile (which then counts as theirs).
            return [(totals[-1] - totals[0]) / (len(totals) - 1)]
        if len(totals) >= 2 and totals[-1] == state.total == totals[0]:
            return [0.0]  # nothing grows at all: calls of this method cost nothing
        if (
            reservation is not None
            and reservation.alone
            and state.total is not None
            # Sent right after the answer before it, with no bucket leaving in between: the
            # growth is this request's calls and what others spent in that moment.
            and reservation.planned_at - state.seen_at <= _RECHECK
            and not (state.reset_at and now >= state.reset_at)
            and totals[-1] >= state.total
        ):
            return [(totals[-1] - state.total) / len(totals)]
        return []

    def _local_reset(self, reading: Reading, now: float) -> float:
        """`operating_reset_at` on our clock, within the window, never already past."""
        assert reading.reset_at is not None
        # The portal's clock may differ from ours: its `start` was a moment before now, so
        # shifting by (now - start) turns its times into ours, a little late (the safe side).
        shift = now - reading.start if reading.start is not None else 0.0
        reset = min(reading.reset_at + shift, now + self.window)
        if reset <= now:
            # The bucket should have left but is still counted (whole seconds, a lagging
            # clock): the next one leaves a bucket's length later at the soonest.
            reset += self.window / 10
        return reset

    def _learn(self, state: _Method, sample: float) -> None:
        # Up at once (a dearer call must not overshoot), down slowly (one cheap batch
        # must not open the gates).
        if state.cost is None or sample >= state.cost:
            state.cost = sample
        else:
            state.cost += 0.3 * (sample - state.cost)

    # -- 429 --------------------------------------------------------------------

    def paused(self, method: str) -> bool:
        """Whether OPERATION_TIME_LIMIT holds `method` back now."""
        state = self._methods.get(method)
        return state is not None and state.paused_until > self._clock()

    def pause(self, method: str) -> float:
        """After OPERATION_TIME_LIMIT: hold the method until its oldest bucket leaves."""
        state = self._method(method)
        now = self._clock()
        if state.reset_at > now:
            until = min(state.reset_at, now + self.window) + _RESET_MARGIN
        else:
            until = now + self.window / 10  # a bucket's length: the soonest one can leave
        state.paused_until = max(state.paused_until, until)
        return state.paused_until - now

    # -- the load -----------------------------------------------------------------

    def expect(self, method: str, *, calls: int, every: float, warn: Callable[[str], None]) -> None:
        """`calls` calls of `method` are wanted every `every` seconds.

        `warn` gets `load_warning`'s message once, as soon as the cost of a call is known.
        """
        state = self._method(method)
        state.expected = (calls, every, warn)
        self._maybe_warn(method, state)

    def _maybe_warn(self, method: str, state: _Method) -> None:
        # Checked at every answer until it warns once: a cost that grows later may still
        # make the load stop fitting.
        if state.warned or state.expected is None or state.cost is None:
            return
        calls, every, warn = state.expected
        message = load_warning(
            method,
            cost=state.cost,
            calls=calls,
            every=every,
            limit=self.limit,
            window=self.window,
            headroom=self.HEADROOM,
        )
        if message is not None:
            state.warned = True
            warn(message)


def load_warning(
    method: str,
    *,
    cost: float,
    calls: int,
    every: float,
    limit: float,
    window: float,
    headroom: float = OperatingBudget.HEADROOM,
) -> str | None:
    """What to say when `calls` calls costing `cost` s every `every` s overrun the budget.

    >>> import textwrap
    >>> text = load_warning("m", cost=0.1, calls=1500, every=60, limit=480, window=600)
    >>> print(textwrap.fill(text, 88))
    m is charged 0.100s of operating time per call: 1500 calls every 60s need 1500s per 10
    minutes, the limit is 480s; cycles will be stretched to about 197s each to stay under it
    (bitrix24_poll_behind_seconds tells how late they start)
    >>> load_warning("m", cost=0.01, calls=1500, every=60, limit=480, window=600) is None
    True
    """
    needed = cost * calls * window / every
    usable = limit * (1 - headroom)
    if needed <= usable:
        return None
    stretched = cost * calls * window / usable
    return (
        f"{method} is charged {cost:.3f}s of operating time per call: {calls} calls every"
        f" {every:g}s need {needed:.0f}s per {_span(window)}, the limit is {limit:g}s;"
        f" cycles will be stretched to about {stretched:.0f}s each to stay under it"
        " (bitrix24_poll_behind_seconds tells how late they start)"
    )


def _span(seconds: float) -> str:
    """A window as people say it: "10 minutes", or "30s" when it is not whole minutes."""
    minutes = seconds / 60
    if minutes >= 1 and minutes == int(minutes):
        return f"{int(minutes)} minutes" if minutes != 1 else "minute"
    return f"{seconds:g}s"


def finite(value: object) -> float | None:
    """A JSON number as a finite float, or None (JSON may carry NaN, Infinity, 10**400)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None

"""What one portal's poll cycle produced, frozen for the renderer.

A `PortalSnapshot` is built at the end of every cycle and never changed after it is
published: the renderer and the status page read it while the next cycle runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from exporter.bitrix import ClientStats
from exporter.lines import Series
from exporter.mapping import Sample


@dataclass(frozen=True, slots=True)
class Status:
    """Whether one user's counters from one source were fetched in the last cycle."""

    user_id: int | str  # a pseudonym in privacy mode pseudonymous (exporter.privacy)
    source: str  # a source's name: "tasks", "im", ...
    success: bool
    last_success: float | None  # unix time
    reason: str | None = None  # why the last fetch failed: its error code, e.g. NoAccess


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """How many users one source fetched counters for, and for how many it worked."""

    source: str
    users: int
    succeeded: int
    # The oldest last success among them (Unix time); only in privacy mode aggregate, where
    # it stands for the per-user timestamps.
    oldest_success: float | None = None


Owner = tuple[int, str]  # (user_id, source name)


def health_of(
    fresh: Mapping[Owner, bool], up: bool, last_success: Mapping[Owner, float] | None = None
) -> tuple[SourceHealth, ...]:
    """The per-source counts of a cycle's outcome (`fresh`: whether each (user, source)
    was fetched), which outlive the privacy mode ``aggregate``; with `last_success`, also
    the oldest last success of each source's users. Counted from the outcome, not from the
    statuses, so that those are still made only when first read.

    >>> health_of({(1, "tasks"): True, (2, "tasks"): False}, up=True)
    (SourceHealth(source='tasks', users=2, succeeded=1, oldest_success=None),)
    >>> health_of({(1, "tasks"): True, (2, "tasks"): False}, True, {(1, "tasks"): 9.0})[0]
    SourceHealth(source='tasks', users=2, succeeded=1, oldest_success=9.0)
    """
    users: dict[str, int] = {}
    succeeded: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for owner, ok in fresh.items():
        source = owner[1]
        users[source] = users.get(source, 0) + 1
        succeeded[source] = succeeded.get(source, 0) + (ok and up)
        if last_success is not None and (at := last_success.get(owner)) is not None:
            oldest[source] = min(at, oldest.get(source, at))
    return tuple(SourceHealth(s, users[s], succeeded[s], oldest.get(s)) for s in sorted(users))


T = TypeVar("T")  # what a LazyStatuses makes its statuses from


class LazyStatuses(Sequence[Status], Generic[T]):
    """Statuses made by whoever reads them first, usually the render thread: a big portal
    has thousands, and making them where a cycle ends held up the event loop (and every
    scrape) for ~10 ms. A subclass says how to make them, and how many they are, from what
    it hands in; that is dropped once they are made.

    The inputs are one object, set before and dropped after the statuses: a thread that
    finds them gone finds the statuses, and two threads making them at once make the same.
    """

    def __init__(self, inputs: T) -> None:
        self._inputs: T | None = inputs
        self._made: tuple[Status, ...] = ()

    def _make(self, inputs: T) -> tuple[Status, ...]:
        raise NotImplementedError

    def _count(self, inputs: T) -> int:
        raise NotImplementedError

    @property
    def _statuses(self) -> tuple[Status, ...]:
        inputs = self._inputs
        if inputs is not None:
            self._made = self._make(inputs)
            self._inputs = None
        return self._made

    @overload
    def __getitem__(self, index: int) -> Status: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Status]: ...
    def __getitem__(self, index: int | slice) -> Status | Sequence[Status]:
        return self._statuses[index]

    def __len__(self) -> int:
        inputs = self._inputs
        return self._count(inputs) if inputs is not None else len(self._made)

    def __iter__(self) -> Iterator[Status]:
        return iter(self._statuses)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


@dataclass(frozen=True)
class _Outcome:
    """What a cycle's statuses are made from (copied, so later cycles do not change it)."""

    fresh: dict[Owner, bool]
    last: dict[Owner, float]
    up: bool
    reasons: dict[Owner, str]
    cycle_error: str | None


class Statuses(LazyStatuses[_Outcome]):
    """One status per (user, source) of a cycle, in order, made when first read."""

    def __init__(
        self,
        fresh: Mapping[Owner, bool],
        last: Mapping[Owner, float],
        up: bool,
        reasons: Mapping[Owner, str] | None = None,
        cycle_error: str | None = None,
    ) -> None:
        super().__init__(_Outcome(dict(fresh), dict(last), up, dict(reasons or {}), cycle_error))

    def _count(self, inputs: _Outcome) -> int:
        return len(inputs.fresh)

    def _make(self, inputs: _Outcome) -> tuple[Status, ...]:
        last, up, reasons, error = inputs.last, inputs.up, inputs.reasons, inputs.cycle_error
        return tuple(
            Status(
                user_id,
                source,
                ok and up,
                last.get((user_id, source)),
                None if ok and up else reasons.get((user_id, source)) or error,
            )
            for (user_id, source), ok in sorted(inputs.fresh.items())
        )


@dataclass(frozen=True)
class PortalSnapshot:
    """What one portal's last cycle produced; never changed after it is published."""

    name: str
    up: bool
    # The sources' series as exposition lines; iterating it gives `Sample`s. Any iterable
    # of samples given here is encoded into one.
    samples: Series
    statuses: Sequence[Status]
    user_names: tuple[tuple[int, str], ...]
    stats: ClientStats
    operating_limit: float
    duration: float | None
    behind: float
    cycles: int
    error: str | None = None
    health: tuple[SourceHealth, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.samples, Series):
            given: Iterable[Sample] = self.samples
            object.__setattr__(self, "samples", Series.of(given))


def copy_stats(stats: ClientStats) -> ClientStats:
    """A copy that later requests do not change."""
    return ClientStats(
        requests=stats.requests.copy(),
        errors=stats.errors.copy(),
        duration_buckets=list(stats.duration_buckets),
        duration_sum=stats.duration_sum,
        duration_count=stats.duration_count,
        rate_limit_wait=stats.rate_limit_wait,
        operating=dict(stats.operating),
    )

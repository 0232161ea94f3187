"""What one portal's poll cycle produced, frozen for the renderer.

A `PortalSnapshot` is built at the end of every cycle and never changed after it is
published: the renderer and the status page read it while the next cycle runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.bitrix import ClientStats
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


def health_of(statuses: tuple[Status, ...]) -> tuple[SourceHealth, ...]:
    """The per-source counts of `statuses`, which outlive the privacy mode ``aggregate``."""
    users: dict[str, int] = {}
    succeeded: dict[str, int] = {}
    for status in statuses:
        users[status.source] = users.get(status.source, 0) + 1
        succeeded[status.source] = succeeded.get(status.source, 0) + status.success
    return tuple(SourceHealth(s, users[s], succeeded[s]) for s in sorted(users))


@dataclass(frozen=True)
class PortalSnapshot:
    """What one portal's last cycle produced; never changed after it is published."""

    name: str
    up: bool
    samples: tuple[Sample, ...]
    statuses: tuple[Status, ...]
    user_names: tuple[tuple[int, str], ...]
    stats: ClientStats
    operating_limit: float
    duration: float | None
    behind: float
    cycles: int
    error: str | None = None
    health: tuple[SourceHealth, ...] = ()


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

"""The last good result of every command, and what a snapshot reports of them.

A command whose fetch fails keeps its last good samples until they are older than
`stale_after`; then its series go. Each (user, source) remembers when it last succeeded,
for `bitrix24_last_success_timestamp_seconds`. Nothing here does I/O: the poller tells
the store what happened and when.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from exporter.mapping import Sample
from exporter.snapshot import Status

Owner = tuple[int, str]  # (user_id, source name)


@dataclass
class Fetch:
    """Last good result of one command (a user's counters for one group and role, ...)."""

    samples: tuple[Sample, ...] = ()
    last_success: float | None = None


class FetchStore:
    """Last good samples per command key, and the last success per (user, source)."""

    def __init__(self) -> None:
        self.fetches: dict[str, Fetch] = {}
        self.last_success: dict[Owner, float] = {}
        # The (user, source) pairs of the last cycle: when a cycle gets no answer at all,
        # they are the ones that failed.
        self.watched: set[Owner] = set()
        # Why each (user, source) failed in the cycle running now (a FetchError's code).
        self.reasons: dict[Owner, str] = {}

    def failed_because(self, owner: Owner, code: str) -> None:
        self.reasons[owner] = code

    def succeed(self, key: str, samples: Iterable[Sample], now: float) -> None:
        fetch = self.fetches.setdefault(key, Fetch())
        renewed = tuple(samples)
        # Unchanged values keep the objects of the last cycle: renewing all ~100,000
        # samples of a big portal each cycle set off full garbage collections (~0.1 s
        # each, which scrapes wait out) several times a cycle.
        if renewed != fetch.samples:
            fetch.samples = renewed
        fetch.last_success = now

    def fail(self, key: str, now: float, stale_after: float) -> None:
        """The fetch of `key` failed at `now`: its samples stay until they are stale."""
        fetch = self.fetches.setdefault(key, Fetch())
        if fetch.last_success is None or now - fetch.last_success > stale_after:
            fetch.samples = ()

    def fail_all(self, now: float, stale_after: float) -> dict[Owner, bool]:
        """No command got an answer: every fetch failed, and so did every watched owner."""
        for key in self.fetches:
            self.fail(key, now, stale_after)
        return dict.fromkeys(self.watched, False)

    def finish(self, fresh: Mapping[Owner, bool], now: float) -> None:
        """Record the cycle's outcome per (user, source)."""
        for owner, ok in fresh.items():
            if ok:
                self.last_success[owner] = now
        self.watched = set(fresh)

    def keep_only(self, keys: Collection[str], owners: Collection[Owner]) -> None:
        """Drop what belongs to users that left the config or the discovered list."""
        for key in [k for k in self.fetches if k not in keys]:
            del self.fetches[key]
        for owner in [o for o in self.last_success if o not in owners]:
            del self.last_success[owner]

    def samples(self) -> tuple[Sample, ...]:
        return tuple(s for fetch in self.fetches.values() for s in fetch.samples)

    def statuses(
        self, fresh: Mapping[Owner, bool], up: bool, cycle_error: str | None = None
    ) -> tuple[Status, ...]:
        """One status per (user, source) of the cycle; none succeeds on a portal that is down.

        A failed one carries its reason: its own failure's code, else the cycle's. The
        reasons are the cycle's: they are forgotten here."""
        reasons, self.reasons = self.reasons, {}
        return tuple(
            Status(
                user_id,
                source,
                ok and up,
                self.last_success.get((user_id, source)),
                None if ok and up else reasons.get((user_id, source)) or cycle_error,
            )
            for (user_id, source), ok in sorted(fresh.items())
        )

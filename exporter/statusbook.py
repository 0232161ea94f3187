"""What the status page remembers between cycles, and the page's view built from it.

A snapshot tells the state of one cycle; the status page also tells since when a portal has
been up or down, how many requests (and 503s, 429s) the last hour saw, and the last errors.
`StatusBook` keeps that, fed with every snapshot the publisher receives (it never calls
Bitrix24 and holds a few numbers and strings per portal), and `StatusBook.view` builds the
`PageView` that `exporter.statuspage.render_page` turns into HTML.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from exporter.config import Portal
from exporter.logs import mask
from exporter.metrics import DEPARTMENT_INFO
from exporter.snapshot import PortalSnapshot
from exporter.statuspage import BudgetUse, ErrorLine, FailureGroup, PageView, PortalView

__all__ = ["StatusBook", "names_shown"]

# Requests are counted over this many seconds.
WINDOW: Final = 3600.0
# How many distinct errors a portal keeps.
KEPT_ERRORS: Final = 5


@dataclass(frozen=True)
class _Count:
    """A portal's cumulative request figures at one moment."""

    at: float
    requests: int
    throttled: int
    blocked: int


@dataclass
class _Error:
    text: str
    at: float
    times: int = 1


@dataclass
class _History:
    up: bool | None = None
    since: float | None = None  # when `up` last changed
    last_at: float | None = None  # when the last snapshot arrived
    counts: deque[_Count] = field(default_factory=deque)
    errors: deque[_Error] = field(default_factory=lambda: deque(maxlen=KEPT_ERRORS))


def _count(snapshot: PortalSnapshot, at: float) -> _Count:
    stats = snapshot.stats
    errors: Counter[str] = Counter()
    for (_, code), n in stats.errors.items():
        errors[code] += n
    return _Count(
        at=at,
        requests=sum(stats.requests.values()),
        throttled=errors["QUERY_LIMIT_EXCEEDED"],
        blocked=errors["OPERATION_TIME_LIMIT"],
    )


def names_shown(portal: Portal) -> bool:
    """Whether the page may name the users of `portal`: only where its privacy mode is
    `none` (pseudonymous and aggregate portals never show a name or user id)."""
    return portal.privacy.mode == "none"


class StatusBook:
    """Per-portal history for the status page; `observe` every published snapshot."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._portals: dict[str, _History] = {}

    def observe(self, snapshot: PortalSnapshot) -> None:
        now = self._clock()
        history = self._portals.setdefault(snapshot.name, _History())
        if history.up is None or history.up != snapshot.up:
            history.up, history.since = snapshot.up, now
        history.last_at = now
        count = _count(snapshot, now)
        counts = history.counts
        if not counts or count.requests < counts[-1].requests:
            # First sight, or the counters started again (the portal was removed and
            # added back): the client's counters were zero when its first cycle began.
            counts.clear()
            counts.append(_Count(now - (snapshot.duration or 0.0), 0, 0, 0))
        counts.append(count)
        # Keep one figure from before the window as the baseline of the last hour.
        while len(counts) > 2 and counts[1].at <= now - WINDOW:
            counts.popleft()
        if snapshot.error:
            text = mask(snapshot.error)
            same = next((e for e in history.errors if e.text == text), None)
            if same is not None:
                history.errors.remove(same)
                same.at, same.times = now, same.times + 1
                history.errors.append(same)
            else:
                history.errors.append(_Error(text, now))

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of portals that are no longer configured."""
        wanted = set(keep)
        for name in [n for n in self._portals if n not in wanted]:
            del self._portals[name]

    def view(
        self,
        *,
        portals: Iterable[Portal],
        snapshots: Mapping[str, PortalSnapshot],
        poll_interval: float,
        version: str,
        reload_ok: bool,
        reload_at: float | None,
        shard: tuple[int, int] | None = None,
    ) -> PageView:
        """The page for the running `portals`, as of now."""
        now = self._clock()
        views = tuple(
            self._portal_view(p, snapshots.get(p.name), poll_interval, now)
            for p in sorted(portals, key=lambda p: p.name)
        )
        return PageView(
            version=version,
            now=now,
            poll_interval=poll_interval,
            reload_ok=reload_ok,
            reload_at=reload_at,
            portals=views,
            shard=shard,
        )

    def _portal_view(
        self, portal: Portal, snap: PortalSnapshot | None, interval: float, now: float
    ) -> PortalView:
        history = self._portals.get(portal.name)
        if snap is None or history is None or history.last_at is None:
            return PortalView(name=portal.name, state="starting")
        ended = history.last_at
        started = ended - (snap.duration or 0.0)
        # The poller's schedule: the next start is one interval after the last scheduled
        # one, and never before the last start (a late cycle does not cause a burst).
        next_cycle = max(started - snap.behind + interval, started)
        counts = history.counts
        first, last = counts[0], counts[-1]
        return PortalView(
            name=portal.name,
            state="up" if snap.up else "down",
            since=history.since,
            last_cycle=ended,
            duration=snap.duration,
            behind=snap.behind,
            next_cycle=next_cycle,
            users=watched_users(snap),
            departments=sum(1 for s in snap.samples if s.family is DEPARTMENT_INFO) or None,
            failures=failure_groups(snap, names=names_shown(portal)),
            requests=last.requests - first.requests,
            throttled=last.throttled - first.throttled,
            blocked=last.blocked - first.blocked,
            counted_since=first.at,
            budget=tuple(
                BudgetUse(method, used, snap.operating_limit)
                for method, used in sorted(snap.stats.operating.items())
            ),
            errors=tuple(ErrorLine(e.at, e.text, e.times) for e in reversed(history.errors)),
            error=None if snap.error is None else mask(snap.error),
        )


def watched_users(snap: PortalSnapshot) -> int:
    """How many users the portal watches (in privacy mode aggregate: from the counts)."""
    if snap.statuses:
        return len({s.user_id for s in snap.statuses})
    return max((h.users for h in snap.health), default=0)


def failure_groups(snap: PortalSnapshot, *, names: bool) -> tuple[FailureGroup, ...]:
    """Users whose last fetch failed, grouped by reason, most users first.

    A user counts once per reason, whichever of its sources failed. Without a reason of its
    own a failure takes the cycle's error (the whole cycle failed).
    """
    fallback = "the cycle failed"
    by_reason: dict[str, set[int | str]] = {}
    for status in snap.statuses:
        if not status.success:
            reason = status.reason or fallback
            by_reason.setdefault(reason, set()).add(status.user_id)
    known: dict[int | str, str] = dict(snap.user_names)
    groups = [
        FailureGroup(
            reason=reason,
            users=len(users),
            names=tuple(known.get(u, f"user {u}") for u in sorted(users, key=str)) if names else (),
        )
        for reason, users in by_reason.items()
    ]
    if not snap.statuses:
        # Privacy mode aggregate keeps no per-user status: the counts per source instead.
        groups += [
            FailureGroup(f"{h.source} counters not fetched", h.users - h.succeeded, ())
            for h in snap.health
            if h.succeeded < h.users
        ]
    return tuple(sorted(groups, key=lambda g: (-g.users, g.reason)))

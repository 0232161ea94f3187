"""The last good result of every command, and what a snapshot reports of them.

A command whose fetch fails keeps its last good samples until they are older than
`stale_after`; then its series go. Each (user, source) remembers when it last succeeded,
for `bitrix24_last_success_timestamp_seconds`. Nothing here does I/O: the poller tells
the store what happened and when.

Samples are kept as their exposition lines (`exporter.lines`), one tuple of bytes per
command: a big portal's ~100,000 series are then a few hundred thousand bytes objects
rather than a million Python objects the garbage collector walks on every full collection.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import cast

from exporter.lines import Block, Lines, Series, encode_samples
from exporter.mapping import Sample
from exporter.metrics import Family
from exporter.snapshot import Status

Owner = tuple[int, str]  # (user_id, source name)

# One command's last good result: when it last succeeded (None: never), then its lines
# (`exporter.lines.Lines`: family name, bytes, ...). A plain tuple of immutable values,
# which the garbage collector stops tracking.
Fetch = tuple[float | str | bytes | None, ...]


class FetchStore:
    """Last good samples per command key, and the last success per (user, source)."""

    def __init__(self) -> None:
        self.fetches: dict[str, Fetch] = {}
        self.last_success: dict[Owner, float] = {}
        # The (user, source) pairs of the last cycle: when a cycle gets no answer at all,
        # they are the ones that failed.
        self.watched: set[Owner] = set()
        self._families: dict[str, Family] = {}
        # Families whose lines changed since `samples()` last built the series; the others
        # keep their block, so that the renderer sees the same object and reuses its work.
        self._changed: set[str] = set()
        self._series = Series()

    def succeed(self, key: str, samples: Iterable[Sample], now: float) -> None:
        lines = encode_samples(samples, self._families)
        old = self.fetches.get(key)
        if old is not None and old[1:] == lines:
            lines = cast(Lines, old[1:])  # the same bytes: keep last cycle's objects
        else:
            self._note(cast(Lines, old[1:]) if old is not None else (), lines)
        self.fetches[key] = (now, *lines)

    def fail(self, key: str, now: float, stale_after: float) -> None:
        """The fetch of `key` failed at `now`: its samples stay until they are stale."""
        old = self.fetches.get(key)
        if old is None:
            self.fetches[key] = (None,)
            return
        last = cast(float | None, old[0])
        if last is None or now - last > stale_after:
            self._note(cast(Lines, old[1:]), ())
            self.fetches[key] = (last,)

    def fail_all(self, now: float, stale_after: float) -> dict[Owner, bool]:
        """No command got an answer: every fetch failed, and so did every watched owner."""
        for key in list(self.fetches):
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
            self._note(cast(Lines, self.fetches.pop(key)[1:]), ())
        for owner in [o for o in self.last_success if o not in owners]:
            del self.last_success[owner]

    def samples(self) -> Series:
        """Every command's last good samples, per family in the order of the commands."""
        if self._changed:
            blocks = {b.family.name: b for b in self._series.blocks.values()}
            pieces: dict[str, list[bytes]] = {name: [] for name in self._changed}
            for fetch in self.fetches.values():
                for index in range(1, len(fetch), 2):
                    wanted = pieces.get(cast(str, fetch[index]))
                    if wanted is not None:
                        wanted.append(cast(bytes, fetch[index + 1]))
            for name, found in pieces.items():
                if found:
                    blocks[name] = Block(self._families[name], found)
                else:
                    blocks.pop(name, None)
            self._series = Series(blocks.values())
            self._changed = set()
        return self._series

    def statuses(self, fresh: Mapping[Owner, bool], up: bool) -> tuple[Status, ...]:
        """One status per (user, source) of the cycle; none succeeds on a portal that is down."""
        return tuple(
            Status(user_id, source, ok and up, self.last_success.get((user_id, source)))
            for (user_id, source), ok in sorted(fresh.items())
        )

    def _note(self, old: Lines, new: Lines) -> None:
        """Mark the families of a fetch whose lines changed from `old` to `new`."""
        for lines in (old, new):
            for index in range(0, len(lines), 2):
                self._changed.add(cast(str, lines[index]))

"""The last good result of every command, and what a snapshot reports of them.

A command whose fetch fails keeps its last good samples until they are older than
`stale_after`; then its series go. Each (user, source) remembers when it last succeeded,
for `bitrix24_last_success_timestamp_seconds`. Nothing here does I/O: the poller tells
the store what happened and when.

Samples are kept as their exposition lines (`exporter.lines`), and only once: per family,
one bytes object with every command's lines in the order the commands were first seen,
and per command (a slot) the length of its lines in an array. A command whose lines
change has its new lines held aside until the next snapshot joins them in; unchanged
runs of commands are copied over as they are. A big portal's ~100,000 series are then
a few large objects rather than an object (or several) per series for the allocator to
keep and the garbage collector to walk.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Collection, Iterable, Mapping, Set
from itertools import accumulate
from typing import TypeVar, cast

from exporter.lines import Block, Series, encode_samples
from exporter.mapping import Sample
from exporter.metrics import Family
from exporter.snapshot import Owner as Owner
from exporter.snapshot import Statuses

T = TypeVar("T")

_NEVER = math.nan  # in `_last`: never succeeded
_NOTHING = hash(())  # in `_prints`: the fingerprint of no samples


def fingerprint(samples: Iterable[Sample]) -> int:
    """A hash of the samples' families, labels and values: equal samples, equal lines.

    Comparing it saves writing the lines of the ~all commands whose counters did not
    change; two different sets of samples of one command would have to collide in 64 bits
    (str hashes are salted per process) to be mistaken for each other.
    """
    return hash(tuple([(s.family.name, s.labels, s.value) for s in samples]))


class _Column:
    """One family's lines of every command: a block as of the last snapshot, then changes."""

    __slots__ = ("_starts", "block", "family", "lengths", "pending")

    def __init__(self, family: Family) -> None:
        self.family = family
        self.block: Block | None = None
        # Per slot, as in the block: the length of its lines. Four bytes each: a portal's
        # lines of one family stay far below 4 GiB.
        self.lengths = array("I")
        self._starts: array[int] | None = array("I", [0])
        self.pending: dict[int, bytes] = {}  # slot -> its lines since (b"": none)

    @property
    def data(self) -> bytes:
        return self.block.data if self.block is not None else b""

    @property
    def starts(self) -> array[int]:
        """Where each slot's lines start in `data`, then where the last ones end."""
        if self._starts is None:
            self._starts = array("I", accumulate(self.lengths, initial=0))
        return self._starts

    def current(self, slot: int) -> bytes:
        """The lines `slot` has now."""
        if slot in self.pending:
            return self.pending[slot]
        if slot < len(self.lengths) and self.lengths[slot]:
            starts = self.starts
            return self.data[starts[slot] : starts[slot + 1]]
        return b""

    def rebuild(self, slots: int) -> None:
        """A new block with the changed lines in: unchanged runs of slots are taken from the
        old one in one piece each. Only references here; the render thread joins them."""
        old = memoryview(self.data)
        starts = self.starts
        known = len(starts) - 1  # slots present in `data`
        if len(self.lengths) < slots:
            self.lengths.frombytes(bytes(self.lengths.itemsize * (slots - len(self.lengths))))
        pieces: list[bytes | memoryview] = []
        copied = 0  # the next slot whose old lines are not yet taken
        for slot in sorted(self.pending):
            if copied < min(slot, known):
                pieces.append(old[starts[copied] : starts[min(slot, known)]])
            lines = self.pending[slot]
            if lines:
                pieces.append(lines)
            self.lengths[slot] = len(lines)
            copied = slot + 1
        if copied < known:
            pieces.append(old[starts[copied] : starts[known]])
        self.pending = {}
        self._starts = None
        size = sum(len(piece) for piece in pieces)
        self.block = Block(self.family, pieces) if size else None

    def compact(self, keep: list[int], slots: int) -> None:
        """Renumber: `keep` lists the old slots that stay, in their order (none pending)."""
        if len(self.lengths) < slots:
            self.lengths.frombytes(bytes(self.lengths.itemsize * (slots - len(self.lengths))))
        # Only slots without lines go (a dropped key's lines were dropped), so the block
        # stays as it is.
        self.lengths = array("I", (self.lengths[slot] for slot in keep))
        self._starts = None


def _as_set(items: Collection[T]) -> Set[T]:
    return items if isinstance(items, Set) else set(items)


class FetchStore:
    """Last good samples per command key, and the last success per (user, source)."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}  # command key -> its slot, in the order first seen
        self._last = array("d")  # per slot: when it last succeeded (NaN: never)
        self._prints = array("q")  # per slot: the fingerprint of the samples its lines show
        self._dead = 0  # slots of keys that were dropped
        self._columns: dict[str, _Column] = {}
        self._families: dict[str, Family] = {}
        self._series = Series()
        self.last_success: dict[Owner, float] = {}
        # The (user, source) pairs of the last cycle: when a cycle gets no answer at all,
        # they are the ones that failed.
        self.watched: set[Owner] = set()
        # Why each (user, source) failed in the cycle running now (a FetchError's code).
        self.reasons: dict[Owner, str] = {}

    def failed_because(self, owner: Owner, code: str) -> None:
        self.reasons[owner] = code

    def succeed(self, key: str, samples: Iterable[Sample], now: float) -> None:
        slot = self._slot(key)
        self._last[slot] = now
        samples = list(samples)
        printed = fingerprint(samples)
        if printed == self._prints[slot]:
            return  # the same samples as the lines it has
        self._prints[slot] = printed
        lines = encode_samples(samples, self._families)
        names, data = cast(tuple[str, ...], lines[::2]), cast(tuple[bytes, ...], lines[1::2])
        new = dict(zip(names, data, strict=True))
        for name in new.keys() - self._columns.keys():
            self._columns[name] = _Column(self._families[name])
        for name, column in self._columns.items():
            wanted = new.get(name, b"")
            if column.current(slot) != wanted:
                column.pending[slot] = wanted

    def fail(self, key: str, now: float, stale_after: float) -> None:
        """The fetch of `key` failed at `now`: its samples stay until they are stale."""
        slot = self._slot(key)
        last = self._last[slot]
        if math.isnan(last) or now - last > stale_after:
            self._drop(slot)

    def fail_all(self, now: float, stale_after: float) -> dict[Owner, bool]:
        """No command got an answer: every fetch failed, and so did every watched owner."""
        for key in list(self.slots):
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
        # Set differences: one pass in C over a big portal's ~30,000 keys, not in Python.
        for key in self.slots.keys() - _as_set(keys):
            self._drop(self.slots.pop(key))
            self._dead += 1
        for owner in self.last_success.keys() - _as_set(owners):
            del self.last_success[owner]

    def samples(self) -> Series:
        """Every command's last good samples, per family in the order of the commands.

        The same `Series` (and, per family, the same `Block`) as last time while nothing
        changed, so that the renderer can reuse its work.
        """
        changed = [c for c in self._columns.values() if c.pending]
        for column in changed:
            column.rebuild(len(self._last))
        if changed:
            self._series = Series(c.block for c in self._columns.values() if c.block is not None)
        if self._dead > len(self.slots):
            self._compact()
        return self._series

    def statuses(
        self, fresh: Mapping[Owner, bool], up: bool, cycle_error: str | None = None
    ) -> Statuses:
        """One status per (user, source) of the cycle; none succeeds on a portal that is down.

        A failed one carries its reason: its own failure's code, else the cycle's. The
        reasons are the cycle's: they are forgotten here."""
        reasons, self.reasons = self.reasons, {}
        return Statuses(fresh, self.last_success, up, reasons, cycle_error)

    def last_fetch(self, key: str) -> float | None:
        """When the fetch of `key` last succeeded (None: never, or an unknown key)."""
        slot = self.slots.get(key)
        if slot is None or math.isnan(self._last[slot]):
            return None
        return self._last[slot]

    def _slot(self, key: str) -> int:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = len(self._last)
            self._last.append(_NEVER)
            self._prints.append(_NOTHING)
        return slot

    def _drop(self, slot: int) -> None:
        self._prints[slot] = _NOTHING
        for column in self._columns.values():
            if column.current(slot):
                column.pending[slot] = b""

    def _compact(self) -> None:
        """Give the live keys slots 0, 1, ... again, once most slots belong to dropped keys."""
        keep = sorted(self.slots.values())
        for column in self._columns.values():
            column.compact(keep, len(self._last))
        renumber = {old: new for new, old in enumerate(keep)}
        self.slots = {key: renumber[slot] for key, slot in self.slots.items()}
        self._last = array("d", (self._last[slot] for slot in keep))
        self._prints = array("q", (self._prints[slot] for slot in keep))
        self._dead = 0

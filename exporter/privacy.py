"""What the exporter may tell about a person, per portal: the privacy modes.

- ``none``: user ids and names as Bitrix24 has them.
- ``pseudonymous``: every user id in a label (``user_id``, ``head_user_id``, and the
  ``chat_id`` of a dialog, which is the other person's user id) becomes
  ``hmac.new(key, f"{portal}:{user_id}".encode(), hashlib.sha256).hexdigest()[:16]``:
  stable across restarts, and whoever holds the key can compute it for a given user to map
  it back. Names are not exported (no ``bitrix24_user_info``) and log lines below debug
  level name users by their pseudonym.
- ``aggregate``: no series carries a user. Every family with a ``user_id`` label is left
  out, ``head_user_id`` is empty, and per-user health becomes the per-portal counts
  ``bitrix24_collect_users`` and ``bitrix24_collect_success_users`` and the data age
  ``bitrix24_collect_oldest_success_timestamp_seconds`` (the poller adds it in this
  mode). Department sums are shown only where they cover groups of at least
  ``min_team_size`` users
  (`exporter.teams.shown_departments`); log lines name no user.

`Privacy.apply` is the one place a snapshot passes before anything leaves the process:
the renderer (`/metrics`) and the status page (`/`) read only snapshots that went through
it. It works on label names, not on families, so a new family with a ``user_id`` label is
covered without a change here. Log lines name users through `Privacy.who`.

It works on a family's block of exposition lines, not on samples: a family that drops
goes without being read, one without a user label goes as it is, and a block that did not
change since the last cycle gets last cycle's rewrite. A changed block is rewritten line
by line when it is first read, usually by the render thread; reading every sample on the
event loop each cycle held up scrapes for seconds at 100,000 series.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache, partial

from exporter.config import Portal, PrivacyMode
from exporter.lines import Block, Series, read_samples, unescape
from exporter.mapping import Sample
from exporter.metrics import IM_CHAT_UNREAD, Family
from exporter.snapshot import LazyStatuses, PortalSnapshot, Status

# Labels whose value is a user id.
USER_LABELS = frozenset({"user_id", "head_user_id"})


def pseudonym(key: str, portal: str, user_id: int | str) -> str:
    """The pseudonym of one user of one portal.

    >>> pseudonym("0123456789abcdef", "acme", 17)
    '0621a943d9549435'
    """
    message = f"{portal}:{user_id}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:16]


class Privacy:
    """One portal's privacy mode, applied to its snapshots and its log lines."""

    def __init__(
        self, portal: str, mode: PrivacyMode = "none", *, key: str = "", min_team_size: int = 5
    ) -> None:
        self.portal = portal
        self.mode = mode
        self._key = key
        # Department sums of fewer users than this are never shown (1: every sum).
        self.min_team_size = min_team_size if mode == "aggregate" else 1
        self._pseudonyms: dict[str, str] = {}
        self._plans: dict[Family, tuple[int, ...] | None] = {}
        # Per family: last cycle's block and its rewrite, reused while the block is the same.
        self._done: dict[Family, tuple[Block, Block]] = {}

    @classmethod
    def of(cls, portal: Portal) -> Privacy:
        settings = portal.privacy
        return cls(
            portal.name,
            settings.mode,
            key=settings.pseudonym_key or "",
            min_team_size=settings.min_team_size,
        )

    def who(self, user_id: int) -> str | None:
        """How a log line names a user: ``user 17``, ``user <pseudonym>``, or None (say no
        user at all)."""
        match self.mode:
            case "none":
                return f"user {user_id}"
            case "pseudonymous":
                return f"user {self._user(str(user_id))}"
            case _:
                return None

    def apply(self, snapshot: PortalSnapshot) -> PortalSnapshot:
        """The snapshot as this mode allows it out of the process."""
        if self.mode == "none":
            return snapshot
        samples = self._series(snapshot.samples)
        if self.mode == "pseudonymous":
            statuses: Sequence[Status] = Renamed(snapshot.statuses, self._user)
            return dataclasses.replace(snapshot, samples=samples, statuses=statuses, user_names=())
        return dataclasses.replace(snapshot, samples=samples, statuses=(), user_names=())

    # -- labels -----------------------------------------------------------------------

    def _user(self, user_id: str) -> str:
        if not user_id:
            return user_id
        found = self._pseudonyms.get(user_id)
        if found is None:
            found = self._pseudonyms[user_id] = pseudonym(self._key, self.portal, user_id)
        return found

    def _plan(self, family: Family) -> tuple[int, ...] | None:
        """The positions of user-id labels in `family`; None: drop the family."""
        if family not in self._plans:
            at = tuple(i for i, name in enumerate(family.labels) if name in USER_LABELS)
            drop = self.mode == "aggregate" and "user_id" in family.labels
            self._plans[family] = None if drop else at
        return self._plans[family]

    def _series(self, series: Series) -> Series:
        blocks: list[Block] = []
        done: dict[Family, tuple[Block, Block]] = {}
        for family, block in series.blocks.items():
            plan = self._plan(family)
            if plan is None:
                continue
            if not plan:
                blocks.append(block)
                continue
            last = self._done.get(family)
            if last is None or last[0] is not block:
                last = (block, Block.later(family, partial(self._hidden, family, plan, block)))
            done[family] = last
            blocks.append(last[1])
        self._done = done
        return Series(blocks)

    def _hidden(self, family: Family, plan: tuple[int, ...], block: Block) -> bytes:
        """`block`'s lines with the user labels at `plan` hidden."""
        text = block.data.decode("utf-8")
        hidden, lines = _line_pattern(family).subn(partial(self._hide_line, family, plan), text)
        if lines != text.count("\n"):
            # A line the pattern does not know (never written by this exporter): go the
            # long way, through the samples, rather than let one out as it is.
            samples = read_samples(family, block.data)
            series = Series.of(self._hide(s, plan) for s in samples)
            found = series.block(family)
            return found.data if found is not None else b""
        return hidden.encode("utf-8")

    def _hide_line(self, family: Family, plan: tuple[int, ...], line: re.Match[str]) -> str:
        # Values as written in the line: read unescaped; pseudonyms (hex) need no escaping.
        return _line_head(family, self._hidden_labels(family, plan, line.groups(), unescape))

    def _hide(self, sample: Sample, plan: tuple[int, ...]) -> Sample:
        labels = self._hidden_labels(sample.family, plan, sample.labels, str)
        return Sample(sample.family, tuple(labels), sample.value)

    def _hidden_labels(
        self,
        family: Family,
        plan: tuple[int, ...],
        values: Iterable[str],
        read: Callable[[str], str],
    ) -> list[str]:
        """`values` with the user labels at `plan` hidden; `read` gives a value's text."""
        hidden = list(values)
        for i in plan:
            hidden[i] = self._user(read(hidden[i])) if self.mode == "pseudonymous" else ""
        if family is IM_CHAT_UNREAD and read(hidden[2]).startswith("dialog"):
            hidden[3] = self._user(read(hidden[3]))  # a dialog's chat_id is the other person's id
        return hidden


# A label value as written in a line: anything but a bare quote or backslash, or an escape.
_VALUE = r'((?:[^"\\\n]|\\.)*)'


@cache
def _line_pattern(family: Family) -> re.Pattern[str]:
    """The start of one of `family`'s lines, up to its value, one group per label value."""
    labels = ",".join(f'{name}="{_VALUE}"' for name in family.labels)
    return re.compile("^" + re.escape(family.name) + r"\{" + labels + r"\} ", re.MULTILINE)


def _line_head(family: Family, values: Iterable[str]) -> str:
    pairs = zip(family.labels, values, strict=True)
    labels = ",".join(f'{name}="{value}"' for name, value in pairs)
    return f"{family.name}{{{labels}}} "


class Renamed(LazyStatuses[tuple[Sequence[Status], Callable[[str], str]]]):
    """Statuses with their user ids as pseudonyms, made when first read (by the render
    thread, as the statuses themselves: a big portal has thousands)."""

    def __init__(self, statuses: Sequence[Status], user: Callable[[str], str]) -> None:
        super().__init__((statuses, user))

    def _count(self, inputs: tuple[Sequence[Status], Callable[[str], str]]) -> int:
        return len(inputs[0])

    def _make(self, inputs: tuple[Sequence[Status], Callable[[str], str]]) -> tuple[Status, ...]:
        statuses, user = inputs
        return tuple(dataclasses.replace(s, user_id=user(str(s.user_id))) for s in statuses)

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
  ``bitrix24_collect_users`` and ``bitrix24_collect_success_users``. Department sums are
  shown only where they cover groups of at least ``min_team_size`` users
  (`exporter.teams.shown_departments`); log lines name no user.

`Privacy.apply` is the one place a snapshot passes before anything leaves the process:
the renderer (`/metrics`) and the status page (`/`) read only snapshots that went through
it. It works on label names, not on families, so a new family with a ``user_id`` label is
covered without a change here. Log lines name users through `Privacy.who`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Iterable

from exporter.config import Portal, PrivacyMode
from exporter.lines import Series
from exporter.mapping import Sample
from exporter.metrics import IM_CHAT_UNREAD, Family
from exporter.snapshot import PortalSnapshot

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
        # Last cycle's rewritten samples, so that unchanged samples keep their objects.
        self._memo: dict[Sample, Sample] = {}

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
        if self.mode == "pseudonymous":
            return dataclasses.replace(
                snapshot,
                samples=Series.of(self._rewrite(snapshot.samples)),
                statuses=tuple(
                    dataclasses.replace(s, user_id=self._user(str(s.user_id)))
                    for s in snapshot.statuses
                ),
                user_names=(),
            )
        return dataclasses.replace(
            snapshot, samples=Series.of(self._rewrite(snapshot.samples)), statuses=(), user_names=()
        )

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

    def _rewrite(self, samples: Iterable[Sample]) -> tuple[Sample, ...]:
        memo: dict[Sample, Sample] = {}
        out: list[Sample] = []
        for sample in samples:
            plan = self._plan(sample.family)
            if plan is None:
                continue
            if not plan:
                out.append(sample)
                continue
            done = self._memo.get(sample)
            if done is None:
                done = self._hide(sample, plan)
            memo[sample] = done
            out.append(done)
        self._memo = memo
        return tuple(out)

    def _hide(self, sample: Sample, plan: tuple[int, ...]) -> Sample:
        labels = list(sample.labels)
        for i in plan:
            labels[i] = self._user(labels[i]) if self.mode == "pseudonymous" else ""
        if sample.family is IM_CHAT_UNREAD and labels[2].startswith("dialog"):
            labels[3] = self._user(labels[3])  # a dialog's chat_id is the other person's id
        return Sample(sample.family, tuple(labels), sample.value)

"""Sources: one module per Bitrix24 method that a poll cycle fetches.

A source knows, for its method, everything the poller must not: which commands a cycle
sends for which users (from its config section), how one command's result becomes
samples (through the pure functions of `exporter.mapping`), how a command is named in a
log line, and which metric families it fills. The poller loops over a portal's sources
and never asks which one it holds.

Adding a source: see docs/architecture.md ("Adding a source").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from exporter.bitrix import Command
from exporter.config import Portal
from exporter.mapping import Sample
from exporter.metrics import Family


class Source(Protocol):
    """What the poller needs of one Bitrix24 method."""

    # The `source` label of the health series (collect_success, last_success_timestamp).
    name: ClassVar[str]
    method: ClassVar[str]
    # The families this source's samples belong to, in exposition order.
    families: ClassVar[tuple[Family, ...]]
    # The scopes that allow the method (any one of them); `doctor` checks them.
    scopes: ClassVar[tuple[str, ...]]
    # True for methods that only read the caller's own data (im.counters.get): they are
    # asked once per credential, for its own user, never for other users.
    caller_only: ClassVar[bool]

    def plan(self, users: Sequence[int]) -> list[Planned]:
        """The commands of one cycle for `users` (for a caller_only source: the caller)."""
        ...

    def samples(self, planned: Planned, result: object) -> list[Sample]:
        """One command's result as samples; raises FetchError for one it cannot use."""
        ...

    def describe(self, command: Command) -> str:
        """What one command asks for, for a log line ("group 0, role view_all")."""
        ...


@dataclass(frozen=True, slots=True)
class Planned:
    """One command of a cycle, the user whose counters it fetches and its source."""

    command: Command
    user_id: int
    source: Source


def check_method(source: Source, command: Command) -> None:
    """A result is only ever mapped by the source of its method."""
    if command.method != source.method:
        raise TypeError(f"{source.name} source cannot map a {command.method} result")


class Planner:
    """The commands of a cycle from a portal's sources, kept while the users stay the same.

    Building the plan anew every cycle blocked the event loop for ~0.1 s per 25,000
    commands; nothing changes a plan once it is built."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = tuple(sources)
        self._last: tuple[tuple[tuple[int, ...], int], list[Planned]] | None = None

    def plan(self, users: Sequence[int], own_user: int) -> list[Planned]:
        inputs = (tuple(users), own_user)
        if self._last is not None and self._last[0] == inputs:
            return self._last[1]
        plan: list[Planned] = []
        for source in self.sources:
            plan += source.plan([own_user] if source.caller_only else users)
        self._last = (inputs, plan)
        return plan


def sources_for(portal: Portal) -> tuple[Source, ...]:
    """The enabled sources of a portal, in the order their commands are sent."""
    from exporter.sources.im import ImSource
    from exporter.sources.tasks import TasksSource

    found: list[Source] = []
    if portal.tasks.enabled:
        found.append(TasksSource(portal.name, portal.tasks))
    # Last, so that its one command fills the last partial batch instead of splitting
    # the task counters.
    if portal.im.enabled:
        found.append(ImSource(portal.name, portal.im))
    return tuple(found)


def source_families() -> tuple[Family, ...]:
    """Every source's families, in exposition order."""
    from exporter.sources.departments import DepartmentsSource
    from exporter.sources.im import ImSource
    from exporter.sources.tasks import TasksSource

    return (*TasksSource.families, *ImSource.families, *DepartmentsSource.families)

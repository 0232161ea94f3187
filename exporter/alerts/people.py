"""Who an alert concerns, and what the receiver may use of a running portal.

A receiver needs two things of the portal it sends through: the `BitrixClient` of its main
credential (so sends share the poller's rate limit, operating budget, retries and request
counters) and the names of the users polling learned (for `[USER=ID]` mentions). `Portals`
is that narrow view; `SupervisorPortals` reads it from the running pollers.

A portal in a privacy mode other than `none` exports pseudonyms (or nothing) where user ids
were, so its alerts' `user_id` labels are not Bitrix24 user ids: `user_ids_exported` says
so, and the receiver then neither notifies nor mentions anyone by such a label (turning a
pseudonym back into a person would undo what the mode is for).

Department heads and names come from the company structure polling learned (teams:
`department.get`). `SupervisorDepartments` reads it; where a department has no head, the
nearest department above it that has one answers. Without teams it knows nothing:
`notify_head` then notifies nobody and a department shows by its `department` label or id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from exporter.bitrix import BitrixClient
from exporter.poller import PortalPoller
from exporter.supervisor import Supervisor
from exporter.teams import OrgChart


class Portals(Protocol):
    """What alert delivery uses of the portals the exporter polls."""

    def client(self, portal: str) -> BitrixClient | None:
        """The portal's main client, None when this exporter does not poll the portal."""
        ...

    def user_names(self, portal: str) -> Mapping[int, str]:
        """User id -> full name, as far as polling has learned them."""
        ...

    def user_ids_exported(self, portal: str) -> bool:
        """Whether the portal's series carry real user ids (privacy mode none)."""
        ...


class Departments(Protocol):
    """The company structure of a portal, as the teams feature knows it."""

    def head_of(self, portal: str, department_id: int) -> int | None:
        """The user id of the department's head; None when unknown or without a head."""
        ...

    def name_of(self, portal: str, department_id: int) -> str | None:
        """The department's name; None when unknown."""
        ...


class NoDepartments:
    """No company structure: no heads, no names."""

    def head_of(self, portal: str, department_id: int) -> int | None:
        return None

    def name_of(self, portal: str, department_id: int) -> str | None:
        return None


class SupervisorPortals:
    """`Portals` read from the supervisor's running pollers at the time of each call.

    The supervisor starts with the app, after the routes are laid out, and a reload
    replaces pollers: so it is looked up on every call and nothing is cached.
    """

    def __init__(self, supervisor: Callable[[], Supervisor | None]) -> None:
        self._supervisor = supervisor

    def _poller(self, portal: str) -> PortalPoller | None:
        supervisor = self._supervisor()
        return None if supervisor is None else supervisor.pollers.get(portal)

    def client(self, portal: str) -> BitrixClient | None:
        poller = self._poller(portal)
        return None if poller is None else poller.clients.main

    def user_names(self, portal: str) -> Mapping[int, str]:
        poller = self._poller(portal)
        return {} if poller is None else poller.directory.names

    def user_ids_exported(self, portal: str) -> bool:
        poller = self._poller(portal)
        return poller is not None and poller.portal.privacy.mode == "none"


class SupervisorDepartments:
    """`Departments` from the department tree the running pollers learned (teams)."""

    def __init__(self, supervisor: Callable[[], Supervisor | None]) -> None:
        self._supervisor = supervisor

    def _chart(self, portal: str) -> OrgChart | None:
        supervisor = self._supervisor()
        poller = None if supervisor is None else supervisor.pollers.get(portal)
        return None if poller is None else poller.directory.chart

    def head_of(self, portal: str, department_id: int) -> int | None:
        chart = self._chart(portal)
        if chart is None or department_id not in chart.departments:
            return None
        heads = (chart.departments[d].head for d in chart.ancestry(department_id))
        return next((head for head in heads if head is not None), None)

    def name_of(self, portal: str, department_id: int) -> str | None:
        chart = self._chart(portal)
        record = None if chart is None else chart.departments.get(department_id)
        return record.name if record is not None and record.name else None

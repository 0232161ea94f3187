"""Who an alert concerns, and what the receiver may use of a running portal.

A receiver needs two things of the portal it sends through: the `BitrixClient` of its main
credential (so sends share the poller's rate limit, operating budget, retries and request
counters) and the names of the users polling learned (for `[USER=ID]` mentions). `Portals`
is that narrow view; `SupervisorPortals` reads it from the running pollers.

Department heads and names come from the teams feature. Until it is there, `Departments`
is answered by `NoDepartments` (no head, no name): `notify_head` then notifies nobody, and
a department shows as "department N". The teams feature provides an object with the same
two methods and hands it to `build_receivers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from exporter.bitrix import BitrixClient
from exporter.poller import PortalPoller
from exporter.supervisor import Supervisor


class Portals(Protocol):
    """What alert delivery uses of the portals the exporter polls."""

    def client(self, portal: str) -> BitrixClient | None:
        """The portal's main client, None when this exporter does not poll the portal."""
        ...

    def user_names(self, portal: str) -> Mapping[int, str]:
        """User id -> full name, as far as polling has learned them."""
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

"""Receivers from the config, kept across reloads, and the route laid out in the app.

A reload builds the receivers again; a receiver of the same name and portal keeps its
memory of deliveries (so a reload repeats nothing), and keeps its cap while
`max_per_minute` is the same (so a reload does not reopen a full minute).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from aiohttp import web

from exporter import metrics
from exporter.alerts.delivery import AlertStats, Receiver, ReceiverSettings
from exporter.alerts.people import (
    Departments,
    Portals,
    SupervisorDepartments,
    SupervisorPortals,
)
from exporter.alerts.route import AlertRoutes, install
from exporter.render import Publisher
from exporter.supervisor import Supervisor

ALERT_ROUTES = web.AppKey("alert_routes", AlertRoutes)


def build_receivers(
    settings: Sequence[ReceiverSettings],
    portals: Portals,
    stats: AlertStats,
    *,
    departments: Departments | None = None,
    previous: Mapping[str, Receiver] | None = None,
) -> dict[str, Receiver]:
    """One `Receiver` per configured receiver, keeping what still applies of `previous`."""
    built: dict[str, Receiver] = {}
    for item in settings:
        old = (previous or {}).get(item.name)
        same_portal = old is not None and old.settings.portal == item.portal
        same_cap = old is not None and old.cap.per_minute == item.max_per_minute
        built[item.name] = Receiver(
            item,
            portals,
            stats,
            departments=departments,
            memory=old.memory if old and same_portal else None,
            cap=old.cap if old and same_cap else None,
        )
    return built


def add_alert_routes(
    app: web.Application,
    settings: Sequence[ReceiverSettings],
    supervisor: Callable[[], Supervisor | None],
    publisher: Publisher,
    *,
    basic_auth: Callable[[], bool] = lambda: False,
    departments: Departments | None = None,
) -> AlertRoutes:
    """The receivers' route (only when there is a receiver) and their counters on /metrics."""
    stats = AlertStats()
    portals = SupervisorPortals(supervisor)
    departments = departments or SupervisorDepartments(supervisor)
    routes = AlertRoutes(
        build_receivers(settings, portals, stats, departments=departments),
        stats,
        basic_auth=basic_auth,
        delivered=publisher.touch,
        rebuild=lambda new, old: build_receivers(
            new, portals, stats, departments=departments, previous=old
        ),
    )
    if routes.receivers:
        publisher.info.counters[metrics.ALERT_NOTIFICATIONS] = stats.notifications
        publisher.info.counters[metrics.ALERT_DELIVERIES] = stats.deliveries
    install(app, routes)
    app[ALERT_ROUTES] = routes
    return routes

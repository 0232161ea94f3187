"""One alert receiver: where a notification goes, sending it once, and what came of it.

A notification becomes targets, in this order: the chat message (`im.message.add` to the
receiver's `chat`), then one notification (`im.notify.system.add`) per person and status:
the user in an alert's `user_id` label (`notify_user`) and the head of the department in
its `department_id` label (`notify_head`). Each target has its own key in the receiver's
`DeliveryMemory`: the chat key is (chat, group key, status, every alert's fingerprint with
its start and end), a person's key is (user, status, the fingerprints, starts and ends of
that person's alerts). So a repeat or a retry of Alertmanager delivers nothing twice, a
retry after a partial failure sends only what is missing, a resolved notification is a new
message, and a person whose alerts did not change is not told again when another alert
joins the group.

Every send goes through the portal's main `BitrixClient` and spends one slot of the
receiver's `MinuteCap`; at the cap the rest waits for Alertmanager's retry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

from exporter.alerts.memory import DEFAULT_WINDOW, DeliveryMemory, MinuteCap
from exporter.alerts.messages import (
    Names,
    chat_message,
    mentioned_users,
    personal_message,
    positive_id,
)
from exporter.alerts.payload import Alert, Notification, Status
from exporter.alerts.people import Departments, NoDepartments, Portals
from exporter.bitrix import BitrixClient
from exporter.failures import BitrixError, Code

log = logging.getLogger(__name__)

CHAT_METHOD = "im.message.add"
# "system": the notification has no sender, like the portal's own; "personal" would come
# from the webhook's user, who is rarely the one raising the alert.
NOTIFY_METHOD = "im.notify.system.add"
# Sends after which Alertmanager should retry: the portal did not take the message, but a
# later attempt may (it was unreachable, overloaded or the method's budget is spent).
TRANSIENT = frozenset({"OPERATION_TIME_LIMIT"})
# Retry-After for a transient failure: about one poll cycle of a small portal.
RETRY_AFTER_FAILURE = 30

TargetKind = Literal["chat", "user"]


class ReceiverSettings(Protocol):
    """A receiver as the config declares it (`alert_receivers[]`)."""

    @property
    def name(self) -> str: ...
    @property
    def portal(self) -> str: ...
    @property
    def token(self) -> str | None: ...
    @property
    def chat(self) -> str | None: ...
    @property
    def notify_user(self) -> bool: ...
    @property
    def notify_head(self) -> bool: ...
    @property
    def max_per_minute(self) -> int: ...


@dataclass(frozen=True)
class Target:
    """One send of a notification: to the chat, or to one person."""

    kind: TargetKind
    key: tuple[Any, ...]
    method: str
    params: Mapping[str, Any]
    shown: str  # "chat chat42", "user 3"


@dataclass
class Report:
    """What came of one notification: per target, and whether Alertmanager should retry."""

    delivered: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line each: target and error
    # Seconds after which a retry may succeed; None when nothing is left to retry.
    retry_after: int | None = None
    retry_reason: str = ""

    @property
    def complete(self) -> bool:
        return not self.failed and self.retry_after is None

    def summary(self) -> str:
        """The report on one line, for the response body and the log."""
        parts = []
        if self.delivered:
            parts.append("delivered to " + ", ".join(self.delivered))
        if self.duplicates:
            parts.append("already delivered to " + ", ".join(self.duplicates))
        if self.failed:
            parts.append("failed: " + "; ".join(self.failed))
        if self.retry_reason:
            parts.append(self.retry_reason)
        return "; ".join(parts) or "nothing to deliver"


@dataclass
class AlertStats:
    """The receivers' own counters: notifications received, deliveries by outcome."""

    # Label values -> count; keys typed as any tuple so the renderer can take them as is.
    notifications: dict[tuple[str, ...], float] = field(default_factory=dict)
    deliveries: dict[tuple[str, ...], float] = field(default_factory=dict)

    def declare(self, receiver: str, kinds: Sequence[TargetKind]) -> None:
        """Start the receiver's series at 0, so a first increase shows in rate()."""
        for status in ("firing", "resolved"):
            self.notifications.setdefault((receiver, status), 0.0)
        for kind in kinds:
            for outcome in ("ok", "failed", "duplicate"):
                self.deliveries.setdefault((receiver, kind, outcome), 0.0)

    def received(self, receiver: str, status: Status) -> None:
        key = (receiver, status)
        self.notifications[key] = self.notifications.get(key, 0.0) + 1

    def delivery(self, receiver: str, kind: TargetKind, outcome: str) -> None:
        key = (receiver, kind, outcome)
        self.deliveries[key] = self.deliveries.get(key, 0.0) + 1


class Receiver:
    """One configured receiver with its memory of deliveries and its per-minute cap."""

    def __init__(
        self,
        settings: ReceiverSettings,
        portals: Portals,
        stats: AlertStats,
        *,
        departments: Departments | None = None,
        window: float = DEFAULT_WINDOW,
        memory: DeliveryMemory | None = None,
        cap: MinuteCap | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.token = settings.token
        self.portals = portals
        self.departments: Departments = departments or NoDepartments()
        self.stats = stats
        self.memory = memory or DeliveryMemory(window)
        self.cap = cap or MinuteCap(settings.max_per_minute)
        kinds: list[TargetKind] = ["chat"] if settings.chat else []
        if settings.notify_user or settings.notify_head:
            kinds.append("user")
        stats.declare(self.name, kinds)

    def names(self, notification: Notification) -> Names:
        """The names the messages of this notification mention, as the portal knows them."""
        portal = self.settings.portal
        departments: dict[int, str] = {}
        for alert in notification.alerts:
            department = positive_id(alert.labels.get("department_id"))
            if department is None or department in departments:
                continue
            # The alert's own `department` label (the teams rules set it) when the
            # structure is not known here.
            name = self.departments.name_of(portal, department) or alert.labels.get("department")
            if name:
                departments[department] = name
        if not self.portals.user_ids_exported(portal):
            return Names(departments=departments, user_ids=False)
        known = self.portals.user_names(portal)
        users = {u: known[u] for u in mentioned_users(notification.alerts) if u in known}
        return Names(users=users, departments=departments)

    def targets(self, notification: Notification) -> list[Target]:
        """Every send this notification asks for, the chat first."""
        names = self.names(notification)
        found: list[Target] = []
        chat = self.settings.chat
        if chat:
            identities = frozenset(a.identity for a in notification.alerts)
            found.append(
                Target(
                    "chat",
                    ("chat", chat, notification.group_key, notification.status, identities),
                    CHAT_METHOD,
                    {
                        "DIALOG_ID": chat,
                        "MESSAGE": chat_message(notification, names),
                        "URL_PREVIEW": "N",
                    },
                    f"chat {chat}",
                )
            )
        for (user_id, status), entries in self._recipients(notification).items():
            alerts = [alert for alert, _ in entries]
            departments = {department for _, department in entries}
            # Told as a head only when every alert reached them through one department.
            department = departments.pop() if len(departments) == 1 else None
            found.append(
                Target(
                    "user",
                    ("user", user_id, status, frozenset(a.identity for a in alerts)),
                    NOTIFY_METHOD,
                    {
                        "USER_ID": user_id,
                        "MESSAGE": personal_message(status, alerts, names, department=department),
                    },
                    f"user {user_id}",
                )
            )
        return found

    def _recipients(
        self, notification: Notification
    ) -> dict[tuple[int, Status], list[tuple[Alert, int | None]]]:
        """(person, status) -> their alerts, each with the department it reached them by
        (None: the alert names them)."""
        found: dict[tuple[int, Status], dict[tuple[str, str, str], tuple[Alert, int | None]]] = {}
        real_ids = self.portals.user_ids_exported(self.settings.portal)
        for alert in notification.alerts:
            if self.settings.notify_user and real_ids:
                user_id = positive_id(alert.labels.get("user_id"))
                if user_id is not None:
                    found.setdefault((user_id, alert.status), {})[alert.identity] = (alert, None)
            if self.settings.notify_head:
                department = positive_id(alert.labels.get("department_id"))
                if department is not None:
                    head = self.departments.head_of(self.settings.portal, department)
                    if head is not None:
                        # Someone named by the alert is told as themselves, not as a head.
                        found.setdefault((head, alert.status), {}).setdefault(
                            alert.identity, (alert, department)
                        )
        return {key: list(entries.values()) for key, entries in sorted(found.items())}

    async def deliver(self, notification: Notification) -> Report:
        """Send every target not delivered yet, within the cap; never raises for Bitrix24."""
        self.stats.received(self.name, notification.status)
        report = Report()
        targets = self.targets(notification)
        client = self.portals.client(self.settings.portal)
        for target in targets:
            if self.memory.delivered(target.key):
                report.duplicates.append(target.shown)
                self.stats.delivery(self.name, target.kind, "duplicate")
                continue
            if client is None:
                report.retry_after = RETRY_AFTER_FAILURE
                report.retry_reason = (
                    f"portal {self.settings.portal} is not polled by this exporter"
                )
                break
            if client.budget.paused(target.method):
                report.retry_after = RETRY_AFTER_FAILURE
                report.retry_reason = (
                    f"{target.method} is paused by the portal's operating limit; retry later"
                )
                break
            if not self.cap.take():
                report.retry_after = self.cap.retry_after()
                report.retry_reason = (
                    f"over {self.cap.per_minute} deliveries per minute; "
                    f"retry in {report.retry_after}s"
                )
                break
            try:
                sent = await self.memory.once(target.key, partial(_send, client, target))
            except BitrixError as error:
                self.stats.delivery(self.name, target.kind, "failed")
                report.failed.append(f"{target.shown}: {error}")
                log.warning(
                    "alert receiver %s: %s not delivered: %s", self.name, target.shown, error
                )
                if error.retryable or error.error in TRANSIENT:
                    # The portal is unreachable or overloaded: the rest would fail alike.
                    report.retry_after = RETRY_AFTER_FAILURE
                    report.retry_reason = "Bitrix24 could not be reached; retry later"
                    break
                continue
            outcome = "ok" if sent else "duplicate"
            self.stats.delivery(self.name, target.kind, outcome)
            (report.delivered if sent else report.duplicates).append(target.shown)
        return report


async def _send(client: BitrixClient, target: Target) -> None:
    """One send; an answer without an id (im.notify.*: `false`) is a failure too."""
    result = (await client.call(target.method, target.params)).result
    if isinstance(result, bool) or not isinstance(result, int | str) or not str(result).isdigit():
        client.stats.errors[target.method, Code.NOT_SENT] += 1
        raise BitrixError(
            client.portal,
            target.method,
            Code.NOT_SENT,
            f"answered {_shown(result)} instead of an id: not delivered",
            200,
        )


def _shown(result: object) -> str:
    text = repr(result)
    return text if len(text) <= 40 else text[:37] + "..."

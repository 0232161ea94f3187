"""Alert delivery without HTTP: the webhook body, the BB-code messages, the delivery memory,
the per-minute cap (pure functions and objects with an injected clock) and who is told."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from exporter.alerts.delivery import AlertStats, Receiver
from exporter.alerts.memory import DeliveryMemory, MinuteCap
from exporter.alerts.messages import (
    MAX_LISTED,
    PORTAL_LIMIT,
    Names,
    chat_message,
    personal_message,
)
from exporter.alerts.payload import PayloadRejected, parse_notification
from exporter.alerts.people import NoDepartments
from tests.alertlib import alert, body

NAMES = Names(users={3: "Clara Schmidt"}, departments={15: "R&D"})


# ---- the webhook body -----------------------------------------------------------------------


def test_payload_is_read() -> None:
    """Every field the receiver uses comes through; unknown keys are ignored."""
    raw = body(alert("a", labels={"user_id": "3"}), alert("b", status="resolved"), truncated=2)
    raw["somethingNew"] = {"x": 1}
    notification = parse_notification(raw)
    assert notification.status == "firing"
    assert notification.truncated == 2
    assert [a.fingerprint for a in notification.firing] == ["a"]
    assert [a.fingerprint for a in notification.resolved] == ["b"]
    assert notification.alerts[1].identity == ("b", "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z")
    assert notification.external_url == "http://alertmanager:9093"


def _broken(change: dict[str, Any]) -> dict[str, Any]:
    raw = body(alert())
    for path, value in change.items():
        node: Any = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([1, 2], "body: expected a JSON object, got list"),
        (_broken({"version": "3"}), "version: expected \"4\", got '3'"),
        (_broken({"version": ...}), 'version: expected "4", got null'),
        (_broken({"status": "bad"}), 'status: expected "firing" or "resolved", got \'bad\''),
        (_broken({"alerts": {}}), "alerts: expected a list, got object"),
        (_broken({"alerts": []}), "alerts: empty"),
        (_broken({"groupKey": 5}), "groupKey: expected a string, got int"),
        (_broken({"groupKey": ""}), "groupKey: empty"),
        (
            _broken({"truncatedAlerts": -1}),
            "truncatedAlerts: expected a non-negative integer, got int",
        ),
        (_broken({"commonLabels": []}), "commonLabels: expected an object, got list"),
        (_broken({"alerts.0.labels": None}), "alerts[0].labels: expected an object, got null"),
        (
            _broken({"alerts.0.labels.severity": 5}),
            "alerts[0].labels.severity: expected a string, got int",
        ),
        (
            _broken({"alerts.0.status": None}),
            'alerts[0].status: expected "firing" or "resolved", got null',
        ),
        (
            _broken({"alerts.0.fingerprint": ...}),
            "alerts[0].fingerprint: expected a string, got null",
        ),
        (_broken({"alerts.0.startsAt": 1}), "alerts[0].startsAt: expected a string, got int"),
        (
            _broken({"alerts.0.annotations": "x"}),
            "alerts[0].annotations: expected an object, got str",
        ),
    ],
)
def test_payload_rejections_name_the_key(raw: object, reason: str) -> None:
    """A body that is not a version 4 payload is refused with one line naming the key."""
    with pytest.raises(PayloadRejected) as caught:
        parse_notification(raw)
    assert str(caught.value) == reason
    assert "\n" not in reason


# ---- chat messages --------------------------------------------------------------------------


def test_firing_message_names_the_user_with_a_mention() -> None:
    """Status, alert, severity, summary, description, the user as a mention, the
    department by name, the portal, other labels, and links to the source, the runbook
    and Alertmanager; no job or prometheus labels."""
    raw = body(
        alert(
            labels={"user_id": "3", "department_id": "15", "job": "bitrix24", "source": "tasks"},
            annotations={
                "summary": "Clara Schmidt (user 3) has 12 overdue tasks on acme",
                "description": "She has had more than 5 for a day.",
                "runbook_url": "https://example.org/docs/alerts.md#overdue",
            },
        )
    )
    text = chat_message(parse_notification(raw), NAMES)
    assert text.splitlines() == [
        "[b][color=#d32f2f]FIRING[/color][/b] [b]Bitrix24UserTasksOverdue[/b] · 1 alert",
        "",
        "[b]Bitrix24UserTasksOverdue[/b] · info",
        "Clara Schmidt (user 3) has 12 overdue tasks on acme",
        "[i]She has had more than 5 for a day.[/i]",
        "User: [USER=3]Clara Schmidt[/USER] · Department: R&D · Portal: acme · source: tasks",
        "[url=http://prometheus:9090/graph?g0.expr=x]Source[/url]"
        " · [url=https://example.org/docs/alerts.md#overdue]Runbook[/url]",
        "",
        "[url=http://alertmanager:9093]Alertmanager[/url]",
    ]


@pytest.mark.parametrize(
    ("raw", "present", "absent"),
    [
        # A user the portal has no name for: plain text, no mention.
        (body(alert(labels={"user_id": "9"})), ["User: user 9"], ["[USER="]),
        # Resolved: its own header colour and word.
        (
            body(alert(status="resolved")),
            ["[b][color=#388e3c]RESOLVED[/color][/b]"],
            ["FIRING"],
        ),
        # Firing and resolved in one group: each alert marked, firing listed first.
        (
            body(alert("a", status="resolved"), alert("b")),
            ["FIRING[/color] [b]Bitrix24", "RESOLVED[/color] [b]Bitrix24", "· 2 alerts"],
            [],
        ),
        # Several alert names: a neutral title.
        (body(alert("a"), alert("b", name="Bitrix24DataStale")), ["[b]Alerts[/b]"], []),
        # BB-code in labels and annotations is shown, not obeyed.
        (
            body(
                alert(
                    labels={"note": "[USER=1]boss[/USER]"},
                    annotations={"summary": "[url=http://evil]click[/url] at rate(x[5m])"},
                )
            ),
            ["[\u200bUSER=1]boss[\u200b/USER]", "[\u200burl=http://evil]click", "x[5m]"],
            ["[USER=1]", "[url=http://evil]"],
        ),
        # Credentials in a link are dropped; a non-http link is not shown.
        (
            {
                **body(alert()),
                "externalURL": "http://admin:hunter2@alertmanager:9093",
                "alerts": [{**alert(), "generatorURL": "javascript:alert(1)"}],
            },
            ["[url=http://alertmanager:9093]Alertmanager[/url]"],
            ["hunter2", "javascript", "Source"],
        ),
        # No summary: the description stands in; neither: the alert name.
        (
            body(alert(annotations={"description": "only a description"})),
            ["\nonly a description\n"],
            ["[i]"],
        ),
    ],
)
def test_chat_message_cases(raw: dict[str, Any], present: list[str], absent: list[str]) -> None:
    """What a message shows and never shows, case by case."""
    text = chat_message(parse_notification(raw), NAMES)
    for part in present:
        assert part in text
    for part in absent:
        assert part not in text


@pytest.mark.parametrize(("alerts", "truncated"), [(45, 0), (45, 5), (MAX_LISTED, 3)])
def test_many_alerts_are_listed_up_to_a_bound(alerts: int, truncated: int) -> None:
    """At most MAX_LISTED alerts are listed; the rest, and those Alertmanager left out,
    are counted in "and N more"."""
    raw = body(*(alert(f"f{i}", labels={"user_id": str(i)}) for i in range(alerts)))
    raw["truncatedAlerts"] = truncated
    text = chat_message(parse_notification(raw), NAMES)
    listed = min(alerts, MAX_LISTED)
    assert text.count("[b]Bitrix24UserTasksOverdue[/b] · info") == listed
    assert f"· {alerts + truncated} alerts" in text
    assert f"… and {alerts + truncated - listed} more" in text


def test_huge_alerts_stay_under_the_portal_limit() -> None:
    """Long annotations and labels are cut and fewer alerts are listed, so the message
    never reaches the 20,000 characters at which Bitrix24 cuts it."""
    huge = "x" * 50_000
    raw = body(
        *(
            alert(
                f"f{i}", labels={"extra": huge}, annotations={"summary": huge, "description": huge}
            )
            for i in range(30)
        )
    )
    text = chat_message(parse_notification(raw), NAMES)
    assert len(text) < PORTAL_LIMIT
    assert "… and " in text
    assert text.count("Bitrix24UserTasksOverdue[/b] · info") >= 1


# ---- personal notifications -----------------------------------------------------------------


def test_personal_notifications_are_short() -> None:
    """One line per alert (up to three, then "and N more"), naming the alert and what it
    says; a head is told which department."""
    one = parse_notification(body(alert())).alerts
    assert personal_message("firing", one) == (
        "[b]FIRING[/b] Bitrix24UserTasksOverdue: User has 12 overdue tasks on acme"
    )
    assert personal_message("resolved", one, NAMES, department=15) == (
        "[b]RESOLVED[/b] in R&D Bitrix24UserTasksOverdue: User has 12 overdue tasks on acme"
    )
    many = parse_notification(body(*(alert(f"f{i}") for i in range(5)))).alerts
    text = personal_message("firing", many)
    assert text.splitlines()[0] == "[b]FIRING[/b]"
    assert text.splitlines()[-1] == "… and 2 more"
    assert len(text.splitlines()) == 5


# ---- memory and cap -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_delivers_once_within_the_window() -> None:
    """A key is sent once; again only after the window; a failed send leaves it open."""
    clock = Clock()
    memory = DeliveryMemory(60.0, clock=clock)
    sent: list[str] = []

    async def send() -> None:
        sent.append("x")

    assert await memory.once("k", send) is True
    assert await memory.once("k", send) is False
    clock.now += 61
    assert await memory.once("k", send) is True
    assert len(sent) == 2

    async def fail() -> None:
        raise RuntimeError("portal down")

    with pytest.raises(RuntimeError):
        await memory.once("j", fail)
    assert not memory.delivered("j")
    assert await memory.once("j", send) is True


async def test_concurrent_duplicates_wait_for_the_first() -> None:
    """Two identical deliveries at once (a retry, or a second Alertmanager): one sends,
    the other waits for it and counts as a duplicate."""
    memory = DeliveryMemory(60.0)
    release = asyncio.Event()
    sent: list[int] = []

    async def send() -> None:
        await release.wait()
        sent.append(1)

    first = asyncio.create_task(memory.once("k", send))
    second = asyncio.create_task(memory.once("k", send))
    await asyncio.sleep(0)
    release.set()
    assert sorted([await first, await second]) == [False, True]
    assert sent == [1]


def test_memory_is_bounded() -> None:
    """Past its capacity the memory forgets the oldest keys first."""
    memory = DeliveryMemory(60.0, capacity=3)
    for key in "abcd":
        memory.remember(key)
    assert len(memory) == 3
    assert not memory.delivered("a") and memory.delivered("d")


def test_cap_allows_so_many_per_minute() -> None:
    """The cap lets `per_minute` through, then says when the oldest slot frees."""
    clock = Clock()
    cap = MinuteCap(2, clock=clock)
    assert cap.take()
    clock.now += 10
    assert cap.take()
    assert not cap.take()
    assert cap.retry_after() == 50
    clock.now += 50
    assert cap.take()
    assert not cap.take()
    assert cap.retry_after() == 10


# ---- who is told ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A receiver's settings (what the config's AlertReceiver holds)."""

    name: str = "ops"
    portal: str = "acme"
    token: str | None = "t"
    chat: str | None = "chat42"
    notify_user: bool = True
    notify_head: bool = True
    max_per_minute: int = 6


class Portal:
    """The portal as polling knows it: no client needed to plan, and two names; with
    `privacy`, its series carry pseudonyms instead of user ids."""

    def __init__(self, *, privacy: bool = False) -> None:
        self.privacy = privacy

    def client(self, portal: str) -> None:
        return None

    def user_names(self, portal: str) -> dict[int, str]:
        return {3: "Clara Schmidt", 7: "Hugo Martin"}

    def user_ids_exported(self, portal: str) -> bool:
        return not self.privacy


class Company:
    """What the teams feature answers: department 15 (R&D) is headed by user 7."""

    def head_of(self, portal: str, department_id: int) -> int | None:
        return {15: 7}.get(department_id)

    def name_of(self, portal: str, department_id: int) -> str | None:
        return {15: "R&D"}.get(department_id)


def _targets(
    settings: Settings, departments: Any, *alerts: dict[str, Any], privacy: bool = False
) -> dict[str, str]:
    receiver = Receiver(settings, Portal(privacy=privacy), AlertStats(), departments=departments)
    return {
        t.shown: t.params["MESSAGE"] for t in receiver.targets(parse_notification(body(*alerts)))
    }


def test_the_user_and_the_head_of_their_department_are_told() -> None:
    """notify_user tells the user an alert names; notify_head tells the head of its
    department, saying which department; someone both named and head is told once, as
    themselves."""
    a = alert("a", labels={"user_id": "3", "department_id": "15"}, annotations={"summary": "A"})
    b = alert("b", labels={"user_id": "7", "department_id": "15"}, annotations={"summary": "B"})
    assert _targets(Settings(notify_user=False), Company(), a) == {
        "chat chat42": _targets(Settings(), Company(), a)["chat chat42"],
        "user 7": "[b]FIRING[/b] in R&D Bitrix24UserTasksOverdue: A",
    }
    told = _targets(Settings(), Company(), a, b)
    assert set(told) == {"chat chat42", "user 3", "user 7"}
    assert told["user 3"] == "[b]FIRING[/b] Bitrix24UserTasksOverdue: A"
    assert told["user 7"].splitlines() == [
        "[b]FIRING[/b]",
        "Bitrix24UserTasksOverdue: A",
        "Bitrix24UserTasksOverdue: B",
    ]
    assert "Department: R&D" in told["chat chat42"]


def test_without_the_company_structure_no_head_is_told() -> None:
    """Until the teams feature answers, notify_head tells nobody and a department shows
    by its id."""
    a = alert("a", labels={"department_id": "15"})
    told = _targets(Settings(notify_user=False), NoDepartments(), a)
    assert list(told) == ["chat chat42"]
    assert "Department: department 15" in told["chat chat42"]


def test_a_department_alert_names_its_department_and_head() -> None:
    """The teams rules' labels: the department by name (from the structure, else from
    the `department` label) and its head as a mention; the head is notified."""
    a = alert(
        name="Bitrix24DepartmentTasksOverdue",
        labels={"department_id": "16", "department": "Field", "head_user_id": "7", "head": "H"},
        annotations={"summary": "Department Field on acme has 4.0 overdue tasks per person"},
    )
    told = _targets(Settings(notify_user=False), NoDepartments(), a)
    assert (
        "Head: [USER=7]Hugo Martin[/USER] · Department: Field · Portal: acme" in told["chat chat42"]
    )
    assert "head:" not in told["chat chat42"] and "department:" not in told["chat chat42"]
    assert list(
        _targets(Settings(), Company(), {**a, "labels": {**a["labels"], "department_id": "15"}})
    ) == [
        "chat chat42",
        "user 7",
    ]


def test_pseudonyms_are_never_taken_for_user_ids() -> None:
    """A portal in a privacy mode exports pseudonyms where user ids were: its alerts
    notify no one by them and mention no one; the pseudonym is shown as it is. The head
    of a department (known from the structure, not from a label) is still told."""
    a = alert(labels={"user_id": "1234567890123456", "department_id": "15"})
    told = _targets(Settings(), Company(), a, privacy=True)
    assert set(told) == {"chat chat42", "user 7"}
    assert "User: 1234567890123456" in told["chat chat42"]
    assert "[USER=" not in told["chat chat42"]

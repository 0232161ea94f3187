"""Alerts into Bitrix24 end to end: counter -> exporter -> Prometheus -> Alertmanager ->
POST /alerts/... -> the portal's chat and the user's notifications.

Set-up, all on 127.0.0.1: a fake portal (a demo portal whose users all start with one
overdue task; chat 42 and 44 with the webhook's user), the exporter as a subprocess polling
it every second with the receivers `team-leads` (chat42, notify_user) and `ops` (chat44),
their token in a file; Debian's Prometheus with rules.yml and a copy of alerts.yml with
every `for:` at 2s; Debian's Alertmanager with the shipped alertmanager/alertmanager.yml,
its group timings shortened (group_wait 1s, group_interval 1s, repeat_interval 4s) and its
webhooks pointed at the exporter with the token file.

Raising user 3's overdue tasks must bring one FIRING message naming the user into chat 42
and a notification to user 3; Alertmanager's repeat must reach the exporter and deliver
nothing; lowering the counter must bring one RESOLVED message and notification. The test
prints the time from the counter rising to the message, and the messages a repeat cycle
delivered.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter import fakeportal
from tests.operator_kit_lib import ALERTMANAGER, RULES, short_for_alerts, wait_until
from tests.support import (
    LeakWatch,
    free_port,
    register_secret,
    require_binary,
    series,
    start_process,
)

pytestmark = pytest.mark.integration

OVERDUE = fakeportal.NEW_COUNTER_CODES["expired"]
RAISED_USER = 3  # "Clara Schmidt" in the demo portal
TOKEN = "e2e-alerts-t0ken-0123456789"
register_secret(TOKEN)


@pytest.fixture
async def portal() -> AsyncIterator[tuple[fakeportal.FakePortal, str]]:
    """The demo portal with every user at one overdue task; chats 42 and 44."""
    portal, path = fakeportal.demo_portal(users=4)
    portal.requests_per_second = None  # polled every second: no accidental 503s
    for user in portal.users:
        for role in fakeportal.ROLES:
            portal.set_task_counters(user, role, {"expired": (1, OVERDUE)})
        portal.set_task_counters(user, "view_all", {"expired": (1, OVERDUE)}, group_id=7)
    portal.add_chat(42, (1,))
    portal.add_chat(44, (1,))
    runner, url = await fakeportal.serve(portal)
    try:
        yield portal, url + path
    finally:
        await runner.cleanup()


def alertmanager_config(target: Path, exporter: str, token_file: Path) -> None:
    """The shipped Alertmanager config with short group timings and the test's exporter."""
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))

    def shorten(route: dict[str, Any]) -> None:
        for key, value in (("group_wait", "1s"), ("group_interval", "1s")):
            if key in route:
                route[key] = value
        if "repeat_interval" in route:
            route["repeat_interval"] = "4s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    hooks = [h for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks, "the shipped config delivers nothing through the exporter"
    for hook in hooks:
        hook["url"] = hook["url"].replace("http://exporter:9877", exporter)
        hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


async def test_overdue_tasks_reach_the_chat_and_the_user(
    tmp_path: Path,
    portal: tuple[fakeportal.FakePortal, str],
    processes: list[subprocess.Popen[bytes]],
    exporter_process: Any,
    leak_watch: LeakWatch,
) -> None:
    """FIRING into the chat naming the user and to the user; a repeat delivers nothing;
    RESOLVED follows when the counter drops."""
    fake, webhook = portal
    token_file = tmp_path / "alerts-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    prometheus_port, alertmanager_port = free_port(), free_port()

    receivers = [
        {
            "name": "team-leads",
            "portal": "acme",
            "token_file": str(token_file),
            "chat": "chat42",
            "notify_user": True,
            "max_per_minute": 60,
        },
        {"name": "ops", "portal": "acme", "token_file": str(token_file), "chat": "chat44"},
    ]
    config = {
        "poll_interval": "1s",
        "request_timeout": "2s",
        "portals": [
            {
                "name": "acme",
                "webhook": webhook,
                "tasks": {"users": "all", "groups": [0, 7], "roles": list(fakeportal.ROLES)},
            }
        ],
        "alert_receivers": receivers,
    }
    started = exporter_process(config)
    exporter, exporter_port = started.url, started.port

    alertmanager_config(tmp_path / "alertmanager.yml", exporter, token_file)
    start_process(
        processes,
        [
            require_binary("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{alertmanager_port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
    )

    short_for_alerts(tmp_path / "alerts.yml")
    (tmp_path / "rules.yml").write_text(RULES.read_text(encoding="utf-8"), encoding="utf-8")
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml", "alerts.yml"],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "bitrix24",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config), encoding="utf-8")
    start_process(
        processes,
        [
            require_binary("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        tmp_path / "prometheus.log",
    )

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def get(url: str) -> tuple[int, str]:
            if url.startswith(exporter):  # through the fixture, so the body meets the guard
                answer = await started.get(url.removeprefix(exporter))
                return answer.status, answer.text
            async with session.get(url) as response:
                return response.status, await response.text()

        async def ready(url: str) -> bool:
            return (await get(url))[0] == 200

        await wait_until(lambda: ready(exporter + "/readyz"), "exporter /readyz", 30)
        await wait_until(
            lambda: ready(f"http://127.0.0.1:{alertmanager_port}/-/ready"), "alertmanager", 30
        )
        await wait_until(
            lambda: ready(f"http://127.0.0.1:{prometheus_port}/-/ready"), "prometheus", 30
        )

        async def user_known() -> bool:
            # The name must be on /metrics and in Prometheus for the rule's annotation.
            url = f"http://127.0.0.1:{prometheus_port}/api/v1/query"
            params = {"query": f'bitrix24_user_info{{user_id="{RAISED_USER}"}}'}
            async with session.get(url, params=params) as response:
                return bool((await response.json())["data"]["result"])

        await wait_until(user_known, "the raised user's name in Prometheus", 30)
        assert fake.messages == [] and fake.notifications == []

        # --- the counter rises: FIRING into the chat, and to the user ----------------------
        raised_at = time.monotonic()
        fake.set_task_counters(RAISED_USER, "view_all", {"expired": (12, OVERDUE)})

        def chat(word: str) -> list[fakeportal.SentMessage]:
            return [m for m in fake.messages if m.chat_id == 42 and word in m.message]

        def told(word: str) -> list[fakeportal.SentNotification]:
            return [n for n in fake.notifications if n.user_id == RAISED_USER and word in n.message]

        async def fired() -> bool:
            return bool(chat("FIRING"))

        await wait_until(fired, "a FIRING message in chat 42", 90, step=0.05)
        to_chat = time.monotonic() - raised_at
        [message] = chat("FIRING")
        assert "Bitrix24UserTasksOverdue" in message.message
        assert f"[USER={RAISED_USER}]Clara Schmidt[/USER]" in message.message
        assert "Clara Schmidt (user 3) has 12 overdue tasks on acme" in message.message

        async def notified() -> bool:
            return bool(told("FIRING"))

        await wait_until(notified, "a FIRING notification to user 3", 30)

        # --- Alertmanager repeats: the exporter hears it and delivers nothing ----------------
        async def received(status: str) -> float:
            _, text = await get(exporter + "/metrics")
            found = series(
                text, "bitrix24_alert_notifications_total", receiver="team-leads", status=status
            )
            return sum(s.value for s in found)

        first_seen = await received("firing")
        messages_before = len(fake.messages)

        async def repeated() -> bool:
            return await received("firing") > first_seen

        await wait_until(repeated, "Alertmanager's repeat of the notification", 60)

        # The repeat is counted as received before its outcome is decided: wait for that.
        async def counted_as_duplicate() -> bool:
            _, text = await get(exporter + "/metrics")
            duplicates = series(
                text,
                "bitrix24_alert_deliveries_total",
                receiver="team-leads",
                target="chat",
                outcome="duplicate",
            )
            return sum(s.value for s in duplicates) >= 1

        await wait_until(counted_as_duplicate, "the repeat counted as a duplicate", 30)
        repeat_messages = len(fake.messages) - messages_before
        assert repeat_messages == 0
        assert len(chat("FIRING")) == 1 and len(told("FIRING")) == 1

        # --- the counter drops: RESOLVED -----------------------------------------------------
        lowered_at = time.monotonic()
        fake.set_task_counters(RAISED_USER, "view_all", {"expired": (1, OVERDUE)})

        async def resolved() -> bool:
            return bool(chat("RESOLVED")) and bool(told("RESOLVED"))

        await wait_until(resolved, "a RESOLVED message and notification", 90, step=0.05)
        to_resolved = time.monotonic() - lowered_at
        assert len(chat("RESOLVED")) == 1 and len(told("RESOLVED")) == 1
        assert len(chat("FIRING")) == 1 and len(told("FIRING")) == 1

        # The sends went through the portal's client: they are the portal's requests.
        async def sends_counted() -> bool:
            _, text = await get(exporter + "/metrics")
            return bool(series(text, "bitrix24_api_requests_total", method="im.message.add"))

        await wait_until(sends_counted, "im.message.add in bitrix24_api_requests_total", 10)

    # The exporter's own output reaches the guard through the exporter_process fixture.
    for name in ("alertmanager.log", "prometheus.log"):
        leak_watch.body(name, (tmp_path / name).read_bytes())
    print(
        f"\ncounter raised -> FIRING message in the chat: {to_chat:.1f}s;"
        f" counter lowered -> RESOLVED: {to_resolved:.1f}s;"
        f" messages delivered by one repeat cycle: {repeat_messages}"
    )

"""The exporter end to end: the fake portal over real HTTP, the exporter app, `/metrics`."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from typing import Any

from exporter.fakeportal import FakeUser, Faults
from tests.support import (
    ROLES,
    SECRET,
    config_of,
    make_portal,
    metrics_text,
    portal_config,
    series,
    total,
    value,
    wait_for,
)


async def test_counters_of_every_user_reach_metrics(
    served: Any, exporter_app: Any, log_text: Any
) -> None:
    """With `users: all`, every active user's task and chat counters are served within a cycle."""
    portal = make_portal(3)
    portal.set_task_counters(
        2, "view_all", {"expired": (4, 6291456), "new_comments": (9, 12582912)}
    )
    portal.set_im_counters(1, {"TYPE": {"ALL": 5, "NOTIFY": 2, "CHAT": 3}, "CHAT": {"18": 3}})
    url = await served(portal)
    client = await exporter_app(config_of(portal_config(url)))
    text = await metrics_text(client)
    assert value(text, "bitrix24_up", portal="acme") == 1
    assert value(text, "bitrix24_tasks", user_id="2", counter="expired", role="view_all") == 4
    assert value(text, "bitrix24_tasks", user_id="2", counter="new_comments", code="12582912") == 9
    expired = sorted(
        (s.labels for s in series(text, "bitrix24_tasks", counter="expired")),
        key=lambda labels: labels["user_id"],
    )
    assert expired == [
        {
            "portal": "acme",
            "user_id": str(u),
            "group_id": "0",
            "role": "view_all",
            "counter": "expired",
            "code": "6291456",
        }
        for u in (1, 2, 3)
    ]
    assert value(text, "bitrix24_im_unread", user_id="1", counter="all") == 5
    assert value(text, "bitrix24_im_unread", user_id="1", counter="notify") == 2
    assert value(text, "bitrix24_user_info", user_id="2", name="User2 Test") == 1
    assert value(text, "bitrix24_collect_success", user_id="3", source="tasks") == 1
    assert value(text, "bitrix24_collect_success", user_id="1", source="im") == 1
    assert (
        value(text, "bitrix24_last_success_timestamp_seconds", user_id="3", source="tasks") > 1.7e9
    )
    assert not series(text, "bitrix24_im_chat_unread")  # opt-in only
    assert SECRET not in text and SECRET not in log_text()


async def test_values_follow_the_portal(served: Any, exporter_app: Any) -> None:
    """A counter that changes on the portal changes on /metrics within a poll interval."""
    portal = make_portal(2)
    portal.set_task_counters(2, "view_all", {"expired": (1, 6291456)})
    client = await exporter_app(
        config_of(portal_config(await served(portal), poll_interval="300ms"))
    )
    portal.set_task_counters(2, "view_all", {"expired": (12, 6291456)})

    async def updated() -> bool:
        text = await metrics_text(client)
        found = series(text, "bitrix24_tasks", user_id="2", counter="expired")
        return [s.value for s in found] == [12]

    await wait_for(updated)


async def test_requests_go_as_json_post_in_batches(served: Any) -> None:
    """500 users cost at most 10 task requests a cycle: 50 commands per batch, sent as JSON."""
    from exporter.bitrix import new_session
    from exporter.poller import PortalPoller

    portal = make_portal(500)
    config = config_of(portal_config(await served(portal)))
    async with new_session() as session:
        poller = PortalPoller(config.portals[0], config, session, lambda s: None)
        await poller.cycle()  # learns the profile and the user list
        before = len(portal.requests)
        snapshot = await poller.cycle()
    cycle = portal.requests[before:]
    task_requests = [r for r in cycle if "tasks.task.counters.get" in str(r.params)]
    assert len(task_requests) <= 10
    assert all(r.http_method == "POST" and r.method == "batch" for r in cycle)
    assert max(r.commands for r in cycle) == 50
    assert len(cycle) == 11  # 10 full batches of task commands, then im.counters.get
    assert sum(1 for s in snapshot.statuses if s.source == "tasks" and s.success) == 500


async def test_standard_limit_cycle_of_500_users_draws_no_503(served: Any) -> None:
    """A whole cycle of 500 users x 5 roles from an idle portal at 2 req/s, burst 50: zero 503s."""
    from exporter.bitrix import new_session
    from exporter.poller import PortalPoller

    portal = make_portal(500, requests_per_second=2.0, burst=50)
    raw = portal_config(
        await served(portal), portal={"tasks": {"users": "all", "roles": list(ROLES)}}
    )
    config = config_of(raw)
    async with new_session() as session:
        poller = PortalPoller(config.portals[0], config, session, lambda s: None)
        snapshot = await poller.cycle()
    assert snapshot.up
    assert portal.count(status=503) == 0
    assert len(portal.requests) == 54  # profile, user.get x2, 50 task batches, im
    # It had to wait: 54 requests are more than the 48 it sends at once. (How long it waited
    # depends on how fast the machine sent the first 48, so only that it waited is checked.)
    assert snapshot.stats.rate_limit_wait > 0
    assert sum(1 for s in snapshot.statuses if s.success) == 501


async def test_query_limit_exceeded_is_retried(served: Any, exporter_app: Any) -> None:
    """503 QUERY_LIMIT_EXCEEDED (another client drained the bucket) is backed off and retried."""
    portal = make_portal(2)
    portal.faults = Faults(query_limit_burst=3)
    client = await exporter_app(config_of(portal_config(await served(portal))))
    text = await metrics_text(client)
    assert value(text, "bitrix24_up") == 1
    assert value(text, "bitrix24_collect_success", user_id="2", source="tasks") == 1
    assert value(text, "bitrix24_api_requests_total", method="profile", code="503") == 3
    assert (
        value(text, "bitrix24_api_errors_total", method="profile", error="QUERY_LIMIT_EXCEEDED")
        == 3
    )
    assert value(text, "bitrix24_rate_limit_wait_seconds_total") > 0


async def test_server_errors_and_html_pages_are_retried(served: Any, exporter_app: Any) -> None:
    """500s, HTML 502 pages and dropped connections are retried with backoff until they pass."""
    portal = make_portal(2, seed=3)
    portal.faults = Faults(http_500_rate=0.2, html_502_rate=0.2, reset_rate=0.1)
    client = await exporter_app(config_of(portal_config(await served(portal))))

    async def every_fault_seen_and_collected() -> bool:
        text = await metrics_text(client)
        return bool(series(text, "bitrix24_tasks", user_id="2", counter="expired")) and all(
            series(text, "bitrix24_api_requests_total", code=code)
            for code in ("500", "502", "connection")
        )

    # Until each fault happened at least once, so that no check below passes as 0 == 0.
    await wait_for(every_fault_seen_and_collected, timeout=60)
    text = await metrics_text(client)
    html_pages = total(text, "bitrix24_api_requests_total", code="502")
    unreadable = total(text, "bitrix24_api_errors_total", error="invalid_response")
    assert unreadable == html_pages  # each HTML page is counted as an unreadable answer


async def test_operation_time_limit_pauses_the_method(served: Any) -> None:
    """After 429 OPERATION_TIME_LIMIT the method waits for the budget's reset, not a retry."""
    from exporter.bitrix import new_session
    from exporter.poller import PortalPoller

    window = 4.0
    portal = make_portal(2, operating_window=window, operating_cost=0.01)
    config = config_of(portal_config(await served(portal)))
    async with new_session() as session:
        poller = PortalPoller(config.portals[0], config, session, lambda s: None)
        await poller.cycle()  # learns operating_reset_at
        portal.faults = Faults(operation_time_limit=True)
        refused = await poller.cycle()
        assert not any(s.success for s in refused.statuses if s.source == "tasks")
        portal.faults = Faults()
        marker = len(portal.requests)
        recovered = await poller.cycle()
    assert all(s.success for s in recovered.statuses)
    tasks = [r for r in portal.requests if "tasks.task.counters.get" in str(r.params)]
    retried = [r for r in portal.requests[marker:] if "tasks.task.counters.get" in str(r.params)]
    # Held back until the oldest budget bucket expired, not sent straight away: the bucket
    # opened with the first task request and lasts `window` on the portal's own clock
    # (operating_reset_at is in whole seconds, hence the second of slack).
    assert retried and retried[0].at >= tasks[0].at + window - 1.0
    assert refused.stats.errors["tasks.task.counters.get", "OPERATION_TIME_LIMIT"] == 2


async def test_revoked_webhook_is_down_with_one_log_line(
    served: Any, exporter_app: Any, log_text: Any
) -> None:
    """A revoked webhook gives up 0, one clear log line and one request per cycle, no storm."""
    portal = make_portal(2)
    client = await exporter_app(
        config_of(portal_config(await served(portal), poll_interval="200ms"))
    )
    portal.revoke_webhook(SECRET)
    revoked_at = len(portal.requests)

    async def five_refusals() -> bool:
        return sum(r.status == 401 for r in portal.requests[revoked_at:]) >= 5

    await wait_for(five_refusals)
    text = await metrics_text(client)
    assert value(text, "bitrix24_up") == 0
    assert value(text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    after = portal.requests[revoked_at:]
    assert all(r.status == 401 for r in after[1:])
    # One line for five refused requests: every retry logs a DEBUG line naming the error,
    # so none was retried (each refusal is a cycle of its own), and five cycles said it once.
    lines = [line for line in log_text().splitlines() if "INVALID_CREDENTIALS" in line]
    assert len(lines) == 1, lines
    assert "portal acme" in lines[0] and SECRET not in log_text()


async def test_no_permission_gives_failed_status_logged_once(
    served: Any, exporter_app: Any, log_text: Any
) -> None:
    """`result: []` for another user: no counter series, a failed status, one log line."""
    portal = make_portal(2, admin=False)
    raw = portal_config(
        await served(portal), poll_interval="200ms", portal={"tasks": {"users": [1, 2]}}
    )
    client = await exporter_app(config_of(raw))

    async def four_cycles() -> bool:
        # One batch a cycle (two users' commands and im.counters.get), and nothing fails.
        return portal.count("batch") >= 4

    await wait_for(four_cycles)
    text = await metrics_text(client)
    assert value(text, "bitrix24_up") == 1
    assert value(text, "bitrix24_collect_success", user_id="1", source="tasks") == 1
    assert value(text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert series(text, "bitrix24_tasks", user_id="1")
    assert not series(text, "bitrix24_tasks", user_id="2")
    assert not series(text, "bitrix24_last_success_timestamp_seconds", user_id="2")
    lines = [line for line in log_text().splitlines() if "for user 2" in line]
    assert len(lines) == 1 and "NoAccess" in lines[0]


async def test_unknown_counters_and_legacy_portals_pass_through(
    served: Any, exporter_app: Any
) -> None:
    """An old portal's counter names and an unheard-of counter are exported as they come."""
    portal = make_portal(2, legacy_counters=True)
    portal.set_task_counters(2, "view_all", {"brand_new": (4, 99), "wait_ctrl": (1, 8388608)})
    client = await exporter_app(config_of(portal_config(await served(portal))))
    text = await metrics_text(client)
    assert value(text, "bitrix24_tasks", user_id="2", counter="brand_new", code="99") == 4
    assert value(text, "bitrix24_tasks", user_id="2", counter="wait_ctrl") == 1
    assert series(text, "bitrix24_tasks", user_id="1", counter="expired_soon", code="9437184")


def tasks_of(text: str, user_id: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in series(text, "bitrix24_tasks", user_id=user_id)
    }


async def test_failed_fetch_keeps_its_last_values(served: Any, exporter_app: Any) -> None:
    """A failing user keeps its last values and success time within stale_after; status 0."""
    portal = make_portal(2)
    raw = portal_config(
        await served(portal), poll_interval="200ms", stale_after="1h", request_timeout="1s"
    )
    client = await exporter_app(config_of(raw))
    before = await metrics_text(client)
    kept = tasks_of(before, "2")
    last_ok = value(before, "bitrix24_last_success_timestamp_seconds", user_id="2", source="tasks")
    assert kept
    portal.faults = Faults(http_500_rate=1.0)
    # The portal's values change meanwhile: what is served must be the last fetched ones.
    portal.set_task_counters(2, "view_all", {"expired": (99, 6291456)})

    async def failed() -> bool:
        text = await metrics_text(client)
        return value(text, "bitrix24_collect_success", user_id="2", source="tasks") == 0

    await wait_for(failed)
    text = await metrics_text(client)
    assert tasks_of(text, "2") == kept
    assert (
        value(text, "bitrix24_last_success_timestamp_seconds", user_id="2", source="tasks")
        == last_ok
    )


async def test_stale_values_go_after_stale_after(served: Any, exporter_app: Any) -> None:
    """Past stale_after a failing user's values go; its status and success time stay true."""
    portal = make_portal(2)
    raw = portal_config(
        await served(portal), poll_interval="200ms", stale_after="1s", request_timeout="1s"
    )
    client = await exporter_app(config_of(raw))
    before = await metrics_text(client)
    last_ok = value(before, "bitrix24_last_success_timestamp_seconds", user_id="2", source="tasks")
    portal.faults = Faults(http_500_rate=1.0)

    async def dropped() -> bool:
        return not series(await metrics_text(client), "bitrix24_tasks", user_id="2")

    await wait_for(dropped)
    text = await metrics_text(client)
    assert value(text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert (
        value(text, "bitrix24_last_success_timestamp_seconds", user_id="2", source="tasks")
        == last_ok
    )
    portal.faults = Faults()

    async def back() -> bool:
        return bool(series(await metrics_text(client), "bitrix24_tasks", user_id="2"))

    await wait_for(back)


async def test_users_who_leave_disappear_next_refresh(served: Any, exporter_app: Any) -> None:
    """A user deactivated on the portal drops out of /metrics once the user list refreshes."""
    portal = make_portal(3)
    raw = portal_config(await served(portal), poll_interval="200ms", user_refresh_interval="200ms")
    client = await exporter_app(config_of(raw))
    assert series(await metrics_text(client), "bitrix24_tasks", user_id="3")
    portal.users[3].active = False

    async def gone() -> bool:
        text = await metrics_text(client)
        return not series(text, "bitrix24_tasks", user_id="3") and not series(
            text, "bitrix24_collect_success", user_id="3"
        )

    await wait_for(gone)
    portal.add_user(FakeUser(4, "New", "Person"))

    async def joined() -> bool:
        return bool(
            series(await metrics_text(client), "bitrix24_user_info", user_id="4", name="New Person")
        )

    await wait_for(joined)


async def test_metrics_negotiation_and_gzip(served: Any, exporter_app: Any) -> None:
    """OpenMetrics when asked for, text 0.0.4 otherwise, gzip when accepted."""
    client = await exporter_app(config_of(portal_config(await served(make_portal(1)))))
    om = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    )
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    body = await om.text()
    assert body.endswith("# EOF\n") and "# TYPE bitrix24_api_requests counter" in body
    text = await client.get("/metrics", headers={"Accept": "text/plain"})
    assert text.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE bitrix24_api_requests_total counter" in await text.text()
    raw = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert raw.headers["Content-Encoding"] == "gzip"
    assert b"bitrix24_up" in gzip.decompress(await raw.read())


async def test_scrapes_never_wait_on_bitrix24(served: Any, exporter_app: Any) -> None:
    """/metrics, /healthz, /readyz and / answer while Bitrix24 has not answered anything."""
    portal = make_portal(1)
    portal.faults = Faults(latency=600.0)  # ends early when the portal shuts down
    client = await exporter_app(
        config_of(portal_config(await served(portal), request_timeout="10m")), ready=False
    )

    async def asked() -> bool:
        return bool(portal.requests)

    await wait_for(asked)
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        # A liveness bound only: a scrape that waited on the portal would wait 10 minutes.
        response = await asyncio.wait_for(client.get(path), 60)
        assert response.status == (503 if path == "/readyz" else 200)
    assert [r.status for r in portal.requests] == [0]  # still waiting for its first answer


async def test_landing_page_shows_portal_state(served: Any, exporter_app: Any) -> None:
    """`/` links /metrics and shows each portal's state, never the webhook secret."""
    client = await exporter_app(config_of(portal_config(await served(make_portal(1)))))
    page = await (await client.get("/")).text()
    assert 'href="metrics"' in page and '<span class="badge up" id="acme-state">up</span>' in page
    assert SECRET not in page


async def test_exposition_passes_promtool(served: Any, exporter_app: Any) -> None:
    """`promtool check metrics` finds nothing to complain about in a real exposition."""
    portal = make_portal(3)
    portal.faults = Faults(query_limit_burst=1)
    raw = portal_config(await served(portal), portal={"im": {"chats": True}})
    client = await exporter_app(config_of(raw))
    text = await metrics_text(client)
    assert "bitrix24_im_chat_unread" in text and "bitrix24_api_errors_total" in text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()


async def test_once_prints_the_exposition(
    served: Any, exporter_process: Any, tmp_path: Any
) -> None:
    """`--once` runs one cycle, prints the exposition and exits 0; 1 when a portal failed."""
    portal = make_portal(2)
    url = await served(portal)
    good = exporter_process(portal_config(url), "--once", listen=False)
    assert await good.wait_exit() == 0, good.stderr()
    assert value(good.stdout(), "bitrix24_up", portal="acme") == 1
    portal.revoke_webhook(SECRET)
    bad = exporter_process(portal_config(url), "--once", listen=False)
    assert await bad.wait_exit() == 1
    assert "INVALID_CREDENTIALS" in bad.stderr() and SECRET not in bad.stderr()


async def test_check_config_exit_codes(exporter_process: Any) -> None:
    """`--check-config` exits 0 on a good file, 2 with one line per problem on a bad one."""
    good = exporter_process(portal_config("http://127.0.0.1:1"), "--check-config", listen=False)
    assert await good.wait_exit() == 0
    bad_raw = portal_config(
        "http://127.0.0.1:1", poll_interval="soon", portal={"rate_limit": "huge"}
    )
    bad = exporter_process(bad_raw, "--check-config", listen=False)
    assert await bad.wait_exit() == 2
    lines = bad.stderr().strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(
        "poll_interval: must be a duration like 500ms, 30s, 5m or 1h30m"
        " (a bare number is seconds), got 'soon'"
    )
    assert "portals[0].rate_limit" in lines[1]
    assert SECRET not in bad.stderr()


async def test_sigterm_exits_cleanly(served: Any, exporter_process: Any) -> None:
    """SIGTERM stops polling, closes the session and exits 0 without a traceback."""
    portal = make_portal(2)
    portal.faults = Faults(latency=0.3)
    process = exporter_process(portal_config(await served(portal), poll_interval="200ms"))
    await process.wait_ready()
    assert series(await process.metrics(), "bitrix24_tasks")
    process.proc.terminate()
    assert await process.wait_exit() == 0
    log = process.stderr()
    assert "Traceback" not in log and SECRET not in log

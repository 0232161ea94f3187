"""POST /alerts/{name} over real HTTP: the exporter app with a receiver, polling a fake
portal, delivering into the fake's chat and notifications through the portal's client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from exporter.alerts.route import MAX_BODY
from exporter.fakeportal import FakeDepartment, FakePortal
from exporter.server import build_app
from tests.alertlib import TOKEN, alert, body, receiver
from tests.support import (
    LeakWatch,
    config_of,
    make_portal,
    metrics_text,
    portal_config,
    register_secret,
    series,
    value,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
register_secret(TOKEN)

Start = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def portal() -> FakePortal:
    """Users 1-3 ("User3 Test" is the one alerts name); chat 42 has the webhook's user 1."""
    portal = make_portal(3, requests_per_second=None)
    portal.add_chat(42, (1, 2))
    portal.add_chat(43, (2,))
    return portal


@pytest.fixture
async def start(
    portal: FakePortal,
    served: Callable[[FakePortal], Awaitable[str]],
    aiohttp_client: Any,
    leak_watch: LeakWatch,
) -> AsyncIterator[Start]:
    """Start the exporter with receivers on the fake portal; wait until it polled once."""
    url = await served(portal)

    async def read(
        session: Any, context: Any, params: aiohttp.TraceResponseChunkReceivedParams
    ) -> None:
        leak_watch.body(f"response body of {params.method} {params.url.path}", params.chunk)

    async def begin(
        *receivers: dict[str, Any], teams: bool = False, **kwargs: Any
    ) -> TestClient[Any, Any]:
        trace = aiohttp.TraceConfig()
        trace.on_response_chunk_received.append(read)
        raw = portal_config(url, alert_receivers=list(receivers))
        raw["portals"][0]["teams"] = {"enabled": teams}
        config = config_of(raw)
        app = build_app(config, **kwargs)
        client: TestClient[Any, Any] = await aiohttp_client(app, trace_configs=[trace])

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await wait_for(ready)
        return client

    yield begin


async def post(
    client: TestClient[Any, Any], raw: object, *, name: str = "ops", headers: Any = None
) -> tuple[int, str, Any]:
    async with client.post(
        f"/alerts/{name}", json=raw, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.text(), response.headers


async def test_firing_then_resolved_reaches_chat_and_user(start: Start, portal: FakePortal) -> None:
    """A firing notification lands in the chat naming the user with a mention and in the
    user's notifications; a repeat delivers nothing; the resolved one is a new message
    and a new notification. The counters say so, and the sends show in the portal's
    request counters."""
    client = await start(receiver())
    firing = body(alert(labels={"user_id": "3"}))
    status, text, _ = await post(client, firing)
    assert status == 200, text
    assert text == "alert receiver ops: delivered to chat chat42, user 3\n"
    [message] = portal.messages
    assert message.chat_id == 42 and not message.url_preview
    assert "FIRING" in message.message
    assert "[USER=3]User3 Test[/USER]" in message.message
    [notice] = portal.notifications
    assert (notice.user_id, notice.kind) == (3, "system")
    assert notice.message.startswith("[b]FIRING[/b] Bitrix24UserTasksOverdue")

    status, text, _ = await post(client, firing)
    assert (status, text) == (200, "alert receiver ops: already delivered to chat chat42, user 3\n")
    assert len(portal.messages) == 1 and len(portal.notifications) == 1

    resolved = body(alert(status="resolved", labels={"user_id": "3"}))
    status, text, _ = await post(client, resolved)
    assert status == 200, text
    assert "RESOLVED" in portal.messages[-1].message
    assert portal.notifications[-1].message.startswith("[b]RESOLVED[/b]")
    assert len(portal.messages) == 2 and len(portal.notifications) == 2

    async def counted() -> bool:
        # The sends reach bitrix24_api_requests_total with the next poll cycle.
        text = await metrics_text(client)
        sends = [
            series(text, "bitrix24_api_requests_total", method=method, code="200")
            for method in ("im.message.add", "im.notify.system.add")
        ]
        return [[s.value for s in found] for found in sends] == [[2.0], [2.0]]

    await wait_for(counted)
    text = await metrics_text(client)
    assert value(text, "bitrix24_alert_notifications_total", receiver="ops", status="firing") == 2
    assert value(text, "bitrix24_alert_notifications_total", receiver="ops", status="resolved") == 1
    deliveries = {
        (target, outcome): value(
            text, "bitrix24_alert_deliveries_total", receiver="ops", target=target, outcome=outcome
        )
        for target in ("chat", "user")
        for outcome in ("ok", "failed", "duplicate")
    }
    assert deliveries == {
        ("chat", "ok"): 2,
        ("chat", "failed"): 0,
        ("chat", "duplicate"): 1,
        ("user", "ok"): 2,
        ("user", "failed"): 0,
        ("user", "duplicate"): 1,
    }


async def test_identical_notifications_at_once_send_one_message(
    start: Start, portal: FakePortal
) -> None:
    """Two Alertmanagers (or a retry racing the first try) posting the same notification
    together: one message, one notification."""
    client = await start(receiver())
    firing = body(alert(labels={"user_id": "3"}))
    answers = await asyncio.gather(*(post(client, firing) for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    assert len(portal.messages) == 1 and len(portal.notifications) == 1


@pytest.mark.parametrize(
    ("headers", "name", "status", "text"),
    [
        ({}, "ops", 401, "alert receiver ops: missing or wrong bearer token"),
        ({"Authorization": "Bearer nope"}, "ops", 401, "missing or wrong bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, "ops", 401, "missing or wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "ops", 401, "missing or wrong bearer token"),
        (AUTH, "nobody", 404, "no alert receiver named 'nobody'"),
    ],
)
async def test_unauthorised_or_unknown_sends_nothing(
    start: Start,
    portal: FakePortal,
    headers: dict[str, str],
    name: str,
    status: int,
    text: str,
) -> None:
    """Without the right bearer token (401, with a Bearer challenge) or to an unknown
    receiver (404) nothing is delivered."""
    client = await start(receiver())
    got, answer, answer_headers = await post(client, body(), name=name, headers=headers)
    assert got == status
    assert text in answer and answer.count("\n") == 1
    if status == 401:
        assert answer_headers["WWW-Authenticate"].startswith("Bearer ")
    assert portal.messages == [] and portal.notifications == []


async def test_bad_bodies_are_refused_with_one_line(start: Start, portal: FakePortal) -> None:
    """Not JSON, the wrong shape, or over the size bound (announced or streamed): 400
    with one line naming the problem, nothing sent, no traceback."""
    client = await start(receiver())
    cases: list[tuple[Any, str]] = [
        (b"{not json", "alert receiver ops: body: not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "alert receiver ops: body: not JSON"),
        (b'{"version": "4", "alerts": []}', "alert receiver ops: alerts: empty"),
        (b'{"version": 4}', 'alert receiver ops: version: expected "4", got int'),
        (b"x" * (MAX_BODY + 1), f"alert receiver ops: body: larger than {MAX_BODY} bytes"),
    ]

    async def streamed() -> AsyncIterator[bytes]:
        # No Content-Length: the bound must hold while reading.
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    for data, reason in cases:
        async with client.post("/alerts/ops", data=data, headers=AUTH) as response:
            assert (response.status, await response.text()) == (400, reason + "\n")
    async with client.post("/alerts/ops", data=streamed(), headers=AUTH) as response:
        assert response.status == 400
        assert "larger than" in await response.text()
    assert portal.messages == []


async def test_unreachable_portal_answers_503_for_a_retry(start: Start, portal: FakePortal) -> None:
    """When Bitrix24 cannot be reached (after the client's own retries) the answer is 503
    with Retry-After, so Alertmanager retries; the retry then delivers."""
    client = await start(receiver())
    portal.faults.http_500_rate = 1.0
    status, text, headers = await post(client, body(alert(labels={"user_id": "3"})))
    assert status == 503, text
    assert "Bitrix24 could not be reached" in text
    assert int(headers["Retry-After"]) > 0
    portal.faults.http_500_rate = 0.0
    status, text, _ = await post(client, body(alert(labels={"user_id": "3"})))
    assert (status, text) == (200, "alert receiver ops: delivered to chat chat42, user 3\n")
    assert len(portal.messages) == 1


async def test_a_refused_target_answers_422_and_the_rest_is_delivered(
    start: Start, portal: FakePortal
) -> None:
    """The webhook's user may not write to chat 43 (ACCESS_ERROR) and user 77 does not
    exist (the portal answers false): 422, since a retry would not help; user 3 still
    gets their notification, and the failures are counted."""
    client = await start(receiver(chat="chat43"))
    raw = body(alert("a", labels={"user_id": "3"}), alert("b", labels={"user_id": "77"}))
    status, text, _ = await post(client, raw)
    assert status == 422, text
    assert "chat chat43: portal acme: im.message.add: ACCESS_ERROR" in text
    assert "user 77: portal acme: im.notify.system.add: not_sent" in text
    assert "delivered to user 3" in text
    assert portal.messages == []
    assert [n.user_id for n in portal.notifications] == [3]

    async def counted() -> bool:
        metrics = await metrics_text(client)
        found = series(
            metrics,
            "bitrix24_alert_deliveries_total",
            receiver="ops",
            target="chat",
            outcome="failed",
        )
        return [s.value for s in found] == [1.0]

    await wait_for(counted)


async def test_over_the_cap_answers_503_with_retry_after(start: Start, portal: FakePortal) -> None:
    """With max_per_minute 2 the third send of the minute waits: 503 with Retry-After
    (Alertmanager retries 5xx only); repeats are free and never count."""
    client = await start(receiver(max_per_minute=2, notify_user=False))
    for i in range(2):
        status, text, _ = await post(client, body(alert(f"f{i}"), group_key=f"g{i}"))
        assert status == 200, text
        status, text, _ = await post(client, body(alert(f"f{i}"), group_key=f"g{i}"))
        assert status == 200 and "already delivered" in text
    status, text, headers = await post(client, body(alert("f2"), group_key="g2"))
    assert status == 503
    assert "over 2 deliveries per minute" in text
    assert 0 < int(headers["Retry-After"]) <= 60
    assert len(portal.messages) == 2


async def test_no_receiver_no_route(start: Start, portal: FakePortal) -> None:
    """Without receivers the route does not exist: the server's plain 404."""
    client = await start()
    status, text, _ = await post(client, body())
    assert status == 404
    assert "alert receiver" not in text
    assert "bitrix24_alert_" not in await metrics_text(client)


async def test_basic_auth_in_front_replaces_the_bearer_token(
    start: Start, portal: FakePortal
) -> None:
    """When basic auth protects every request, Alertmanager's one Authorization header
    is the basic one, so the bearer check is left to it."""
    client = await start(receiver(), basic_auth=lambda: True)
    status, text, _ = await post(client, body(), headers={})
    assert status == 200, text


async def test_a_receiver_nothing_protects_refuses(start: Start, portal: FakePortal) -> None:
    """Without a token, the route serves only while basic auth protects the server (the
    config check refuses the rest at start; basic auth may be taken out later)."""
    unprotected = receiver()
    del unprotected["token"]
    protected = True
    client = await start(unprotected, basic_auth=lambda: protected)
    assert (await post(client, body(alert("a"), group_key="a"), headers={}))[0] == 200
    protected = False
    status, text, _ = await post(client, body(alert("b"), group_key="b"), headers={})
    assert (status, text) == (401, "alert receiver ops: not protected by a token or basic auth\n")
    assert len(portal.messages) == 1


async def test_no_secret_in_messages(start: Start, portal: FakePortal) -> None:
    """The receiver's token and the webhook secret never reach the chat."""
    client = await start(receiver())
    raw = body(alert(labels={"user_id": "3"}))
    raw["externalURL"] = f"http://am:{TOKEN}@alertmanager:9093"
    assert (await post(client, raw))[0] == 200
    sent = [m.message for m in portal.messages] + [n.message for n in portal.notifications]
    assert sent and not any(TOKEN in text for text in sent)


async def test_the_head_comes_from_the_department_tree_polling_learned(
    start: Start, portal: FakePortal
) -> None:
    """With teams, notify_head tells the head of the alert's department, or where it has
    none, the nearest head above it: R&D (15) has no head, its parent Acme (1) is headed by
    user 2, who is told "in R&D"."""
    portal.add_department(FakeDepartment(1, "Acme", head=2))
    portal.add_department(FakeDepartment(15, "R&D", parent=1))
    spec = receiver(chat=None, notify_user=False, notify_head=True)
    client = await start(spec, teams=True)

    async def tree_known() -> bool:
        return 'department_id="15"' in await metrics_text(client)

    await wait_for(tree_known)
    raw = body(alert(labels={"department_id": "15"}, annotations={"summary": "R&D is late"}))
    status, text, _ = await post(client, raw)
    assert (status, text) == (200, "alert receiver ops: delivered to user 2\n")
    [notice] = portal.notifications
    assert notice.message == "[b]FIRING[/b] in R&D Bitrix24UserTasksOverdue: R&D is late"

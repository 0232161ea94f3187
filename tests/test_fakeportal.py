"""Tests for the fake Bitrix24 portal, over real HTTP through pytest-aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from exporter.fakeportal import (
    LEGACY_COUNTER_CODES,
    ROLES,
    FakePortal,
    FakeUser,
    demo_portal,
    parse_php_query,
    serve,
)

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

SECRET = "s3cr3t"
HOOK = f"/rest/1/{SECRET}/"
USER_HOOK = "/rest/2/userhook/"


def make_portal(**kwargs: Any) -> FakePortal:
    """An admin (1), a plain user (2) with webhooks, and an inactive user (3)."""
    kwargs.setdefault("requests_per_second", None)
    portal = FakePortal(**kwargs)
    portal.add_user(FakeUser(1, "Anna", "Admin", admin=True))
    portal.add_user(FakeUser(2, "Boris", "Plain"))
    portal.add_user(FakeUser(3, "Clara", "Gone", active=False))
    portal.add_webhook(1, SECRET)
    portal.add_webhook(2, "userhook")
    return portal


async def call(
    client: TestClient[Any, Any],
    path: str,
    *,
    json_body: Any = None,
    data: Any = None,
    http_method: str = "POST",
    params: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with client.request(
        http_method, path, json=json_body, data=data, params=params
    ) as response:
        return response.status, await response.json(content_type=None)


@pytest.fixture
def portal() -> FakePortal:
    return make_portal()


@pytest.fixture
async def client(portal: FakePortal, aiohttp_client: ClientFactory) -> TestClient[Any, Any]:
    return await aiohttp_client(portal.app)


# ---- auth and envelope ----------------------------------------------------------------------


async def test_profile_has_result_and_time_block(client: TestClient[Any, Any]) -> None:
    """A valid webhook gets the profile of its user and the full time block."""
    status, body = await call(client, HOOK + "profile")
    assert status == 200
    assert body["result"] == {
        "ID": "1",
        "ADMIN": True,
        "NAME": "Anna",
        "LAST_NAME": "Admin",
        "PERSONAL_GENDER": "",
        "TIME_ZONE": "",
        "TIME_ZONE_OFFSET": 0,
    }
    assert set(body["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating_reset_at",
        "operating",
    }
    assert body["time"]["date_start"].endswith("+00:00")


async def test_get_with_json_suffix_works(client: TestClient[Any, Any]) -> None:
    """GET and the `.json` suffix reach the same method."""
    status, body = await call(client, HOOK + "profile.json", http_method="GET")
    assert status == 200
    assert body["result"]["NAME"] == "Anna"


async def test_profile_of_inactive_user_is_empty_list(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """An inactive user's profile is `[]`, as PHP returns an empty array."""
    portal.add_webhook(3, "inactive")
    status, body = await call(client, "/rest/3/inactive/profile")
    assert (status, body["result"]) == (200, [])


@pytest.mark.parametrize(
    "path",
    [
        "/rest/1/wrong/profile",  # unknown secret
        f"/rest/2/{SECRET}/profile",  # the secret belongs to user 1
    ],
)
async def test_bad_credentials_are_401(client: TestClient[Any, Any], path: str) -> None:
    """Unknown secrets and user/secret mismatches get 401 INVALID_CREDENTIALS, no time block."""
    status, body = await call(client, path)
    assert status == 401
    assert body == {
        "error": "INVALID_CREDENTIALS",
        "error_description": "Invalid request credentials",
    }


async def test_revoked_webhook_is_401(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """Once revoked, a webhook that worked gets 401 INVALID_CREDENTIALS."""
    assert (await call(client, HOOK + "profile"))[0] == 200
    portal.revoke_webhook(SECRET)
    status, body = await call(client, HOOK + "profile")
    assert (status, body["error"]) == (401, "INVALID_CREDENTIALS")


async def test_scope_lists_what_the_webhook_was_granted(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """`scope` answers the webhook's scopes (sorted); full=true lists every scope the portal
    knows; a method outside the scopes answers 401 insufficient_scope, in a batch too."""
    portal.add_webhook(2, "narrow", scopes=("task", "user_brief"))
    status, body = await call(client, HOOK + "scope")
    assert (status, body["result"]) == (200, ["department", "im", "task", "user"])
    status, body = await call(client, "/rest/2/narrow/scope")
    assert (status, body["result"]) == (200, ["task", "user_brief"])
    status, body = await call(client, "/rest/2/narrow/scope", json_body={"full": True})
    assert {"im", "task", "user_brief", "department"} <= set(body["result"])
    status, body = await call(client, "/rest/2/narrow/im.counters.get")
    assert (status, body["error"]) == (401, "insufficient_scope")
    assert (await call(client, "/rest/2/narrow/user.get"))[0] == 200
    assert (await call(client, "/rest/2/narrow/tasks.task.counters.get"))[0] == 200
    status, body = await call(
        client, "/rest/2/narrow/batch", json_body={"cmd": {"im": "im.counters.get"}}
    )
    assert body["result"]["result_error"]["im"]["error"] == "insufficient_scope"


async def test_call_without_credentials_is_no_auth_found(client: TestClient[Any, Any]) -> None:
    """`/rest/{method}` without any token is refused with NO_AUTH_FOUND."""
    status, body = await call(client, "/rest/profile")
    assert (status, body["error"]) == (401, "NO_AUTH_FOUND")


async def test_unknown_method_is_404(client: TestClient[Any, Any]) -> None:
    """An unknown method gets 404 ERROR_METHOD_NOT_FOUND."""
    status, body = await call(client, HOOK + "crm.lead.list")
    assert status == 404
    assert body == {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}


async def test_requests_are_recorded_without_the_secret(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """Every request is recorded in order, secret masked, with status and error code."""
    await call(client, HOOK + "profile.json", http_method="GET", params={"x": "1"})
    await call(client, HOOK + "nope", json_body={"a": 1})
    first, second = portal.requests
    assert (first.http_method, first.path, first.method) == (
        "GET",
        "/rest/1/<secret>/profile.json",
        "profile",
    )
    assert (first.params, first.commands, first.status, first.error) == ({"x": "1"}, 1, 200, None)
    assert (second.method, second.status, second.error) == ("nope", 404, "ERROR_METHOD_NOT_FOUND")
    assert second.at >= first.at
    assert portal.count() == 2
    assert portal.count("profile") == 1
    assert portal.count(status=404) == 1
    assert portal.count("profile", 404) == 0


async def test_body_wins_over_query_and_broken_json_is_empty(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """Query and body merge with the body winning; a broken JSON body means no parameters."""
    await call(client, HOOK + "profile?a=query&b=query", data={"b": "body"})
    async with client.post(
        HOOK + "profile", data=b"{broken", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 200
    assert portal.requests[0].params == {"a": "query", "b": "body"}
    assert portal.requests[1].params == {}


# ---- user.get -------------------------------------------------------------------------------


async def test_user_get_pages_by_50(aiohttp_client: ClientFactory) -> None:
    """120 users come in pages of 50 with `total`, and `next` while more remain."""
    portal = make_portal()
    for user_id in range(4, 121):
        portal.add_user(FakeUser(user_id, f"U{user_id}"))
    client = await aiohttp_client(portal.app)
    pages = []
    for start in (0, 50, 100):
        status, body = await call(client, HOOK + "user.get", json_body={"start": start})
        assert status == 200
        pages.append(body)
    assert [len(p["result"]) for p in pages] == [50, 50, 20]
    assert [p["total"] for p in pages] == [120, 120, 120]
    assert [p.get("next") for p in pages] == [50, 100, None]
    ids = [u["ID"] for p in pages for u in p["result"]]
    assert ids == [str(i) for i in range(1, 121)]
    assert pages[0]["result"][0] == {
        "ID": "1",
        "ACTIVE": True,
        "NAME": "Anna",
        "LAST_NAME": "Admin",
        "SECOND_NAME": "",
        "USER_TYPE": "employee",
        "UF_DEPARTMENT": [1],
    }


async def test_active_false_in_a_form_means_active(client: TestClient[Any, Any]) -> None:
    """The ACTIVE trap: the string "false" is truthy in PHP, so it selects active users."""
    _, body = await call(client, HOOK + "user.get", data={"ACTIVE": "false"})
    assert [u["ID"] for u in body["result"]] == ["1", "2"]
    _, body = await call(client, HOOK + "user.get?FILTER[ACTIVE]=false")
    assert [u["ID"] for u in body["result"]] == ["1", "2"]


async def test_active_false_in_json_means_inactive(client: TestClient[Any, Any]) -> None:
    """JSON false is falsy, so it selects inactive users; "N" does too."""
    _, body = await call(client, HOOK + "user.get", json_body={"FILTER": {"ACTIVE": False}})
    assert [u["ID"] for u in body["result"]] == ["3"]
    _, body = await call(client, HOOK + "user.get", json_body={"ACTIVE": "N"})
    assert [u["ID"] for u in body["result"]] == ["3"]


async def test_user_get_filters(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """USER_TYPE and ID filter; with FILTER present, top-level filters are ignored."""
    portal.add_user(FakeUser(4, "Ext", user_type="extranet"))
    _, body = await call(client, HOOK + "user.get", json_body={"USER_TYPE": "extranet"})
    assert [(u["ID"], u["UF_DEPARTMENT"]) for u in body["result"]] == [("4", [])]
    _, body = await call(client, HOOK + "user.get", json_body={"filter": {"ID": [2, 3]}})
    assert [u["ID"] for u in body["result"]] == ["2", "3"]
    _, body = await call(
        client, HOOK + "user.get", json_body={"ID": 2, "FILTER": {}, "ADMIN_MODE": True}
    )
    assert len(body["result"]) == 4


async def test_user_current_is_the_callers_record(client: TestClient[Any, Any]) -> None:
    """user.current returns the credential's own user."""
    _, body = await call(client, USER_HOOK + "user.current")
    assert body["result"]["ID"] == "2"
    assert body["result"]["ACTIVE"] is True


# ---- im.counters.get ------------------------------------------------------------------------


async def test_im_counters_are_the_callers_and_empty_maps_are_lists(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """im.counters.get ignores any user parameter and serialises empty maps as `[]`."""
    payload = {
        "TYPE": {"ALL": 4, "NOTIFY": 1, "CHAT": 3, "DIALOG": 0, "LINES": 0, "MESSENGER": 3},
        "CHAT": {"18": 3},
        "DIALOG": {},
        "LINES": {},
        "CHAT_MUTED": {},
        "CHAT_UNREAD": [],
    }
    portal.set_im_counters(2, payload)
    async with client.post(USER_HOOK + "im.counters.get", json={"USER_ID": 1}) as response:
        text = await response.text()
    assert '"DIALOG":[]' in text
    result = json.loads(text)["result"]
    assert result["CHAT"] == {"18": 3}
    assert result["TYPE"]["ALL"] == 4


async def test_default_im_counters_have_consistent_totals(client: TestClient[Any, Any]) -> None:
    """Seed-derived im counters keep ALL = MESSENGER + NOTIFY."""
    _, body = await call(client, HOOK + "im.counters.get")
    kind = body["result"]["TYPE"]
    assert kind["ALL"] == kind["MESSENGER"] + kind["NOTIFY"]
    assert set(kind) >= {"ALL", "NOTIFY", "CHAT", "DIALOG", "LINES", "MESSENGER"}


# ---- tasks.task.counters.get ----------------------------------------------------------------


async def test_task_counters_of_self(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """The caller reads its own counters, with the top-level `total: 1`."""
    portal.set_task_counters(
        2, "view_all", {"expired": (1, 6291456), "new_comments": (7, 12582912)}
    )
    status, body = await call(client, USER_HOOK + "tasks.task.counters.get")
    assert status == 200
    assert body["result"] == {
        "expired": {"counter": 1, "code": 6291456},
        "new_comments": {"counter": 7, "code": 12582912},
    }
    assert body["total"] == 1


@pytest.mark.parametrize(
    ("hook", "params", "readable"),
    [
        (USER_HOOK, {"userId": 1}, False),  # a plain user may not read someone else
        (USER_HOOK, {"userId": "2"}, True),  # numeric strings are fine
        (HOOK, {"userId": 2}, True),  # an admin reads anyone
        (HOOK, {"userId": 999}, False),  # unknown user
        (HOOK, {"userId": 2, "type": "view_nothing"}, False),  # unknown type
        (HOOK, {"userId": 2, "type": "view_role_auditor"}, True),
    ],
)
async def test_task_counter_access(
    client: TestClient[Any, Any], hook: str, params: dict[str, Any], readable: bool
) -> None:
    """Who may read whose counters; the rest get `result: []` and no `total`."""
    status, body = await call(client, hook + "tasks.task.counters.get", json_body=params)
    assert status == 200
    if readable:
        assert set(body["result"]) == {"expired", "new_comments", "mentioned"}
    else:
        assert body["result"] == []
        assert "total" not in body


async def test_task_counters_bad_user_id_is_400(client: TestClient[Any, Any]) -> None:
    """A userId that is not an integer leaks the PHP TypeError as error "0"."""
    status, body = await call(client, HOOK + "tasks.task.counters.get", data={"userId": "abc"})
    assert status == 400
    assert body == {
        "error": "0",
        "error_description": "Argument #1 ($userId) must be of type int, string given, "
        "called in /var/www/html/bitrix/modules/tasks/lib/internals/counter.php on line 78 "
        "(internal error)",
    }


async def test_task_counters_unknown_group_is_400(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """An unknown groupId is refused; a known group answers with its own counters."""
    status, body = await call(client, HOOK + "tasks.task.counters.get", json_body={"groupId": 5})
    assert (status, body) == (
        400,
        {"error": "0", "error_description": "Group not found or access denied. (internal error)"},
    )
    portal.set_task_counters(1, "view_all", {"expired": (2, 6291456)}, group_id=5)
    status, body = await call(client, HOOK + "tasks.task.counters.get", json_body={"groupId": 5})
    assert (status, body["result"]) == (200, {"expired": {"counter": 2, "code": 6291456}})


async def test_legacy_counters_per_role(aiohttp_client: ClientFactory) -> None:
    """Older portals return the per-role legacy set with the documented codes."""
    client = await aiohttp_client(make_portal(legacy_counters=True).app)
    expected = {
        "view_all": ["wo_deadline", "expired", "expired_soon", "not_viewed", "wait_ctrl"],
        "view_role_accomplice": ["expired", "expired_soon", "not_viewed"],
        "view_role_auditor": ["expired"],
    }
    for role, names in expected.items():
        _, body = await call(client, HOOK + "tasks.task.counters.get", json_body={"type": role})
        assert list(body["result"]) == names
        assert all(body["result"][n]["code"] == LEGACY_COUNTER_CODES[n] for n in names)


# ---- batch ----------------------------------------------------------------------------------


async def test_batch_shape(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """Results, errors, totals, next and per-command time blocks are keyed by command."""
    for user_id in range(4, 60):
        portal.add_user(FakeUser(user_id, f"U{user_id}"))
    cmd = {
        "users": "user.get?FILTER[ACTIVE]=Y&select[]=ID",
        "t2": "tasks.task.counters.get?userId=2&groupId=0&type=view_all",
        "bad": "tasks.task.counters.get?userId=abc",
        "nested": "batch?cmd[x]=profile",
    }
    status, body = await call(client, HOOK + "batch", json_body={"halt": 0, "cmd": cmd})
    assert status == 200
    assert set(body) == {"result", "time"}
    sections = body["result"]
    assert list(sections["result"]) == ["users", "t2"]
    assert len(sections["result"]["users"]) == 50
    assert set(sections["result"]["t2"]) == {"expired", "new_comments", "mentioned"}
    assert sections["result_total"] == {"users": 58, "t2": 1}
    assert sections["result_next"] == {"users": 50}
    assert set(sections["result_time"]) == {"users", "t2"}
    assert "operating" in sections["result_time"]["t2"]
    assert sections["result_error"]["bad"]["error"] == "0"
    assert sections["result_error"]["nested"] == {
        "error": "ERROR_BATCH_METHOD_NOT_ALLOWED",
        "error_description": "Method is not allowed for batch usage",
    }
    assert portal.requests[-1].commands == 4


async def test_batch_form_encoded_and_empty_sections(
    portal: FakePortal, client: TestClient[Any, Any]
) -> None:
    """A form-encoded batch parses its commands with parse_str; empty sections are `[]`."""
    data = {"cmd[me]": "profile", "cmd[who]": "user.get?ID=2"}
    status, body = await call(client, HOOK + "batch", data=data)
    assert status == 200
    assert body["result"]["result"]["me"]["ID"] == "1"
    assert [u["ID"] for u in body["result"]["result"]["who"]] == ["2"]
    assert body["result"]["result_error"] == []
    assert body["result"]["result_next"] == []


async def test_batch_51st_command_is_rejected(client: TestClient[Any, Any]) -> None:
    """Commands past the 50th get ERROR_BATCH_LENGTH_EXCEEDED; the first 50 run."""
    cmd = {f"c{i}": "profile" for i in range(51)}
    _, body = await call(client, HOOK + "batch", json_body={"cmd": cmd})
    assert len(body["result"]["result"]) == 50
    assert body["result"]["result_error"] == {
        "c50": {
            "error": "ERROR_BATCH_LENGTH_EXCEEDED",
            "error_description": "Max batch length exceeded",
        }
    }


async def test_batch_halt_stops_after_first_error(client: TestClient[Any, Any]) -> None:
    """With halt=1 nothing after the first failing command runs."""
    cmd = {"a": "profile", "b": "no.such.method", "c": "profile"}
    _, body = await call(client, HOOK + "batch", json_body={"halt": 1, "cmd": cmd})
    assert list(body["result"]["result"]) == ["a"]
    assert list(body["result"]["result_error"]) == ["b"]


# ---- limits ---------------------------------------------------------------------------------


class Clock:
    """A clock for the fake portal that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_leaky_bucket_rejects_the_sixth_immediate_request(
    aiohttp_client: ClientFactory,
) -> None:
    """With burst 5 at 1/s, the sixth immediate request gets the exact 503 body."""
    portal = make_portal(requests_per_second=1.0, burst=5, clock=Clock())
    client = await aiohttp_client(portal.app)
    statuses = [(await call(client, HOOK + "profile"))[0] for _ in range(5)]
    assert statuses == [200] * 5
    status, body = await call(client, HOOK + "profile")
    assert status == 503
    assert body == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    assert portal.count(status=503) == 1


async def test_leaky_bucket_drains_and_batch_counts_once(aiohttp_client: ClientFactory) -> None:
    """The bucket drains at the configured rate, and a batch costs one request."""
    clock = Clock()
    portal = make_portal(requests_per_second=20.0, burst=2, clock=clock)
    client = await aiohttp_client(portal.app)
    cmd = {f"c{i}": "profile" for i in range(10)}
    assert (await call(client, HOOK + "batch", json_body={"cmd": cmd}))[0] == 200
    assert (await call(client, HOOK + "profile"))[0] == 200
    assert (await call(client, HOOK + "profile"))[0] == 503
    clock.now += 0.049  # not quite one request's worth at 20/s
    assert (await call(client, HOOK + "profile"))[0] == 503
    clock.now += 0.002  # now a little over one
    assert (await call(client, HOOK + "profile"))[0] == 200
    assert (await call(client, HOOK + "profile"))[0] == 503


async def test_operating_budget(aiohttp_client: ClientFactory) -> None:
    """Calls are charged per credential and method, and refused once the sum is over the limit."""
    portal = make_portal(operating_cost=200.0, operating_limit=480.0)
    client = await aiohttp_client(portal.app)
    times = []
    for _ in range(3):
        status, body = await call(client, HOOK + "im.counters.get")
        assert status == 200
        times.append(body["time"])
    assert [t["operating"] for t in times] == [200.0, 400.0, 600.0]
    assert times[0]["duration"] == 200.0
    assert times[0]["operating_reset_at"] == pytest.approx(times[0]["start"] + 600, abs=2)
    status, body = await call(client, HOOK + "im.counters.get")
    assert status == 429
    assert body == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": "Method is blocked due to operation time limit.",
    }
    # Another method, or another webhook, has its own budget.
    assert (await call(client, HOOK + "profile"))[0] == 200
    assert (await call(client, USER_HOOK + "im.counters.get"))[0] == 200
    # Inside a batch the refusal lands in result_error; batch itself costs nothing.
    cmd = {"im": "im.counters.get", "me": "profile"}
    status, body = await call(client, HOOK + "batch", json_body={"cmd": cmd})
    assert status == 200
    assert body["result"]["result_error"]["im"]["error"] == "OPERATION_TIME_LIMIT"
    assert body["result"]["result_time"]["me"]["operating"] == 400.0
    assert body["time"]["operating"] == 0
    assert body["time"]["duration"] == 200.0


async def test_operating_budget_expires(aiohttp_client: ClientFactory) -> None:
    """Buckets expire one window after their first call."""
    clock = Clock()
    portal = make_portal(
        operating_cost=10.0, operating_limit=5.0, operating_window=0.2, clock=clock
    )
    client = await aiohttp_client(portal.app)
    assert (await call(client, HOOK + "profile"))[0] == 200
    assert (await call(client, HOOK + "profile"))[0] == 429
    clock.now += 0.199
    assert (await call(client, HOOK + "profile"))[0] == 429
    clock.now += 0.002
    assert (await call(client, HOOK + "profile"))[0] == 200


async def test_no_operating_fields_without_a_limit(aiohttp_client: ClientFactory) -> None:
    """With operating_limit=None, like a self-hosted portal, the time block has no operating."""
    client = await aiohttp_client(make_portal(operating_limit=None).app)
    _, body = await call(client, HOOK + "profile")
    assert "operating" not in body["time"]
    assert "operating_reset_at" not in body["time"]


# ---- faults ---------------------------------------------------------------------------------


async def test_fault_latency(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """Latency delays every answer."""
    portal.faults.latency = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(client, HOOK + "profile"))[0] == 200
    # A lower bound: a loaded machine only makes the answer later, never earlier.
    assert loop.time() - started >= 0.2


async def test_fault_http_500(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """A 500 carries the INTERNAL_SERVER_ERROR body."""
    portal.faults.http_500_rate = 1.0
    status, body = await call(client, HOOK + "profile")
    assert status == 500
    assert body == {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"}
    assert portal.requests[-1].error == "INTERNAL_SERVER_ERROR"


async def test_fault_malformed_json(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """A 200 whose JSON body is cut short."""
    portal.faults.malformed_json_rate = 1.0
    async with client.post(HOOK + "profile") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(await response.text())


async def test_fault_html_502(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """A 502 nginx page in HTML."""
    portal.faults.html_502_rate = 1.0
    async with client.post(HOOK + "profile") as response:
        assert response.status == 502
        assert response.content_type == "text/html"
        assert "502 Bad Gateway" in await response.text()


async def test_fault_hang(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """A hang outlasts the client's timeout."""
    portal.faults.hang_rate = 1.0
    portal.faults.hang_seconds = 5.0
    with pytest.raises(asyncio.TimeoutError):
        async with client.post(
            HOOK + "profile", timeout=aiohttp.ClientTimeout(total=0.2)
        ) as response:
            await response.read()


async def test_fault_reset(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """A reset closes the connection without any response."""
    portal.faults.reset_rate = 1.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(client, HOOK + "profile")
    assert portal.requests[-1].status == 0


async def test_fault_query_limit_burst(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """The next N requests get 503 QUERY_LIMIT_EXCEEDED, then service resumes."""
    portal.faults.query_limit_burst = 2
    statuses = [(await call(client, HOOK + "profile"))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert portal.requests[0].error == "QUERY_LIMIT_EXCEEDED"


async def test_fault_operation_time_limit(portal: FakePortal, client: TestClient[Any, Any]) -> None:
    """Every limited call gets 429; batch still answers, with the error per command."""
    portal.faults.operation_time_limit = True
    status, body = await call(client, HOOK + "profile")
    assert (status, body["error"]) == (429, "OPERATION_TIME_LIMIT")
    status, body = await call(client, HOOK + "batch", json_body={"cmd": {"p": "profile"}})
    assert status == 200
    assert body["result"]["result_error"]["p"]["error"] == "OPERATION_TIME_LIMIT"


async def test_faults_replay_with_the_same_seed(aiohttp_client: ClientFactory) -> None:
    """The same seed gives the same sequence of faults."""
    runs = []
    for _ in range(2):
        portal = make_portal(seed=42)
        portal.faults.http_500_rate = 0.5
        client = await aiohttp_client(portal.app)
        runs.append([(await call(client, HOOK + "profile"))[0] for _ in range(12)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


# ---- helpers, demo and serve ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("a=1&b=2", {"a": "1", "b": "2"}),
        ("FILTER[ACTIVE]=Y&FILTER[ID]=5", {"FILTER": {"ACTIVE": "Y", "ID": "5"}}),
        ("select[]=ID&select[]=NAME", {"select": ["ID", "NAME"]}),
        ("a=1&a=2", {"a": "2"}),
        ("q=a+b%26c", {"q": "a b&c"}),
        ("x.y=1", {"x_y": "1"}),
        ("cmd[k]=user.get%3FID%3D1", {"cmd": {"k": "user.get?ID=1"}}),
        ("", {}),
    ],
)
def test_parse_php_query(query: str, expected: dict[str, Any]) -> None:
    """parse_php_query follows PHP's parse_str."""
    assert parse_php_query(query) == expected


async def test_demo_portal_over_serve() -> None:
    """The demo portal serves on a real port with non-zero counters for its admin."""
    portal, path = demo_portal(users=6, seed=1)
    assert path.startswith("/rest/1/") and path.endswith("/")
    assert len(portal.users) == 6 and portal.users[1].admin
    runner, base = await serve(portal)
    try:
        assert base.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.post(base + path + "tasks.task.counters.get") as response:
                body = await response.json()
            async with session.post(base + path + "im.counters.get") as response:
                im = await response.json()
    finally:
        await runner.cleanup()
    assert all(c["counter"] > 0 for c in body["result"].values())
    assert im["result"]["TYPE"]["ALL"] > 0


async def test_advance_counters_moves_values_and_stays_non_negative(
    aiohttp_client: ClientFactory,
) -> None:
    """advance_counters changes what the API reports and never goes below zero."""
    portal, path = demo_portal()
    portal.requests_per_second = None
    client = await aiohttp_client(portal.app)
    cmd = {
        f"u{user}_{role}": f"tasks.task.counters.get?userId={user}&type={role}"
        for user in portal.users
        for role in ROLES
    }
    cmd["im"] = "im.counters.get"

    async def snapshot() -> dict[str, Any]:
        _, body = await call(client, path + "batch", json_body={"cmd": cmd})
        results: dict[str, Any] = body["result"]["result"]
        return results

    before = await snapshot()
    rnd = random.Random(3)
    for _ in range(200):
        portal.advance_counters(rnd)
    after = await snapshot()
    assert before != after
    values = [c["counter"] for k, r in after.items() if k != "im" for c in r.values()]
    assert min(values) >= 0
    kind = after["im"]["TYPE"]
    assert kind["ALL"] == kind["MESSENGER"] + kind["NOTIFY"] >= 0

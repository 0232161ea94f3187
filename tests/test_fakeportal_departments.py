"""The fake portal's company structure over real HTTP: department.get with the shapes
Bitrix24 sends, paging in batch, UF_DEPARTMENT in user.get, and the department scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient

from exporter.fakeportal import DEMO_DEPARTMENTS, FakeDepartment, FakePortal, FakeUser, demo_portal

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

HOOK = "/rest/1/deptsecret/"


async def call(client: TestClient[Any, Any], path: str, body: Any = None) -> tuple[int, Any]:
    async with client.post(path, json=body) as response:
        return response.status, await response.json(content_type=None)


async def test_department_get_sends_the_documented_shapes(aiohttp_client: ClientFactory) -> None:
    """Ids as strings, SORT an int, no PARENT on the root, no UF_HEAD without a head, parents
    before children, only active departments."""
    portal, hook = demo_portal()
    portal.requests_per_second = None
    portal.add_department(FakeDepartment(99, "Closed", 1, active=False))
    client = await aiohttp_client(portal.app)
    status, body = await call(client, hook + "department.get")
    assert status == 200
    assert body["total"] == len(DEMO_DEPARTMENTS)
    rows = body["result"]
    assert rows[0] == {"ID": "1", "NAME": "Acme", "SORT": 500, "UF_HEAD": "1"}
    assert {"ID": "3", "NAME": "Support", "SORT": 500, "PARENT": "1"} in rows
    seen: set[str] = set()
    for row in rows:
        assert row.get("PARENT") is None or row["PARENT"] in seen, row
        seen.add(row["ID"])
    assert "99" not in seen
    # Four levels deep: Key Accounts -> Field Sales -> Sales -> Acme.
    parents = {row["ID"]: row.get("PARENT") for row in rows}
    assert [parents["6"], parents["4"], parents["2"], parents["1"]] == ["4", "2", "1", None]


async def test_department_get_filters_sorts_and_pages_in_batch(
    aiohttp_client: ClientFactory,
) -> None:
    """Filter keys at the top level or in FILTER, sort/order, and pages of 50 (`START`) that
    several go into one batch, with total and next per command."""
    portal = FakePortal(requests_per_second=None)
    portal.add_user(FakeUser(1, "Anna", admin=True))
    portal.add_webhook(1, "deptsecret")
    portal.add_department(FakeDepartment(1, "Root"))
    for department_id in range(2, 121):
        portal.add_department(FakeDepartment(department_id, f"D{department_id}", 1))
    client = await aiohttp_client(portal.app)
    _, first = await call(client, HOOK + "department.get", {"START": 0})
    assert (len(first["result"]), first["total"], first["next"]) == (50, 120, 50)
    cmd = {f"d{start}": f"department.get?START={start}" for start in (50, 100)}
    _, batch = await call(client, HOOK + "batch", {"cmd": cmd})
    sections = batch["result"]
    assert [len(sections["result"][k]) for k in cmd] == [50, 20]
    assert sections["result_total"] == {"d50": 120, "d100": 120}
    assert sections["result_next"] == {"d50": 100}
    _, one = await call(client, HOOK + "department.get", {"FILTER": {"PARENT": "1", "ID": 7}})
    assert [r["ID"] for r in one["result"]] == ["7"]
    _, top = await call(client, HOOK + "department.get", {"ID": ["3", "2"]})
    assert [r["ID"] for r in top["result"]] == ["2", "3"]
    _, desc = await call(client, HOOK + "department.get", {"sort": "ID", "order": "DESC"})
    assert desc["result"][0]["ID"] == "120"


async def test_users_carry_their_departments(aiohttp_client: ClientFactory) -> None:
    """UF_DEPARTMENT lists every department of a user (ints, or numeric strings when asked);
    extranet users have none."""
    portal, hook = demo_portal()
    portal.requests_per_second = None
    portal.add_user(FakeUser(40, "Guest", user_type="extranet"))
    client = await aiohttp_client(portal.app)
    _, body = await call(client, hook + "user.get", {"ID": 3})
    assert body["result"][0]["UF_DEPARTMENT"] == [4, 3]
    portal.department_ids_as_strings = True
    _, body = await call(client, hook + "user.get", {"ID": 3})
    assert body["result"][0]["UF_DEPARTMENT"] == ["4", "3"]
    _, body = await call(client, hook + "user.get", {"FILTER": {"ID": 40}})
    assert body["result"][0]["UF_DEPARTMENT"] == []


async def test_department_get_needs_the_department_scope(aiohttp_client: ClientFactory) -> None:
    """A webhook without the department scope gets 401 insufficient_scope, alone and inside
    a batch, while its other methods keep working."""
    portal, _ = demo_portal()
    portal.requests_per_second = None
    hook = portal.add_webhook(1, "noscope", scopes=("im", "task", "user"))
    client = await aiohttp_client(portal.app)
    status, body = await call(client, hook + "department.get")
    assert (status, body["error"]) == (401, "insufficient_scope")
    cmd = {"d": "department.get", "u": "user.get?ID=1"}
    status, batch = await call(client, hook + "batch", {"cmd": cmd})
    assert status == 200
    assert batch["result"]["result_error"]["d"]["error"] == "insufficient_scope"
    assert batch["result"]["result"]["u"][0]["ID"] == "1"

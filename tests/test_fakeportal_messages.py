"""The fake portal's sending methods (im.message.add, im.notify.system.add,
im.notify.personal.add): what they record and how they refuse, over real HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from exporter.fakeportal import MESSAGE_MAX_LENGTH, FakePortal, FakeUser

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

HOOK = "/rest/1/s3cr3t/"


@pytest.fixture
def portal() -> FakePortal:
    """User 1 (webhook) and 2 in chat 42, chat 43 without user 1, group 7's chat 44,
    inactive user 3, and a webhook of user 1 without the im scope."""
    portal = FakePortal(requests_per_second=None)
    portal.add_user(FakeUser(1, "Anna", "Admin", admin=True))
    portal.add_user(FakeUser(2, "Boris", "Plain"))
    portal.add_user(FakeUser(3, "Clara", "Gone", active=False))
    portal.add_webhook(1, "s3cr3t")
    portal.add_webhook(1, "noim", scopes=("task", "user"))
    portal.add_chat(42, (1, 2))
    portal.add_chat(43, (2,))
    portal.add_chat(44, (1, 2), group_id=7)
    return portal


@pytest.fixture
async def client(portal: FakePortal, aiohttp_client: ClientFactory) -> TestClient[Any, Any]:
    return await aiohttp_client(portal.app)


async def call(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with client.post(path, json=body) as response:
        return response.status, await response.json(content_type=None)


async def test_message_into_a_chat_is_recorded(
    client: TestClient[Any, Any], portal: FakePortal
) -> None:
    """A member posts into chatN and into a workgroup's chat as sgN; each message gets
    an id and is recorded with its dialog, sender and flags."""
    status, body = await call(
        client,
        HOOK + "im.message.add",
        {"DIALOG_ID": "chat42", "MESSAGE": " [b]FIRING[/b] x ", "URL_PREVIEW": "N"},
    )
    assert status == 200 and isinstance(body["result"], int)
    status, body2 = await call(
        client, HOOK + "im.message.add", {"DIALOG_ID": "sg7", "MESSAGE": "y"}
    )
    assert status == 200 and body2["result"] != body["result"]
    first, second = portal.messages
    assert (first.id, first.dialog_id, first.chat_id, first.from_user_id) == (
        body["result"],
        "chat42",
        42,
        1,
    )
    assert (first.message, first.url_preview, first.system) == ("[b]FIRING[/b] x", False, False)
    assert (second.chat_id, second.url_preview) == (44, True)


async def test_private_message_goes_to_a_user(
    client: TestClient[Any, Any], portal: FakePortal
) -> None:
    """A numeric DIALOG_ID is a private dialog with that user."""
    status, _ = await call(client, HOOK + "im.message.add", {"DIALOG_ID": "2", "MESSAGE": "hi"})
    assert status == 200
    assert (portal.messages[0].to_user_id, portal.messages[0].chat_id) == (2, None)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"DIALOG_ID": "chat43", "MESSAGE": "x"}, 403, "ACCESS_ERROR"),  # not a member
        ({"DIALOG_ID": "chat99", "MESSAGE": "x"}, 403, "ACCESS_ERROR"),  # no such chat
        ({"DIALOG_ID": "sg8", "MESSAGE": "x"}, 400, "CHAT_ID_EMPTY"),  # group without chat
        ({"DIALOG_ID": "99", "MESSAGE": "x"}, 400, "USER_NOT_FOUND"),
        ({"DIALOG_ID": "abc", "MESSAGE": "x"}, 400, "USER_ID_EMPTY"),
        ({"MESSAGE": "x"}, 400, "PARAMS_ERROR"),
        ({"DIALOG_ID": "chat42", "MESSAGE": "  "}, 400, "MESSAGE_EMPTY"),
        ({"DIALOG_ID": "chat42"}, 400, "MESSAGE_EMPTY"),
        ({"DIALOG_ID": "chat42", "MESSAGE": ["x"]}, 400, "MESSAGE_EMPTY"),
    ],
)
async def test_message_refusals(
    client: TestClient[Any, Any],
    portal: FakePortal,
    body: dict[str, Any],
    status: int,
    error: str,
) -> None:
    """Each refusal has the real portal's status and code, and nothing is recorded."""
    got, answer = await call(client, HOOK + "im.message.add", body)
    assert (got, answer["error"]) == (status, error)
    assert portal.messages == []


async def test_long_message_is_cut_not_refused(
    client: TestClient[Any, Any], portal: FakePortal
) -> None:
    """Past 20,000 characters the portal keeps the start and marks the cut."""
    text = "x" * (MESSAGE_MAX_LENGTH + 10)
    status, _ = await call(
        client, HOOK + "im.message.add", {"DIALOG_ID": "chat42", "MESSAGE": text}
    )
    assert status == 200
    assert portal.messages[0].message == "x" * MESSAGE_MAX_LENGTH + " (...)"


@pytest.mark.parametrize(
    ("method", "kind", "sender"),
    [("im.notify.system.add", "system", 0), ("im.notify.personal.add", "personal", 1)],
)
async def test_notifications_are_recorded(
    client: TestClient[Any, Any], portal: FakePortal, method: str, kind: str, sender: int
) -> None:
    """A system notification has no sender, a personal one comes from the webhook's user;
    TAG is kept but de-duplicates nothing for a webhook (two sends, two notifications)."""
    for _ in range(2):
        status, body = await call(
            client, HOOK + method, {"USER_ID": 2, "MESSAGE": "overdue", "TAG": "t1"}
        )
        assert status == 200 and isinstance(body["result"], int)
    assert [(n.user_id, n.from_user_id, n.kind, n.tag) for n in portal.notifications] == [
        (2, sender, kind, "t1")
    ] * 2


@pytest.mark.parametrize(
    ("body", "status", "result_or_error"),
    [
        ({"USER_ID": 99, "MESSAGE": "x"}, 200, False),  # unknown user: not added
        ({"USER_ID": 3, "MESSAGE": "x"}, 200, False),  # inactive user
        ({"USER_ID": 0, "MESSAGE": "x"}, 400, "USER_ID_EMPTY"),
        ({"USER_ID": 2, "MESSAGE": ""}, 400, "MESSAGE_EMPTY"),
    ],
)
async def test_notification_refusals(
    client: TestClient[Any, Any],
    portal: FakePortal,
    body: dict[str, Any],
    status: int,
    result_or_error: object,
) -> None:
    """A notification to a user the portal cannot notify answers `false`; a missing user
    id or message is an error; nothing is recorded either way."""
    got, answer = await call(client, HOOK + "im.notify.system.add", body)
    assert got == status
    assert answer.get("result", answer.get("error")) == result_or_error
    assert portal.notifications == []


@pytest.mark.parametrize(
    "method", ["im.message.add", "im.notify.system.add", "im.notify.personal.add"]
)
async def test_sending_needs_the_im_scope(
    client: TestClient[Any, Any], portal: FakePortal, method: str
) -> None:
    """A webhook without the im scope gets 401 insufficient_scope and sends nothing."""
    status, body = await call(
        client, "/rest/1/noim/" + method, {"DIALOG_ID": "chat42", "USER_ID": 2, "MESSAGE": "x"}
    )
    assert (status, body["error"]) == (401, "insufficient_scope")
    assert portal.messages == [] and portal.notifications == []

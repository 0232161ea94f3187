"""The pure mapping from API JSON to samples, table-tested on the documented examples."""

from __future__ import annotations

import pytest

from exporter.mapping import (
    NoAccess,
    PayloadError,
    im_counter_samples,
    parse_profile,
    parse_users,
    task_counter_samples,
    to_number,
)
from exporter.metrics import IM_CHAT_UNREAD, IM_UNREAD, TASKS

# The documented tasks.task.counters.get answer of a current portal.
SEED_CURRENT = {
    "expired": {"counter": 1, "code": 6291456},
    "new_comments": {"counter": 7, "code": 12582912},
}
# The documented answer of an older portal.
SEED_LEGACY = {
    "wo_deadline": {"counter": 0, "code": 10485760},
    "expired": {"counter": 1, "code": 6291456},
    "expired_soon": {"counter": 0, "code": 9437184},
    "not_viewed": {"counter": 0, "code": 1048576},
    "wait_ctrl": {"counter": 0, "code": 8388608},
}
# The documented im.counters.get answer.
SEED_IM = {
    "CHAT": {"18": 1},
    "DIALOG": {"1": 3, "5": 1},
    "LINES": {},
    "TYPE": {"ALL": 5, "CHAT": 1, "DIALOG": 4, "LINES": 0, "NOTIFY": 0},
}


def rows(samples: list) -> list[tuple]:  # type: ignore[type-arg]
    return [(s.family.name, *s.labels, s.value) for s in samples]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            SEED_CURRENT,
            [
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "expired", "6291456", 1.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "new_comments", "12582912", 7.0),
            ],
        ),
        (
            SEED_LEGACY,
            [
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "wo_deadline", "10485760", 0.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "expired", "6291456", 1.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "expired_soon", "9437184", 0.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "not_viewed", "1048576", 0.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "wait_ctrl", "8388608", 0.0),
            ],
        ),
        # An unknown counter is passed through, a missing code becomes "".
        (
            {"mentioned": {"counter": 2, "code": 15728640}, "brand_new": {"counter": "4"}},
            [
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "mentioned", "15728640", 2.0),
                ("bitrix24_tasks", "acme", "547", "0", "view_all", "brand_new", "", 4.0),
            ],
        ),
        # Entries without a usable number are skipped, not fatal.
        ({"expired": {"counter": None}, "odd": 3, "flag": {"counter": True}}, []),
        ({}, []),
    ],
)
def test_task_counters_map_to_samples(payload: object, expected: list[tuple]) -> None:  # type: ignore[type-arg]
    """Every counter the portal returns becomes one bitrix24_tasks sample with its code."""
    assert rows(task_counter_samples("acme", 547, 0, "view_all", payload)) == expected


def test_task_counters_empty_list_means_no_access() -> None:
    """`result: []` is the portal's way of refusing: it is reported, not mapped to zeros."""
    with pytest.raises(NoAccess):
        task_counter_samples("acme", 2, 0, "view_all", [])


@pytest.mark.parametrize("payload", ["text", 5, None, [1, 2]])
def test_task_counters_wrong_shape_is_a_payload_error(payload: object) -> None:
    """A result that is not an object of counters raises a typed error."""
    with pytest.raises(PayloadError):
        task_counter_samples("acme", 2, 0, "view_all", payload)


def test_im_seed_maps_to_type_counters() -> None:
    """TYPE keys become lower-cased counter labels; maps are ignored without `chats`."""
    assert rows(im_counter_samples("acme", 1, SEED_IM)) == [
        ("bitrix24_im_unread", "acme", "1", "all", 5.0),
        ("bitrix24_im_unread", "acme", "1", "chat", 1.0),
        ("bitrix24_im_unread", "acme", "1", "dialog", 4.0),
        ("bitrix24_im_unread", "acme", "1", "lines", 0.0),
        ("bitrix24_im_unread", "acme", "1", "notify", 0.0),
    ]


def test_im_chats_give_per_chat_series() -> None:
    """With `chats`, every map entry is a per-chat series; channel comments are flattened."""
    payload = {
        **SEED_IM,
        "LINES": [],
        "CHANNEL_COMMENT": {"40": {"41": 2}},
        "CHAT_UNREAD": [18],
        "COPILOT": {"77": 1},
    }
    samples = im_counter_samples("acme", 1, payload, chats=True)
    chats = [s for s in samples if s.family is IM_CHAT_UNREAD]
    assert rows(chats) == [
        ("bitrix24_im_chat_unread", "acme", "1", "chat", "18", 1.0),
        ("bitrix24_im_chat_unread", "acme", "1", "dialog", "1", 3.0),
        ("bitrix24_im_chat_unread", "acme", "1", "dialog", "5", 1.0),
        ("bitrix24_im_chat_unread", "acme", "1", "channel_comment", "41", 2.0),
        ("bitrix24_im_chat_unread", "acme", "1", "copilot", "77", 1.0),
    ]
    assert sum(1 for s in samples if s.family is IM_UNREAD) == 5


@pytest.mark.parametrize("payload", [[], {"TYPE": []}, {"TYPE": [], "CHAT": []}])
def test_im_empty_maps_arrive_as_lists(payload: object) -> None:
    """PHP sends empty maps as []: that is no counters, not an error."""
    assert im_counter_samples("acme", 1, payload, chats=True) == []


def test_im_unknown_type_keys_pass_through() -> None:
    """New kinds (copilot, collab, ...) appear as they come."""
    samples = im_counter_samples("acme", 1, {"TYPE": {"COLLAB": 2, "TASKS_TASK": "3"}})
    assert [(s.labels[2], s.value) for s in samples if s.family is IM_UNREAD] == [
        ("collab", 2.0),
        ("tasks_task", 3.0),
    ]


def test_profile_and_users() -> None:
    """Profile ids arrive as strings; names join first and last name."""
    profile = parse_profile({"ID": "17", "ADMIN": True, "NAME": "Anna", "LAST_NAME": "Ivanova"})
    assert (profile.user_id, profile.admin, profile.name) == (17, True, "Anna Ivanova")
    users = parse_users([{"ID": "3", "NAME": "Boris"}, {"ID": "x"}, "junk", {"ID": "4"}])
    assert [(u.user_id, u.name) for u in users] == [(3, "Boris"), (4, "")]
    with pytest.raises(NoAccess):
        parse_profile([])
    with pytest.raises(PayloadError):
        parse_profile({"ID": "abc"})


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        (1, 1.0),
        ("2", 2.0),
        (" 3.5 ", 3.5),
        (True, None),
        ("x", None),
        (10**400, None),
        (float("nan"), None),
    ],
)
def test_to_number(raw: object, number: float | None) -> None:
    """Numbers may come as strings; booleans, NaN and overflowing ints are not numbers."""
    assert to_number(raw) == number


def test_task_family_labels_are_the_contract() -> None:
    """The label names of bitrix24_tasks are a public contract."""
    assert TASKS.labels == ("portal", "user_id", "group_id", "role", "counter", "code")

"""Pure functions from Bitrix24 API JSON to samples and records.

No I/O here: every function takes the decoded `result` of one method call and returns
samples or records, or raises `PayloadError` (a shape we cannot use) or `NoAccess`
(the portal answered `result: []`, its way of saying "not yours to see").
Counter names and codes are passed through as the portal sends them, known or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exporter.failures import NoAccess as NoAccess
from exporter.failures import PayloadError as PayloadError
from exporter.metrics import IM_CHAT_UNREAD, IM_UNREAD, TASKS, Family


@dataclass(frozen=True, slots=True)
class Sample:
    """One series: its family, label values in the family's label order, and value."""

    family: Family
    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True, slots=True)
class Profile:
    """The user behind a credential, from `profile`."""

    user_id: int
    admin: bool
    name: str


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One user from `user.get`, with the departments the user is directly in."""

    user_id: int
    name: str
    departments: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DepartmentRecord:
    """One department from `department.get`; `parent` and `head` are None where unset."""

    department_id: int
    name: str
    parent: int | None
    head: int | None


def to_number(value: object) -> float | None:
    """The numeric value of a JSON scalar, or None where there is none.

    PHP sometimes sends numbers as strings; booleans are not numbers here.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def to_user_id(value: object) -> int | None:
    """A positive user id from an int or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: isdigit() also accepts "²", which int() rejects; and a bounded
        # length, as int() refuses more than 4300 digits.
        if text.isascii() and text.isdigit() and len(text) <= 30:
            number = int(text)
            return number if number > 0 else None
    return None


def task_counter_samples(
    portal: str, user_id: int, group_id: int, role: str, result: object
) -> list[Sample]:
    """Samples of `bitrix24_tasks` from one `tasks.task.counters.get` result.

    >>> [s.labels[4:] + (s.value,) for s in task_counter_samples(
    ...     "acme", 1, 0, "view_all", {"expired": {"counter": 1, "code": 6291456}})]
    [('expired', '6291456', 1.0)]
    """
    if isinstance(result, list) and not result:
        raise NoAccess("result is [] (no permission to read this user's counters, or no such user)")
    if not isinstance(result, dict):
        raise PayloadError(f"result must be an object of counters, got {type(result).__name__}")
    base = (portal, str(user_id), str(group_id), role)
    samples: list[Sample] = []
    for name, entry in result.items():
        if not isinstance(entry, dict):
            continue
        value = to_number(entry.get("counter"))
        if value is None:
            continue
        code = entry.get("code", "")
        code_text = "" if code is None or isinstance(code, dict | list) else str(code)
        samples.append(Sample(TASKS, (*base, str(name), code_text), value))
    return samples


# Keys of im.counters.get that are not per-chat maps: TYPE holds the totals; the
# *_UNREAD lists hold chats marked unread by hand, which carry no count.
_IM_TOTALS_KEY = "TYPE"


def im_counter_samples(
    portal: str, user_id: int, result: object, *, chats: bool = False
) -> list[Sample]:
    """Samples of `bitrix24_im_unread` (and, with `chats`, `bitrix24_im_chat_unread`).

    Empty maps arrive as `[]` (PHP), unknown keys are passed through lower-cased.
    """
    if isinstance(result, list) and not result:
        return []
    if not isinstance(result, dict):
        raise PayloadError(f"result must be an object, got {type(result).__name__}")
    uid = str(user_id)
    samples: list[Sample] = []
    totals = result.get(_IM_TOTALS_KEY, [])
    if isinstance(totals, dict):
        for kind, raw in totals.items():
            value = to_number(raw)
            if value is not None:
                samples.append(Sample(IM_UNREAD, (portal, uid, str(kind).lower()), value))
    elif totals != []:
        raise PayloadError(f"result.TYPE must be an object, got {type(totals).__name__}")
    if chats:
        for section, chat_map in result.items():
            if section == _IM_TOTALS_KEY or not isinstance(chat_map, dict):
                continue
            samples.extend(_chat_samples(portal, uid, str(section).lower(), chat_map))
    return samples


def _chat_samples(
    portal: str, uid: str, section: str, chat_map: dict[object, object]
) -> list[Sample]:
    samples: list[Sample] = []
    for chat_id, raw in chat_map.items():
        if isinstance(raw, dict):
            # CHANNEL_COMMENT nests comment chats under their parent channel.
            samples.extend(_chat_samples(portal, uid, section, raw))
            continue
        value = to_number(raw)
        if value is not None:
            samples.append(Sample(IM_CHAT_UNREAD, (portal, uid, section, str(chat_id)), value))
    return samples


def parse_profile(result: object) -> Profile:
    """The credential's own user from a `profile` result."""
    if isinstance(result, list) and not result:
        raise NoAccess("profile is [] (the webhook's user is inactive)")
    if not isinstance(result, dict):
        raise PayloadError(f"profile must be an object, got {type(result).__name__}")
    user_id = to_user_id(result.get("ID"))
    if user_id is None:
        raise PayloadError(f"profile.ID must be a positive integer, got {result.get('ID')!r}")
    return Profile(user_id=user_id, admin=result.get("ADMIN") is True, name=_full_name(result))


def parse_users(result: object) -> list[UserRecord]:
    """Users of one `user.get` page; records without a usable ID are skipped."""
    users: list[UserRecord] = []
    for record in _page_rows("user.get", result):
        user_id = to_user_id(record.get("ID"))
        if user_id is not None:
            departments = parse_user_departments(record.get("UF_DEPARTMENT"))
            users.append(UserRecord(user_id, _full_name(record), departments))
    return users


def parse_user_departments(value: object) -> tuple[int, ...]:
    """The department ids of a user's `UF_DEPARTMENT`: ints in the docs, numeric strings
    accepted, duplicates and unusable entries dropped, missing or empty for extranet users.

    >>> parse_user_departments([1, "15", " 15", "x", 0])
    (1, 15)
    >>> parse_user_departments(None), parse_user_departments(False), parse_user_departments(7)
    ((), (), (7,))
    """
    items = value if isinstance(value, list) else [value]
    found: list[int] = []
    for item in items:
        department_id = to_user_id(item)  # the same rule: a positive int or numeric string
        if department_id is not None and department_id not in found:
            found.append(department_id)
    return tuple(found)


def parse_departments(result: object) -> list[DepartmentRecord]:
    """Departments of one `department.get` page; rows without a usable ID are skipped.

    `ID`, `PARENT` and `UF_HEAD` arrive as strings; the root has no `PARENT` and a
    department without a head no `UF_HEAD` (Bitrix24 copies only the fields that are set).

    >>> parse_departments([{"ID": "1", "NAME": "Acme"},
    ...                    {"ID": "15", "NAME": "R&D", "SORT": 500, "PARENT": "1", "UF_HEAD": "7"}])
    ... # doctest: +NORMALIZE_WHITESPACE
    [DepartmentRecord(department_id=1, name='Acme', parent=None, head=None),
     DepartmentRecord(department_id=15, name='R&D', parent=1, head=7)]
    """
    departments: list[DepartmentRecord] = []
    for row in _page_rows("department.get", result):
        department_id = to_user_id(row.get("ID"))
        if department_id is None:
            continue
        name = row.get("NAME")
        parent = to_user_id(row.get("PARENT"))
        departments.append(
            DepartmentRecord(
                department_id,
                name.strip() if isinstance(name, str) else "",
                parent if parent != department_id else None,
                to_user_id(row.get("UF_HEAD")),
            )
        )
    return departments


def _page_rows(method: str, result: object) -> list[dict[str, object]]:
    """The object rows of one list page; PHP's empty array (`{}`, e.g. a portal without
    departments) is an empty page, and rows that are not objects are skipped."""
    if isinstance(result, dict) and not result:
        return []
    if not isinstance(result, list):
        raise PayloadError(f"{method} result must be a list, got {type(result).__name__}")
    return [row for row in result if isinstance(row, dict)]


def _full_name(record: dict[str, object]) -> str:
    parts = [record.get("NAME"), record.get("LAST_NAME")]
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())

"""The fake company of the teams tests: a department tree four levels deep, a user in two
departments, departments without a head, and ids chosen so that any leak is easy to find
(users 900101-900125, departments 11-17)::

    11 Company (head 900101)          900101
      12 Sales (head 900102)          900102
        14 Field Sales (head 900103)  900103-900108, 900125 (also in Support)
          16 Key Accounts (no head)   900109-900113
        15 Inside Sales (head 900114) 900114-900116
      13 Support (no head)            900117-900122, 900125
      17 Tiny (head 900123)           900123-900124
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from typing import Any

from exporter.fakeportal import NEW_COUNTER_CODES, FakeDepartment, FakePortal, FakeUser
from tests.support import register_secret

SECRET = "teamsw3bh00ks3cr3t"
KEY = "pseudonym-key-0123456789"
register_secret(SECRET, KEY)

DEPARTMENTS = [
    FakeDepartment(11, "Company", None, head=900101),
    FakeDepartment(12, "Sales", 11, head=900102),
    FakeDepartment(13, "Support", 11),
    FakeDepartment(14, "Field Sales", 12, head=900103),
    FakeDepartment(15, "Inside Sales", 12, head=900114),
    FakeDepartment(16, "Key Accounts", 14),
    FakeDepartment(17, "Tiny", 11, head=900123),
]
MEMBERS: dict[int, tuple[int, ...]] = {
    900101: (11,),
    900102: (12,),
    **{u: (14,) for u in range(900103, 900109)},
    **{u: (16,) for u in range(900109, 900114)},
    **{u: (15,) for u in range(900114, 900117)},
    **{u: (13,) for u in range(900117, 900123)},
    900123: (17,),
    900124: (17,),
    900125: (14, 13),
}
FIRST_NAMES = ["Quillon", "Zephyra", "Orvandel", "Thessaly", "Brumwick"]
LAST_NAME = "Vexlar"
USER_ID = re.compile(r"(?<![\d.])9001[0-2]\d(?![\d.])")
EXPIRED = NEW_COUNTER_CODES["expired"]
COMMENTS = NEW_COUNTER_CODES["new_comments"]


def overdue(user_id: int) -> int:
    return user_id % 5


def company(*, scopes: tuple[str, ...] = ("department", "im", "task", "user")) -> FakePortal:
    """The company above; user 900101 (admin) owns the webhook."""
    portal = FakePortal(requests_per_second=None)
    for department in DEPARTMENTS:
        portal.add_department(department)
    for index, (user_id, departments) in enumerate(MEMBERS.items()):
        first = FIRST_NAMES[index % len(FIRST_NAMES)]
        portal.add_user(
            FakeUser(user_id, first, LAST_NAME, admin=user_id == 900101, departments=departments)
        )
        portal.set_task_counters(
            user_id,
            "view_all",
            {"expired": (overdue(user_id), EXPIRED), "new_comments": (1, COMMENTS)},
        )
    portal.department_ids_as_strings = True  # the undocumented shape, to be safe
    portal.set_im_counters(
        900101,
        {"TYPE": {"ALL": 4, "NOTIFY": 1, "MESSENGER": 3, "DIALOG": 3}, "DIALOG": {"900102": 3}},
    )
    portal.add_webhook(900101, SECRET, scopes=scopes)
    return portal


def raw_config(url: str, **portal: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "acme",
        "webhook": f"{url}/rest/900101/{SECRET}/",
        "tasks": {"users": "all"},
        "teams": {"enabled": True},
    }
    entry.update(portal)
    return {
        "poll_interval": "1s",
        "request_timeout": "2s",
        "user_refresh_interval": "1s",
        "portals": [entry],
    }


def subtree(department_id: int) -> set[int]:
    found = {department_id}
    for department in DEPARTMENTS:
        if department.parent == department_id:
            found |= subtree(department.id)
    return found


def covered(department_id: int, users: set[int]) -> set[int]:
    """The ground truth: users in the department or below it."""
    below = subtree(department_id)
    return {u for u in users if below.intersection(MEMBERS[u])}


def hashed(user_id: int) -> str:
    """The documented pseudonym of a user of portal acme."""
    return hmac.new(KEY.encode(), f"acme:{user_id}".encode(), hashlib.sha256).hexdigest()[:16]


def leaks(text: str) -> Iterator[str]:
    """User ids and names in `text`."""
    for match in USER_ID.finditer(text):
        yield f"user id {match.group()} in ...{text[max(0, match.start() - 60) : match.end()]}"
    for name in (*FIRST_NAMES, LAST_NAME):
        if name in text:
            at = text.index(name)
            yield f"name {name} in ...{text[max(0, at - 60) : at + 20]}"

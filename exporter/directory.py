"""Who the exporter watches on one portal: the credential's user, the users, their names.

The credential's own user comes from `profile` (once, and again after the credential was
refused). `tasks.users: all` lists every active employee with `user.get`, on its own
schedule (`user_refresh_interval`), the first page telling the total and the rest going
in `batch` requests; an explicit id list only learns the names on that schedule. Names
feed `bitrix24_user_info`. A reload hands the directory to the next poller of the same
credential, so nothing is learned twice.

With teams (or `tasks.users: {departments: [...]}`) the directory also knows the company
structure: the departments (`department.get`, paged like `user.get`, on the same schedule)
and the departments each user is directly in (`UF_DEPARTMENT`, which `user.get` carries
anyway). A credential without the `department` scope is found out through `scope` before
`department.get` is called, said once, and only the department series are missing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

from exporter.bitrix import MAX_BATCH, BitrixClient, BitrixError, Command
from exporter.config import DepartmentUsers, TasksSettings, WebhookAuth
from exporter.failures import FetchError
from exporter.mapping import Profile, UserRecord, parse_profile, parse_users
from exporter.oncelog import OnceLog
from exporter.sources.departments import SCOPE, DepartmentsSource
from exporter.teams import OrgChart, members_of

log = logging.getLogger(__name__)

USERS_FILTER = {"ACTIVE": True, "USER_TYPE": "employee"}

_Record = TypeVar("_Record")


class UserDirectory:
    """The users of one portal that the exporter has learned about, and when."""

    def __init__(self, portal: str) -> None:
        self.portal = portal
        self.profile: Profile | None = None
        # The users behind extra per-user webhooks (im.webhooks), learned on first use.
        self.callers: dict[WebhookAuth, Profile] = {}
        self.names: dict[int, str] = {}
        self.discovered: list[int] | None = None
        self.discovered_at = -math.inf
        # The company structure (teams): None until department.get first answered.
        self.chart: OrgChart | None = None
        self.memberships: dict[int, tuple[int, ...]] = {}
        self.departments_at = -math.inf
        self.department_scope: bool | None = None  # None: not known yet
        # How log lines name a user (exporter.privacy.Privacy.who); None: name nobody.
        self.who: Callable[[int], str | None] = lambda user_id: f"user {user_id}"

    async def learn_profile(self, client: BitrixClient, tasks: TasksSettings) -> Profile:
        """The credential's own user (asked once; raises FetchError)."""
        if self.profile is not None:
            return self.profile
        profile = parse_profile((await client.call("profile")).result)
        self.profile = profile
        if profile.name:
            self.names[profile.user_id] = profile.name
        who = self.who(profile.user_id) or "a user"
        log.info("portal %s: credential belongs to %s (admin: %s)", self.portal, who, profile.admin)
        if not profile.admin and tasks.users != "self":
            log.warning(
                "portal %s: %s is not a portal administrator: Bitrix24 answers [] for"
                " the task counters of users it does not head; use an administrator's webhook",
                self.portal,
                who,
            )
        return profile

    def forget_profile(self) -> None:
        """The credential was refused: learn its user again once it works."""
        self.profile = None

    def learn_caller(self, auth: WebhookAuth, answer: object) -> Profile | FetchError:
        """The user behind an extra webhook from its `profile` answer, or why not."""
        if isinstance(answer, FetchError):
            return answer
        try:
            profile = parse_profile(answer)
        except FetchError as failure:
            return failure
        self.callers[auth] = profile
        if profile.name:
            self.names.setdefault(profile.user_id, profile.name)
        return profile

    def keep_callers(self, auths: set[WebhookAuth]) -> None:
        self.callers = {a: p for a, p in self.callers.items() if a in auths}

    async def task_users(
        self,
        client: BitrixClient,
        tasks: TasksSettings,
        refresh: float,
        once: OnceLog,
        *,
        teams: bool = False,
    ) -> list[int]:
        """The users whose task counters a cycle fetches; with `teams`, also keep the
        departments and the users' memberships up to date."""
        assert self.profile is not None
        wanted = teams or (tasks.enabled and isinstance(tasks.users, DepartmentUsers))
        if wanted and time.monotonic() - self.departments_at >= refresh:
            await self.learn_departments(client, once)
        if not tasks.enabled:
            if teams:  # departments of the credentials' own users, for the im sums
                await self._learn_names(client, self._own_users(), refresh)
            return []
        due = time.monotonic() - self.discovered_at >= refresh
        if tasks.users == "all" or isinstance(tasks.users, DepartmentUsers):
            if self.discovered is None or due:
                await self.discover(client, once)
            ids = list(self.discovered or [])
            if isinstance(tasks.users, DepartmentUsers):
                if self.chart is None:
                    once.say(
                        "by-department",
                        f"portal {self.portal}: tasks.users: without department.get only the"
                        " users directly in the listed departments are watched, not those of"
                        " their sub-departments",
                    )
                else:
                    once.resolve("by-department")
                known = {u: self.memberships.get(u, ()) for u in ids}
                ids = members_of(self.chart, known, tasks.users.departments)
        else:
            ids = list(tasks.users) if isinstance(tasks.users, tuple) else [self.profile.user_id]
            if teams:
                await self._learn_names(client, sorted({*ids, *self._own_users()}), refresh)
            elif tasks.users != "self":
                await self._learn_names(client, ids, refresh)
        return [i for i in ids if i not in tasks.exclude_users]

    def _own_users(self) -> list[int]:
        """The credentials' own users (the main one and the extra im webhooks')."""
        own = [p.user_id for p in self.callers.values()]
        if self.profile is not None:
            own.append(self.profile.user_id)
        return own

    async def learn_departments(self, client: BitrixClient, once: OnceLog) -> None:
        """The portal's departments, if the credential has the `department` scope."""
        source = DepartmentsSource()
        self.departments_at = time.monotonic()
        if not self.department_scope:
            # Asked first, so that a missing scope never counts as a refused call (the
            # credential works; the auth alerts must not fire for it).
            try:
                granted = (await client.call("scope")).result
            except FetchError:
                granted = None  # a portal without `scope`: let department.get tell
            if isinstance(granted, list):
                self.department_scope = SCOPE in granted
        try:
            if self.department_scope is False:
                raise BitrixError(self.portal, source.method, "insufficient_scope")
            records = await _all_pages(client, source.first(), source.page, source.records)
        except FetchError as exc:
            if exc.error in ("insufficient_scope", "ERROR_METHOD_NOT_FOUND"):
                self.department_scope = False
                once.say(
                    "departments",
                    f"portal {self.portal}: {source.method} needs the `{SCOPE}` scope, which"
                    " this credential lacks: no department series until it is granted (the"
                    " counters keep flowing)",
                    signature="scope",
                )
            else:
                once.say(
                    "departments",
                    f"portal {self.portal}: {source.method} failed, keeping the last"
                    f" departments: {exc}",
                )
            return
        once.resolve("departments", f"portal {self.portal}: {source.method} works again")
        self.department_scope = True
        self.chart = OrgChart.of(records)

    async def discover(self, client: BitrixClient, once: OnceLog) -> None:
        """Every active employee: the first page tells the total, the rest go in batches."""

        def page(start: int) -> Command:
            return Command(f"users_{start}", "user.get", {"FILTER": USERS_FILTER, "start": start})

        try:
            records = await _all_pages(client, page(0), page, parse_users)
        except FetchError as exc:
            if self.discovered is None:
                raise
            once.say(
                "discovery", f"portal {self.portal}: user.get failed, keeping the last list: {exc}"
            )
            return
        once.resolve("discovery", f"portal {self.portal}: user.get works again")
        self.discovered = sorted({r.user_id for r in records})
        self.discovered_at = time.monotonic()
        self._learn(records, every=True)
        log.info("portal %s: %d active users found", self.portal, len(self.discovered))

    async def _learn_names(self, client: BitrixClient, ids: list[int], refresh: float) -> None:
        """Names and departments of `ids`, on the user list's schedule."""
        if time.monotonic() - self.discovered_at < refresh:
            return
        commands = [Command(f"user_{i}", "user.get", {"ID": i}) for i in ids]
        outcome = await client.batch(commands)
        for command in commands:
            result = outcome.get(command.key)
            if isinstance(result, BitrixError):
                continue
            try:
                self._learn(parse_users(result))
            except FetchError:
                continue
        self.discovered_at = time.monotonic()

    def _learn(self, records: list[UserRecord], *, every: bool = False) -> None:
        """Keep the names and departments of `records` (`every`: of all users, so forget
        the departments of anyone else)."""
        self.names.update({r.user_id: r.name for r in records if r.name})
        found = {r.user_id: r.departments for r in records}
        self.memberships = found if every else self.memberships | found


async def _all_pages(
    client: BitrixClient,
    first: Command,
    page: Callable[[int], Command],
    parse: Callable[[object], list[_Record]],
) -> list[_Record]:
    """Every page of a list method: the first tells the total, the rest go in batches."""
    answer = await client.call(first.method, first.params)
    records = parse(answer.result)
    pages = [page(start) for start in range(MAX_BATCH, answer.total or 0, MAX_BATCH)]
    outcome = await client.batch(pages)
    for command in pages:
        result = outcome.get(command.key)
        if isinstance(result, BitrixError):
            raise result
        records.extend(parse(result))
    return records

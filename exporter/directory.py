"""Who the exporter watches on one portal: the credential's user, the users, their names.

The credential's own user comes from `profile` (once, and again after the credential was
refused). `tasks.users: all` lists every active employee with `user.get`, on its own
schedule (`user_refresh_interval`), the first page telling the total and the rest going
in `batch` requests; an explicit id list only learns the names on that schedule. Names
feed `bitrix24_user_info`. A reload hands the directory to the next poller of the same
credential, so nothing is learned twice.
"""

from __future__ import annotations

import logging
import math
import time

from exporter.bitrix import MAX_BATCH, BitrixClient, BitrixError, Command
from exporter.config import TasksSettings, WebhookAuth
from exporter.failures import FetchError
from exporter.mapping import Profile, parse_profile, parse_users
from exporter.oncelog import OnceLog

log = logging.getLogger(__name__)

USERS_FILTER = {"ACTIVE": True, "USER_TYPE": "employee"}


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

    async def learn_profile(self, client: BitrixClient, tasks: TasksSettings) -> Profile:
        """The credential's own user (asked once; raises FetchError)."""
        if self.profile is not None:
            return self.profile
        profile = parse_profile((await client.call("profile")).result)
        self.profile = profile
        if profile.name:
            self.names[profile.user_id] = profile.name
        log.info(
            "portal %s: credential belongs to user %d (admin: %s)",
            self.portal,
            profile.user_id,
            profile.admin,
        )
        if not profile.admin and tasks.users != "self":
            log.warning(
                "portal %s: user %d is not a portal administrator: Bitrix24 answers [] for"
                " the task counters of users it does not head; use an administrator's webhook",
                self.portal,
                profile.user_id,
            )
        return profile

    def forget_profile(self) -> None:
        """The credential was refused: learn its user again once it works."""
        self.profile = None

    def learn_caller(self, auth: WebhookAuth, result: object) -> Profile:
        """The user behind an extra webhook, from its `profile` result; raises FetchError."""
        profile = parse_profile(result)
        self.callers[auth] = profile
        if profile.name:
            self.names.setdefault(profile.user_id, profile.name)
        return profile

    def keep_callers(self, auths: set[WebhookAuth]) -> None:
        self.callers = {a: p for a, p in self.callers.items() if a in auths}

    async def task_users(
        self, client: BitrixClient, tasks: TasksSettings, refresh: float, once: OnceLog
    ) -> list[int]:
        """The users whose task counters a cycle fetches."""
        if not tasks.enabled:
            return []
        assert self.profile is not None
        due = time.monotonic() - self.discovered_at >= refresh
        if tasks.users == "self":
            ids = [self.profile.user_id]
        elif tasks.users == "all":
            if self.discovered is None or due:
                await self.discover(client, once)
            ids = list(self.discovered or [])
        elif isinstance(tasks.users, tuple):
            ids = list(tasks.users)
            if due:
                await self._learn_names(client, ids)
        return [i for i in ids if i not in tasks.exclude_users]

    async def discover(self, client: BitrixClient, once: OnceLog) -> None:
        """Every active employee: the first page tells the total, the rest go in batches."""
        try:
            first = await client.call("user.get", {"FILTER": USERS_FILTER, "start": 0})
            records = parse_users(first.result)
            total = first.total or 0
            pages = [
                Command(f"users_{start}", "user.get", {"FILTER": USERS_FILTER, "start": start})
                for start in range(MAX_BATCH, total, MAX_BATCH)
            ]
            outcome = await client.batch(pages)
            for command in pages:
                page = outcome.get(command.key)
                if isinstance(page, BitrixError):
                    raise page
                records.extend(parse_users(page))
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
        self.names.update({r.user_id: r.name for r in records if r.name})
        log.info("portal %s: %d active users found", self.portal, len(self.discovered))

    async def _learn_names(self, client: BitrixClient, ids: list[int]) -> None:
        commands = [Command(f"user_{i}", "user.get", {"ID": i}) for i in ids]
        outcome = await client.batch(commands)
        for command in commands:
            result = outcome.get(command.key)
            if isinstance(result, BitrixError):
                continue
            try:
                records = parse_users(result)
            except FetchError:
                continue
            self.names.update({r.user_id: r.name for r in records if r.name})
        self.discovered_at = time.monotonic()

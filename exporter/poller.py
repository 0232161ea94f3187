"""The background loop: one poll cycle per portal per poll interval.

Each cycle learns who the credential is (`profile`, once), refreshes the user list on its
own schedule, then fetches every (user, group, role) task counter and the chat counters in
as few `batch` requests as the limits allow. It ends by handing an immutable
`PortalSnapshot` to the publisher. A failing fetch keeps its last good samples for
`stale_after`; `collect_success` and `last_success_timestamp_seconds` keep telling the truth.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from exporter.bitrix import (
    MAX_BATCH,
    BitrixClient,
    BitrixError,
    ClientStats,
    Command,
    Credential,
    OperatingBudget,
    PortalThrottle,
    WebhookCredential,
)
from exporter.config import Config, OAuthAuth, Portal, WebhookAuth
from exporter.mapping import (
    NoAccess,
    PayloadError,
    Profile,
    Sample,
    im_counter_samples,
    parse_profile,
    parse_users,
    task_counter_samples,
)
from exporter.oauth import OAuthCredential

log = logging.getLogger(__name__)

TASKS_METHOD = "tasks.task.counters.get"
IM_METHOD = "im.counters.get"
USERS_FILTER = {"ACTIVE": True, "USER_TYPE": "employee"}
# Results are mapped this many commands at a time between visits to the event loop, so that
# a cycle of a big portal never holds up a scrape for long (~5 ms per 250 here).
MAP_SLICE = 250


@dataclass(frozen=True, slots=True)
class Status:
    """Whether one user's counters from one source were fetched in the last cycle."""

    user_id: int
    source: str  # "im" or "tasks"
    success: bool
    last_success: float | None  # unix time


@dataclass(frozen=True)
class PortalSnapshot:
    """What one portal's last cycle produced; never changed after it is published."""

    name: str
    up: bool
    samples: tuple[Sample, ...]
    statuses: tuple[Status, ...]
    user_names: tuple[tuple[int, str], ...]
    stats: ClientStats
    operating_limit: float
    duration: float | None
    behind: float
    cycles: int
    error: str | None = None


@dataclass
class _Fetch:
    """Last good result of one command (a user's counters for one group and role)."""

    samples: tuple[Sample, ...] = ()
    last_success: float | None = None


@dataclass
class _Plan:
    """The commands of one cycle and which user and source each belongs to."""

    commands: list[Command] = field(default_factory=list)
    owner: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (user_id, source)


def credential_for(auth: WebhookAuth | OAuthAuth, portal: str) -> Credential:
    if isinstance(auth, WebhookAuth):
        return WebhookCredential(url=auth.url, secret=auth.secret)
    return OAuthCredential(portal, auth)


def copy_stats(stats: ClientStats) -> ClientStats:
    return ClientStats(
        requests=stats.requests.copy(),
        errors=stats.errors.copy(),
        duration_buckets=list(stats.duration_buckets),
        duration_sum=stats.duration_sum,
        duration_count=stats.duration_count,
        rate_limit_wait=stats.rate_limit_wait,
        operating=dict(stats.operating),
    )


class PortalPoller:
    """Polls one portal forever (until stopped), publishing a snapshot after each cycle."""

    def __init__(
        self,
        portal: Portal,
        config: Config,
        session: aiohttp.ClientSession,
        publish: Callable[[PortalSnapshot], None],
        *,
        clock: Callable[[], float] = time.time,
        retry_base: float = 0.5,
        previous: PortalPoller | None = None,
    ) -> None:
        """`previous` is the poller this one replaces after a config reload: what still
        applies (counters, the rate-limit bucket, operating budgets, credentials with their
        tokens, last samples and the schedule) carries over, so a reload causes no burst."""
        self.portal = portal
        self.config = config
        self._publish = publish
        self._clock = clock
        self.stats: ClientStats = previous.stats if previous else ClientStats()
        self.throttle: PortalThrottle
        if previous and previous.portal.rate_limit == portal.rate_limit:
            self.throttle = previous.throttle
        else:
            self.throttle = PortalThrottle(
                portal.rate_limit.requests_per_second, portal.rate_limit.burst, self.stats
            )
        same_budget = previous and (
            (previous.portal.operating_limit, previous.portal.operating_window)
            == (portal.operating_limit, portal.operating_window)
        )
        old_budgets = previous.budgets if previous and same_budget else {}
        old_credentials = previous.credentials if previous else {}
        self.budgets: dict[WebhookAuth | OAuthAuth, OperatingBudget] = {}
        self.credentials: dict[WebhookAuth | OAuthAuth, Credential] = {}

        def client(auth: WebhookAuth | OAuthAuth) -> BitrixClient:
            budget = old_budgets.get(auth) or OperatingBudget(
                portal.operating_limit, window=portal.operating_window
            )
            credential = old_credentials.get(auth) or credential_for(auth, portal.name)
            self.budgets[auth] = budget
            self.credentials[auth] = credential
            return BitrixClient(
                portal.name,
                credential,
                session,
                throttle=self.throttle,
                budget=budget,
                stats=self.stats,
                timeout=config.request_timeout,
                retry_base=retry_base,
            )

        self.main = client(portal.auth)
        self.im_clients = {w: client(w) for w in portal.im.webhooks}
        self.next_start: float | None = previous.next_start if previous else None
        self.profile: Profile | None = None
        self.im_profiles: dict[WebhookAuth, Profile] = {}
        self.user_names: dict[int, str] = {}
        self.discovered: list[int] | None = None
        self.discovered_at = -math.inf
        self.fetches: dict[str, _Fetch] = {}
        self.user_success: dict[tuple[int, str], float] = {}
        self.watched: set[tuple[int, str]] = set()
        self.stopping = False
        self.cycles = 0
        self.first_cycle_done = asyncio.Event()
        self._said: dict[str, str] = {}
        self._load_checked = False
        self._planned: tuple[tuple[tuple[int, ...], int | None], _Plan] | None = None
        if previous is not None and previous.portal.auth == portal.auth:
            self._carry(previous)

    def _carry(self, previous: PortalPoller) -> None:
        """Keep what the same credential already learned and fetched."""
        self.profile = previous.profile
        self.im_profiles = {a: p for a, p in previous.im_profiles.items() if a in self.im_clients}
        self.user_names = previous.user_names
        self.discovered = previous.discovered
        self.discovered_at = previous.discovered_at
        self.fetches = previous.fetches
        self.user_success = previous.user_success
        self.watched = previous.watched
        self.cycles = previous.cycles
        self._said = previous._said
        if previous.first_cycle_done.is_set():
            self.first_cycle_done.set()

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        scheduled = loop.time() if self.next_start is None else self.next_start
        if (delay := scheduled - loop.time()) > 0:
            await asyncio.sleep(delay)  # a reloaded portal keeps its schedule
        while not self.stopping:
            started = loop.time()
            behind = max(0.0, started - scheduled)
            snapshot = await self.cycle(behind=behind)
            self._publish(snapshot)
            self.first_cycle_done.set()
            scheduled = max(scheduled + interval, started)
            self.next_start = scheduled
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def cycle(self, *, behind: float = 0.0) -> PortalSnapshot:
        """Run one poll cycle; never raises for anything Bitrix24 does."""
        started = time.monotonic()
        up, error, code = False, None, ""
        fresh: dict[tuple[int, str], bool] = {}
        try:
            up, failure, fresh = await self._collect()
            if failure is not None:
                error, code = str(failure), failure.error
        except (BitrixError, PayloadError, NoAccess) as exc:
            error = str(exc)
            code = exc.error if isinstance(exc, BitrixError) else type(exc).__name__
        except Exception as exc:  # a bug must not kill the loop; say it loudly instead
            log.exception("portal %s: poll cycle failed", self.portal.name)
            error = f"internal error: {type(exc).__name__}"
        if not fresh:
            # The cycle ended before any counter came back: every watched user failed.
            now = self._clock()
            for fetch in self.fetches.values():
                self._expire(fetch, now)
            fresh = dict.fromkeys(self.watched, False)
        self.watched = set(fresh)
        if error:
            # Once per kind of failure: the method in the text changes from cycle to cycle.
            self._say("portal", error, logging.ERROR, signature=code)
        else:
            self._resolve("portal", f"portal {self.portal.name}: poll succeeded again")
        self.cycles += 1
        await asyncio.sleep(0)  # a scrape may go between the mapping and the snapshot
        return self._snapshot(up, error, fresh, time.monotonic() - started, behind)

    # -- one cycle --------------------------------------------------------------

    async def _collect(self) -> tuple[bool, BitrixError | None, dict[tuple[int, str], bool]]:
        if self.profile is None:
            self.profile = parse_profile((await self.main.call("profile")).result)
            if self.profile.name:
                self.user_names[self.profile.user_id] = self.profile.name
            log.info(
                "portal %s: credential belongs to user %d (admin: %s)",
                self.portal.name,
                self.profile.user_id,
                self.profile.admin,
            )
            if not self.profile.admin and self.portal.tasks.users != "self":
                log.warning(
                    "portal %s: user %d is not a portal administrator: Bitrix24 answers [] for"
                    " the task counters of users it does not head; use an administrator's webhook",
                    self.portal.name,
                    self.profile.user_id,
                )
        users = await self._task_users()
        plan = self._plan(users)
        self._check_load(len(plan.commands))
        if calls := sum(1 for c in plan.commands if c.method == TASKS_METHOD):
            # Said once, as soon as the first answers tell what a call costs.
            self.main.budget.expect(
                TASKS_METHOD,
                calls=calls,
                every=self.config.poll_interval,
                warn=lambda text: log.warning("portal %s: %s", self.portal.name, text),
            )
        outcome = await self.main.batch(plan.commands) if plan.commands else {}
        now = self._clock()
        reached = not plan.commands
        auth_error: BitrixError | None = None
        request_errors: list[BitrixError] = []
        fresh: dict[tuple[int, str], bool] = {}
        for index, command in enumerate(plan.commands):
            if index % MAP_SLICE == MAP_SLICE - 1:
                await asyncio.sleep(0)
            user_id, source = plan.owner[command.key]
            result = outcome.get(command.key)
            ok = self._take(command, user_id, result, now)
            if isinstance(result, BitrixError):
                if result.is_auth and auth_error is None:
                    auth_error = result
                if result.whole_batch:
                    request_errors.append(result)
                if result.status is not None and result.status < 500 and not result.is_auth:
                    reached = True
            else:
                reached = True
            fresh[user_id, source] = fresh.get((user_id, source), True) and ok
        for auth, im_client in self.im_clients.items():
            im_user, im_ok = await self._collect_im_webhook(auth, im_client, now)
            if im_user is not None:
                fresh[im_user, "im"] = im_ok
        self._forget(plan)
        for key, ok in fresh.items():
            if ok:
                self.user_success[key] = now
        if auth_error is not None:
            self.profile = None  # learn it again once the credential works
            return False, auth_error, fresh
        if not reached:
            first = next((r for r in outcome.values() if isinstance(r, BitrixError)), None)
            return False, first or BitrixError(self.portal.name, "batch", "no response"), fresh
        if request_errors:
            self._say(
                "requests",
                f"{request_errors[0]} ({len(request_errors)} of {len(plan.commands)} commands"
                " lost; they keep their last values until stale_after)",
                signature=request_errors[0].error,
            )
        else:
            self._resolve("requests", f"portal {self.portal.name}: batch requests succeed again")
        return True, None, fresh

    async def _task_users(self) -> list[int]:
        tasks = self.portal.tasks
        if not tasks.enabled:
            return []
        assert self.profile is not None
        if tasks.users == "self":
            ids = [self.profile.user_id]
        elif tasks.users == "all":
            if self.discovered is None or (
                time.monotonic() - self.discovered_at >= self.config.user_refresh_interval
            ):
                await self._discover_users()
            ids = list(self.discovered or [])
        elif isinstance(tasks.users, tuple):
            ids = list(tasks.users)
            if time.monotonic() - self.discovered_at >= self.config.user_refresh_interval:
                await self._learn_names(ids)
        return [i for i in ids if i not in tasks.exclude_users]

    async def _discover_users(self) -> None:
        """Every active employee: the first page tells the total, the rest go in batches."""
        try:
            first = await self.main.call("user.get", {"FILTER": USERS_FILTER, "start": 0})
            records = parse_users(first.result)
            total = first.total or 0
            pages = [
                Command(f"users_{start}", "user.get", {"FILTER": USERS_FILTER, "start": start})
                for start in range(MAX_BATCH, total, MAX_BATCH)
            ]
            outcome = await self.main.batch(pages)
            for command in pages:
                page = outcome.get(command.key)
                if isinstance(page, BitrixError):
                    raise page
                records.extend(parse_users(page))
        except (BitrixError, PayloadError) as exc:
            if self.discovered is None:
                raise
            self._say(
                "discovery",
                f"portal {self.portal.name}: user.get failed, keeping the last list: {exc}",
            )
            return
        self._resolve("discovery", f"portal {self.portal.name}: user.get works again")
        self.discovered = sorted({r.user_id for r in records})
        self.discovered_at = time.monotonic()
        self.user_names.update({r.user_id: r.name for r in records if r.name})
        log.info("portal %s: %d active users found", self.portal.name, len(self.discovered))

    async def _learn_names(self, ids: list[int]) -> None:
        commands = [Command(f"user_{i}", "user.get", {"ID": i}) for i in ids]
        outcome = await self.main.batch(commands)
        for command in commands:
            result = outcome.get(command.key)
            if isinstance(result, BitrixError):
                continue
            try:
                records = parse_users(result)
            except PayloadError:
                continue
            self.user_names.update({r.user_id: r.name for r in records if r.name})
        self.discovered_at = time.monotonic()

    def _plan(self, users: list[int]) -> _Plan:
        # The same users give the same plan; building it anew every cycle blocked the event
        # loop for ~0.1 s per 25,000 commands. Nothing changes a plan once it is built.
        inputs = (tuple(users), self.profile.user_id if self.profile is not None else None)
        if self._planned is not None and self._planned[0] == inputs:
            return self._planned[1]
        plan = _Plan()
        tasks = self.portal.tasks
        for user_id in users:
            for group_id in tasks.groups:
                for role in tasks.roles:
                    key = f"t{user_id}_g{group_id}_{role}"
                    params = {"userId": user_id, "groupId": group_id, "type": role}
                    plan.commands.append(Command(key, TASKS_METHOD, params))
                    plan.owner[key] = (user_id, "tasks")
        if self.portal.im.enabled and self.profile is not None:
            # Last, so that it fills the last partial batch instead of splitting the tasks.
            plan.commands.append(Command("im_self", IM_METHOD))
            plan.owner["im_self"] = (self.profile.user_id, "im")
        self._planned = (inputs, plan)
        return plan

    def _take(self, command: Command, user_id: int, result: object, now: float) -> bool:
        """Map one command's result into its stored fetch; False if it failed."""
        fetch = self.fetches.setdefault(command.key, _Fetch())
        name = self.portal.name
        try:
            if isinstance(result, BitrixError):
                raise result
            if command.method == TASKS_METHOD:
                params = command.params
                samples = task_counter_samples(
                    name, user_id, int(params["groupId"]), str(params["type"]), result
                )
            else:
                samples = im_counter_samples(name, user_id, result, chats=self.portal.im.chats)
        except (BitrixError, PayloadError, NoAccess) as exc:
            self._expire(fetch, now)
            if isinstance(exc, BitrixError) and exc.whole_batch:
                return False  # the whole request failed: said once for the portal, not per user
            if isinstance(exc, BitrixError) and exc.error == "OPERATION_TIME_LIMIT":
                # The portal blocked the method for the credential, not for this user: one
                # line per method, not one per command (thousands on a big portal).
                self._say(
                    f"operating-{command.method}",
                    f"portal {name}: {command.method}: {exc.error}: {exc.description}"
                    " (held back until the portal's operating window resets)",
                    signature=exc.error,
                )
                return False
            reason = exc.description if isinstance(exc, BitrixError) else str(exc)
            code = exc.error if isinstance(exc, BitrixError) else type(exc).__name__
            self._say(
                command.key,
                f"portal {name}: {command.method} for user {user_id}"
                f" ({self._describe(command)}): {code}: {reason}",
            )
            return False
        self._resolve(
            command.key, f"portal {name}: {command.method} for user {user_id} works again"
        )
        self._resolve(f"operating-{command.method}", f"portal {name}: {command.method} runs again")
        renewed = tuple(samples)
        # Unchanged values keep the objects of the last cycle: renewing all ~100,000 samples
        # of a big portal each cycle set off full garbage collections (~0.1 s each, which
        # scrapes wait out) several times a cycle.
        if renewed != fetch.samples:
            fetch.samples = renewed
        fetch.last_success = now
        return True

    async def _collect_im_webhook(
        self, auth: WebhookAuth, client: BitrixClient, now: float
    ) -> tuple[int | None, bool]:
        """im.counters.get through another user's own webhook (it reads only its caller)."""
        profile = self.im_profiles.get(auth)
        commands = [Command("im", IM_METHOD)]
        if profile is None:
            commands.insert(0, Command("profile", "profile"))
        outcome = await client.batch(commands)
        if profile is None:
            result = outcome.get("profile")
            try:
                if isinstance(result, BitrixError):
                    raise result
                profile = parse_profile(result)
            except (BitrixError, PayloadError, NoAccess) as exc:
                self._say(
                    f"im-webhook-{auth.redacted}", f"portal {self.portal.name}: im webhook: {exc}"
                )
                return None, False
            self.im_profiles[auth] = profile
            if profile.name:
                self.user_names.setdefault(profile.user_id, profile.name)
        command = Command(f"im_{profile.user_id}", IM_METHOD)
        return profile.user_id, self._take(command, profile.user_id, outcome.get("im"), now)

    def _expire(self, fetch: _Fetch, now: float) -> None:
        if fetch.last_success is None or now - fetch.last_success > self.config.stale_after:
            fetch.samples = ()

    def _forget(self, plan: _Plan) -> None:
        """Drop what belongs to users that left the config or the discovered list."""
        keep = set(plan.owner) | {f"im_{p.user_id}" for p in self.im_profiles.values()}
        for key in [k for k in self.fetches if k not in keep]:
            del self.fetches[key]
        owners = set(plan.owner.values()) | {(p.user_id, "im") for p in self.im_profiles.values()}
        for owner in [k for k in self.user_success if k not in owners]:
            del self.user_success[owner]

    # -- snapshot ---------------------------------------------------------------

    def _snapshot(
        self,
        up: bool,
        error: str | None,
        fresh: dict[tuple[int, str], bool],
        duration: float,
        behind: float,
    ) -> PortalSnapshot:
        samples = tuple(s for fetch in self.fetches.values() for s in fetch.samples)
        statuses = tuple(
            Status(user_id, source, ok and up, self.user_success.get((user_id, source)))
            for (user_id, source), ok in sorted(fresh.items())
        )
        watched = {s.user_id for s in statuses}
        names = tuple(sorted((u, n) for u, n in self.user_names.items() if u in watched))
        return PortalSnapshot(
            name=self.portal.name,
            up=up,
            samples=samples,
            statuses=statuses,
            user_names=names,
            stats=copy_stats(self.stats),
            operating_limit=self.portal.operating_limit,
            duration=duration,
            behind=behind,
            cycles=self.cycles,
            error=error,
        )

    # -- saying things once -----------------------------------------------------

    def _say(
        self, key: str, message: str, level: int = logging.WARNING, *, signature: str | None = None
    ) -> None:
        """Log a problem when it starts or changes (`signature`, else the text), not every cycle."""
        mark = message if signature is None else signature
        if self._said.get(key) != mark:
            self._said[key] = mark
            log.log(level, "%s", message)

    def _resolve(self, key: str, message: str) -> None:
        if self._said.pop(key, None) is not None:
            log.info("%s", message)

    def _describe(self, command: Command) -> str:
        params = command.params
        if command.method == TASKS_METHOD:
            return f"group {params['groupId']}, role {params['type']}"
        return "own counters"

    def _check_load(self, commands: int) -> None:
        """Say once if the configured load cannot fit the poll interval under the rate limit."""
        if self._load_checked or not commands:
            return
        self._load_checked = True
        requests = math.ceil(commands / MAX_BATCH) + len(self.im_clients)
        rate = self.portal.rate_limit.requests_per_second
        seconds = requests / rate
        if seconds > self.config.poll_interval:
            log.warning(
                "portal %s: one cycle needs %d requests (%d commands), %.3gs at %.3g requests/s,"
                " longer than poll_interval %.3gs: cycles will run back to back",
                self.portal.name,
                requests,
                commands,
                seconds,
                rate,
                self.config.poll_interval,
            )

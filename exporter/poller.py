"""The background loop: one poll cycle per portal per poll interval.

Each cycle learns who the credential is (once), asks the user directory whom to watch,
lets every source of the portal plan its commands, sends them in as few `batch` requests
as the limits allow, and maps each result through the source that asked for it into the
fetch store. It ends by handing an immutable `PortalSnapshot` to the publisher. A failing
fetch keeps its last good samples for `stale_after` (see `FetchStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exporter.bitrix import DEFAULT_RETRY, BitrixClient, BitrixError, Command, RetryPolicy
from exporter.capacity import CapacityCheck
from exporter.clients import PortalClients
from exporter.config import Config, Portal, WebhookAuth
from exporter.directory import UserDirectory
from exporter.failures import Code, FetchError, PayloadError
from exporter.fetchlog import FetchLog
from exporter.fetchstore import FetchStore, Owner
from exporter.oncelog import OnceLog
from exporter.privacy import Privacy
from exporter.snapshot import PortalSnapshot, copy_stats, health_of
from exporter.sources import Planned, Planner, Source, sources_for
from exporter.teams import DepartmentSums, TeamView

log = logging.getLogger(__name__)

# Results are mapped this many commands at a time between visits to the event loop, so that
# a cycle of a big portal never holds up a scrape for long (~5 ms per 250 here).
MAP_SLICE = 250
# Commands sent per window (see PortalPoller._answers): 20 batches of 50.
WINDOW = 1000


@dataclass
class Handover:
    """What a poller hands to the one that replaces it after a config reload: the clients
    (which keep what still applies to the new settings), and with the same main
    credential what was learned and fetched; the once-log always, so that a reload
    repeats no log line."""

    clients: PortalClients
    directory: UserDirectory
    store: FetchStore
    once: OnceLog
    next_start: float | None
    cycles: int


@dataclass
class _CycleResult:
    """How a cycle went: whether the portal answered, and each (user, source)'s outcome."""

    up: bool
    failure: FetchError | None = None
    fresh: dict[Owner, bool] = field(default_factory=dict)


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
        retry: RetryPolicy = DEFAULT_RETRY,
        handover: Handover | None = None,
    ) -> None:
        self.portal = portal
        self.config = config
        self._publish = publish
        self._clock = clock
        self.sources: tuple[Source, ...] = sources_for(portal)
        self.planner = Planner(self.sources)
        old = handover
        self.clients = PortalClients(
            portal,
            session,
            timeout=config.request_timeout,
            retry=retry,
            previous=old.clients if old else None,
        )
        self.main = self.clients.main
        self.stats = self.clients.stats
        # What was learned and fetched belongs to the main credential's user.
        same_auth = old is not None and old.clients.portal.auth == portal.auth
        self.directory = old.directory if old and same_auth else UserDirectory(portal.name)
        self.directory.keep_callers(set(self.clients.callers))
        # Everything that leaves the process (snapshots, log lines) passes the privacy mode.
        self.privacy = Privacy.of(portal)
        self.directory.who = self.privacy.who
        self.department_sums = DepartmentSums(TeamView.of(portal, self.privacy.min_team_size))
        self.store = old.store if old and same_auth else FetchStore()
        self.cycles = old.cycles if old and same_auth else 0
        self.once = old.once if old else OnceLog(log)
        self.fetch_log = FetchLog(portal.name, self.once, self.privacy.who)
        self.capacity = CapacityCheck(portal, config, self.once)
        self.next_start: float | None = old.next_start if old else None
        self._stop = asyncio.Event()

    def handover(self) -> Handover:
        return Handover(
            self.clients, self.directory, self.store, self.once, self.next_start, self.cycles
        )

    # -- the loop ---------------------------------------------------------------

    def stop(self) -> None:
        """End the loop: at once when it sleeps, after the cycle when one runs."""
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        scheduled = loop.time() if self.next_start is None else self.next_start
        await self._sleep(scheduled - loop.time())  # a reloaded portal keeps its schedule
        while not self._stop.is_set():
            started = loop.time()
            behind = max(0.0, started - scheduled)
            snapshot = await self.cycle(behind=behind)
            self._publish(snapshot)
            scheduled = max(scheduled + interval, started)
            self.next_start = scheduled
            await self._sleep(scheduled - loop.time())

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)

    async def cycle(self, *, behind: float = 0.0) -> PortalSnapshot:
        """Run one poll cycle; never raises for anything Bitrix24 does."""
        started = time.monotonic()
        try:
            result = await self._collect()
        except FetchError as exc:
            result = _CycleResult(up=False, failure=exc)
        except Exception as exc:  # a bug must not kill the loop; say it loudly instead
            log.exception("portal %s: poll cycle failed", self.portal.name)
            result = _CycleResult(
                up=False, failure=FetchError(Code.INTERNAL, f"internal error: {type(exc).__name__}")
            )
        now = self._clock()
        fresh = result.fresh or self.store.fail_all(now, self.config.stale_after)
        self.store.finish(fresh, now)
        if (failure := result.failure) is not None:
            # Once per kind of failure: the method in the text changes from cycle to cycle.
            self.once.say("portal", str(failure), logging.ERROR, signature=failure.error)
        else:
            self.once.resolve("portal", f"portal {self.portal.name}: poll succeeded again")
        self.cycles += 1
        await asyncio.sleep(0)  # a scrape may go between the mapping and the snapshot
        return self._snapshot(result, fresh, time.monotonic() - started, behind)

    # -- one cycle --------------------------------------------------------------

    async def _collect(self) -> _CycleResult:
        profile = await self.directory.learn_profile(self.main, self.portal.tasks)
        users = await self.directory.task_users(
            self.main,
            self.portal.tasks,
            self.config.user_refresh_interval,
            self.once,
            teams=self.portal.teams.enabled,
        )
        plan = self.planner.plan(users, profile.user_id)
        self.capacity.check_load(len(plan), len(self.clients.callers))
        self.capacity.expect_budget(plan, self.main.budget)
        reached = not plan
        auth_error: BitrixError | None = None
        first_error: BitrixError | None = None
        request_errors: list[BitrixError] = []
        fresh: dict[Owner, bool] = {}
        async for planned, result, now in self._answers(plan):
            match result:
                case BitrixError(whole_batch=whole, reached=answered):
                    first_error = first_error or result
                    if result.is_auth and auth_error is None:
                        auth_error = result
                    if whole:
                        request_errors.append(result)
                    reached = reached or answered
                case _:
                    reached = True
            owner = (planned.user_id, planned.source.name)
            fresh[owner] = self._take(planned, result, now) and fresh.get(owner, True)
        now = self._clock()
        kept = [p.command.key for p in plan]
        for auth, client in self.clients.callers.items():
            kept += await self._collect_caller(auth, client, now, fresh)
        self.store.keep_only(set(kept), set(fresh))
        if auth_error is not None:
            self.directory.forget_profile()
            return _CycleResult(False, auth_error, fresh)
        if not reached:
            no_response = BitrixError(self.portal.name, "batch", Code.NO_RESPONSE)
            return _CycleResult(False, first_error or no_response, fresh)
        self.fetch_log.requests(request_errors, len(plan))
        return _CycleResult(True, None, fresh)

    async def _answers(self, plan: list[Planned]) -> AsyncIterator[tuple[Planned, object, float]]:
        """Each planned command with its result (or error) and when it came, in plan order.

        The plan goes out in windows of `WINDOW` commands, two in flight after the first,
        and each window is mapped as soon as it is in: the decoded answers of a big portal
        then live for a window, not all of them until the cycle's last batch (~150 B per
        series at 10,000 users, all promoted to the old generation on the way)."""
        windows = [plan[i : i + WINDOW] for i in range(0, len(plan), WINDOW)]

        def send(window: list[Planned]) -> asyncio.Future[dict[str, Any]]:
            return asyncio.ensure_future(self.main.batch([p.command for p in window]))

        # The first window alone: until a method's cost is known, the operating budget lets
        # one batch learn it while any other waits half a second.
        flying = [send(windows[0])] if windows else []
        sent = len(flying)
        try:
            for window in windows:
                outcome = await flying.pop(0)
                while sent < len(windows) and len(flying) < 2:
                    flying.append(send(windows[sent]))
                    sent += 1
                now = self._clock()
                for index, planned in enumerate(window):
                    if index % MAP_SLICE == MAP_SLICE - 1:
                        await asyncio.sleep(0)
                    yield planned, outcome.get(planned.command.key), now
        finally:
            for future in flying:
                future.cancel()

    def _take(self, planned: Planned, result: object, now: float) -> bool:
        """Map one command's result into the fetch store; False if it failed."""
        failure: FetchError | None = None
        match result:
            case FetchError():
                failure = result
            case None:
                failure = PayloadError("no result for this command in the batch answer")
            case _:
                try:
                    samples = planned.source.samples(planned, result)
                except FetchError as exc:
                    failure = exc
        if failure is not None:
            self.store.fail(planned.command.key, now, self.config.stale_after)
            self.store.failed_because((planned.user_id, planned.source.name), failure.error)
            self.fetch_log.failed(planned, failure)
            return False
        self.fetch_log.succeeded(planned)
        self.store.succeed(planned.command.key, samples, now)
        return True

    async def _collect_caller(
        self, auth: WebhookAuth, client: BitrixClient, now: float, fresh: dict[Owner, bool]
    ) -> list[str]:
        """The caller_only sources through another user's own webhook; the keys it keeps."""
        sources = [s for s in self.sources if s.caller_only]
        if not sources:
            return []
        profile = self.directory.callers.get(auth)
        commands = [Command(s.name, s.method) for s in sources]
        if profile is None:
            commands.insert(0, Command("profile", "profile"))
        outcome = await client.batch(commands)
        if profile is None:
            learned = self.directory.learn_caller(auth, outcome.get("profile"))
            if isinstance(learned, FetchError):
                text = f"portal {self.portal.name}: im webhook: {learned}"
                self.once.say(f"caller-{auth.redacted}", text)
                return []
            profile = learned
        kept: list[str] = []
        for source in sources:
            for planned in source.plan([profile.user_id]):
                ok = self._take(planned, outcome.get(source.name), now)
                fresh[profile.user_id, source.name] = ok
                kept.append(planned.command.key)
        return kept

    # -- snapshot ---------------------------------------------------------------

    def _snapshot(
        self, result: _CycleResult, fresh: dict[Owner, bool], duration: float, behind: float
    ) -> PortalSnapshot:
        up, failure = result.up, result.failure
        error, code = (None, None) if failure is None else (str(failure), failure.error)
        statuses = self.store.statuses(fresh, up, code)
        # Where no per-user timestamp goes out, the oldest of them stands for their age.
        aggregate = self.privacy.mode == "aggregate"
        watched = {user_id for user_id, _ in fresh}  # not from `statuses`: made when first read
        names = tuple(sorted((u, n) for u, n in self.directory.names.items() if u in watched))
        samples, chart = self.store.samples(), self.directory.chart
        if self.portal.teams.enabled and chart is not None:
            members = self.directory.memberships
            samples = self.department_sums(chart, members, watched, samples)
        snapshot = PortalSnapshot(
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
            health=health_of(fresh, up, self.store.last_success if aggregate else None),
        )
        return self.privacy.apply(snapshot)

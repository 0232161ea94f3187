"""Fault injection: the exporter keeps telling the truth while Bitrix24 misbehaves.

Each scenario runs the real exporter app against the fake portal over real HTTP on 127.0.0.1,
turns one fault on (or all of them), and meanwhile probes /metrics and /healthz. It checks that

- both keep answering 200 throughout, and the poll loop never dies or logs a traceback;
- every body served is true: task counters are exactly the portal's values, counters never go
  backwards, a success timestamp never moves back;
- the fault really happened, and `bitrix24_api_requests_total` / `bitrix24_api_errors_total`
  on /metrics match what the portal recorded; `bitrix24_up` / `bitrix24_collect_success` say
  what happened;
- no cycle sends more requests than the retry policy allows (max_retries + 1 attempts of each
  request the cycle needs);
- once the fault stops, fresh data is served: for a fault that a retry rides out, by the
  first cycle that starts after it stopped.

The checks count events, never durations: how fast /metrics answers during a fault and how
many seconds recovery takes are measured by `bench/faults.py`. Each scenario prints what it
saw; run with `-s` to see it.

The fake portal runs in a process of its own (`tests/fault_portal.py`, steered over HTTP),
and so does the prober (`tests/prober.py`), as Prometheus would. Cycles are told apart by
the published snapshot (`PUBLISHER` on the app: what /metrics is rendered from, with its
cycle number and request counts); everything else is read from /metrics and from the
portal's records.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from exporter.bitrix import DEFAULT_RETRY, MAX_BATCH, BitrixClient
from exporter.server import PUBLISHER
from tests.fault_portal import ROLES, expected_tasks
from tests.support import (
    ROOT,
    SECRET,
    LeakWatch,
    config_of,
    parse_metrics,
    portal_config,
    register_secret,
    series,
    total,
    value,
    wait_for,
)

POLL = 0.3  # poll_interval, seconds
# request_timeout: a local answer takes milliseconds, so only a hung request (HANG) times
# out, however loaded the machine.
TIMEOUT = 1.0
HANG = 3.0
STALE = 30.0  # stale_after: long, so that no served value is dropped mid-scenario
USERS = 50
OPERATING_WINDOW = 2.0  # the fake's operating-time window, so a 429 pause is short
# Liveness bounds: how long a wait may take before the test gives up. Far above what each
# takes on a loaded machine; they end a hung test, they measure nothing.
LIVENESS = 60.0

# The retry policy, read from the code rather than copied: each request is sent at most
# max_retries + 1 times.
MAX_RETRIES = DEFAULT_RETRY.max_retries
ATTEMPTS = MAX_RETRIES + 1
CONCURRENCY: int = inspect.signature(BitrixClient).parameters["concurrency"].default


def batches(users: int) -> int:
    """Requests of a steady cycle: every (user, role) command plus im.counters.get, 50 a batch."""
    return math.ceil((users * len(ROLES) + 1) / MAX_BATCH)


def per_cycle_bound(users: int, *, relearn: bool = False) -> int:
    """Most requests one cycle may send: every request it needs, each tried ATTEMPTS times.

    After an auth error the cycle first learns the credential's profile again: one more.
    """
    return ATTEMPTS * (batches(users) + (1 if relearn else 0))


DRAINER_SECRET = "dr41n3rs3cr3tw3bh00k"
register_secret(DRAINER_SECRET)


def spec(users: int = USERS, **kwargs: Any) -> dict[str, Any]:
    """A `tests.fault_portal` portal: `users` users with known counters, no rate limit."""
    return {
        "users": users,
        "secret": SECRET,
        "operating_window": OPERATING_WINDOW,
        **kwargs,
    }


def fault_config(url: str, **portal: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "tasks": {"users": "all", "roles": list(ROLES)},
        "rate_limit": {"requests_per_second": 1000, "burst": 1000},
        # The fake's budget window, which the exporter must be told: it holds a method
        # refused with OPERATION_TIME_LIMIT for a tenth of it when no reset is known.
        "operating_window": f"{OPERATING_WINDOW:g}s",
    }
    settings.update(portal)
    return portal_config(
        url,
        poll_interval=f"{POLL}s",
        request_timeout=f"{TIMEOUT}s",
        stale_after=f"{STALE}s",
        user_refresh_interval="1h",
        portal=settings,
    )


Families = dict[str, dict[tuple[tuple[str, str], ...], float]]


def families(text: str) -> Families:
    """Samples by name, then by their sorted label pairs."""
    found: Families = {}
    for s in parse_metrics(text):
        found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def counted(text: str, metric: str, /, **labels: str) -> float:
    """The sum of a counter's matching series, 0 before its first one.

    Only for counters, and only to wait for or compare a count the test knows is positive
    (a vanished counter reads 0 and fails those checks); gauges go through `value`/`total`.
    """
    return sum(s.value for s in series(text, metric, **labels))


class PortalProcess:
    """The fake portal of `tests/fault_portal.py` in its own process, and its controls."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.url = ""
        self._control = ""
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fault_portal",
            json.dumps(self.spec),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        self.url, self._control = line.decode().split()
        self._session = aiohttp.ClientSession()
        return self.url

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> None:
        assert self._session is not None
        async with self._session.post(self._control + path, json=body or {}) as response:
            assert response.status == 200, await response.text()

    async def faults(self, **faults: Any) -> None:
        """Replace the portal's `Faults` (no arguments: behave again)."""
        await self._post("/faults", faults)

    async def revoke(self, secret: str) -> None:
        await self._post("/revoke", {"secret": secret})

    async def add_webhook(self, user_id: int, secret: str) -> None:
        await self._post("/webhook", {"user_id": user_id, "secret": secret})

    async def stop_listening(self) -> None:
        """Connections are refused from now on."""
        await self._post("/stop")

    async def listen_again(self) -> None:
        """Back on the same port."""
        await self._post("/start")

    async def recorded(self, *, everyone: bool = False) -> list[dict[str, Any]]:
        """What the portal recorded from the exporter's webhook (`everyone`: all clients)."""
        assert self._session is not None
        async with self._session.get(self._control + "/requests") as response:
            rows: list[dict[str, Any]] = await response.json()
        return rows if everyone else [r for r in rows if r["path"].startswith("/rest/1/")]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


@dataclass
class Watch:
    """What the in-process probe saw: the truth of each body, and the requests of each cycle."""

    problems: list[str] = field(default_factory=list)
    bodies: int = 0
    last_text: str = ""
    # (cycle number, requests sent so far) of each published snapshot seen
    cycles: list[tuple[int, int]] = field(default_factory=list)
    _previous: Families = field(default_factory=dict)

    def per_cycle(self, since: int = 0, until: int | None = None) -> list[int]:
        """Requests of each cycle after `since` (up to `until`), where its neighbour was seen."""
        counts = []
        for (c1, r1), (c2, r2) in zip(self.cycles, self.cycles[1:], strict=False):
            if c1 >= since and (until is None or c2 <= until) and c2 == c1 + 1:
                counts.append(r2 - r1)
        return counts

    def cycle_of(self, text: str) -> int:
        """The latest cycle `text` can have been rendered from.

        Its request total belongs to one cycle: the first seen with at least that total is
        it (or, if that one already sent more, the one before it).
        """
        sent = total(text, "bitrix24_api_requests_total")
        for cycle, requests in self.cycles:
            if requests >= sent:
                return cycle if requests == sent else cycle - 1
        raise AssertionError(f"no published cycle has sent {sent} requests: {self.cycles}")

    def check(self, text: str) -> None:
        """The truth of one served body, and that nothing moved backwards since the last."""
        found = families(text)
        for labels, served in found.get("bitrix24_tasks", {}).items():
            shown = dict(labels)
            want = expected_tasks(int(shown["user_id"]), shown["role"]).get(shown["counter"])
            if want is None or (float(want[0]), str(want[1])) != (served, shown["code"]):
                self.problems.append(f"served {shown} = {served}, the portal has {want}")
        for name in (
            "bitrix24_api_requests_total",
            "bitrix24_api_errors_total",
            "bitrix24_last_success_timestamp_seconds",
        ):
            before = self._previous.get(name, {})
            for labels, now in found.get(name, {}).items():
                if now < before.get(labels, -math.inf):
                    self.problems.append(
                        f"{name}{dict(labels)} went back: {before[labels]} > {now}"
                    )
        stamps = found.get("bitrix24_last_success_timestamp_seconds", {})
        for labels, ok in found.get("bitrix24_collect_success", {}).items():
            if ok == 1 and labels not in stamps:
                self.problems.append(f"collect_success 1 without a timestamp: {dict(labels)}")
        for labels, up in found.get("bitrix24_up", {}).items():
            if up not in (0.0, 1.0):
                self.problems.append(f"bitrix24_up{dict(labels)} = {up}")
        self._previous = found


class Scenario:
    """The exporter app against a portal in a process, probed while faults come and go."""

    def __init__(self, portal: PortalProcess, client: TestClient[Any, Any], users: int) -> None:
        self.portal = portal
        self.client = client
        self.users = users
        app = client.server.app
        assert app is not None
        self.publisher = app[PUBLISHER]
        self.watch = Watch()
        self.worst = {"/metrics": 0.0, "/healthz": 0.0}
        self.probes = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._prober: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Scenario:
        self._task = asyncio.create_task(self._probe())
        self._prober = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.prober",
            self.client.server.host,
            str(self.client.server.port),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._prober.stdout is not None
        # It prints one line after its first round and one at the end; nothing else.
        line = await asyncio.wait_for(self._prober.stdout.readline(), LIVENESS)
        assert line == b"ready\n", line
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._prober is not None:
            out, _ = await self._prober.communicate(b"stop\n")
            result = json.loads(out)
            self.worst = result["worst"]
            self.probes = result["count"]
            self.watch.problems += result["failures"]

    async def _probe(self) -> None:
        while not self._stop.is_set():
            response = await self.client.get("/metrics")
            text = await response.text()
            if response.status != 200:
                self.watch.problems.append(f"/metrics answered {response.status}")
            if text != self.watch.last_text:
                self.watch.bodies += 1
                self.watch.check(text)
                self.watch.last_text = text
            # Read after the body, so the cycle of every body seen is already recorded.
            snapshot = self.publisher.snapshots.get("acme")
            if snapshot is not None and (
                not self.watch.cycles or self.watch.cycles[-1][0] != snapshot.cycles
            ):
                self.watch.cycles.append((snapshot.cycles, sum(snapshot.stats.requests.values())))
            await asyncio.sleep(0.01)

    @property
    def cycle(self) -> int:
        """The last cycle the exporter finished and published."""
        snapshot = self.publisher.snapshots.get("acme")
        return snapshot.cycles if snapshot is not None else 0

    @property
    def text(self) -> str:
        """The last /metrics body the probe read."""
        return self.watch.last_text

    async def until(
        self, predicate: Callable[[], bool], what: str, timeout: float = LIVENESS
    ) -> None:
        async def check() -> bool:
            return predicate()

        await wait_for(check, timeout=timeout, step=0.01, what=what)

    async def cycles_pass(self, count: int) -> None:
        target = self.cycle + count
        await self.until(lambda: self.cycle >= target, f"{count} more cycles")

    async def faults_stop(self, **faults: Any) -> tuple[float, int]:
        """Replace the portal's faults (none: behave again); the wall time and the cycle
        published by then, for `recovered`."""
        await self.portal.faults(**faults)
        return time.time(), self.cycle

    async def recovered(
        self, since: tuple[float, int], timeout: float = LIVENESS
    ) -> tuple[float, int]:
        """Wait until /metrics shows up 1 and every user fetched after `since`; return the
        seconds that took (for the report) and how many cycles after `since` it was."""
        since_wall, since_cycle = since
        loop = asyncio.get_running_loop()
        started = loop.time()

        def fresh() -> bool:
            found = families(self.text)
            success = found.get("bitrix24_collect_success", {})
            stamps = found.get("bitrix24_last_success_timestamp_seconds", {})
            return (
                len(success) == self.users + 1
                and all(v == 1 for v in success.values())
                and all(stamps.get(k, 0) > since_wall for k in success)
                and value(self.text, "bitrix24_up") == 1
            )

        await self.until(fresh, "fresh data on /metrics", timeout)
        return loop.time() - started, self.watch.cycle_of(self.text) - since_cycle

    async def agrees_with_portal(
        self,
        statuses: Iterable[int] = (),
        *,
        refused: bool = False,
        exact: bool = True,
        totals: bool = True,
    ) -> None:
        """/metrics' request counts and the portal's records tell the same story.

        The portal records a request when it arrives, the exporter counts it when its answer
        (or its timeout) comes and publishes it when the cycle ends: so the body is read
        between two readings of the records and must lie between them, once it has caught up
        with the first. `statuses`: HTTP statuses compared one by one as well (`exact`
        False: the exporter may have counted fewer, for statuses that a hung request gets
        only after the exporter gave up on it). `refused`: connections were refused, which
        the exporter counts and the portal never sees. `totals` False: compare the statuses
        only (refused connections and reset ones both count as `connection`).
        """

        def sent(text: str) -> float:
            every = counted(text, "bitrix24_api_requests_total")
            return every - counted(text, "bitrix24_api_requests_total", code="connection") * refused

        def of(rows: list[dict[str, Any]], status: int) -> int:
            return sum(1 for r in rows if r["status"] == status)

        before = await self.portal.recorded()

        def caught_up() -> bool:
            return (not totals or sent(self.text) >= len(before)) and all(
                counted(self.text, "bitrix24_api_requests_total", code=str(status))
                >= of(before, status)
                for status in statuses
                if exact
            )

        await self.until(caught_up, "/metrics catching up with the portal's records")
        text = self.text
        after = await self.portal.recorded()
        if totals:
            # A request that timed out may never have been read by the portal.
            timeouts = counted(text, "bitrix24_api_requests_total", code="timeout")
            assert len(before) <= sent(text)
            assert sent(text) - timeouts <= len(after)
        for status in statuses:
            shown = counted(text, "bitrix24_api_requests_total", code=str(status))
            assert shown <= of(after, status), (status, shown, of(after, status))
            if exact:
                assert of(before, status) <= shown, (status, shown, of(before, status))

    def assert_sound(self, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture) -> None:
        """Answers throughout, true bodies, a live loop, no traceback, no secret read."""
        assert self.watch.problems == [], self.watch.problems[:5]
        assert self.probes >= 1  # it said "ready": the whole scenario ran under the probe
        tasks = {t.get_name(): t for t in asyncio.all_tasks()}
        for name in ("poll-acme", "publisher"):
            assert name in tasks and not tasks[name].done(), f"task {name} is gone"
        logged = [text for where, text in leak_watch.texts if where.startswith("log record")]
        bad = [t for t in logged if "Traceback" in t or "poll cycle failed" in t]
        bad += [r.getMessage() for r in caplog.records if r.name == "asyncio"]
        assert bad == [], bad[:3]
        assert leak_watch.leaks() == []

    def report(self, name: str, bound: int, seen: list[int], recovery: tuple[float, int]) -> None:
        print(
            f"\n[{name}] max /metrics {self.worst['/metrics'] * 1000:.1f} ms, /healthz"
            f" {self.worst['/healthz'] * 1000:.1f} ms over {self.probes} probes;"
            f" requests per cycle: bound {bound}, most seen {max(seen, default=0)}"
            f" over {len(seen)} cycles; recovery {recovery[0]:.2f} s, {recovery[1]} cycles"
        )


@pytest.fixture
async def scenario(
    exporter_app: Any, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callable[..., Any]]:
    """Start a portal process and the exporter on it; returns a probing `Scenario`."""
    caplog.set_level("WARNING", logger="asyncio")
    portals: list[PortalProcess] = []

    async def start(portal_spec: dict[str, Any], **settings: Any) -> Scenario:
        portal = PortalProcess(portal_spec)
        portals.append(portal)
        url = await portal.start()
        client = await exporter_app(config_of(fault_config(url, **settings)))
        return Scenario(portal, client, portal_spec["users"])

    yield start
    for portal in portals:
        await portal.close()


RATE_FAULTS = [
    # id, the fault, the request code and the error it shows up as, how often to see it
    ("http_500", {"http_500_rate": 0.10}, "500", "INTERNAL_SERVER_ERROR", 3),
    ("malformed_json", {"malformed_json_rate": 0.05}, "200", "invalid_response", 2),
    ("html_502", {"html_502_rate": 0.10}, "502", "invalid_response", 3),
    ("hang", {"hang_rate": 0.02, "hang_seconds": HANG}, "timeout", "timeout", 1),
    ("reset", {"reset_rate": 0.05}, "connection", "connection", 2),
    ("query_limit_burst", {"query_limit_burst": 6}, "503", "QUERY_LIMIT_EXCEEDED", 6),
]


@pytest.mark.parametrize(
    ("fault", "code", "error", "occurrences"),
    [pytest.param(f, c, e, n, id=i) for i, f, c, e, n in RATE_FAULTS],
)
async def test_transient_fault(
    scenario: Any,
    leak_watch: LeakWatch,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    code: str,
    error: str,
    occurrences: int,
) -> None:
    """A transient fault is retried within the bound, counted as it happened, and healed by
    the first cycle that starts after it stopped."""
    async with await scenario(spec(seed=11)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.faults(**fault)
        await run.until(
            lambda: counted(run.text, "bitrix24_api_errors_total", error=error) >= occurrences,
            f"{occurrences} x {error} on /metrics",
        )
        stopped = await run.faults_stop()
        recovery = await run.recovered(stopped)
        await run.cycles_pass(1)
        # Every attempt reached the portal, and both sides agree on each status it answered.
        statuses = [int(code)] if code.isdigit() else []
        await run.agrees_with_portal(statuses)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS)
    run.report(f"{code} {error}", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    # The fault shows up under its request code; a 200 that could not be read is one of them.
    text = run.text
    assert counted(text, "bitrix24_api_requests_total", code=code) >= occurrences
    assert counted(text, "bitrix24_api_errors_total", error=error) >= occurrences
    if code == "200":
        # The portal answered 200 every time, so every unreadable answer counted was one.
        assert {r["status"] for r in await run.portal.recorded()} == {200}
        assert counted(text, "bitrix24_api_requests_total", code="200") == total(
            text, "bitrix24_api_requests_total"
        )
    # The cycle in flight when the fault stopped may still fail; the next one may not.
    assert recovery[1] <= 2, recovery


async def test_second_client_drains_the_bucket(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another client emptying the shared bucket gives 503s: backed off, bounded, reported."""
    users = 10
    portal = spec(users, requests_per_second=5.0, burst=10, seed=5, webhooks=[[2, DRAINER_SECRET]])
    limit = {"requests_per_second": 5, "burst": 10}
    async with await scenario(portal, rate_limit=limit) as run:
        await run.cycles_pass(2)
        first = run.cycle
        draining = asyncio.Event()

        async def drain() -> None:
            url = f"{run.portal.url}/rest/2/{DRAINER_SECRET}/profile"
            async with aiohttp.ClientSession() as session:
                while not draining.is_set():
                    async with session.post(url) as response:
                        await response.read()
                    await asyncio.sleep(0.04)

        drainer = asyncio.create_task(drain())
        await run.until(lambda: value(run.text, "bitrix24_up") == 0, "up 0 while drained")
        draining.set()
        await drainer
        drained = run.cycle
        # The portal's bucket takes its own time to leak: fresh data follows, however many
        # cycles that takes.
        recovery = await run.recovered((time.time(), run.cycle))
        await run.cycles_pass(1)
        await run.agrees_with_portal([503])
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(users)
    run.report("503 second client", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert max(run.watch.per_cycle(since=first, until=drained)) == bound  # it did retry
    text = run.text
    assert total(text, "bitrix24_rate_limit_wait_seconds_total") > 0
    refused = counted(text, "bitrix24_api_requests_total", code="503")
    assert refused > 0
    assert counted(text, "bitrix24_api_errors_total", error="QUERY_LIMIT_EXCEEDED") == refused
    everyone = await run.portal.recorded(everyone=True)
    assert sum(1 for r in everyone if r["path"].startswith("/rest/2/")) > refused  # the drainer


async def test_operation_time_limit(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """429 OPERATION_TIME_LIMIT holds the methods back (no request at all) until the reset."""
    users = 100  # 7 batches a cycle: more than the 4 the client sends at a time
    # Long enough that the window's first bucket (the reset the exporter waits for) is still
    # ahead when the 429 comes, however slowly the first cycles ran (the portal reports the
    # reset in whole seconds), so that the hold is the one until the reset.
    window = 6.0
    portal = spec(users, seed=7, operating_window=window)
    async with await scenario(portal, operating_window=f"{window:g}s") as run:
        await run.cycles_pass(2)
        first = run.cycle
        window_opened = (await run.portal.recorded())[0]["at"]
        await run.portal.faults(operation_time_limit=True)
        switched = len(await run.portal.recorded())

        async def refused_by_the_portal() -> bool:
            # Every batch answered from now on had its commands refused.
            return any(r["status"] == 200 for r in (await run.portal.recorded())[switched:])

        # Off as soon as the portal refused once: the exporter holds the cycle until the
        # reset, so /metrics only shows the refusals when that cycle ends.
        await wait_for(refused_by_the_portal, what="a batch refused by the portal")
        stopped = await run.faults_stop()
        marker = len(await run.portal.recorded())
        await run.until(
            lambda: (
                counted(run.text, "bitrix24_api_errors_total", error="OPERATION_TIME_LIMIT") > 0
            ),
            "OPERATION_TIME_LIMIT on /metrics",
        )

        def refused() -> bool:
            shown = series(run.text, "bitrix24_collect_success", source="tasks")
            return any(s.value == 0 for s in shown)

        await run.until(refused, "refused users on /metrics")
        text = run.text
        # The pause ends with the portal's window: fresh data follows, however many cycles
        # the wait spans.
        recovery = await run.recovered(stopped)
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(users)
    run.report("429 OPERATION_TIME_LIMIT", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    # The portal was reached and answered: up, but the refused users' counters are not fresh.
    assert value(text, "bitrix24_up") == 1
    # Only the batches already in flight were refused: once paused, the method's other
    # batches were not sent into the block.
    refused_commands = total(text, "bitrix24_api_errors_total", error="OPERATION_TIME_LIMIT")
    # (+ 1: im.counters.get, a method of its own, may be refused in a batch of its own.)
    assert 0 < refused_commands <= CONCURRENCY * MAX_BATCH + 1 < users * len(ROLES)
    # The block was logged once per method, not once per refused command or cycle.
    said = [
        text
        for where, text in leak_watch.texts
        if "OPERATION_TIME_LIMIT" in text and where.endswith(("WARNING", "ERROR"))
    ]
    tasks = [line for line in said if "tasks.task.counters.get" in line]
    assert len(tasks) == 1, said
    assert len(said) - len(tasks) <= 1, said  # im.counters.get, if its batch was refused too
    # Held back until the portal's window (opened by the first request of the run) expired,
    # not retried at once: on the portal's own clock, whatever the machine's load.
    later = (await run.portal.recorded())[marker:]
    assert later and later[0]["at"] >= window_opened + window - 1.0


async def test_webhook_revoked_mid_run(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A revoked webhook is down with one request a cycle, never retried; back once restored."""
    async with await scenario(spec(seed=3)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.revoke(SECRET)
        await run.until(lambda: value(run.text, "bitrix24_up") == 0, "up 0 once revoked")
        refused = run.cycle
        await run.cycles_pass(4)
        down_text = run.text
        await run.portal.add_webhook(1, SECRET)  # the administrator creates it again
        restored = (time.time(), run.cycle)
        recovery = await run.recovered(restored)
        await run.cycles_pass(1)
        await run.agrees_with_portal([401])
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS, relearn=True)
    run.report("401 revoked webhook", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    # Once the profile is known to fail, each cycle asks once: nothing is retried.
    once = run.watch.per_cycle(since=refused + 1, until=refused + 4)
    assert once and set(once) == {1}, once
    assert value(down_text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert series(down_text, "bitrix24_tasks", user_id="2")  # kept until stale_after
    assert recovery[1] <= 2, recovery
    text = run.text
    refusals = counted(text, "bitrix24_api_requests_total", code="401")
    assert refusals > 0
    assert counted(text, "bitrix24_api_errors_total", error="INVALID_CREDENTIALS") == refusals


async def test_portal_disappears_and_comes_back(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Connection refused: retried within the bound, up 0; the same port again: fresh data."""
    async with await scenario(spec(seed=4)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.stop_listening()
        await run.until(lambda: value(run.text, "bitrix24_up") == 0, "up 0 while refused")
        down_text = run.text
        await run.portal.listen_again()
        back = (time.time(), run.cycle)
        recovery = await run.recovered(back)
        await run.cycles_pass(1)
        # Refused connections never reach the portal: everything else did.
        await run.agrees_with_portal(refused=True)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS)
    run.report("portal gone (connection refused)", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert value(down_text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert counted(down_text, "bitrix24_api_requests_total", code="connection") > 0
    assert recovery[1] <= 2, recovery


MIXED = {
    "http_500_rate": 0.10,
    "malformed_json_rate": 0.05,
    "html_502_rate": 0.05,
    "hang_rate": 0.05,
    "hang_seconds": HANG,
    "reset_rate": 0.05,
}
# What each fault of MIXED shows up as on /metrics: (request code, error).
MIXED_SEEN = [
    ("500", "INTERNAL_SERVER_ERROR"),
    ("200", "invalid_response"),  # malformed JSON
    ("502", "invalid_response"),
    ("timeout", "timeout"),
    ("connection", "connection"),
    ("503", "QUERY_LIMIT_EXCEEDED"),
]


async def test_all_faults_mixed(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every fault at once and in turn: answers stay true; each fault is seen and counted;
    fresh data after it ends."""

    def seen_all(pairs: Iterable[tuple[str, str]]) -> Callable[[], bool]:
        def check() -> bool:
            return all(
                counted(run.text, "bitrix24_api_requests_total", code=code) > 0
                and counted(run.text, "bitrix24_api_errors_total", error=error) > 0
                for code, error in pairs
            )

        return check

    async with await scenario(spec(seed=21)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.faults(**MIXED, query_limit_burst=4)
        # Until each fault has fired at least once: none of the checks below is 0 == 0.
        await run.until(seen_all(MIXED_SEEN), "every fault of MIXED on /metrics")
        refused_before = counted(run.text, "bitrix24_api_requests_total", code="connection")
        await run.portal.stop_listening()
        await run.until(
            lambda: (
                counted(run.text, "bitrix24_api_requests_total", code="connection") > refused_before
            ),
            "refused connections on /metrics",
        )
        await run.portal.listen_again()
        await run.portal.revoke(SECRET)
        await run.until(lambda: value(run.text, "bitrix24_up") == 0, "up 0 once revoked")
        await run.portal.add_webhook(1, SECRET)
        await run.portal.faults(**MIXED, operation_time_limit=True)
        await run.until(
            seen_all([("401", "INVALID_CREDENTIALS"), ("200", "OPERATION_TIME_LIMIT")]),
            "INVALID_CREDENTIALS and OPERATION_TIME_LIMIT on /metrics",
        )
        stopped = await run.faults_stop()
        recovery = await run.recovered(stopped)
        await run.cycles_pass(1)
        # A hung request may get its 401 or 503 after the exporter gave up on it (a
        # timeout): those two are compared one way only.
        await run.agrees_with_portal([500, 502], totals=False)
        await run.agrees_with_portal([401, 503], exact=False, totals=False)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS, relearn=True)
    run.report("all mixed", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound

"""Fault injection: the exporter keeps telling the truth while Bitrix24 misbehaves.

Each scenario runs the real exporter app against the fake portal over real HTTP on 127.0.0.1,
turns one fault on (or all of them), and meanwhile probes /metrics and /healthz. It checks that

- both answer within 100 ms throughout, and the poll loop never dies or logs a traceback;
- every body served is true: task counters are exactly the portal's values, counters never go
  backwards, a success timestamp never moves back;
- `bitrix24_api_requests_total` / `bitrix24_api_errors_total` match what the portal recorded,
  and `bitrix24_up` / `bitrix24_collect_success` say what happened;
- no cycle sends more requests than the retry policy allows (max_retries + 1 attempts of each
  request the cycle needs);
- once the fault stops, fresh data is served within a poll interval, plus what the retry
  policy (or the portal's operating-time pause) may still make it wait.

So that the measurements are the exporter's own, the fake portal runs in a process of its
own (`tests/fault_portal.py`, steered over HTTP), and the latency probes come from a separate
process too, as Prometheus' would.
The numbers each scenario saw are printed; run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from exporter.bitrix import DEFAULT_RETRY, MAX_BATCH, BitrixClient
from exporter.server import PUBLISHER, SUPERVISOR
from tests.conftest import (
    ROOT,
    SECRET,
    LeakWatch,
    config_of,
    portal_config,
    register_secret,
    series,
    value,
    wait_for,
)
from tests.fault_portal import ROLES, expected_tasks

POLL = 0.3  # poll_interval, seconds
TIMEOUT = 0.5  # request_timeout
STALE = 30.0  # stale_after: long, so that no served value is dropped mid-scenario
USERS = 50
LATENCY_LIMIT = 0.100
OPERATING_WINDOW = 2.0  # the fake's operating-time window, so a 429 pause is short

# The retry policy, read from the code rather than copied: each request is sent at most
# max_retries + 1 times, sleeping at most base * 2**attempt (capped) in between.
MAX_RETRIES = DEFAULT_RETRY.max_retries
RETRY_BASE = DEFAULT_RETRY.base
RETRY_CAP = DEFAULT_RETRY.cap
ATTEMPTS = MAX_RETRIES + 1
CONCURRENCY: int = inspect.signature(BitrixClient).parameters["concurrency"].default
LONGEST_BACKOFF = min(RETRY_CAP, RETRY_BASE * 2 ** (MAX_RETRIES - 1))


def batches(users: int) -> int:
    """Requests of a steady cycle: every (user, role) command plus im.counters.get, 50 a batch."""
    return math.ceil((users * len(ROLES) + 1) / MAX_BATCH)


def per_cycle_bound(users: int, *, relearn: bool = False) -> int:
    """Most requests one cycle may send: every request it needs, each tried ATTEMPTS times.

    After an auth error the cycle first learns the credential's profile again: one more.
    """
    return ATTEMPTS * (batches(users) + (1 if relearn else 0))


# Fresh data needs a cycle that starts after the fault stopped (within a poll interval), runs
# (~0.1 s for 50 users) and is rendered (the publisher coalesces renders 0.2 s apart).
SLACK = 0.5
# A fault that is retried can leave the cycle in flight waiting out one more backoff and
# one more request when it stops.
RETRY_SLACK = LONGEST_BACKOFF + TIMEOUT

DRAINER_SECRET = "dr41n3rs3cr3tw3bh00k"
register_secret(DRAINER_SECRET)

LINE = re.compile(r"^(?P<name>[a-z0-9_]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# Probes /metrics and /healthz over one keep-alive connection until stdin has a line, then
# prints the slowest answer of each; a separate process, so nothing in the test's own
# process (the fake portal, the checks) can slow the probe down or hide a slow answer.
PROBER = r"""
import http.client, json, select, sys, time
host, port = sys.argv[1], int(sys.argv[2])
worst = {"/metrics": 0.0, "/healthz": 0.0}
count, failures = 0, []
def connect():
    return http.client.HTTPConnection(host, port, timeout=5)
conn = connect()
while not select.select([sys.stdin], [], [], 0)[0]:
    for path in worst:
        started = time.monotonic()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            status = repr(exc)
            conn.close()
            conn = connect()
        worst[path] = max(worst[path], time.monotonic() - started)
        if status != 200:
            failures.append(f"{path}: {status}")
    count += 1
    time.sleep(0.01)
print(json.dumps({"worst": worst, "count": count, "failures": failures[:10]}))
"""


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


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample lines by metric name, then by label pairs."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        labels = tuple(LABEL.findall(match["labels"] or ""))
        found.setdefault(match["name"], {})[labels] = float(match["value"])
    return found


def by_code(stats: Any) -> dict[str, int]:
    found: dict[str, int] = {}
    for (_, code), count in stats.requests.items():
        found[code] = found.get(code, 0) + count
    return found


def errors_named(stats: Any, error: str) -> int:
    return sum(n for (_, e), n in stats.errors.items() if e == error)


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
    _previous: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)

    def per_cycle(self, since: int = 0, until: int | None = None) -> list[int]:
        """Requests of each cycle after `since` (up to `until`), where its neighbour was seen."""
        counts = []
        for (c1, r1), (c2, r2) in zip(self.cycles, self.cycles[1:], strict=False):
            if c1 >= since and (until is None or c2 <= until) and c2 == c1 + 1:
                counts.append(r2 - r1)
        return counts

    def check(self, text: str) -> None:
        """The truth of one served body, and that nothing moved backwards since the last."""
        families = parse(text)
        for labels, served in families.get("bitrix24_tasks", {}).items():
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
            for labels, now in families.get(name, {}).items():
                if now < before.get(labels, -math.inf):
                    self.problems.append(
                        f"{name}{dict(labels)} went back: {before[labels]} > {now}"
                    )
        stamps = families.get("bitrix24_last_success_timestamp_seconds", {})
        for labels, ok in families.get("bitrix24_collect_success", {}).items():
            if ok == 1 and labels not in stamps:
                self.problems.append(f"collect_success 1 without a timestamp: {dict(labels)}")
        for labels, up in families.get("bitrix24_up", {}).items():
            if up not in (0.0, 1.0):
                self.problems.append(f"bitrix24_up{dict(labels)} = {up}")
        self._previous = families


class Scenario:
    """The exporter app against a portal in a thread, probed while faults come and go."""

    def __init__(self, portal: PortalProcess, client: TestClient[Any, Any], users: int) -> None:
        self.portal = portal
        self.client = client
        self.users = users
        app = client.server.app
        assert app is not None
        self.publisher = app[PUBLISHER]
        self.poller = app[SUPERVISOR].pollers["acme"]
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
            "-c",
            PROBER,
            self.client.server.host,
            str(self.client.server.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
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
            snapshot = self.publisher.snapshots.get("acme")
            if snapshot is not None and (
                not self.watch.cycles or self.watch.cycles[-1][0] != snapshot.cycles
            ):
                self.watch.cycles.append((snapshot.cycles, sum(snapshot.stats.requests.values())))
            await asyncio.sleep(0.01)

    @property
    def cycle(self) -> int:
        return self.watch.cycles[-1][0] if self.watch.cycles else 0

    @property
    def stats(self) -> Any:
        return self.poller.stats

    def metric(self, name: str, **labels: str) -> float:
        return sum(series(self.watch.last_text, name, **labels).values())

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def check() -> bool:
            return predicate()

        await wait_for(check, timeout=timeout, step=0.01)

    async def cycles_pass(self, count: int, timeout: float = 10.0) -> None:
        target = self.cycle + count
        await self.until(lambda: self.cycle >= target, timeout)

    async def recovery(self, since_wall: float, timeout: float = 10.0) -> float:
        """Seconds until /metrics shows up 1 and every user fetched after `since_wall`."""
        loop = asyncio.get_running_loop()
        started = loop.time()

        def fresh() -> bool:
            families = parse(self.watch.last_text)
            success = families.get("bitrix24_collect_success", {})
            stamps = families.get("bitrix24_last_success_timestamp_seconds", {})
            return (
                len(success) == self.users + 1
                and all(v == 1 for v in success.values())
                and all(stamps.get(k, 0) > since_wall for k in success)
                and value(self.watch.last_text, "bitrix24_up") == 1
            )

        await self.until(fresh, timeout)
        return loop.time() - started

    def assert_sound(self, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture) -> None:
        """Fast answers, true bodies, a live loop, no traceback, no secret in what was read."""
        assert self.watch.problems == [], self.watch.problems[:5]
        assert self.probes > 20, "the prober barely ran"
        for path, worst in self.worst.items():
            assert worst < LATENCY_LIMIT, f"{path} took {worst * 1000:.0f} ms"
        tasks = {t.get_name(): t for t in asyncio.all_tasks()}
        for name in ("poll-acme", "publisher"):
            assert name in tasks and not tasks[name].done(), f"task {name} is gone"
        logged = [text for where, text in leak_watch.texts if where.startswith("log record")]
        bad = [t for t in logged if "Traceback" in t or "poll cycle failed" in t]
        bad += [r.getMessage() for r in caplog.records if r.name == "asyncio"]
        assert bad == [], bad[:3]
        assert leak_watch.leaks() == []

    async def close(self) -> None:
        """Stop the exporter: the cycle in flight finishes, so both sides' counts settle."""
        await self.client.close()

    def report(self, name: str, bound: int, seen: list[int], recovery: float) -> None:
        print(
            f"\n[{name}] max /metrics {self.worst['/metrics'] * 1000:.1f} ms, /healthz"
            f" {self.worst['/healthz'] * 1000:.1f} ms over {self.probes} probes;"
            f" requests per cycle: bound {bound}, most seen {max(seen, default=0)}"
            f" over {len(seen)} cycles; recovery {recovery:.2f} s"
        )


@pytest.fixture
async def scenario(
    exporter_app: Any, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callable[..., Any]]:
    """Start a portal process and the exporter on it; returns a probing `Scenario`."""
    caplog.set_level("WARNING", logger="asyncio")
    # This process also holds pytest's heap, which the exporter's own process would not:
    # keep the collector off it, so that its full collections (30-50 ms here) do not count
    # against the exporter's latency.
    gc.collect()
    gc.freeze()
    portals: list[PortalProcess] = []
    runs: list[Scenario] = []

    async def start(portal_spec: dict[str, Any], **settings: Any) -> Scenario:
        portal = PortalProcess(portal_spec)
        portals.append(portal)
        url = await portal.start()
        client = await exporter_app(config_of(fault_config(url, **settings)))
        run = Scenario(portal, client, portal_spec["users"])
        runs.append(run)
        return run

    yield start
    for run in runs:
        await run.close()
    for portal in portals:
        await portal.close()
    gc.unfreeze()


RATE_FAULTS = [
    # id, the fault, the request code and the error it shows up as, how often to see it
    ("http_500", {"http_500_rate": 0.10}, "500", "INTERNAL_SERVER_ERROR", 3),
    ("malformed_json", {"malformed_json_rate": 0.05}, "200", "invalid_response", 2),
    ("html_502", {"html_502_rate": 0.10}, "502", "invalid_response", 3),
    ("hang", {"hang_rate": 0.02, "hang_seconds": 2.0}, "timeout", "timeout", 1),
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
    """A transient fault is retried within the bound, counted as it happened, and healed."""
    async with await scenario(spec(seed=11)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        before = errors_named(run.stats, error)
        await run.portal.faults(**fault)
        await run.until(lambda: errors_named(run.stats, error) - before >= occurrences, 15)
        await run.portal.faults()
        recovery = await run.recovery(time.time())
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS)
    run.report(f"{code} {error}", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert run.metric("bitrix24_api_requests_total", code=code) >= 1
    assert run.metric("bitrix24_api_errors_total", error=error) >= occurrences
    assert recovery <= POLL + SLACK + RETRY_SLACK
    # Every attempt reached the portal, and both sides agree on each error status.
    await run.close()
    recorded = await run.portal.recorded()
    counted = by_code(run.stats)
    assert sum(counted.values()) == len(recorded)
    if code.isdigit() and code != "200":
        assert counted[code] == sum(1 for r in recorded if r["status"] == int(code))


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
        await run.until(lambda: run.metric("bitrix24_up") == 0, 10)
        draining.set()
        await drainer
        drained = run.cycle
        recovery = await run.recovery(time.time())
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(users)
    run.report("503 second client", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert max(run.watch.per_cycle(since=first, until=drained)) == bound  # it did retry
    assert run.stats.rate_limit_wait > 0
    assert recovery <= POLL + SLACK + RETRY_SLACK
    await run.close()
    recorded = await run.portal.recorded()
    refused = sum(1 for r in recorded if r["status"] == 503)
    assert refused > 0 and by_code(run.stats)["503"] == refused
    assert errors_named(run.stats, "QUERY_LIMIT_EXCEEDED") == refused
    everyone = await run.portal.recorded(everyone=True)
    assert sum(1 for r in everyone if r["path"].startswith("/rest/2/")) > refused  # the drainer


async def test_operation_time_limit(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """429 OPERATION_TIME_LIMIT holds the methods back (no request at all) until the reset."""
    users = 100  # 7 batches a cycle: more than the 4 the client sends at a time
    async with await scenario(spec(users, seed=7)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.faults(operation_time_limit=True)
        await run.until(lambda: errors_named(run.stats, "OPERATION_TIME_LIMIT") > 0, 10)
        await run.portal.faults()
        refused_at = time.monotonic()
        marker = len(await run.portal.recorded())

        def refused() -> bool:
            shown = series(run.watch.last_text, "bitrix24_collect_success", source="tasks")
            return 0 in shown.values()

        await run.until(refused, 5)
        text = run.watch.last_text
        recovery = await run.recovery(time.time())
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(users)
    run.report("429 OPERATION_TIME_LIMIT", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    # The portal was reached and answered: up, but the refused users' counters are not fresh.
    assert value(text, "bitrix24_up") == 1
    assert sum(series(text, "bitrix24_api_errors_total", error="OPERATION_TIME_LIMIT").values())
    # Only the batches already in flight were refused: once paused, the method's other
    # batches were not sent into the block; and the block was logged once per method, not
    # once per refused command.
    refused = errors_named(run.stats, "OPERATION_TIME_LIMIT")
    # (+ 1: im.counters.get, a method of its own, may be refused in a batch of its own.)
    assert 0 < refused <= CONCURRENCY * MAX_BATCH + 1 < users * len(ROLES)
    said = [
        text
        for where, text in leak_watch.texts
        if "OPERATION_TIME_LIMIT" in text and where.endswith(("WARNING", "ERROR"))
    ]
    assert len(said) <= 2, said[:3]  # tasks.task.counters.get and im.counters.get
    # Held back until the oldest bucket of the portal's window expired, not retried at once.
    later = (await run.portal.recorded())[marker:]
    assert later and later[0]["at"] - refused_at > 0.5
    # The pause ends at operating_reset_at (whole seconds) + 1 s.
    assert recovery <= OPERATING_WINDOW + 1.5 + POLL + SLACK


async def test_webhook_revoked_mid_run(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A revoked webhook is down with one request a cycle, never retried; back once restored."""
    async with await scenario(spec(seed=3)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.revoke(SECRET)
        await run.until(lambda: run.metric("bitrix24_up") == 0, 5)
        refused = run.cycle
        await run.cycles_pass(4)
        down_text = run.watch.last_text
        await run.portal.add_webhook(1, SECRET)  # the administrator creates it again
        recovery = await run.recovery(time.time())
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS, relearn=True)
    run.report("401 revoked webhook", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    # Once the profile is known to fail, each cycle asks once: nothing is retried.
    assert set(run.watch.per_cycle(since=refused + 1, until=refused + 4)) == {1}
    assert value(down_text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert series(down_text, "bitrix24_tasks", user_id="2")  # kept until stale_after
    assert recovery <= POLL + SLACK
    await run.close()
    recorded = await run.portal.recorded()
    refusals = sum(1 for r in recorded if r["status"] == 401)
    assert refusals > 0 and by_code(run.stats)["401"] == refusals
    assert errors_named(run.stats, "INVALID_CREDENTIALS") == refusals


async def test_portal_disappears_and_comes_back(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Connection refused: retried within the bound, up 0; the same port again: fresh data."""
    async with await scenario(spec(seed=4)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.stop_listening()
        await run.until(lambda: run.metric("bitrix24_up") == 0, 10)
        down_text = run.watch.last_text
        await run.portal.listen_again()
        recovery = await run.recovery(time.time())
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS)
    run.report("portal gone (connection refused)", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert value(down_text, "bitrix24_collect_success", user_id="2", source="tasks") == 0
    assert series(down_text, "bitrix24_api_requests_total", code="connection")
    assert recovery <= POLL + SLACK + RETRY_SLACK
    # Refused connections never reach the portal: everything else did.
    await run.close()
    counted = by_code(run.stats)
    assert sum(counted.values()) - counted["connection"] == len(await run.portal.recorded())


async def test_all_faults_mixed(
    scenario: Any, leak_watch: LeakWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every fault at once and in turn: answers stay fast and true; fresh data after it ends."""
    mixed = {
        "http_500_rate": 0.10,
        "malformed_json_rate": 0.05,
        "html_502_rate": 0.05,
        "hang_rate": 0.02,
        "hang_seconds": 2.0,
        "reset_rate": 0.02,
    }
    async with await scenario(spec(seed=21)) as run:
        await run.cycles_pass(2)
        first = run.cycle
        await run.portal.faults(**mixed, query_limit_burst=4)
        await asyncio.sleep(1.0)
        await run.portal.stop_listening()
        await asyncio.sleep(1.0)
        await run.portal.listen_again()
        await run.portal.revoke(SECRET)
        await run.until(lambda: run.metric("bitrix24_up") == 0, 10)
        await run.portal.add_webhook(1, SECRET)
        await run.portal.faults(**mixed, operation_time_limit=True)
        await run.until(lambda: errors_named(run.stats, "OPERATION_TIME_LIMIT") > 0, 10)
        await run.portal.faults()
        recovery = await run.recovery(time.time(), timeout=15)
        await run.cycles_pass(1)
    seen = run.watch.per_cycle(since=first)
    bound = per_cycle_bound(USERS, relearn=True)
    run.report("all mixed", bound, seen, recovery)
    run.assert_sound(leak_watch, caplog)
    assert seen and max(seen) <= bound
    assert recovery <= OPERATING_WINDOW + 1.5 + POLL + SLACK + RETRY_SLACK
    await run.close()
    counted = by_code(run.stats)
    for code in ("500", "401", "connection"):
        assert counted.get(code, 0) > 0, code
    recorded = await run.portal.recorded()
    for status in (500, 502, 503, 401):
        assert counted.get(str(status), 0) == sum(1 for r in recorded if r["status"] == status)

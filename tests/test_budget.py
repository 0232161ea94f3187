"""The operating budget: pacing on what the portal counts, with windows of seconds.

The end-to-end tests scale Bitrix24's 480 s per 10 minutes down to 8 s per 10 s (the
exporter is told so by `operating_window`), so that cycles stretch within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.bitrix import BitrixClient, ClientStats, Command, WebhookCredential, new_session
from exporter.budget import OperatingBudget, load_warning
from exporter.fakeportal import FakePortal
from exporter.sources.tasks import METHOD as TASKS_METHOD
from exporter.throttle import PortalThrottle
from tests.support import (
    ROLES,
    SECRET,
    config_of,
    make_portal,
    metrics_text,
    portal_config,
    series,
    value,
    wait_for,
)

WINDOW = 10.0
LIMIT = 8.0
CHARGE = 0.01  # 60 users x 5 roles: 3 s a pass; every 1 s that asks for 30 s per 10 s
USERS = 60


# ---- the warning ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        pytest.param(
            {"cost": 0.1, "calls": 1500, "every": 60.0, "limit": 480.0, "window": 600.0},
            "tasks.task.counters.get is charged 0.100s of operating time per call: 1500 calls"
            " every 60s need 1500s per 10 minutes, the limit is 480s; cycles will be stretched"
            " to about 197s each to stay under it (bitrix24_poll_behind_seconds tells how late"
            " they start)",
            id="the issue's portal",
        ),
        pytest.param(
            {"cost": 0.01, "calls": 300, "every": 1.0, "limit": 8.0, "window": 10.0},
            "tasks.task.counters.get is charged 0.010s of operating time per call: 300 calls"
            " every 1s need 30s per 10s, the limit is 8s; cycles will be stretched to about 4s"
            " each to stay under it (bitrix24_poll_behind_seconds tells how late they start)",
            id="a window of seconds",
        ),
        pytest.param(
            {"cost": 0.02, "calls": 2000, "every": 120.0, "limit": 480.0, "window": 600.0},
            None,
            id="fits: 200 of 456 usable seconds",
        ),
        pytest.param(
            {"cost": 0.02, "calls": 2300, "every": 60.0, "limit": 480.0, "window": 600.0},
            "tasks.task.counters.get is charged 0.020s of operating time per call: 2300 calls"
            " every 60s need 460s per 10 minutes, the limit is 480s; cycles will be stretched"
            " to about 61s each to stay under it (bitrix24_poll_behind_seconds tells how late"
            " they start)",
            id="inside the limit but not its headroom",
        ),
    ],
)
def test_load_warning(load: dict[str, float], expected: str | None) -> None:
    """The warning names the cost, the calls, what they need and what the exporter will do."""
    assert load_warning(TASKS_METHOD, calls=int(load.pop("calls")), **load) == expected


# ---- the budget on its own, with a clock we move --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def blocks(first: float, calls: int, cost: float, *, reset_in: float, at: float) -> list[Any]:
    """`time` blocks of `calls` commands run one after another from a total of `first`."""
    return [
        {
            "start": at + i * 0.001,
            "duration": 0.002,
            "operating": first + (i + 1) * cost,
            "operating_reset_at": round(at + reset_in),
        }
        for i in range(calls)
    ]


def test_cost_is_the_growth_of_operating_not_the_duration() -> None:
    """Calls answered in 2 ms each but charged 0.1 s cost 0.1 s, and the first batch goes alone."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (50, 0.0)
    first = budget.reserve(TASKS_METHOD, 50)
    # Until the first answer tells the cost, nothing else of the method is sent.
    assert budget.calls_that_fit(TASKS_METHOD, 50)[0] == 0
    budget.record(TASKS_METHOD, blocks(0.0, 50, 0.1, reset_in=600, at=clock.now), first)
    budget.release(first)
    assert budget.cost_of(TASKS_METHOD) == pytest.approx(0.1)
    assert budget.operating(TASKS_METHOD) == pytest.approx(5.0)


def test_a_call_costs_at_most_the_total_after_it() -> None:
    """Before any growth is seen, the total after a lone call bounds what a call costs."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    budget.record("user.get", blocks(0.0, 1, 0.05, reset_in=600, at=clock.now))
    assert budget.cost_of("user.get") is None
    # 0.05 s a call at most: four requests of 50 fit, in flight together.
    flying = [budget.reserve("user.get", 50) for _ in range(3)]
    assert budget.calls_that_fit("user.get", 50) == (50, 0.0)
    for reservation in flying:
        budget.release(reservation)
    # Another integration's spending makes the bound useless: one call alone finds out.
    budget.record(TASKS_METHOD, blocks(400.0, 1, 0.05, reset_in=600, at=clock.now))
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (1, 0.0)
    budget.reserve(TASKS_METHOD, 1)
    assert budget.calls_that_fit(TASKS_METHOD, 50)[0] == 0


def test_near_the_limit_one_request_at_a_time_then_none_until_the_reset() -> None:
    """Room for in-flight and next, then one at a time, a partial batch, the reset, a probe."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    first = budget.reserve(TASKS_METHOD, 50)
    budget.record(TASKS_METHOD, blocks(400.0, 50, 0.1, reset_in=300, at=clock.now), first)
    budget.release(first)  # 405 s counted; 456 s usable: room for 510 calls
    flying = [budget.reserve(TASKS_METHOD, 50) for _ in range(10)]  # 50 s planned
    # 405 + 50 + 5 > 456: the next request waits for the ones in flight.
    assert budget.calls_that_fit(TASKS_METHOD, 50)[0] == 0
    for reservation in flying[1:]:
        budget.release(reservation)
    # 405 + 5 (in flight) + 5 fits.
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (50, 0.0)
    budget.record(TASKS_METHOD, blocks(449.95, 50, 0.1, reset_in=300, at=clock.now + 1), flying[0])
    budget.release(flying[0])  # 454.95 s counted: a batch of 10 fits under 456
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (10, 0.0)
    last = budget.reserve(TASKS_METHOD, 10)
    # Someone else spent 10 s meanwhile.
    budget.record(TASKS_METHOD, blocks(465.0, 10, 0.1, reset_in=300, at=clock.now + 2), last)
    budget.release(last)
    fit, wait = budget.calls_that_fit(TASKS_METHOD, 50)
    assert fit == 0 and 300 <= wait <= 302  # until the oldest bucket leaves (+ its rounding)
    clock.now += wait
    # The total dropped by an amount only the next answer tells: one request, sized so that
    # even if nothing had left it stays under the limit less half the headroom (468 s).
    fit, wait = budget.calls_that_fit(TASKS_METHOD, 50)
    assert 15 <= fit <= 20 and wait == 0


def test_growth_of_another_client_counts_as_spent() -> None:
    """Another integration's spending between our commands makes each call dearer, not free."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    first = budget.reserve(TASKS_METHOD, 50)
    answer = blocks(0.0, 50, 0.1, reset_in=600, at=clock.now)
    for i, block in enumerate(answer):
        block["operating"] += 0.05 * i  # someone else spends 0.05 s between two commands
    budget.record(TASKS_METHOD, answer, first)
    budget.release(first)
    assert budget.cost_of(TASKS_METHOD) == pytest.approx(0.15)
    # A lone request sent right after: the growth since that answer is its cost and anyone
    # else's. (After an idle minute it would be mostly others': no cost is learned from it.)
    alone = budget.reserve(TASKS_METHOD, 1)
    budget.record(TASKS_METHOD, blocks(7.6, 1, 0.1, reset_in=590, at=clock.now + 1), alone)
    assert budget.cost_of(TASKS_METHOD) == pytest.approx(0.25)
    budget.release(alone)
    clock.now += 60
    later = budget.reserve(TASKS_METHOD, 1)
    budget.record(TASKS_METHOD, blocks(30.0, 1, 0.1, reset_in=530, at=clock.now), later)
    assert budget.cost_of(TASKS_METHOD) == pytest.approx(0.25)
    assert budget.operating(TASKS_METHOD) == pytest.approx(30.1)


def test_reset_is_read_on_the_portals_clock() -> None:
    """A portal clock 100 s behind ours: its reset comes 100 s later on our clock."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    first = budget.reserve(TASKS_METHOD, 50)
    portal_now = clock.now - 100
    budget.record(TASKS_METHOD, blocks(450.0, 50, 0.1, reset_in=30, at=portal_now), first)
    budget.release(first)
    lone = budget.reserve(TASKS_METHOD, 1)
    budget.record(TASKS_METHOD, blocks(455.0, 1, 1.5, reset_in=30, at=portal_now + 1), lone)
    budget.release(lone)  # 456.5 s: full
    fit, wait = budget.calls_that_fit(TASKS_METHOD, 50)
    assert fit == 0 and wait == pytest.approx(31.0, abs=0.6)


def test_an_old_total_is_read_again_before_several_requests_rely_on_it() -> None:
    """After an idle minute one request goes alone: others may have spent meanwhile."""
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    first = budget.reserve(TASKS_METHOD, 50)
    budget.record(TASKS_METHOD, blocks(0.0, 50, 0.1, reset_in=600, at=clock.now), first)
    budget.release(first)
    budget.reserve(TASKS_METHOD, 50)
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (50, 0.0)  # read a moment ago
    clock.now += 60
    alone = budget.reserve(TASKS_METHOD, 50)
    assert budget.calls_that_fit(TASKS_METHOD, 50)[0] == 0
    budget.record(TASKS_METHOD, blocks(100.0, 50, 0.1, reset_in=540, at=clock.now), alone)
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (50, 0.0)


def test_load_warning_is_said_once_when_the_first_cost_is_known() -> None:
    """`expect` warns after the first answer that tells a cost, and only once."""
    said: list[str] = []
    clock = Clock()
    budget = OperatingBudget(480.0, clock=clock)
    budget.expect(TASKS_METHOD, calls=1500, every=60.0, warn=said.append)
    assert said == []
    for n in range(3):
        reservation = budget.reserve(TASKS_METHOD, 50)
        answer = blocks(n * 5.0, 50, 0.1, reset_in=600, at=clock.now)
        budget.record(TASKS_METHOD, answer, reservation)
        budget.release(reservation)
        budget.expect(TASKS_METHOD, calls=1500, every=60.0, warn=said.append)
    assert len(said) == 1 and "need 1500s per 10 minutes" in said[0]


def test_no_limiter_no_pacing() -> None:
    """Answers without `operating` (a self-hosted portal) leave every method unpaced."""
    budget = OperatingBudget(480.0)
    first = budget.reserve(TASKS_METHOD, 50)
    budget.record(TASKS_METHOD, [{"duration": 0.5, "start": 1.0}] * 50, first)
    budget.release(first)
    flying = [budget.reserve(TASKS_METHOD, 50) for _ in range(4)]
    assert budget.calls_that_fit(TASKS_METHOD, 50) == (50, 0.0)
    for reservation in flying:
        budget.release(reservation)


# ---- end to end, windows of seconds ---------------------------------------------------------


class Warnings(logging.Handler):
    """The exporter's budget warnings, with how many task batches the portal had by then."""

    def __init__(self, portal: FakePortal) -> None:
        super().__init__(logging.WARNING)
        self.portal = portal
        self.said: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "of operating time per call" in message:
            sent = sum(1 for r in self.portal.requests if TASKS_METHOD in str(r.params))
            self.said.append((sent, message))


@pytest.fixture
def scaled_portal() -> Iterator[tuple[FakePortal, Warnings]]:
    """60 users whose task counters are charged 0.01 s each against 8 s per 10 s."""
    portal = make_portal(
        USERS,
        requests_per_second=None,
        operating_limit=LIMIT,
        operating_window=WINDOW,
        operating_charge=CHARGE,  # `duration` stays 0: only `operating` tells the cost
    )
    portal.faults.latency = 0.02  # answers take a while, so several batches are in flight
    warnings = Warnings(portal)
    logger = logging.getLogger("exporter")
    logger.addHandler(warnings)
    try:
        yield portal, warnings
    finally:
        logger.removeHandler(warnings)


def scaled_config(url: str) -> Any:
    return config_of(
        portal_config(
            url,
            portal={
                "tasks": {"users": "all", "roles": list(ROLES)},
                "rate_limit": {"requests_per_second": 1000, "burst": 1000},
                "operating_limit": f"{LIMIT:g}s",
                "operating_window": f"{WINDOW:g}s",
            },
        )
    )


async def stretched_without_429(portal: FakePortal, warnings: Warnings, client: Any) -> None:
    """Wait for a cycle that started late; then check nothing crossed the limit."""

    async def behind() -> bool:
        text = await metrics_text(client)
        return bool(series(text, "bitrix24_poll_behind_seconds")) and (
            # More than a poll interval late: at least one start was skipped to wait for
            # the oldest bucket to leave.
            value(text, "bitrix24_poll_behind_seconds") > 2.0
        )

    await wait_for(behind, timeout=40, step=0.2)
    text = await metrics_text(client)
    assert portal.count(status=429) == 0
    assert not series(text, "bitrix24_api_errors_total", error="OPERATION_TIME_LIMIT")
    assert portal.peak_operating(TASKS_METHOD) <= LIMIT
    # Said once, right after the first batch of task counters told what a call costs.
    assert len(warnings.said) == 1, warnings.said
    sent, message = warnings.said[0]
    assert sent == 1
    # (Another client's spending between the commands makes a call look a little dearer.)
    assert re.search(
        r"portal acme: tasks.task.counters.get is charged 0.01\ds of operating time per call:"
        r" 300 calls every 1s need 3\ds per 10s, the limit is 8s; cycles will be stretched to"
        r" about 4s each .*bitrix24_poll_behind_seconds",
        message,
    ), message


async def test_fixed_charge_independent_of_duration_draws_no_429(
    served: Any, exporter_app: Any, scaled_portal: tuple[FakePortal, Warnings]
) -> None:
    """Calls charged 0.01 s that report a duration of 0: paced on `operating`, zero 429s."""
    portal, warnings = scaled_portal
    client = await exporter_app(scaled_config(await served(portal)))
    await stretched_without_429(portal, warnings, client)


async def test_another_clients_spending_draws_no_429(
    served: Any, exporter_app: Any, scaled_portal: tuple[FakePortal, Warnings]
) -> None:
    """Another integration spends 1.5 s of the same webhook's 8 s: the exporter leaves it room."""
    portal, warnings = scaled_portal
    # A second per second from the first request on: between cycles too, so that a total
    # read a cycle ago has grown by the time the next cycle starts.
    portal.start_other_client(1.0, total=1.5)
    client = await exporter_app(scaled_config(await served(portal)))
    await stretched_without_429(portal, warnings, client)
    assert portal.other_client_spent == (pytest.approx(1.5), 0)


# ---- the client-side bucket ------------------------------------------------------------------


async def test_jittered_arrivals_never_tip_the_bucket(served: Any) -> None:
    """Requests that reach the portal late (hangs before it counts them): zero 503s."""
    portal = make_portal(2, requests_per_second=20.0, burst=10, seed=5)
    portal.faults.hang_rate = 0.3
    portal.faults.hang_seconds = 0.2
    url = await served(portal)
    stats = ClientStats()
    async with new_session() as session:
        client = BitrixClient(
            "acme",
            WebhookCredential(f"{url}/rest/1/{SECRET}/", SECRET),
            session,
            throttle=PortalThrottle(20.0, 10, stats),
            budget=OperatingBudget(480.0),
            stats=stats,
        )
        commands = [Command(f"c{i}", "user.current") for i in range(50 * 40)]
        outcome = await client.batch(commands)
    assert portal.count("batch") == 40
    assert portal.count(status=503) == 0
    assert all(not isinstance(result, Exception) for result in outcome.values())


async def test_full_burst_from_an_idle_bucket() -> None:
    """From an idle bucket `burst` requests leave at once; the next waits for the drain."""
    stats = ClientStats()
    throttle = PortalThrottle(1.0, 10, stats)
    tickets = [await throttle.acquire() for _ in range(10)]
    assert stats.rate_limit_wait == 0
    waiting = asyncio.create_task(throttle.acquire())
    for ticket in tickets:
        throttle.answered(ticket)
    await asyncio.sleep(0)
    # Answered at once, yet counted: ten requests take a second to drain one.
    assert not waiting.done()
    assert throttle.level(asyncio.get_running_loop().time()) + 1 > throttle.burst
    waiting.cancel()


# ---- the fake portal's switches ---------------------------------------------------------------


async def post_batch(client: Any, cmd: dict[str, str]) -> dict[str, Any]:
    response = await client.post(f"/rest/1/{SECRET}/batch", json={"cmd": cmd})
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_fake_charge_is_independent_of_duration(aiohttp_client: Any) -> None:
    """`operating_charge` grows `operating` by a fixed cost while `duration` shows none."""
    portal = make_portal(2, operating_charge=0.1)
    client = await aiohttp_client(portal.app)
    cmd = {f"t{i}": f"{TASKS_METHOD}?userId=2&type=view_all" for i in range(3)}
    times = (await post_batch(client, cmd))["result"]["result_time"]
    assert [times[f"t{i}"]["operating"] for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert [times[f"t{i}"]["duration"] for i in range(3)] == [0, 0, 0]
    assert portal.peak_operating(TASKS_METHOD) == pytest.approx(0.3)


async def test_fake_other_client_spends_the_same_budget(aiohttp_client: Any) -> None:
    """Another integration's spending shows in the webhook's `operating`, up to its total."""
    portal = make_portal(2, operating_limit=8.0, operating_window=10.0)
    portal.start_other_client(100.0, total=5.0)
    client = await aiohttp_client(portal.app)
    cmd = {"t": f"{TASKS_METHOD}?userId=2&type=view_all"}
    await post_batch(client, cmd)  # it starts with the first request

    async def spent() -> bool:
        await post_batch(client, cmd)
        return portal.other_client_spent[0] >= 5.0

    await wait_for(spent)
    times = (await post_batch(client, cmd))["result"]["result_time"]
    assert times["t"]["operating"] == pytest.approx(5.0)
    assert portal.other_client_spent == (pytest.approx(5.0), 0)
    # Like any client it is refused while the budget is over the limit.
    portal.start_other_client(100.0, total=10.0)
    await post_batch(client, cmd)

    async def refused() -> bool:
        await post_batch(client, cmd)
        return portal.other_client_spent[1] > 0

    await wait_for(refused)
    assert portal.peak_operating(TASKS_METHOD) <= 8.0 + 100.0 * WINDOW / 100


async def test_query_limit_exceeded_marks_the_bucket_full() -> None:
    """After a 503 someone else filled the bucket: it counts as full and drains from there."""
    stats = ClientStats()
    throttle = PortalThrottle(2.0, 50, stats)
    throttle.answered(await throttle.acquire())
    loop = asyncio.get_running_loop()
    assert throttle.level(loop.time()) <= 1
    throttle.pause(0.0)
    now = loop.time()
    assert throttle.level(now) == pytest.approx(50, abs=0.01)
    assert throttle.level(now + 5) == pytest.approx(40, abs=0.01)

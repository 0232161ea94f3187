"""The poller's parts on their own: the fetch store's staleness rules, the once-log, and
what a reload hands over (a warning said once stays said)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter.fetchstore import FetchStore
from exporter.mapping import Sample
from exporter.metrics import IM_UNREAD, TASKS
from exporter.oncelog import OnceLog
from tests.support import make_portal, portal_config, wait_for

STALE_AFTER = 30.0


def sample(value: float) -> Sample:
    return Sample(TASKS, ("acme", "1", "0", "view_all", "expired", "6291456"), value)


def test_a_failed_fetch_keeps_its_last_good_samples_until_stale_after() -> None:
    """Failures within stale_after keep the last good values; past it, the series go."""
    store = FetchStore()
    store.succeed("t1", [sample(3)], now=100.0)
    store.fail("t1", now=100.0 + STALE_AFTER, stale_after=STALE_AFTER)
    assert list(store.samples()) == [sample(3)]
    store.fail("t1", now=100.0 + STALE_AFTER + 0.001, stale_after=STALE_AFTER)
    assert list(store.samples()) == []
    store.succeed("t1", [sample(4)], now=200.0)
    assert list(store.samples()) == [sample(4)]


def test_a_fetch_that_never_succeeded_has_no_samples() -> None:
    store = FetchStore()
    store.fail("t1", now=100.0, stale_after=STALE_AFTER)
    assert list(store.samples()) == []
    assert "t1" in store.slots


def test_a_cycle_without_any_answer_fails_every_watched_owner() -> None:
    """fail_all: every fetch ages, and every (user, source) of the last cycle failed."""
    store = FetchStore()
    store.succeed("t1", [sample(3)], now=100.0)
    store.finish({(1, "tasks"): True, (1, "im"): False}, now=100.0)
    fresh = store.fail_all(now=100.0 + STALE_AFTER + 1, stale_after=STALE_AFTER)
    assert fresh == {(1, "tasks"): False, (1, "im"): False}
    assert list(store.samples()) == []
    statuses = store.statuses(fresh, up=False)
    assert [(s.user_id, s.source, s.success, s.last_success) for s in statuses] == [
        (1, "im", False, None),
        (1, "tasks", False, 100.0),
    ]


def test_unchanged_values_keep_last_cycles_objects() -> None:
    """Equal lines are not replaced, and their family's block stays the same object (the
    renderer reuses what it joined and compressed); a changed value gives a new block."""
    store = FetchStore()
    store.succeed("t1", [sample(3)], now=1.0)
    store.succeed("t2", [Sample(IM_UNREAD, ("acme", "1", "chat"), 1.0)], now=1.0)
    tasks, im = store.samples().block(TASKS), store.samples().block(IM_UNREAD)
    store.succeed("t1", [sample(3)], now=2.0)
    assert store.last_fetch("t1") == 2.0
    assert store.samples().block(TASKS) is tasks
    store.succeed("t1", [sample(4)], now=3.0)
    assert store.samples().block(TASKS) is not tasks
    assert store.samples().block(IM_UNREAD) is im
    assert list(store.samples()) == [sample(4), Sample(IM_UNREAD, ("acme", "1", "chat"), 1.0)]


def test_a_portal_that_is_down_reports_no_success() -> None:
    store = FetchStore()
    store.finish({(1, "tasks"): True}, now=5.0)
    (status,) = store.statuses({(1, "tasks"): True}, up=False)
    assert (status.success, status.last_success) == (False, 5.0)


def test_keep_only_forgets_users_that_left() -> None:
    store = FetchStore()
    store.succeed("t1", [sample(1)], now=1.0)
    store.succeed("t2", [sample(2)], now=1.0)
    store.finish({(1, "tasks"): True, (2, "tasks"): True}, now=1.0)
    store.keep_only({"t1"}, {(1, "tasks")})
    assert list(store.slots) == ["t1"]
    assert list(store.last_success) == [(1, "tasks")]


def test_once_log_says_a_problem_once_until_it_changes_or_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.oncelog")
    once = OnceLog(logger)
    with caplog.at_level(logging.INFO, logger="tests.oncelog"):
        once.say("k", "broken: 1", signature="E1")
        once.say("k", "broken: 2", signature="E1")  # same kind of failure: not again
        once.say("k", "other", signature="E2")  # a new kind: said
        once.resolve("k", "works again")
        once.resolve("k", "works again")  # nothing was said since: silent
        once.say("k", "broken: 3", signature="E1")  # after a resolve: said again
    assert [r.getMessage() for r in caplog.records] == [
        "broken: 1",
        "other",
        "works again",
        "broken: 3",
    ]


async def test_capacity_warning_is_not_repeated_by_reloads(
    served: Any, exporter_process: Any, tmp_path: Path
) -> None:
    """A reload that replaces the poller keeps its once-log: the load warning stays said."""
    portal = make_portal(2)
    url = await served(portal)
    # 1 request a cycle at 1 request per 2 s does not fit a 300 ms poll interval.
    slow = {"requests_per_second": 0.5, "burst": 50}
    raw = portal_config(url, poll_interval="300ms", portal={"rate_limit": slow})
    process = exporter_process(raw)
    await process.wait_ready()
    async with aiohttp.ClientSession() as session:
        for chats in (True, False, True, False):
            raw["portals"][0]["im"] = {"chats": chats}  # replaces the portal's poller
            (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
            async with session.post(process.url + "/-/reload") as response:
                assert response.status == 200, await response.text()

    replaced = "replaced: acme"

    async def all_reloaded() -> bool:
        return process.stderr().count(replaced) == 4

    await wait_for(all_reloaded)
    batches_before = portal.count("batch")

    async def two_more_cycles() -> bool:
        return portal.count("batch") >= batches_before + 2

    await wait_for(two_more_cycles)
    assert process.stderr().count("longer than poll_interval") == 1

"""The operating budget as the binding limit.

    .venv/bin/python bench/operating.py [--quick] [--minutes M] [--cost S] [--users N]

Bitrix24 lets each method run for 480 s per 10 minutes (`operating_limit`). Here a fake
portal with the standard rate limit (in another process) charges every
`tasks.task.counters.get` call `--cost` seconds (default 0.02): 2,000 users x 5 roles make
10,001 calls a pass, 200 s of operating time, so at `poll_interval: 60s` the load asks for
2,000 s per 10 minutes, four times the limit (and more than the rate limit alone would let
through). The real app (`build_app` on an `AppRunner`, in this process) runs for
`--minutes` (default 15); every so often this prints how many cycles finished, the last
cycle's duration, `bitrix24_poll_behind_seconds`, the operating time the portal reports and
the 429s so far.

`--quick` scales it down tenfold: a 60 s operating window with a 48 s limit, poll_interval 6s,
500 users, 3 minutes.

Goals: zero 429 `OPERATION_TIME_LIMIT` (neither HTTP 429 nor inside a batch), cycles
stretched instead (poll_behind_seconds > 0), and the warning that the load does not fit
(`PortalPoller._check_budget`), which can only come once the first cycle has measured the
cost of a call, i.e. when the first cycle ends.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import aiohttp
from _common import (
    FakeFleet,
    FakeSpec,
    config_of,
    free_port,
    metric_values,
    parsed,
    portal_entry,
    print_machine,
    table,
    verdict,
)
from aiohttp import web

from exporter.server import SUPERVISOR, build_app
from exporter.sources.tasks import METHOD as TASKS_METHOD


class Captured(logging.Handler):
    """Warnings of the exporter, with the time since start they were logged at."""

    def __init__(self, started: float) -> None:
        super().__init__(logging.WARNING)
        self.started = started
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic() - self.started, record.getMessage()))


async def run(args: argparse.Namespace) -> None:
    window = 60.0 if args.quick else 600.0
    limit = 480.0 * window / 600.0
    interval = 6.0 if args.quick else 60.0
    users = args.users or (500 if args.quick else 2000)
    minutes = args.minutes or (3.0 if args.quick else 15.0)
    step = 10.0 if args.quick else 60.0
    calls = users * 5 + 1
    print(
        f"load: {users} users x 5 roles = {calls:,} calls a pass x {args.cost}s ="
        f" {calls * args.cost:,.0f}s of operating time a pass; every {interval:g}s that asks for"
        f" {calls * args.cost * window / interval:,.0f}s per {window:g}s window; the limit is"
        f" {limit:g}s; rate limit standard; running {minutes:g} min\n"
    )
    spec = FakeSpec(
        users,
        requests_per_second=2.0,
        burst=50,
        operating_limit=limit,
        operating_window=window,
        operating_cost=args.cost,
    )
    async with FakeFleet([spec]) as fleet:
        entry = portal_entry("bench", fleet.urls[0], operating_limit=limit)
        config = parsed(config_of([entry], poll_interval=f"{interval:g}s"))
        started = time.monotonic()
        captured = Captured(started)
        logging.getLogger("exporter").addHandler(captured)
        logging.getLogger("exporter").setLevel(logging.INFO)
        app = build_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        rows: list[list[object]] = []
        max_behind = 0.0
        try:
            async with aiohttp.ClientSession() as client:
                while (elapsed := time.monotonic() - started) < minutes * 60:
                    await asyncio.sleep(min(step, minutes * 60 - elapsed))
                    async with client.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                    row = timeline_row(app, text, await fleet.stats(), time.monotonic() - started)
                    max_behind = max(max_behind, float(row[3] or 0))
                    rows.append(row)
                    print(table(HEADERS, [row]).splitlines()[-1], flush=True)
        finally:
            await runner.cleanup()
            logging.getLogger("exporter").removeHandler(captured)
        stats = await fleet.stats()
    print()
    print(table(HEADERS, rows))
    final = rows[-1]
    http_429, in_batch = int(final[5]), int(final[6])
    warnings = [(t, m) for t, m in captured.records if "operating budget" in m]
    print()
    print(f"HTTP 429: {http_429}; OPERATION_TIME_LIMIT inside batches: {in_batch}")
    print(f"503 QUERY_LIMIT_EXCEEDED: {stats['status'].get('503', 0)}")
    print(f"cycles finished: {final[1]}; highest bitrix24_poll_behind_seconds seen: {max_behind}")
    if warnings:
        at, message = warnings[0]
        print(f"start-up warning after {at:.1f}s (end of the first cycle): {message}")
    else:
        print("start-up warning: NOT logged")
    print(
        "goals: zero 429s "
        + verdict(http_429 == 0 and in_batch == 0)
        + "; cycles stretched, behind exported "
        + verdict(max_behind > 0)
        + "; warned that the load does not fit "
        + verdict(bool(warnings))
    )


HEADERS = [
    "t s",
    "cycles",
    "last cycle s",
    "poll_behind s",
    "operating s (portal)",
    "HTTP 429",
    "429 in batch",
    "requests",
]


def timeline_row(app: web.Application, text: str, stats: dict[str, Any], at: float) -> list[object]:
    poller = app[SUPERVISOR].pollers["bench"]
    duration = metric_values(text, "bitrix24_poll_duration_seconds")
    behind = metric_values(text, "bitrix24_poll_behind_seconds")
    operating = metric_values(text, "bitrix24_api_operating_seconds", method=TASKS_METHOD)
    in_batch = metric_values(
        text, "bitrix24_api_errors_total", method=TASKS_METHOD, error="OPERATION_TIME_LIMIT"
    )
    return [
        f"{at:.0f}",
        poller.cycles,
        f"{duration[0]:.1f}" if duration else "",
        f"{behind[0]:.1f}" if behind else "",
        f"{operating[0]:.1f}" if operating else "",
        stats["status"].get("429", 0),
        int(sum(in_batch)),
        stats["requests"],
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 s window, 500 users, 3 min")
    parser.add_argument("--minutes", type=float, help="how long to run (default 15, quick 3)")
    parser.add_argument("--cost", type=float, default=0.02, help="seconds per call (0.02)")
    parser.add_argument("--users", type=int, help="users (default 2000, quick 500)")
    args = parser.parse_args()
    print_machine()
    await run(args)


if __name__ == "__main__":
    asyncio.run(main())

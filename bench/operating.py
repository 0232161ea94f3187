"""The operating budget as the binding limit, paced on what the portal counts.

    .venv/bin/python bench/operating.py [--quick] [--case fixed|other|both] [--minutes M]

Bitrix24 lets each method of a webhook run for 480 s per 10 minutes (`operating_limit`). A
fake portal with the standard rate limit (in another process) has 300 users x 5 roles
(`users: all`, `poll_interval: 60s`) and charges every `tasks.task.counters.get` 0.1 s of
operating time while its `duration` says 3 ms: 1,500 calls a pass, 150 s a pass, 1,500 s per
10 minutes asked against 480 s. Two cases, each `--minutes` long (default 12, so that the
first minute's bucket leaves, the stretched cycle ends and the next one, which started late,
ends too):

- `fixed`: the charge alone;
- `other`: another integration on the same webhook also spends 100 s of that budget, one
  second per second from the exporter's first request on.

The real app (`build_app` on an `AppRunner`, in this process) polls; every 30 s this prints
cycles, the last cycle's duration, `bitrix24_poll_behind_seconds`, the portal's total as the
exporter last read it and the highest the portal counted, and 429s. Then per case: 429s
(HTTP and inside batches), passes completed with every counter fresh, peak operating, and
when the warning that the load does not fit was logged.

`--quick` scales time down tenfold: a 60 s window with a 48 s limit, `poll_interval: 6s`,
30 users (150 calls of 0.1 s a pass), another client spending 10 s, 2 minutes a case.

Goals: zero 429 `OPERATION_TIME_LIMIT` (HTTP or inside a batch), the peak under the limit,
at least 2 full passes in 7 minutes, cycles stretched (one longer than `poll_interval`, and
the next one's lateness in `bitrix24_poll_behind_seconds`), and the warning logged once,
right after the first batch whose cost is known.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
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

from exporter.server import PUBLISHER, SUPERVISOR, build_app
from exporter.sources.tasks import METHOD as TASKS_METHOD

CHARGE = 0.1  # operating seconds per call
DURATION = 0.003  # what each call's `duration` says


@dataclass(frozen=True)
class Scale:
    window: float
    limit: float
    interval: float
    users: int
    other: float  # seconds the other client spends
    minutes: float
    step: float  # seconds between timeline rows


FULL = Scale(600.0, 480.0, 60.0, 300, 100.0, 12.0, 30.0)
QUICK = Scale(60.0, 48.0, 6.0, 30, 10.0, 2.0, 10.0)


class Captured(logging.Handler):
    """Warnings of the exporter, with the time since start they were logged at."""

    def __init__(self, started: float) -> None:
        super().__init__(logging.WARNING)
        self.started = started
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic() - self.started, record.getMessage()))


HEADERS = [
    "t s",
    "cycles",
    "last cycle s",
    "poll_behind s",
    "operating s (exporter)",
    "peak operating s (portal)",
    "other client s",
    "HTTP 429",
    "429 in batch",
    "requests",
]


async def run_case(case: str, scale: Scale, minutes: float) -> dict[str, Any]:
    other = scale.other if case == "other" else 0.0
    calls = scale.users * 5
    print(
        f"case {case}: {scale.users} users x 5 roles = {calls:,} calls a pass x {CHARGE}s"
        f" charged (duration {DURATION * 1000:g} ms) = {calls * CHARGE:,.0f}s a pass; every"
        f" {scale.interval:g}s that asks for {calls * CHARGE * scale.window / scale.interval:,.0f}s"
        f" per {scale.window:g}s window against {scale.limit:g}s"
        + (f"; another client spends {other:g}s of the same budget" if other else "")
        + f"; rate limit standard; {minutes:g} min"
    )
    spec = FakeSpec(
        scale.users,
        requests_per_second=2.0,
        burst=50,
        operating_limit=scale.limit,
        operating_window=scale.window,
        operating_cost=DURATION,
        operating_charge=CHARGE,
        # Spent within the first sixth of the window (100 s of 10 minutes at full scale).
        other_client_rate=other * 6 / scale.window if other else 0.0,
        other_client_total=other,
    )
    async with FakeFleet([spec]) as fleet:
        entry = portal_entry("bench", fleet.urls[0], operating_limit=scale.limit)
        entry["operating_window"] = scale.window
        config = parsed(config_of([entry], poll_interval=f"{scale.interval:g}s"))
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
        max_behind = longest = 0.0
        try:
            async with aiohttp.ClientSession() as client:
                while (elapsed := time.monotonic() - started) < minutes * 60:
                    await asyncio.sleep(min(scale.step, minutes * 60 - elapsed))
                    async with client.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                    row = timeline_row(app, text, await fleet.stats(), time.monotonic() - started)
                    max_behind = max(max_behind, float(row[3] or 0))
                    longest = max(longest, float(row[2] or 0))
                    rows.append(row)
                    print(table(HEADERS, [row]).splitlines()[-1], flush=True)
            fresh = fresh_passes(app)
        finally:
            await runner.cleanup()
            logging.getLogger("exporter").removeHandler(captured)
        stats = await fleet.stats()
    print()
    print(table(HEADERS, rows))
    final = rows[-1]
    warnings = [(t, m) for t, m in captured.records if "of operating time per call" in m]
    refused = [(t, m) for t, m in captured.records if "OPERATION_TIME_LIMIT" in m]
    result = {
        "case": case,
        "http_429": int(final[7]),
        "in_batch": int(final[8]),
        "status_503": stats["status"].get("503", 0),
        "cycles": final[1],
        "fresh": fresh,
        "peak": stats["peak_operating"],
        "limit": scale.limit,
        "behind": max_behind,
        "longest": longest,
        "interval": scale.interval,
        "warnings": warnings,
        "other": stats["other_client"],
        "refused_logged": len(refused),
    }
    report(result)
    return result


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
        f"{stats['peak_operating']:.1f}",
        f"{stats['other_client'][0]:.0f}",
        stats["status"].get("429", 0),
        int(sum(in_batch)),
        stats["requests"],
    ]


def fresh_passes(app: web.Application) -> str:
    """Cycles finished, and whether the last one brought every user's task counters."""
    snapshot = app[PUBLISHER].snapshots.get("bench")
    if snapshot is None:
        return "none"
    tasks = [s for s in snapshot.statuses if s.source == "tasks"]
    ok = sum(1 for s in tasks if s.success)
    return f"{ok}/{len(tasks)} users fresh after the last"


def report(result: dict[str, Any]) -> None:
    http_429, in_batch = result["http_429"], result["in_batch"]
    print()
    print(f"case {result['case']}:")
    print(f"  HTTP 429: {http_429}; OPERATION_TIME_LIMIT inside batches: {in_batch}")
    print(f"  503 QUERY_LIMIT_EXCEEDED: {result['status_503']}")
    print(f"  passes completed: {result['cycles']} ({result['fresh']})")
    print(f"  peak operating (portal): {result['peak']:.1f}s of {result['limit']:g}s")
    print(f"  longest cycle: {result['longest']:.1f}s (poll_interval {result['interval']:g}s)")
    print(f"  highest bitrix24_poll_behind_seconds seen: {result['behind']:.1f}")
    if result["other"][0]:
        print(
            f"  the other client spent {result['other'][0]:.0f}s"
            f" ({result['other'][1]} of its calls refused)"
        )
    warnings = result["warnings"]
    for at, message in warnings:
        print(f"  warning after {at:.1f}s: {message}")
    if not warnings:
        print("  warning: NOT logged")
    print(
        "  goals: zero 429s "
        + verdict(http_429 == 0 and in_batch == 0)
        + "; peak under the limit "
        + verdict(result["peak"] <= result["limit"])
        + "; 2 full passes "
        + verdict(result["cycles"] >= 2)
        + "; cycles stretched "
        # A cycle that started late proves the one before it overran, if no sample caught it.
        + verdict(result["longest"] > result["interval"] or result["behind"] > 0)
        + ", behind exported "
        + verdict(result["behind"] > 0)
        + "; warned once "
        + verdict(len(warnings) == 1)
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time scaled down tenfold")
    parser.add_argument("--case", choices=["fixed", "other", "both"], default="both")
    parser.add_argument("--minutes", type=float, help="per case (default 12, quick 2)")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    print_machine()
    cases = ["fixed", "other"] if args.case == "both" else [args.case]
    for case in cases:
        await run_case(case, scale, args.minutes or scale.minutes)
        print()


if __name__ == "__main__":
    asyncio.run(main())

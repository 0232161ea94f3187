"""Garbage collection, CPU and live memory of one big portal, cycle by cycle.

    .venv/bin/python bench/heap.py [--quick] [--users N] [--cycles N] [--trace]

One fake portal without a rate limit (in another process) has `--users` users (default
5,556, about 100,000 series; `--quick`: 1,000), each watched in 5 roles. The exporter runs in
a child process (`bench/_exporter_child.py`) and polls it back to back (`poll_interval: 1s`),
so that a cycle or a render always runs. After the first cycle this script watches
`--cycles` more (default 4) and reports figures the child measures itself, which other work
on the machine disturbs less than the wall-clock latency of a scrape (`serving.py`):

- CPU seconds per cycle of the whole process (requests, mapping, rendering, gzip);
- the full garbage collections in those cycles and the longest of them (while one runs, no
  scrape is answered), and the longest young collection;
- the objects the collector tracks at the end, and how many of them are frozen;
- the RSS per series.

`--drift N` has the fake portal give N (user, role) counter sets new values every second
(without it, no value ever changes between cycles).

With `--trace` the child runs under tracemalloc (several times slower) from just before
polling starts, and the live Python bytes per exported series are shown by the source file
that allocated them, the exporter's files one by one and the rest grouped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from _common import (
    NO_LIMIT,
    ExporterChild,
    FakeFleet,
    FakeSpec,
    config_of,
    count_series,
    cpu_seconds,
    portal_entry,
    print_machine,
    proc_status,
    table,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def where(filename: str) -> str:
    """An exporter file by its path in the repository; anything else by its package."""
    if filename.startswith(os.path.join(ROOT, "exporter")):
        return os.path.relpath(filename, ROOT)
    if "/json/" in filename:
        return "json (decoded responses)"
    for package in ("aiohttp", "asyncio", "multidict", "yarl", "prometheus_client", "gzip"):
        if f"/{package}/" in filename or filename.endswith(f"/{package}.py"):
            return package
    return "other"


async def measure(users: int, cycles: int, trace: bool, drift: float) -> dict[str, Any]:
    async with FakeFleet([FakeSpec(users, drift=drift)], cpus={1}, nice=19) as fleet:
        entry = portal_entry("bench", fleet.urls[0], rate_limit=NO_LIMIT)
        raw = config_of([entry], poll_interval="1s")
        env = {"BENCH_TRACEMALLOC": "1"} if trace else {}
        async with ExporterChild(raw, cpus={0}, env=env) as exporter:
            await exporter.wait_ready(limit=1800)
            first = await exporter.wait_cycles(1, limit=1800)
            done = first["cycles"]["bench"]
            cpu_start = cpu_seconds(exporter.pid)
            rss: list[int] = []
            while True:
                state = await exporter.state()
                rss.append(proc_status(exporter.pid)["VmRSS"])
                if state["cycles"]["bench"] >= done + cycles and state["rendered"]:
                    break
                await asyncio.sleep(0.25)
            cpu = cpu_seconds(exporter.pid) - cpu_start
            async with exporter._session.get(exporter.url + "/_bench/state?objects=1") as r:
                last = await r.json()
            series = count_series(await exporter.metrics_text())
            traced: dict[str, Any] | None = None
            if trace:
                async with exporter._session.get(exporter.url + "/_bench/trace") as r:
                    traced = await r.json()
    full = [seconds for end, seconds in state["gc_full"] if end > first["monotonic"]]
    return {
        "users": users,
        "series": series,
        "cycles": state["cycles"]["bench"] - done,
        "cpu_per_cycle": cpu / (state["cycles"]["bench"] - done),
        "cycle_s": state["durations"]["bench"],
        "full": full,
        "young_max": state["gc_young_max"],
        "tracked": last["gc_tracked"],
        "frozen": last["gc_frozen"],
        "rss": max(rss) * 1024,
        "baseline": exporter.baseline_rss_kib * 1024,
        "traced": traced,
    }


def report(r: dict[str, Any]) -> None:
    mib = 1024 * 1024
    full = r["full"]
    print(
        table(
            [
                "users",
                "series",
                "cycles",
                "last cycle s",
                "CPU s per cycle",
                "full GCs",
                "longest full GC ms",
                "longest young GC ms",
                "tracked objects (frozen)",
                "steady RSS MiB",
                "B/series all told",
            ],
            [
                [
                    f"{r['users']:,}",
                    f"{r['series']:,}",
                    r["cycles"],
                    f"{r['cycle_s']:.2f}",
                    f"{r['cpu_per_cycle']:.2f}",
                    len(full),
                    f"{max(full, default=0.0) * 1000:.1f}",
                    f"{r['young_max'] * 1000:.1f}",
                    f"{r['tracked']:,} ({r['frozen']:,})",
                    f"{r['rss'] / mib:.1f}",
                    f"{r['rss'] / r['series']:,.0f}",
                ]
            ],
        )
    )
    if r["traced"] is None:
        return
    groups: dict[str, list[int]] = {}
    for filename, size, count in r["traced"]["files"]:
        entry = groups.setdefault(where(filename), [0, 0])
        entry[0] += size
        entry[1] += count
    current, peak = r["traced"]["traced"]
    rows = [
        [name, f"{size / r['series']:,.1f}", f"{count / r['series']:,.2f}"]
        for name, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])
        if size / r["series"] >= 0.5
    ]
    rows.append(["all traced, now", f"{current / r['series']:,.1f}", ""])
    rows.append(["all traced, peak", f"{peak / r['series']:,.1f}", ""])
    print()
    print("live Python memory traced from before the first cycle, by allocating file:\n")
    print(table(["allocated in", "B/series", "blocks/series"], rows))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 users")
    parser.add_argument("--users", type=int, help="users (default 5556: ~100,000 series)")
    parser.add_argument("--cycles", type=int, default=4, help="cycles watched (default 4)")
    parser.add_argument("--trace", action="store_true", help="break live memory down")
    parser.add_argument(
        "--drift", type=float, default=0.0, help="(user, role) counter sets changed per second"
    )
    args = parser.parse_args()
    users = args.users or (1000 if args.quick else 5556)
    print_machine()
    print(
        f"{users:,} users x 5 roles, polled back to back; exporter on CPU 0, fake portal on"
        f" CPU 1 at nice 19; {args.drift:g} counter sets changed per second\n"
    )
    report(await measure(users, args.cycles, args.trace, args.drift))


if __name__ == "__main__":
    asyncio.run(main())

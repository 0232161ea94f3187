"""Many portals in one process.

    .venv/bin/python bench/many_portals.py [--quick] [--portals N] [--users N] [--rounds N]

200 portals (`--quick`: 50) of 20 users each, every user watched in 5 roles, all in one
exporter process (`bench/_exporter_child.py`: `build_app` on an `AppRunner`). Each portal
is its own fake portal on its own port with its own standard rate limit (2/s, burst 50),
as separate Bitrix24 portals are; the fakes run in another process. Every portal polls every
30 s (`--quick`: 10 s), all starting together.

Reports the time from start to /readyz 200 (every portal's first cycle done and rendered),
the per-portal cycle duration and lateness (`bitrix24_poll_behind_seconds`) after
`--rounds` more rounds, RSS before polling, steady (highest of samples every 0.5 s) and peak,
CPU seconds per round (split into the event loop's thread and the worker threads that
render), the bodies assembled and the publisher's coalescing windows per round, requests
and 503s.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import (
    ExporterChild,
    FakeFleet,
    FakeSpec,
    config_of,
    count_series,
    cpu_seconds,
    median,
    percentile,
    portal_entry,
    print_machine,
    proc_status,
    table,
)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 portals, 10 s interval")
    parser.add_argument("--portals", type=int, help="portals (default 200, quick 50)")
    parser.add_argument("--users", type=int, default=20, help="users per portal (20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after the first (3)")
    args = parser.parse_args()
    count = args.portals or (50 if args.quick else 200)
    interval = 10 if args.quick else 30
    print_machine()
    print(
        f"{count} portals x {args.users} users x 5 roles, each its own fake portal with the"
        f" standard limit; poll_interval {interval}s\n"
    )
    specs = [FakeSpec(args.users, requests_per_second=2.0, burst=50) for _ in range(count)]
    async with FakeFleet(specs) as fleet:
        entries = [portal_entry(f"p{i:03d}", url) for i, url in enumerate(fleet.urls)]
        raw = config_of(entries, poll_interval=f"{interval}s")
        async with ExporterChild(raw) as exporter:
            ready = await exporter.wait_ready()
            after_first = await exporter.wait_cycles(1)
            cpu_start = cpu_seconds(exporter.pid)
            threads_start = after_first["thread_cpu"]
            round_started = time.monotonic()
            samples: list[int] = []
            while True:
                state = await exporter.state()
                samples.append(proc_status(exporter.pid)["VmRSS"])
                if min(state["cycles"].values()) >= 1 + args.rounds and state["rendered"]:
                    break
                await asyncio.sleep(0.5)
            rounds_seconds = time.monotonic() - round_started
            cpu_per_round = (cpu_seconds(exporter.pid) - cpu_start) / args.rounds
            threads = {
                k: (v - threads_start[k]) / args.rounds for k, v in state["thread_cpu"].items()
            }
            assemblies = (state["assemblies"] - after_first["assemblies"]) / args.rounds
            windows = (state["windows"] - after_first["windows"]) / args.rounds
            series = count_series(await exporter.metrics_text())
            peak = proc_status(exporter.pid)["VmHWM"]
            baseline = exporter.baseline_rss_kib
        requests = status_503 = 0
        for index in range(count):
            stats = await fleet.stats(index)
            requests += stats["requests"]
            status_503 += stats["status"].get("503", 0)
    durations = [d for d in state["durations"].values() if d is not None]
    first = [d for d in after_first["durations"].values() if d is not None]
    behind = list(state["behind"].values())
    mib = 1024
    print(
        table(
            ["measure", "value"],
            [
                ["portals / series on /metrics", f"{count} / {series:,}"],
                ["start to /readyz 200 (every first cycle rendered)", f"{ready:.2f} s"],
                [
                    "first cycle per portal: median / p95 / max",
                    f"{median(first):.2f} / {percentile(first, 0.95):.2f} / {max(first):.2f} s",
                ],
                [
                    f"cycle per portal after {args.rounds} rounds: median / p95 / max",
                    f"{median(durations):.3f} / {percentile(durations, 0.95):.3f}"
                    f" / {max(durations):.3f} s",
                ],
                ["poll_behind_seconds: max over portals", f"{max(behind):.3f} s"],
                [f"{args.rounds} rounds took", f"{rounds_seconds:.1f} s"],
                [
                    "CPU per round (all portals): event loop / worker threads",
                    f"{cpu_per_round:.2f} s: {threads['main']:.2f} / {threads['others']:.2f}",
                ],
                [
                    "bodies assembled / coalescing windows per round",
                    f"{assemblies:.1f} / {windows:.1f}",
                ],
                [
                    "RSS before polling / steady / peak",
                    f"{baseline / mib:.1f} / {max(samples) / mib:.1f} / {peak / mib:.1f} MiB",
                ],
                [
                    "RSS per portal (steady - baseline)",
                    f"{(max(samples) - baseline) / count:.0f} KiB",
                ],
                [
                    "RSS per series: all told / marginal (compare memory.py at as many series)",
                    f"{max(samples) * 1024 / series:,.0f} / "
                    f"{(max(samples) - baseline) * 1024 / series:,.0f} B",
                ],
                ["requests / 503s (all portals)", f"{requests:,} / {status_503}"],
            ],
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

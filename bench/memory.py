"""Memory per exported series.

    .venv/bin/python bench/memory.py [--quick] [--sizes 1000,10000] [--cycles N]

For each size, a fresh exporter process (`bench/_exporter_child.py`: `build_app` on an
`AppRunner`) polls a fake portal without a rate limit (in another process) that has that
many users, all watched in 5 roles, every 5 s. The child reports its RSS before polling
starts (imports, config and app built: the baseline). After the first cycles this process
samples the child's RSS every 0.25 s over `--cycles` more cycles, scraping /metrics as
Prometheus does (OpenMetrics, gzip) and as plain text in between, and takes the highest
sample as the steady-state RSS; the peak (VmHWM) includes the first cycle.

Two numbers per series, both reported: all told (steady RSS / series) and marginal
((steady RSS - baseline) / series). Goal: under 1 KiB per exported series all told.

`--drift N` has the fake portal give N (user, role) counter sets new values every second
(by default no value changes between cycles).

Each size runs twice: with glibc malloc as it comes and with MALLOC_ARENA_MAX=2
MALLOC_MMAP_THRESHOLD_=131072 in the exporter's environment (see MALLOC below), to show how
much of the RSS is the allocator holding on to freed memory rather than live data.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
from _common import (
    NO_LIMIT,
    PRIVACY_MODES,
    PROMETHEUS_HEADERS,
    ExporterChild,
    FakeFleet,
    FakeSpec,
    config_of,
    count_series,
    portal_entry,
    print_machine,
    proc_status,
    table,
    verdict,
)

GOAL = 1024
# glibc malloc as it comes, and tuned: at most 2 arenas (the render thread otherwise gets
# arenas of its own) and a fixed mmap threshold (the dynamic one rises to the size of the
# biggest freed buffer, here the multi-MB exposition bodies, which then stay on the heap).
MALLOC = {
    "default": {},
    "tuned": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
}


async def measure(
    users: int, cycles: int, malloc: str, drift: float, privacy: str = "none"
) -> dict[str, Any]:
    async with FakeFleet([FakeSpec(users, drift=drift)]) as fleet:
        entry = portal_entry("bench", fleet.urls[0], rate_limit=NO_LIMIT, privacy=privacy)
        raw = config_of([entry], poll_interval="5s")
        async with ExporterChild(raw, env=MALLOC[malloc]) as exporter:
            await exporter.wait_ready()
            first = await exporter.wait_cycles(2)
            done = min(first["cycles"].values())
            samples: list[int] = []
            series = 0
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                while True:
                    state = await exporter.state()
                    if min(state["cycles"].values()) >= done + cycles and state["rendered"]:
                        break
                    async with session.get(
                        exporter.url + "/metrics", headers=PROMETHEUS_HEADERS
                    ) as response:
                        await response.read()
                    plain = {"Accept-Encoding": "identity"}
                    async with session.get(exporter.url + "/metrics", headers=plain) as response:
                        series = count_series((await response.read()).decode())
                    samples.append(proc_status(exporter.pid)["VmRSS"])
                    await asyncio.sleep(0.25)
            status = proc_status(exporter.pid)
            cycle = max(v for v in state["durations"].values() if v is not None)
            return {
                "malloc": malloc,
                "users": users,
                "series": series,
                "baseline": exporter.baseline_rss_kib * 1024,
                "steady": max(samples) * 1024,
                "peak": status["VmHWM"] * 1024,
                "cycle": cycle,
            }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 users only")
    parser.add_argument("--sizes", help="comma-separated user counts (default 1000,10000)")
    parser.add_argument("--cycles", type=int, default=3, help="cycles sampled (default 3)")
    parser.add_argument(
        "--drift", type=float, default=0.0, help="(user, role) counter sets changed per second"
    )
    parser.add_argument(
        "--malloc", choices=[*MALLOC, "both"], default="both", help="glibc malloc runs (both)"
    )
    parser.add_argument(
        "--privacy", choices=PRIVACY_MODES, default="none", help="the portal's privacy mode"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1000" if args.quick else "1000,10000")).split(",")]
    print_machine()
    print(
        "users x 5 roles, poll_interval 5s, fake portal without a limit in another process;"
        f" {args.drift:g} counter sets changed per second; privacy mode {args.privacy}\n"
    )
    runs = list(MALLOC) if args.malloc == "both" else [args.malloc]
    results = [
        await measure(u, args.cycles, m, args.drift, args.privacy) for u in sizes for m in runs
    ]
    mib = 1024 * 1024
    rows = []
    for r in results:
        all_told = r["steady"] / r["series"]
        marginal = (r["steady"] - r["baseline"]) / r["series"]
        rows.append(
            [
                f"{r['users']:,}",
                r["malloc"],
                f"{r['series']:,}",
                f"{r['cycle']:.1f}",
                f"{r['baseline'] / mib:.1f}",
                f"{r['steady'] / mib:.1f}",
                f"{r['peak'] / mib:.1f}",
                f"{all_told:,.0f}",
                f"{marginal:,.0f}",
                f"{(r['peak'] - r['baseline']) / r['series']:,.0f}",
                verdict(all_told < GOAL),
            ]
        )
    print(
        table(
            [
                "users",
                "glibc malloc",
                "series",
                "cycle s",
                "baseline MiB",
                "steady RSS MiB",
                "peak RSS MiB",
                "all told B/series",
                "marginal B/series",
                "marginal at peak B/series",
                "goal all told < 1 KiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

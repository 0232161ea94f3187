"""Serving /metrics: pre-rendered bytes against prometheus_client rendering per request.

    .venv/bin/python bench/serving.py [--quick] [--sizes 10000,100000] [--seconds S]

For each size (series on /metrics), a fake portal without a rate limit gets as many users
(x 5 roles, 18 series each) as make that many series, and the real exporter (`build_app` in a
child process) polls it once (poll_interval 1h). Its text exposition is then handed to a
peer: a tiny aiohttp app (another child) whose custom collector builds the same families
from the same samples on every collect and serves them with
`prometheus_client.aiohttp.make_aiohttp_handler`, i.e. `generate_latest` per request.

Both are scraped one request at a time from this process, as Prometheus 2.x asks (OpenMetrics
preferred, gzip) and as plain text without compression; median and p99 latency are the time
to read the whole (still compressed) body. Requests per second come from 8 concurrent aiohttp
clients for both (the ratio uses these), and for the exporter also from `wrk -t2 -c8` when
wrk is installed (the Python client tops out first; wrk reports 0 for the peer's slow
answers). Then a second exporter polls back to back (poll_interval 1s, so a cycle and a
render are always running) while this process scrapes it without pause until 5 cycles have
finished; the slowest of those scrapes is reported, with the load average before and after,
the slowest divided by the idle exporter's median for Prometheus' request in the same run
(steadier on a shared machine than the slowest alone), the full garbage collections the
exporter timed meanwhile, and the times its event loop was held for over 20 ms (how many,
the longest, how many took in the end of a cycle). `--drift N` has the fake portal give N
(user, role) counter sets new values every second (by default no value changes between
cycles). The servers are pinned to CPU 0, this process and the fake portal to the other
CPUs, the fake at the lowest priority so that a busy fake does not delay the client.

Goal: at least 100x faster than the peer at 100,000 series, and while a poll cycle runs no
scrape over 50 ms and a p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
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
    free_port,
    median,
    percentile,
    pin_from_env,
    portal_entry,
    print_machine,
    stop,
    table,
    verdict,
)

PROMETHEUS = PROMETHEUS_HEADERS
PLAIN = {"Accept": "text/plain", "Accept-Encoding": "identity"}
PROMETHEUS_PROFILE = "prometheus (OpenMetrics, gzip)"
PROFILES = {PROMETHEUS_PROFILE: PROMETHEUS, "plain text": PLAIN}
SERIES_PER_USER = 18  # 5 roles x 3 counters, user_info, collect_success, last_success
SLOW_SCRAPE = 0.050
P99_GOAL = 0.010
BUSY_CYCLES = 5  # scrape while at least this many cycles (and renders) finish
SPEEDUP_GOAL = 100.0


# ---- the peer: prometheus_client rendering per request ----------------------------------


def run_peer(path: str, port: int) -> None:
    """Child mode: serve the exposition in `path` through a collector and generate_latest."""
    pin_from_env()
    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.aiohttp import make_aiohttp_handler
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    stored = [
        (f.name, f.documentation, f.type, [(s.name, s.labels, s.value) for s in f.samples])
        for f in text_string_to_metric_families(Path(path).read_text())
    ]

    class SnapshotCollector:
        """What a collector over the poller's snapshot does: new families on every collect."""

        def collect(self) -> Iterator[Metric]:
            for name, documentation, kind, samples in stored:
                family = Metric(name, documentation, kind)
                for sample_name, labels, value in samples:
                    family.add_sample(sample_name, labels, value)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector())  # type: ignore[arg-type]
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Peer:
    def __init__(self, exposition: str) -> None:
        self.exposition = exposition
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Peer:
        self._file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-peer-{self.port}.txt"
        self._file.write_text(self.exposition)
        env = dict(os.environ, BENCH_CPUS="0")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--peer",
            str(self._file),
            str(self.port),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None
        await self._proc.stdout.readline()
        await asyncio.sleep(0.5)  # run_app binds after printing
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop(self._proc)
        self._file.unlink()


# ---- clients ---------------------------------------------------------------------------


async def scrape_loop(
    url: str, headers: dict[str, str], *, seconds: float, at_least: int, at_most: int
) -> dict[str, Any]:
    """Scrape one at a time for `seconds` (at least `at_least`, at most `at_most` requests)."""
    latencies: list[float] = []
    bodies: set[tuple[int, int]] = set()
    size = 0
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async with session.get(url, headers=headers) as response:  # warm up the connection
            await response.read()
        deadline = time.monotonic() + seconds
        while len(latencies) < at_most and (
            time.monotonic() < deadline or len(latencies) < at_least
        ):
            started = time.perf_counter()
            async with session.get(url, headers=headers) as response:
                body = await response.read()
            latencies.append(time.perf_counter() - started)
            size = len(body)
            bodies.add((len(body), zlib.crc32(body)))
    return {"latencies": latencies, "bytes": size, "bodies": len(bodies)}


def wrk_rps(url: str, headers: dict[str, str], seconds: float) -> float:
    args = ["wrk", "-t2", "-c8", f"-d{max(1, round(seconds))}s", "--timeout", "60s"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    import subprocess

    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not found:
        raise RuntimeError(f"cannot read wrk output: {out}")
    return float(found.group(1))


async def python_rps(url: str, headers: dict[str, str], seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(url, headers=headers) as response:
                await response.read()
            done += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await asyncio.gather(*(worker(session) for _ in range(8)))
    return done / (time.monotonic() - started)


async def wrk_or_none(url: str, headers: dict[str, str], seconds: float) -> float | None:
    """wrk's figure for a fast server (it reports 0 for one slower than its run)."""
    if not shutil.which("wrk"):
        return None
    return await asyncio.to_thread(wrk_rps, url, headers, seconds)


# ---- one size --------------------------------------------------------------------------


async def measure_size(
    target: int, seconds: float, drift: float, privacy: str = "none"
) -> dict[str, Any]:
    users = max(1, round(target / SERIES_PER_USER))
    result: dict[str, Any] = {"target": target, "users": users, "rows": []}
    async with FakeFleet([FakeSpec(users, drift=drift)], cpus={1}, nice=19) as fleet:
        entry = portal_entry("bench", fleet.urls[0], rate_limit=NO_LIMIT, privacy=privacy)
        idle = config_of([entry], poll_interval="1h")
        async with ExporterChild(idle, cpus={0}) as exporter:
            ready = await exporter.wait_ready()
            await exporter.wait_cycles(1)
            text = await exporter.metrics_text()
            result["series"] = count_series(text)
            result["ready"] = ready
            async with Peer(text) as peer:
                for profile, headers in PROFILES.items():
                    ours = await scrape_loop(
                        exporter.url + "/metrics",
                        headers,
                        seconds=seconds,
                        at_least=50,
                        at_most=5000,
                    )
                    theirs = await scrape_loop(
                        peer.url + "/metrics", headers, seconds=seconds, at_least=5, at_most=500
                    )
                    our_rps = await python_rps(exporter.url + "/metrics", headers, seconds)
                    our_wrk = await wrk_or_none(exporter.url + "/metrics", headers, seconds)
                    their_rps = await python_rps(peer.url + "/metrics", headers, 2 * seconds)
                    result["rows"].append((profile, ours, theirs, our_rps, their_rps, our_wrk))
        busy = config_of([entry], poll_interval="1s")
        async with ExporterChild(busy, cpus={0}, env={"BENCH_STALLS": "1"}) as exporter:
            await exporter.wait_ready()
            load_before = os.getloadavg()[0]
            start = await exporter.state()
            before = sum(start["cycles"].values())
            during: dict[str, Any] = {"latencies": [], "bodies": 0}
            cycles = 0
            while cycles < BUSY_CYCLES or len(during["latencies"]) < 100:
                part = await scrape_loop(
                    exporter.url + "/metrics",
                    PROMETHEUS,
                    seconds=seconds,
                    at_least=1,
                    at_most=1_000_000,
                )
                during["latencies"] += part["latencies"]
                during["bodies"] += part["bodies"]
                after = await exporter.state()
                cycles = sum(after["cycles"].values()) - before
            result["during"] = {
                **during,
                "cycles": cycles,
                "cycle_s": after["durations"],
                "load": (load_before, os.getloadavg()[0]),
                "gc_full": [s for end, s in after["gc_full"] if end > start["monotonic"]],
                "stalls": [x for x in after["stalls"] if x[0] > start["monotonic"]],
            }
    return result


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        for profile, ours, theirs, our_rps, their_rps, our_wrk in r["rows"]:
            ours_med, theirs_med = median(ours["latencies"]), median(theirs["latencies"])
            rows.append(
                [
                    f"{r['series']:,}",
                    profile,
                    f"{ours['bytes']:,}",
                    f"{ours_med * 1000:.2f}",
                    f"{percentile(ours['latencies'], 0.99) * 1000:.2f}",
                    f"{our_rps:,.0f}",
                    "n/a" if our_wrk is None else f"{our_wrk:,.0f}",
                    f"{theirs_med * 1000:.0f}",
                    f"{percentile(theirs['latencies'], 0.99) * 1000:.0f}",
                    f"{their_rps:,.1f}",
                    f"{theirs_med / ours_med:,.0f}x",
                    f"{our_rps / their_rps:,.0f}x",
                    f"{len(ours['latencies'])}/{len(theirs['latencies'])}",
                ]
            )
    print(
        table(
            [
                "series",
                "client",
                "body bytes",
                "exporter median ms",
                "exporter p99 ms",
                "exporter req/s (aiohttp x8)",
                "exporter req/s (wrk -t2 -c8)",
                "generate_latest median ms",
                "generate_latest p99 ms",
                "generate_latest req/s (aiohttp x8)",
                "median ratio",
                "req/s ratio",
                "scrapes",
            ],
            rows,
        )
    )
    print()
    rows = []
    for r in results:
        d = r["during"]
        lat = d["latencies"]
        cycle = max((v for v in d["cycle_s"].values() if v is not None), default=0.0)
        # The idle exporter's median for the same request (Prometheus'), from the same run.
        idle = median(next(o for p, o, *_ in r["rows"] if p == PROMETHEUS_PROFILE)["latencies"])
        gcs = d["gc_full"]
        stalls = d["stalls"]
        rows.append(
            [
                f"{r['series']:,}",
                len(lat),
                d["cycles"],
                d["bodies"],
                f"{cycle:.2f}",
                f"{median(lat) * 1000:.2f}",
                f"{percentile(lat, 0.99) * 1000:.2f}",
                f"{max(lat) * 1000:.1f}",
                f"{max(lat) / idle:,.0f}x",
                f"{len(gcs)} / {max(gcs, default=0.0) * 1000:.1f}",
                f"{len(stalls)} / {max((ms for _, ms, _ in stalls), default=0.0):.0f}"
                f" / {sum(1 for *_, what in stalls if 'cycle' in what)}",
                sum(1 for x in lat if x > SLOW_SCRAPE),
                " -> ".join(f"{x:.2f}" for x in d["load"]),
                verdict(max(lat) <= SLOW_SCRAPE),
                verdict(percentile(lat, 0.99) <= P99_GOAL),
            ]
        )
    print(
        table(
            [
                "series",
                "scrapes while polling",
                "cycles",
                "bodies seen",
                "last cycle s",
                "median ms",
                "p99 ms",
                "max ms",
                "max / idle median",
                "full GCs / longest ms",
                "loop stalls > 20 ms / longest ms / with a cycle's end",
                "scrapes > 50 ms",
                "load avg (1 min) before -> after",
                "goal max <= 50 ms",
                "goal p99 <= 10 ms",
            ],
            rows,
        )
    )
    biggest = max(results, key=lambda r: r["series"])
    if biggest["target"] >= 100_000:
        ratios = [
            median(t["latencies"]) / median(o["latencies"]) for _, o, t, *_ in biggest["rows"]
        ]
        print(
            f"\ngoal >= {SPEEDUP_GOAL:.0f}x at {biggest['series']:,} series (median latency,"
            f" every client): {verdict(min(ratios) >= SPEEDUP_GOAL)} (min {min(ratios):,.0f}x)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 series, short runs")
    parser.add_argument("--sizes", help="comma-separated series counts (default 10000,100000)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 5)")
    parser.add_argument(
        "--drift", type=float, default=0.0, help="(user, role) counter sets changed per second"
    )
    parser.add_argument(
        "--privacy", choices=PRIVACY_MODES, default="none", help="the portal's privacy mode"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000")).split(",")]
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)) or {0})
    print_machine()
    print(
        f"servers pinned to CPU 0; client and fake portal on the rest; {seconds:g}s per run;"
        f" privacy mode {args.privacy}\n"
    )
    results = []
    for size in sizes:
        results.append(await measure_size(size, seconds, args.drift, args.privacy))
        if len(sizes) > 1:
            report(results[-1:])  # in case a later size fails
            print(flush=True)
    report(results)


if __name__ == "__main__":
    if "--peer" in sys.argv:
        index = sys.argv.index("--peer")
        run_peer(sys.argv[index + 1], int(sys.argv[index + 2]))
    else:
        asyncio.run(main())

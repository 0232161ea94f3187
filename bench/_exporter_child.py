"""Child process of the benchmarks: the real exporter app for one config file.

    python bench/_exporter_child.py CONFIG PORT [LOG_LEVEL]

Loads the config, builds the app with `build_app`, prints `{"baseline_rss_kib": N}` (the
resident memory before any polling) and then serves on 127.0.0.1:PORT until SIGTERM. Besides
the exporter's own routes it answers `GET /_bench/state`: cycles finished per portal, whether
the last of them is rendered, each portal's last cycle duration and lateness, the process's
RSS, peak RSS and CPU seconds, every garbage collection of the oldest generation (when it
ended and how long it held the interpreter) with the longest of the younger ones, and every
time the event loop was held for over 20 ms (a 1 ms timer's lateness; what ended meanwhile:
a cycle, a render) when `BENCH_STALLS=1` is in its environment: the 1 ms timer that finds
the stalls costs the event loop ~1 s of CPU a minute, so only `serving.py` turns it on.
`?objects=1` adds the number of objects the collector tracks (and how many are frozen).

With `BENCH_TRACEMALLOC=1` in its environment the child traces allocations from just before
polling starts, and `GET /_bench/trace` answers the live traced bytes per source file
(`?by=line`: per line).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.config import load_config
from exporter.server import PUBLISHER, SUPERVISOR, build_app

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, pin_from_env, proc_status, thread_cpu_seconds


class GcWatch:
    """Times every collection: the full ones one by one, the young ones as a maximum."""

    def __init__(self) -> None:
        self.started = 0.0
        self.full: list[tuple[float, float]] = []  # (monotonic end, seconds)
        self.young_max = 0.0
        self.young = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self.started = now
            return
        seconds = now - self.started
        if info["generation"] == 2:
            self.full.append((time.monotonic(), seconds))
        else:
            self.young += 1
            self.young_max = max(self.young_max, seconds)


GC = GcWatch()
gc.callbacks.append(GC)

# Event loop stalls over 20 ms: (monotonic end, ms, what ended meanwhile: "cycle" when a
# portal finished a cycle, "render" when a body was assembled).
STALLS: list[tuple[float, float, str]] = []


async def watch_loop(app: web.Application) -> None:
    """A 1 ms timer's lateness is how long the loop was held by something else."""

    def marks() -> tuple[int, int]:
        pollers = app[SUPERVISOR].pollers if SUPERVISOR in app else {}
        return sum(p.cycles for p in pollers.values()), app[PUBLISHER].assemblies

    while True:
        before = marks()
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        late = time.perf_counter() - started - 0.001
        if late > 0.020:
            after = marks()
            what = [n for n, b, a in zip(("cycle", "render"), before, after, strict=True) if a > b]
            STALLS.append((time.monotonic(), late * 1000, "+".join(what)))


async def state(request: web.Request) -> web.Response:
    app = request.app
    pollers = app[SUPERVISOR].pollers
    publisher = app[PUBLISHER]
    snapshots = publisher.snapshots
    status = proc_status()
    return web.json_response(
        {
            "cycles": {name: p.cycles for name, p in pollers.items()},
            # The newest snapshot of every portal is in the served body.
            "rendered": not publisher._dirty and set(publisher.rendered) >= set(pollers),
            "durations": {n: s.duration for n, s in snapshots.items()},
            "behind": {n: s.behind for n, s in snapshots.items()},
            "rss_kib": status["VmRSS"],
            "hwm_kib": status["VmHWM"],
            "cpu_seconds": cpu_seconds(),
            "monotonic": time.monotonic(),
            "assemblies": publisher.assemblies,
            "windows": publisher.windows,
            "thread_cpu": thread_cpu_seconds(),
            "gc_full": GC.full,
            "stalls": STALLS,
            "gc_young": GC.young,
            "gc_young_max": GC.young_max,
            **(
                {"gc_tracked": len(gc.get_objects()), "gc_frozen": gc.get_freeze_count()}
                if request.query.get("objects")
                else {}
            ),
        }
    )


async def trace(request: web.Request) -> web.Response:
    """Live traced bytes per file (the innermost frame of each allocation)."""
    if not tracemalloc.is_tracing():
        return web.json_response({"error": "BENCH_TRACEMALLOC is not set"}, status=400)
    by_line = request.query.get("by") == "line"
    stats = tracemalloc.take_snapshot().statistics("lineno" if by_line else "filename")
    return web.json_response(
        {
            "files": [
                (
                    f"{s.traceback[0].filename}:{s.traceback[0].lineno}"
                    if by_line
                    else s.traceback[0].filename,
                    s.size,
                    s.count,
                )
                for s in stats
            ],
            "traced": tracemalloc.get_traced_memory(),
        }
    )


async def main() -> None:
    pin_from_env()
    path, port = sys.argv[1], int(sys.argv[2])
    level = sys.argv[3] if len(sys.argv) > 3 else "WARNING"
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(message)s")
    config = load_config(path)
    app = build_app(config)
    app.router.add_get("/_bench/state", state)
    app.router.add_get("/_bench/trace", trace)
    print(json.dumps({"baseline_rss_kib": proc_status()["VmRSS"]}), flush=True)
    if os.environ.get("BENCH_TRACEMALLOC"):
        tracemalloc.start()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    watcher = asyncio.create_task(watch_loop(app)) if os.environ.get("BENCH_STALLS") else None
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    if watcher is not None:
        watcher.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

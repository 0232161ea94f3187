"""Child process of the benchmarks: the real exporter app for one config file.

    python bench/_exporter_child.py CONFIG PORT [LOG_LEVEL]

Loads the config, builds the app with `build_app`, prints `{"baseline_rss_kib": N}` (the
resident memory before any polling) and then serves on 127.0.0.1:PORT until SIGTERM. Besides
the exporter's own routes it answers `GET /_bench/state`: cycles finished per portal, whether
the last of them is rendered, each portal's last cycle duration and lateness, and the
process's RSS, peak RSS and CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.config import load_config
from exporter.server import PUBLISHER, SUPERVISOR, build_app

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, pin_from_env, proc_status


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
    print(json.dumps({"baseline_rss_kib": proc_status()["VmRSS"]}), flush=True)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

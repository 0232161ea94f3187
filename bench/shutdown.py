"""How fast the exporter exits after SIGTERM: the speed goal of tests/test_shutdown.py.

    .venv/bin/python bench/shutdown.py [--quick] [--runs N]

`python -m exporter` (the real command) polls a fake portal (`_fakes.py`, its own process)
of 300 users x 2 roles; each request takes 1 s, so a cycle of 13 batches is on the wire for
several seconds. SIGTERM is sent twice per run: while requests are in flight (once the first
cycle has started) and while every poller sleeps between cycles (poll_interval 1h, after the
first cycle). Reported: the seconds from the signal to the exit, median and slowest of N runs
(5; `--quick`: 2), and the exit codes.

Goals: exit within 5 s with requests in flight (the pollers get a 3 s grace); at once (under
0.5 s) when nothing is in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from _common import (
    ROOT,
    FakeFleet,
    FakeSpec,
    free_port,
    median,
    portal_entry,
    print_machine,
    table,
    verdict,
)

IN_FLIGHT_GOAL = 5.0
IDLE_GOAL = 0.5


async def ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        while proc.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError("the exporter exited before it was ready")


async def one_run(portal_url: str, poll_interval: str, *, idle: bool) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        raw = {
            "poll_interval": poll_interval,
            "request_timeout": "60s",
            "portals": [
                portal_entry(
                    "acme",
                    portal_url,
                    roles=("view_all", "view_role_responsible"),
                    rate_limit="enterprise",
                )
            ],
        }
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "exporter", "--config", str(config)),
            *("--listen-address", f"127.0.0.1:{port}", "--log-level", "error"),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            if idle:
                await ready(f"http://127.0.0.1:{port}", proc)  # first cycle done, now asleep
            else:
                await asyncio.sleep(1.5)  # the first cycle's batches are on the wire
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            return time.monotonic() - started, code
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def run(runs: int) -> None:
    print_machine()
    spec = FakeSpec(users=300, requests_per_second=None, latency=1.0)
    rows = []
    async with FakeFleet([spec]) as fleet:
        url = fleet.urls[0]
        for name, interval, idle, goal in (
            ("requests in flight", "1s", False, IN_FLIGHT_GOAL),
            ("every poller asleep", "1h", True, IDLE_GOAL),
        ):
            results = [await one_run(url, interval, idle=idle) for _ in range(runs)]
            seconds = [s for s, _ in results]
            codes = sorted({c for _, c in results})
            rows.append(
                (
                    name,
                    runs,
                    median(seconds),
                    max(seconds),
                    goal,
                    verdict(max(seconds) < goal),
                    codes,
                )
            )
    print()
    print(
        table(
            ("SIGTERM while", "runs", "median s", "slowest s", "goal s", "met", "exit codes"),
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs each")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(2 if args.quick else args.runs))


if __name__ == "__main__":
    main()

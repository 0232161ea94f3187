"""The status page `/`: how long the exporter takes to build it, its size, and how long a
real headless Chromium takes to render it (DOM dump, and a phone-sized screenshot).

Two fake portals run in this process: one up with `--users` users behind a non-admin
webhook (so all but one fail with NoAccess and the failure table lists them), one down (a
revoked webhook). The exporter polls each once (poll_interval 1h), then `/` is fetched
`--gets` times and rendered by Chromium `--renders` times.

    .venv/bin/python bench/statuspage.py [--quick] [--users 200]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.config import parse_config
from exporter.fakeportal import FakePortal, FakeUser, serve
from exporter.server import build_app


async def chromium(url: str, home: Path, *args: str) -> tuple[bytes, float]:
    binary = shutil.which("chromium")
    if binary is None:
        sys.exit("chromium is not installed (scripts/bootstrap installs it)")
    flags = [
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--disable-breakpad",
        "--hide-scrollbars",
        f"--user-data-dir={home / 'profile'}",
    ]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        binary,
        *flags,
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home)},
    )
    out, _ = await process.communicate()
    return out, time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--gets", type=int, default=50)
    parser.add_argument("--renders", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # one NoAccess warning per user is not news here
    if args.quick:
        args.users, args.gets, args.renders = 20, 10, 2
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")

    up = FakePortal(operating_cost=0.01)
    for user_id in range(1, args.users + 1):
        up.add_user(FakeUser(user_id, f"User{user_id}", "Bench"))
    up.add_webhook(1, "benchstatuspagesecret")
    down = FakePortal()
    down.add_user(FakeUser(1, "Dora", "Down", admin=True))
    down.add_webhook(1, "benchdeadsecret")
    down.revoke_webhook("benchdeadsecret")
    runners = [await serve(up), await serve(down)]
    (up_runner, up_url), (down_runner, down_url) = runners
    raw = {
        "poll_interval": "1h",
        "portals": [
            {
                "name": "acme",
                "webhook": f"{up_url}/rest/1/benchstatuspagesecret/",
                "tasks": {"users": list(range(1, args.users + 1))},
            },
            {"name": "dead", "webhook": f"{down_url}/rest/1/benchdeadsecret/"},
        ],
    }
    app = build_app(parse_config(raw, source="bench"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(url + "readyz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.1)
        timings, size = [], 0
        for _ in range(args.gets):
            started = time.monotonic()
            async with session.get(url) as response:
                size = len(await response.read())
            timings.append(time.monotonic() - started)
    home = Path(tempfile.mkdtemp(prefix="bench-statuspage-"))
    try:
        dumps = [(await chromium(url, home, "--dump-dom"))[1] for _ in range(args.renders)]
        shot = home / "status.png"
        shots = [
            (await chromium(url, home, f"--screenshot={shot}", "--window-size=412,915"))[1]
            for _ in range(args.renders)
        ]
        shot_size = shot.stat().st_size
    finally:
        shutil.rmtree(home, ignore_errors=True)
        await runner.cleanup()
        await up_runner.cleanup()
        await down_runner.cleanup()

    rows = [
        (f"page size, {args.users} users watched, {args.users - 1} failing", f"{size:,} bytes"),
        (
            f"GET / (median of {args.gets}, in-process fakes)",
            f"{statistics.median(timings) * 1000:.1f} ms",
        ),
        (
            f"Chromium --dump-dom, whole run (median of {args.renders})",
            f"{statistics.median(dumps):.2f} s",
        ),
        (
            f"Chromium --screenshot 412x915, whole run (median of {args.renders})",
            f"{statistics.median(shots):.2f} s",
        ),
        ("screenshot size", f"{shot_size:,} bytes"),
    ]
    print("\n| what | figure |\n| --- | --- |")
    for what, figure in rows:
        print(f"| {what} | {figure} |")


if __name__ == "__main__":
    asyncio.run(main())

"""Soak test (not run in CI): the real exporter against a misbehaving fake portal for a long time.

    .venv/bin/python bench/soak.py --minutes 30

The exporter runs as a subprocess (`python -m exporter`) polling a fake Bitrix24 portal that
this script serves in-process with mixed faults: 10 % HTTP 500, 5 % truncated JSON, 5 % HTML
502 pages, 2 % requests that hang past the request timeout, 2 % connection resets, a burst of
503 QUERY_LIMIT_EXCEEDED every minute, and every five minutes a 20-second outage (the portal's
listener is stopped, so connections are refused, then started again on the same port).
Meanwhile a separate process scrapes /metrics and /healthz twice a second.

Every minute it prints the exporter's resident memory, open file descriptors and open
sockets (from /proc), the slowest scrape of the minute, the portal requests of the minute and
whether the exporter logged a traceback. At the end it compares the last minute with minute
five: the goal is under 10 % growth of RSS and descriptors and a flat socket count, and exits
1 if a goal was missed (or the exporter died, or a traceback appeared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import select
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.fakeportal import FakePortal, FakeUser, Faults, serve  # noqa: E402

SECRET = "soak0webhook0secret0value"
MIXED = Faults(
    http_500_rate=0.10,
    malformed_json_rate=0.05,
    html_502_rate=0.05,
    hang_rate=0.02,
    hang_seconds=3.0,
    reset_rate=0.02,
)


@dataclass
class Minute:
    minute: int
    rss_kib: int
    fds: int
    sockets: int
    max_scrape_ms: float
    scrapes: int
    portal_requests: int
    up: float | None


def proc_stats(pid: int) -> tuple[int, int, int]:
    """(VmRSS in KiB, open descriptors, open sockets) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = sockets = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            fds += 1
            sockets += target.startswith("socket:")
    return rss, fds, sockets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_portal(users: int) -> FakePortal:
    portal = FakePortal(requests_per_second=5.0, burst=250, seed=42)
    for user_id in range(1, users + 1):
        portal.add_user(FakeUser(user_id, f"User{user_id}", "Soak", admin=user_id == 1))
    portal.add_webhook(1, SECRET)
    return portal


def scraper(url: str) -> None:
    """`--scrape URL`: scrape like Prometheus from a process of its own, so that the fake
    portal's work in the driver never shows up as exporter latency. Each line on stdin asks
    for a JSON report of the scrapes since the last one; EOF ends it."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(host, port, timeout=5)

    conn = connect()
    worst, count, failures, up, samples = 0.0, 0, 0, None, []
    while True:
        if select.select([sys.stdin], [], [], 0)[0]:
            if not sys.stdin.readline():
                return
            report = {"max_ms": worst, "count": count, "failures": failures, "up": up}
            report["samples_ms"] = samples
            print(json.dumps(report), flush=True)
            worst, count, failures, samples = 0.0, 0, 0, []
        for path in ("/metrics", "/healthz"):
            started = time.monotonic()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok, body = False, b""
                conn.close()
                conn = connect()
            elapsed = (time.monotonic() - started) * 1000
            worst = max(worst, elapsed)
            samples.append(round(elapsed, 2))
            count += 1
            failures += not ok
            if path == "/metrics" and ok:
                for line in body.split(b"\n"):
                    if line.startswith(b"bitrix24_up{"):
                        up = float(line.rsplit(b" ", 1)[1])
        time.sleep(0.5)


async def scrapes_since(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"report\n")
    await process.stdin.drain()
    report: dict[str, Any] = json.loads(await process.stdout.readline())
    return report


async def fault_loop(
    portal: FakePortal, port: int, holder: dict[str, web.AppRunner], stop: asyncio.Event
) -> None:
    """A burst of QUERY_LIMIT_EXCEEDED every minute; a 20 s outage every five minutes."""
    tick = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 60)
        if stop.is_set():
            return
        tick += 1
        portal.faults.query_limit_burst = 5
        if tick % 5 == 0:
            await holder["runner"].cleanup()
            print(f"  [{time.strftime('%H:%M:%S')}] portal down for 20 s", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 20)
            holder["runner"], _ = await serve(portal, port=port)
            print(f"  [{time.strftime('%H:%M:%S')}] portal back", flush=True)


async def soak(args: argparse.Namespace) -> int:
    portal = make_portal(args.users)
    portal.faults = Faults(**vars(MIXED))
    port = free_port()
    runner, base = await serve(portal, port=port)
    holder = {"runner": runner}
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    config = {
        "poll_interval": args.poll_interval,
        "request_timeout": "1s",
        "user_refresh_interval": "30s",
        "portals": [
            {
                "name": "soak",
                "webhook": f"{base}/rest/1/{SECRET}/",
                "rate_limit": "enterprise",
                "tasks": {"users": "all", "roles": ["view_all", "view_role_responsible"]},
                "im": {"chats": True},
            }
        ],
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    listen = free_port()
    stderr_path = workdir / "exporter.log"
    with stderr_path.open("wb") as stderr:
        exporter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exporter",
            "--config",
            str(workdir / "config.yaml"),
            "--listen-address",
            f"127.0.0.1:{listen}",
            "--log-level",
            "info",
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    print(
        f"soak: {args.minutes} min, {args.users} users, poll {args.poll_interval}, exporter pid"
        f" {exporter.pid}, log {stderr_path}",
        flush=True,
    )
    print(
        "minute   rss_MiB  fds  sockets  max_scrape_ms  scrapes  portal_reqs  up  tracebacks",
        flush=True,
    )
    stop = asyncio.Event()
    await asyncio.sleep(2.0)
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--scrape",
        f"http://127.0.0.1:{listen}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    faults = asyncio.create_task(fault_loop(portal, port, holder, stop))
    minutes: list[Minute] = []
    samples: list[float] = []
    failures = 0
    died = False
    seen = 0  # portal requests counted so far (the list is the fake's: left alone)
    started = time.monotonic()
    try:
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, started + minute * 60 - time.monotonic()))
            if exporter.returncode is not None:
                print(f"exporter exited with {exporter.returncode}", flush=True)
                died = True
                break
            rss, fds, sockets = proc_stats(exporter.pid)
            requests, seen = len(portal.requests) - seen, len(portal.requests)
            tracebacks = stderr_path.read_text(errors="replace").count("Traceback")
            scraped = await scrapes_since(prober)
            samples += scraped["samples_ms"]
            failures += scraped["failures"]
            row = Minute(minute, rss, fds, sockets, scraped["max_ms"], scraped["count"], requests,
                         scraped["up"])  # fmt: skip
            minutes.append(row)
            print(
                f"{minute:6d}  {rss / 1024:8.1f}  {fds:3d}  {sockets:7d}  {row.max_scrape_ms:13.1f}"
                f"  {row.scrapes:7d}  {requests:11d}  {row.up}  {tracebacks}",
                flush=True,
            )
    finally:
        stop.set()
        faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults
        if prober.stdin is not None:
            prober.stdin.close()
        await prober.wait()
        exporter.terminate()
        try:
            code = await asyncio.wait_for(exporter.wait(), 10)
        except TimeoutError:
            exporter.kill()
            code = await exporter.wait()
        await holder["runner"].cleanup()
    log = stderr_path.read_text(errors="replace")
    return report(minutes, samples, failures, log, code, died)


def report(
    minutes: list[Minute],
    samples: list[float],
    failures: int,
    log: str,
    exit_code: int,
    died: bool,
) -> int:
    ok = not died and exit_code == 0 and "Traceback" not in log and SECRET not in log
    print(f"exporter exit code after SIGTERM: {exit_code}")
    ordered = sorted(samples)
    if ordered:
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(
            f"scrapes: {len(ordered)}, failures {failures}, max {ordered[-1]:.1f} ms,"
            f" p99 {p99:.1f} ms, over 100 ms: {sum(1 for v in ordered if v > 100)}"
        )
    print(f"tracebacks in the log: {log.count('Traceback')}; secret in the log: {SECRET in log}")
    baseline_at = min(5, len(minutes))
    if baseline_at == 0:
        return 1
    base, last = minutes[baseline_at - 1], minutes[-1]
    rss_growth = (last.rss_kib - base.rss_kib) / base.rss_kib * 100
    fd_growth = (last.fds - base.fds) / base.fds * 100
    early = [m.sockets for m in minutes[:baseline_at]]
    after = [m.sockets for m in minutes[baseline_at - 1 :]]
    print(
        f"RSS minute {base.minute} -> {last.minute}: {base.rss_kib / 1024:.1f} ->"
        f" {last.rss_kib / 1024:.1f} MiB ({rss_growth:+.1f} %)"
    )
    print(
        f"fds minute {base.minute} -> {last.minute}: {base.fds} -> {last.fds} ({fd_growth:+.1f} %)"
    )
    # Flat: never more open sockets than in the first minutes (fewer while the portal is
    # down is expected: its connections are gone).
    print(
        f"sockets: first {len(early)} minutes max {max(early)}; from minute {base.minute}:"
        f" min {min(after)}, max {max(after)}"
    )
    if len(minutes) >= 6:
        ok = ok and rss_growth < 10 and fd_growth < 10 and max(after) <= max(early)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--poll-interval", dest="poll_interval", default="2s")
    parser.add_argument("--scrape", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scrape:
        scraper(args.scrape)
        return 0
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())

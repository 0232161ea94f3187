"""Serving and recovering while Bitrix24 misbehaves: the speed goals of tests/test_faults.py.

    .venv/bin/python bench/faults.py [--quick] [--seconds S]

The exporter (`_exporter_child.py`, a process of its own) polls a fake portal of 50 users x 3
roles (`tests/fault_portal.py`, another process, steered over HTTP) every 0.3 s, with a
0.5 s request timeout. For each fault in turn the fault is switched on for S seconds (10;
`--quick`: 2) while `tests/prober.py` asks /metrics and /healthz every 10 ms from a third
process; then it is switched off and this process reads /metrics every 10 ms until `up` is 1
and every user was fetched after the switch.

OPERATION_TIME_LIMIT comes first, while the portal's budget window (10 s here, and the
exporter is told so with `operating_window`; 600 s on a real portal) still has its first
bucket ahead, and is switched off as soon as the portal has refused one batch: the exporter
holds the cycle until the reset, so /metrics shows the refusal only when the hold ends.

Reported per fault: the slowest /metrics and /healthz answer during it, and the seconds from
the end of the fault to fresh data. Goals: no answer over 100 ms; fresh data within a poll
interval and 0.5 s of rendering plus the retry policy's longest backoff and one request
timeout (3.3 s here), or, after OPERATION_TIME_LIMIT, within the portal's window plus 1.5 s,
a poll interval and 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import aiohttp
from _common import ROOT, ExporterChild, print_machine, stop, table, verdict
from prometheus_client.parser import text_string_to_metric_families

from tests.fault_portal import ROLES

SECRET = "bench0faults0webhook0secret"
USERS = 50
POLL, TIMEOUT, WINDOW = 0.3, 0.5, 10.0
LATENCY_GOAL = 0.100
LONGEST_BACKOFF = 2.0  # retry_base 0.5 s x 2 ** (max_retries 3 - 1), under retry_cap 10 s
RECOVERY_GOAL = POLL + 0.5 + LONGEST_BACKOFF + TIMEOUT
OPERATING_GOAL = WINDOW + 1.5 + POLL + 0.5

FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("429 OPERATION_TIME_LIMIT", {"faults": {"operation_time_limit": True}}),
    ("HTTP 500 (10 %)", {"faults": {"http_500_rate": 0.10}}),
    ("malformed JSON (5 %)", {"faults": {"malformed_json_rate": 0.05}}),
    ("HTML 502 (10 %)", {"faults": {"html_502_rate": 0.10}}),
    ("hang 2 s (2 %)", {"faults": {"hang_rate": 0.02, "hang_seconds": 2.0}}),
    ("connection reset (5 %)", {"faults": {"reset_rate": 0.05}}),
    ("503 burst of 6", {"faults": {"query_limit_burst": 6}}),
    ("webhook revoked", {"revoke": True}),
    ("connection refused", {"stop": True}),
]


class FaultPortal:
    """`python -m tests.fault_portal` and its control routes."""

    async def __aenter__(self) -> FaultPortal:
        spec = {"users": USERS, "secret": SECRET, "operating_window": WINDOW, "seed": 11}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fault_portal",
            json.dumps(spec),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        self.url, self._control = (await self._proc.stdout.readline()).decode().split()
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()
        assert self._proc.stdin is not None
        self._proc.stdin.close()  # the portal stops when its stdin closes
        await stop(self._proc)

    async def refused_once(self) -> None:
        """Until the portal answers a batch: with OPERATION_TIME_LIMIT on, a refused one."""
        async with self._session.get(self._control + "/requests") as response:
            switched = len(await response.json())
        while True:
            async with self._session.get(self._control + f"/requests?since={switched}") as r:
                if any(row["status"] == 200 for row in await r.json()):
                    return
            await asyncio.sleep(0.01)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> None:
        async with self._session.post(self._control + path, json=body or {}) as response:
            response.raise_for_status()


class Prober:
    """`python -m tests.prober` against the exporter; the slowest answers when stopped."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __aenter__(self) -> Prober:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.prober",
            "127.0.0.1",
            str(self.port),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        await self._proc.stdout.readline()  # "ready"
        return self

    async def __aexit__(self, *exc: object) -> None:
        out, _ = await self._proc.communicate(b"stop\n")
        self.result: dict[str, Any] = json.loads(out)


def fresh(text: str, since: float) -> bool:
    """`up` is 1 and every user's last success is after `since`."""
    success: dict[tuple[str, str], float] = {}
    stamps: dict[tuple[str, str], float] = {}
    up = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.labels.get("user_id", ""), s.labels.get("source", ""))
            if s.name == "bitrix24_collect_success":
                success[key] = s.value
            elif s.name == "bitrix24_last_success_timestamp_seconds":
                stamps[key] = s.value
            elif s.name == "bitrix24_up":
                up = s.value
    return (
        up == 1
        and len(success) == USERS + 1
        and all(v == 1 for v in success.values())
        and all(stamps.get(k, 0) > since for k in success)
    )


async def recovery(session: aiohttp.ClientSession, url: str, since: float) -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/metrics") as response:
                if fresh(await response.text(), since):
                    return time.monotonic() - started
        if time.monotonic() - started > 120:
            raise TimeoutError("no fresh data within 120 s")
        await asyncio.sleep(0.01)


async def run(seconds: float) -> None:
    print_machine()
    rows = []
    async with FaultPortal() as portal:
        raw = {
            "poll_interval": f"{POLL}s",
            "request_timeout": f"{TIMEOUT}s",
            "stale_after": "30s",
            "user_refresh_interval": "1h",
            "portals": [
                {
                    "name": "acme",
                    "webhook": f"{portal.url}/rest/1/{SECRET}/",
                    "tasks": {"users": "all", "roles": list(ROLES)},
                    "rate_limit": {"requests_per_second": 1000, "burst": 1000},
                    "operating_window": f"{WINDOW:g}s",
                }
            ],
        }
        async with ExporterChild(raw) as exporter, aiohttp.ClientSession() as session:
            await exporter.wait_ready()
            for name, fault in FAULTS:
                async with Prober(exporter.port) as prober:
                    if "faults" in fault:
                        await portal.post("/faults", fault["faults"])
                    if fault.get("revoke"):
                        await portal.post("/revoke", {"secret": SECRET})
                    if fault.get("stop"):
                        await portal.post("/stop")
                    if "operation_time_limit" in fault.get("faults", {}):
                        await portal.refused_once()
                    else:
                        await asyncio.sleep(seconds)
                    await portal.post("/faults")
                    if fault.get("revoke"):
                        await portal.post("/webhook", {"user_id": 1, "secret": SECRET})
                    if fault.get("stop"):
                        await portal.post("/start")
                    took = await recovery(session, exporter.url, time.time())
                worst = prober.result["worst"]
                goal = OPERATING_GOAL if "OPERATION" in name else RECOVERY_GOAL
                slowest = max(worst.values())
                rows.append(
                    (
                        name,
                        worst["/metrics"] * 1000,
                        worst["/healthz"] * 1000,
                        verdict(slowest < LATENCY_GOAL),
                        took,
                        goal,
                        verdict(took <= goal),
                        len(prober.result["failures"]),
                    )
                )
                print(f"{name}: done", flush=True)
    print()
    print(
        table(
            (
                "fault",
                "slowest /metrics ms",
                "slowest /healthz ms",
                "< 100 ms",
                "fresh data after s",
                "goal s",
                "met",
                "failed probes",
            ),
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per fault")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each fault lasts")
    args = parser.parse_args()
    asyncio.run(run(2.0 if args.quick else args.seconds))


if __name__ == "__main__":
    main()

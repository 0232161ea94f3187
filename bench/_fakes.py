"""Child process of the benchmarks: fake Bitrix24 portals, one port each.

Reads a JSON list of `FakeSpec` fields from the first line of stdin, serves one `FakePortal`
per spec on 127.0.0.1, prints `{"urls": [...]}` and serves until SIGTERM. Every fake also
answers `GET /_bench/stats?since=N[&times=1]` with what it recorded from request N on:
request count, counts per HTTP status and per method, batch commands per inner method, the
highest `operating` of `tasks.task.counters.get` and what another client spent, and
with `times=1` the arrival time (the monotonic clock, shared by every process on Linux) and
status of each request. `now` is the fake's clock when it answered. A spec's `drift` sets
that many (user, role) task counter sets to new random values every second.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SECRET, pin_from_env

from exporter.fakeportal import NEW_COUNTER_CODES, ROLES, FakePortal, FakeUser, serve

TASKS_METHOD = "tasks.task.counters.get"


def build(spec: dict[str, object]) -> FakePortal:
    portal = FakePortal(
        requests_per_second=spec["requests_per_second"],  # type: ignore[arg-type]
        burst=spec["burst"],  # type: ignore[arg-type]
        operating_limit=spec["operating_limit"],  # type: ignore[arg-type]
        operating_window=spec["operating_window"],  # type: ignore[arg-type]
        operating_cost=spec["operating_cost"],  # type: ignore[arg-type]
        operating_charge=spec["operating_charge"],  # type: ignore[arg-type]
        seed=spec["seed"],  # type: ignore[arg-type]
    )
    portal.faults.latency = float(spec["latency"])  # type: ignore[arg-type]
    if spec["other_client_rate"]:
        # Spends from the exporter's first request on.
        portal.start_other_client(
            float(spec["other_client_rate"]),  # type: ignore[arg-type]
            total=float(spec["other_client_total"]),  # type: ignore[arg-type]
        )
    for user_id in range(1, int(spec["users"]) + 1):  # type: ignore[call-overload]
        portal.add_user(FakeUser(user_id, f"User{user_id}", "Bench", admin=user_id == 1))
    portal.add_webhook(1, SECRET)

    async def stats(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        recorded = portal.requests[since:]
        inner: Counter[str] = Counter()
        for r in recorded:
            if r.method == "batch":
                cmd = r.params.get("cmd", {})
                calls = cmd.values() if isinstance(cmd, dict) else cmd
                inner.update(str(c).partition("?")[0] for c in calls)
        body: dict[str, object] = {
            "now": asyncio.get_running_loop().time(),
            "total": len(portal.requests),
            "requests": len(recorded),
            "status": Counter(str(r.status) for r in recorded),
            "methods": Counter(r.method for r in recorded),
            "commands": sum(r.commands for r in recorded),
            "batch_commands": inner,
            "peak_operating": portal.peak_operating(TASKS_METHOD),
            "other_client": portal.other_client_spent,
        }
        if request.query.get("times"):
            body["at"] = [r.at for r in recorded]
            body["statuses"] = [r.status for r in recorded]
        return web.json_response(body)

    portal.app.router.add_get("/_bench/stats", stats)
    drift = float(spec.get("drift", 0.0))  # type: ignore[arg-type]
    if drift > 0:

        async def advance(app: web.Application) -> AsyncIterator[None]:
            async def loop() -> None:
                rnd = random.Random(int(spec["seed"]))  # type: ignore[call-overload]
                users = int(spec["users"])  # type: ignore[call-overload]
                owed = 0.0
                while True:
                    await asyncio.sleep(0.1)
                    owed += drift / 10
                    while owed >= 1:
                        counters = {n: (rnd.randint(0, 9), c) for n, c in NEW_COUNTER_CODES.items()}
                        portal.set_task_counters(rnd.randint(1, users), rnd.choice(ROLES), counters)
                        owed -= 1

            task = asyncio.create_task(loop())
            yield
            task.cancel()

        portal.app.cleanup_ctx.append(advance)
    return portal


async def main() -> None:
    pin_from_env()
    specs = json.loads(sys.stdin.readline())
    runners = []
    urls = []
    for spec in specs:
        runner, url = await serve(build(spec))
        runners.append(runner)
        urls.append(url)
    print(json.dumps({"urls": urls}), flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

"""The fake portal in a process of its own, steered over HTTP, for tests that time the exporter.

    python -m tests.fault_portal '{"users": 100, "seed": 11}'

prints ``<portal base URL> <control base URL>`` on one line and serves until its stdin closes.
The portal has `users` active users (user 1 an administrator owning the webhook `secret`)
whose task counters are `expected_tasks`, so a test can tell a true value from a false one.
Other keys of the spec: `seed`, `requests_per_second` (default: no limit), `burst`,
`operating_window`, and more `webhooks` ([[user_id, secret], ...]).

Control routes, JSON in and out: ``POST /faults`` (fields of `Faults`), ``POST /revoke``
{"secret"}, ``POST /webhook`` {"user_id", "secret"}, ``POST /stop`` and ``POST /start`` (the
portal's listener: connections are refused in between, and it comes back on the same port),
``GET /requests?since=N`` (what the portal recorded, from the N-th request on).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

from exporter.fakeportal import FakePortal, FakeUser, Faults, serve

ROLES = ("view_all", "view_role_responsible", "view_role_accomplice")


def expected_tasks(user_id: int, role: str) -> dict[str, tuple[int, int]]:
    """The counters the portal holds for a user and role: what the exporter must serve."""
    index = ROLES.index(role)
    return {
        "expired": ((user_id * 7 + index) % 11, 6291456),
        "new_comments": ((user_id * 3 + index) % 5, 12582912),
    }


def build(spec: dict[str, Any]) -> FakePortal:
    portal = FakePortal(
        requests_per_second=spec.get("requests_per_second"),
        burst=spec.get("burst", 50),
        operating_window=spec.get("operating_window", 600.0),
        seed=spec.get("seed", 0),
    )
    for user_id in range(1, spec["users"] + 1):
        portal.add_user(FakeUser(user_id, f"User{user_id}", "Fault", admin=user_id == 1))
        for role in ROLES:
            portal.set_task_counters(user_id, role, expected_tasks(user_id, role))
    portal.set_im_counters(1, {"TYPE": {"ALL": 3, "NOTIFY": 1, "CHAT": 2}, "CHAT": {"18": 2}})
    portal.add_webhook(1, spec["secret"])
    for user_id, secret in spec.get("webhooks", []):
        portal.add_webhook(user_id, secret)
    return portal


class Controlled:
    """The portal, its listener, and the routes that steer both."""

    def __init__(self, portal: FakePortal) -> None:
        self.portal = portal
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.app = web.Application()
        self.app.router.add_post("/faults", self.faults)
        self.app.router.add_post("/revoke", self.revoke)
        self.app.router.add_post("/webhook", self.webhook)
        self.app.router.add_post("/stop", self.stop)
        self.app.router.add_post("/start", self.start)
        self.app.router.add_get("/requests", self.requests)

    async def listen(self) -> str:
        self.runner, url = await serve(self.portal, port=self.port)
        self.port = self.runner.addresses[0][1]
        return url

    async def faults(self, request: web.Request) -> web.Response:
        self.portal.faults = Faults(**await request.json())
        return web.json_response({})

    async def revoke(self, request: web.Request) -> web.Response:
        self.portal.revoke_webhook((await request.json())["secret"])
        return web.json_response({})

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.portal.add_webhook(body["user_id"], body["secret"])
        return web.json_response({})

    async def stop(self, request: web.Request) -> web.Response:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        return web.json_response({})

    async def start(self, request: web.Request) -> web.Response:
        if self.runner is None:
            await self.listen()
        return web.json_response({})

    async def requests(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        rows = [
            {"path": r.path, "status": r.status, "error": r.error, "at": r.at}
            for r in self.portal.requests[since:]
        ]
        return web.json_response(rows)


async def main(spec: dict[str, Any]) -> None:
    controlled = Controlled(build(spec))
    url = await controlled.listen()
    control, control_url = await serve_control(controlled.app)
    print(url, control_url, flush=True)
    # Until the test closes stdin (or dies): then shut down.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await control.cleanup()
    if controlled.runner is not None:
        await controlled.runner.cleanup()


async def serve_control(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

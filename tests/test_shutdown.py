"""Graceful shutdown under load: SIGTERM to the real exporter process while it is busy.

`python -m exporter` runs against the fake portal; the signal arrives while a cycle has
requests in flight, or while an OAuth token refresh is on the wire. The process must exit 0
without a traceback and without waiting for answers that are not coming, and the OAuth state
file must be left whole: the old token pair or the new one, valid JSON, no temporary file
beside it. How fast it exits is measured by `bench/shutdown.py`, not here.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.fakeportal import FakePortal, FakeUser, Faults, serve
from exporter.oauth import TokenState, write_state
from tests.support import make_portal, portal_config, register_secret, wait_for

CLIENT_ID = "local.shutdown.1"
CLIENT_SECRET = "shutd0wnCl13ntS3cr3t"
register_secret(CLIENT_SECRET)

# What an unclean asyncio shutdown prints; none of it may appear.
UNCLEAN = (
    "Traceback",
    "Task was destroyed but it is pending",
    "Unclosed client session",
    "Unclosed connector",
    "Task exception was never retrieved",
    "Exception ignored",
)


async def stop_with_sigterm(process: Any, *, sent: bool = False) -> None:
    """Send SIGTERM (unless `sent`); the process must exit 0 with nothing unclean on stderr."""
    if not sent:
        process.proc.send_signal(signal.SIGTERM)
    # A liveness bound only: the shutdown grace is 3 s, the answers it must not wait for
    # would take 10 minutes.
    code = await process.wait_exit(60)
    log = process.stderr()
    assert code == 0, log
    for text in UNCLEAN:
        assert text not in log, log


async def test_sigterm_with_requests_in_flight(served: Any, exporter_process: Any) -> None:
    """SIGTERM mid-cycle, batches on the wire that never get an answer: exit 0 without
    waiting for them, no traceback."""
    portal = make_portal(300)
    raw = portal_config(
        await served(portal),
        poll_interval="500ms",
        request_timeout="20m",
        portal={
            "tasks": {"users": "all", "roles": ["view_all", "view_role_responsible"]},
            "rate_limit": "enterprise",
        },
    )
    process = exporter_process(raw)
    await process.wait_ready()
    # From now on no request is answered before the portal shuts down.
    portal.faults = Faults(latency=600.0)
    mark = len(portal.requests)

    async def in_flight() -> bool:
        return sum(1 for r in portal.requests[mark:] if r.status == 0) >= 2

    await wait_for(in_flight)
    await stop_with_sigterm(process)
    # It exited while the portal still owed every answer since `mark`.
    assert {r.status for r in portal.requests[mark:]} == {0}


# ---- OAuth: SIGTERM while the token request is on the wire --------------------------------


class SlowTokenServer:
    """An OAuth server in front of the fake portal's token endpoint that can hold answers.

    `forward_first`: the request reaches the fake at once (the refresh token rotates there)
    and only the answer is held back; otherwise the request itself is held, then forwarded.
    """

    def __init__(self, upstream: str, *, forward_first: bool) -> None:
        self.upstream = upstream
        self.forward_first = forward_first
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()  # set: the held request or answer goes on
        self.issued: dict[str, Any] | None = None
        self.app = web.Application()
        self.app.router.add_get("/oauth/token/", self.token)

    async def token(self, request: web.Request) -> web.Response:
        self.arrived.set()
        if not self.forward_first:
            await self.release.wait()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.upstream}/oauth/token/", params=request.query) as answer,
        ):
            body = await answer.read()
            status = answer.status
        self.issued = json.loads(body)
        if self.forward_first:
            await self.release.wait()
        return web.Response(status=status, body=body, content_type="application/json")


@pytest.fixture
async def oauth_portal() -> AsyncIterator[tuple[FakePortal, str, str]]:
    """A fake portal with a local OAuth app; yields it, its URL and the first refresh token."""
    portal = FakePortal(requests_per_second=None)
    portal.add_user(FakeUser(1, "Anna", "Admin", admin=True))
    portal.add_user(FakeUser(2, "Boris", "Plain"))
    first = portal.add_oauth_app(CLIENT_ID, CLIENT_SECRET, 1)
    runner, url = await serve(portal)
    yield portal, url, first
    register_secret(*portal.issued_tokens)
    await runner.cleanup()


@pytest.mark.parametrize(
    ("forward_first", "expected"),
    [
        # The request is held until SIGTERM and then answered within the 3 s grace: the new
        # pair is written.
        pytest.param(False, "new", id="answer-within-grace"),
        # The portal rotated, the answer never arrives: the old file stays as it was.
        pytest.param(True, "old", id="answer-never-arrives"),
    ],
)
async def test_sigterm_during_token_refresh_leaves_the_state_file_whole(
    oauth_portal: tuple[FakePortal, str, str],
    exporter_process: Any,
    tmp_path: Path,
    forward_first: bool,
    expected: str,
) -> None:
    """SIGTERM mid-refresh: exit 0; the state file is the old pair or the new one."""
    _portal, url, first = oauth_portal
    register_secret(first)
    state_file = tmp_path / "state" / "acme.json"
    write_state(str(state_file), TokenState(refresh_token=first))
    before = state_file.read_bytes()
    slow = SlowTokenServer(url, forward_first=forward_first)
    runner, slow_url = await serve_app(slow.app)
    try:
        raw: dict[str, Any] = {
            "poll_interval": "1s",
            "request_timeout": "20m",
            "portals": [
                {
                    "name": "acme",
                    "oauth": {
                        "client_endpoint": f"{url}/rest/",
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                        "state_file": str(state_file),
                        "server": f"{slow_url}/",
                    },
                }
            ],
        }
        process = exporter_process(raw)
        await asyncio.wait_for(slow.arrived.wait(), 60)  # the first cycle asks for a token
        if forward_first:

            async def rotated() -> bool:
                return slow.issued is not None

            await wait_for(rotated)
            await stop_with_sigterm(process)  # the answer is never released
        else:
            process.proc.send_signal(signal.SIGTERM)

            async def shutting_down() -> bool:
                # The listener closes first, then the pollers get their grace.
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", process.port)
                except OSError:
                    return True
                writer.close()
                return False

            await wait_for(shutting_down)
            slow.release.set()
            await stop_with_sigterm(process, sent=True)
    finally:
        slow.release.set()
        await runner.cleanup()
    assert [p.name for p in state_file.parent.iterdir()] == ["acme.json"]  # no temp file left
    state = json.loads(state_file.read_text())
    if expected == "old":
        assert state_file.read_bytes() == before
    else:
        assert slow.issued is not None
        assert state["refresh_token"] == slow.issued["refresh_token"]
        assert state["access_token"] == slow.issued["access_token"]
    assert state_file.stat().st_mode & 0o077 == 0  # still readable by the owner only


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

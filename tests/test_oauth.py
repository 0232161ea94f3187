"""OAuth credentials against the fake portal's token endpoint, over real HTTP.

The credential, the client and the poller are the real ones; the only stand-ins are the
fake portal (which plays both the portal and the OAuth server), an injected clock where a
test needs time to pass, and `os.replace` failing to simulate a crash before the rename.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.bitrix import (
    BitrixClient,
    BitrixError,
    ClientStats,
    Command,
    OperatingBudget,
    PortalThrottle,
    RetryPolicy,
)
from exporter.config import OAuthAuth, parse_config
from exporter.fakeportal import NEW_COUNTER_CODES, TOKEN_METHOD, FakePortal, FakeUser
from exporter.logs import mask
from exporter.oauth import OAuthCredential, TokenState, read_state, write_state
from exporter.poller import PortalPoller, PortalSnapshot

ServerFactory = Callable[..., Awaitable[TestServer]]

CLIENT_ID = "local.5f0e1d2c3b4a59.12345678"
CLIENT_SECRET = "appSecret0123456789"


@pytest.fixture
def portal() -> FakePortal:
    """An admin (1) and a plain user (2), no rate limit; tokens come from `add_oauth_app`."""
    portal = FakePortal(requests_per_second=None)
    portal.add_user(FakeUser(1, "Anna", "Admin", admin=True))
    portal.add_user(FakeUser(2, "Boris", "Plain"))
    return portal


@pytest.fixture
def first_refresh(portal: FakePortal) -> str:
    return portal.add_oauth_app(CLIENT_ID, CLIENT_SECRET, 1)


@pytest.fixture
async def base(portal: FakePortal, aiohttp_server: ServerFactory) -> str:
    server = await aiohttp_server(portal.app)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "acme.json"


def oauth(base: str, state_file: Path, refresh_token: str | None, **kwargs: Any) -> OAuthAuth:
    return OAuthAuth(
        client_endpoint=f"{base}/rest/",
        client_id=kwargs.pop("client_id", CLIENT_ID),
        client_secret=kwargs.pop("client_secret", CLIENT_SECRET),
        refresh_token=refresh_token,
        state_file=str(state_file),
        server=kwargs.pop("server", f"{base}/"),
    )


def client_for(credential: OAuthCredential, session: aiohttp.ClientSession) -> BitrixClient:
    stats = ClientStats()
    return BitrixClient(
        "acme",
        credential,
        session,
        throttle=PortalThrottle(1000.0, 1000, stats),
        budget=OperatingBudget(480.0),
        stats=stats,
        retry=RetryPolicy(base=0.01),
    )


async def token_get(
    session: aiohttp.ClientSession, base: str, refresh_token: str
) -> tuple[int, dict[str, Any]]:
    params = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": refresh_token,
    }
    async with session.get(f"{base}/oauth/token/", params=params) as response:
        return response.status, await response.json(content_type=None)


def state_of(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def exporter_log(caplog: pytest.LogCaptureFixture) -> str:
    """Captured log text without aiohttp's access log, which is the fake server's own."""
    return "\n".join(caplog.handler.format(r) for r in caplog.records if r.name != "aiohttp.access")


# ---- tokens and the state file --------------------------------------------------------------


async def test_first_token_comes_from_the_config_refresh_token(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """Without a state file the config's refresh token gets the first pair, saved 0600."""
    credential = OAuthCredential("acme", oauth(base, state_file, first_refresh))
    before = time.time()
    result = await client_for(credential, session).call("profile")
    assert result.result["ID"] == "1"
    assert portal.token_requests == 1
    saved = state_of(state_file)
    assert set(saved) == {"refresh_token", "access_token", "expires", "client_endpoint"}
    assert saved["refresh_token"] not in ("", first_refresh)
    assert saved["client_endpoint"] == f"{base}/rest/"
    # Bracketed by the clock before and after the call (not a duration): the token's hour
    # counts from when it was issued, less a few seconds of safety margin.
    assert before + 3590 <= saved["expires"] <= time.time() + 3600
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    assert os.listdir(state_file.parent) == ["acme.json"]  # no temporary file left behind
    call = portal.requests[-1]
    assert (call.path, call.params["auth"]) == ("/rest/profile", "<secret>")


async def test_rotation_kills_the_old_refresh_token(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """After a refresh only the rotated token in the state file is accepted by the server."""
    credential = OAuthCredential("acme", oauth(base, state_file, first_refresh))
    await client_for(credential, session).call("profile")
    status, body = await token_get(session, base, first_refresh)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await token_get(session, base, state_of(state_file)["refresh_token"])
    assert status == 200
    assert body["refresh_token"] != state_of(state_file)["refresh_token"]


async def test_token_response_has_the_documented_fields(
    base: str, first_refresh: str, session: aiohttp.ClientSession
) -> None:
    """The fake answers with every field of the real refresh response."""
    status, body = await token_get(session, base, first_refresh)
    assert status == 200
    assert set(body) == {
        "access_token",
        "refresh_token",
        "expires",
        "expires_in",
        "client_endpoint",
        "server_endpoint",
        "domain",
        "member_id",
        "scope",
        "status",
        "user_id",
    }
    assert (body["expires_in"], body["user_id"], body["status"]) == (3600, 1, "L")
    assert body["client_endpoint"] == f"{base}/rest/"


async def test_expired_token_means_one_refresh_then_success(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A 401 expired_token costs exactly one token request, and the call is replayed."""
    credential = OAuthCredential("acme", oauth(base, state_file, first_refresh))
    client = client_for(credential, session)
    await client.call("profile")
    rotated = state_of(state_file)["refresh_token"]
    portal.expire_access_tokens()
    result = await client.call("user.current")
    assert result.result["ID"] == "1"
    assert portal.token_requests == 2
    assert [(r.method, r.status, r.error) for r in portal.requests[-3:]] == [
        ("user.current", 401, "expired_token"),
        (TOKEN_METHOD, 200, None),
        ("user.current", 200, None),
    ]
    assert state_of(state_file)["refresh_token"] != rotated


async def test_normal_calls_never_refresh(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """Twenty calls with a valid token make one token request in all: the first."""
    client = client_for(OAuthCredential("acme", oauth(base, state_file, first_refresh)), session)
    for _ in range(20):
        await client.call("profile")
    assert portal.token_requests == 1
    assert portal.count("profile", 200) == 20


async def test_concurrent_expired_calls_share_one_refresh(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """Calls and batch chunks refused at the same time wait for one refresh and reuse it."""
    client = client_for(OAuthCredential("acme", oauth(base, state_file, first_refresh)), session)
    await client.call("profile")
    portal.expire_access_tokens()
    commands = [Command(f"p{i}", "profile") for i in range(120)]  # three batch chunks
    calls = [client.call("user.current") for _ in range(5)]
    batch, *singles = await asyncio.gather(client.batch(commands), *calls)
    assert all(not isinstance(r, BitrixError) for r in batch.values())
    assert all(s.result["ID"] == "1" for s in singles)
    assert portal.token_requests == 2


async def test_refresh_shortly_before_expiry(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """Within a minute of expiry the next call refreshes first, so no call is refused."""
    now = [time.time()]
    credential = OAuthCredential(
        "acme", oauth(base, state_file, first_refresh), clock=lambda: now[0]
    )
    client = client_for(credential, session)
    await client.call("profile")
    now[0] += 3500
    await client.call("profile")
    assert portal.token_requests == 1
    now[0] += 50  # 50 s before expiry
    await client.call("profile")
    assert portal.token_requests == 2
    assert portal.count(status=401) == 0


async def test_restart_reads_the_rotated_token_from_the_state_file(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A new credential uses the saved access token, then refreshes with the saved token."""
    auth = oauth(base, state_file, first_refresh)
    await client_for(OAuthCredential("acme", auth), session).call("profile")
    restarted = client_for(OAuthCredential("acme", auth), session)
    await restarted.call("profile")
    assert portal.token_requests == 1  # the saved access token was still good
    portal.expire_access_tokens()
    await restarted.call("profile")  # the config's refresh token is dead by now
    assert portal.token_requests == 2
    assert portal.count(TOKEN_METHOD, 200) == 2


async def test_crash_before_the_rename_keeps_the_old_state_file(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed rename leaves the old file whole; the new pair is saved before it is used."""
    client = client_for(OAuthCredential("acme", oauth(base, state_file, first_refresh)), session)
    await client.call("profile")
    old = read_bytes(state_file)
    portal.expire_access_tokens()

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_rename)
        for _ in range(2):
            with pytest.raises(BitrixError) as failure:
                await client.call("profile")
            assert failure.value.error == "state_file"
            assert "No space left on device" in failure.value.description
    assert read_bytes(state_file) == old
    assert os.listdir(state_file.parent) == ["acme.json"]
    assert portal.token_requests == 2  # the rotated pair waits in memory, no new request
    assert portal.count("profile", 200) == 1  # and its access token was never used
    result = await client.call("profile")
    assert result.result["ID"] == "1"
    assert portal.token_requests == 2
    status, _ = await token_get(session, base, state_of(state_file)["refresh_token"])
    assert status == 200


async def test_write_state_is_atomic_on_any_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_state either replaces the whole file or leaves the old one and no temp file."""
    path = tmp_path / "s.json"
    write_state(str(path), TokenState("r1", "a1", 100.0))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        write_state(str(path), TokenState("r2", "a2", 200.0))
    assert read_state(str(path)) == TokenState("r1", "a1", 100.0)
    assert os.listdir(tmp_path) == ["s.json"]


# ---- failures -------------------------------------------------------------------------------


async def test_invalid_grant_stops_until_the_state_file_changes(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A dead refresh token fails every call at once, until a new token is written."""
    portal.revoke_refresh_tokens(CLIENT_ID)
    client = client_for(OAuthCredential("acme", oauth(base, state_file, first_refresh)), session)
    for _ in range(5):
        with pytest.raises(BitrixError) as failure:
            await client.call("profile")
        assert (failure.value.error, failure.value.status) == ("invalid_grant", 400)
        assert failure.value.is_auth
        assert str(state_file) in failure.value.description
    assert portal.token_requests == 1
    write_state(str(state_file), TokenState(portal.issue_refresh_token(CLIENT_ID)))
    assert (await client.call("profile")).result["ID"] == "1"
    assert portal.token_requests == 2


async def test_invalid_client_is_an_auth_error(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A wrong client secret gives 401 invalid_client, once, and names the config section."""
    auth = oauth(base, state_file, first_refresh, client_secret="wrong-secret")
    client = client_for(OAuthCredential("acme", auth), session)
    for _ in range(3):
        with pytest.raises(BitrixError) as failure:
            await client.call("profile")
        assert (failure.value.error, failure.value.status) == ("invalid_client", 401)
        assert failure.value.is_auth
    assert "oauth section" in failure.value.description
    assert portal.token_requests == 1


async def test_no_state_file_and_no_refresh_token(
    portal: FakePortal, base: str, state_file: Path, session: aiohttp.ClientSession
) -> None:
    """Nothing to start from: a clear error and no token request."""
    client = client_for(OAuthCredential("acme", oauth(base, state_file, None)), session)
    with pytest.raises(BitrixError) as failure:
        await client.call("profile")
    assert failure.value.error == "no_refresh_token"
    assert "oauth.refresh_token" in failure.value.description
    assert portal.token_requests == 0


async def test_unreadable_state_file_is_reported_without_its_content(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A broken state file is named, its content never shown, and fixing it recovers."""
    os.mkdir(state_file.parent)
    write_text(state_file, '{"refresh_token": "leaky-value", "expires": "soon"}')
    client = client_for(OAuthCredential("acme", oauth(base, state_file, first_refresh)), session)
    with pytest.raises(BitrixError) as failure:
        await client.call("profile")
    assert failure.value.error == "state_file"
    assert "expires must be a unix time" in str(failure.value)
    assert "leaky-value" not in str(failure.value)
    assert portal.token_requests == 0
    write_text(state_file, json.dumps({"refresh_token": first_refresh}))
    assert (await client.call("profile")).result["ID"] == "1"


async def test_unreachable_token_server_is_retried_after_a_pause(
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
    aiohttp_server: ServerFactory,
) -> None:
    """A 5xx from the OAuth server: one request, then none for `retry_after` seconds."""
    hits = 0

    async def unavailable(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"error": "temporarily_unavailable"}, status=503)

    app = web.Application()
    app.router.add_get("/oauth/token/", unavailable)
    flaky = await aiohttp_server(app)
    now = [time.time()]
    auth = oauth(base, state_file, first_refresh, server=str(flaky.make_url("/")))
    credential = OAuthCredential("acme", auth, retry_after=30.0, clock=lambda: now[0])
    client = client_for(credential, session)
    for _ in range(3):
        with pytest.raises(BitrixError) as failure:
            await client.call("profile")
        assert (failure.value.error, failure.value.status) == ("temporarily_unavailable", 503)
    assert hits == 1
    now[0] += 31
    with pytest.raises(BitrixError):
        await client.call("profile")
    assert hits == 2


# ---- the poller -----------------------------------------------------------------------------


def oauth_config(base: str, state_file: Path, refresh_token: str) -> Any:
    return parse_config(
        {
            "poll_interval": "1s",
            "portals": [
                {
                    "name": "acme",
                    "oauth": {
                        "client_endpoint": f"{base}/rest/",
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                        "refresh_token": refresh_token,
                        "state_file": str(state_file),
                        "server": f"{base}/",
                    },
                    "tasks": {"users": [1, 2], "roles": ["view_all", "view_role_responsible"]},
                }
            ],
        },
        environ={},
    )


async def test_poller_collects_task_counters_with_oauth(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
) -> None:
    """End to end: an oauth portal from the config polls task counters, across an expiry."""
    portal.set_task_counters(2, "view_all", {"expired": (4, NEW_COUNTER_CODES["expired"])})
    config = oauth_config(base, state_file, first_refresh)
    published: list[PortalSnapshot] = []
    poller = PortalPoller(config.portals[0], config, session, published.append)
    snapshot = await poller.cycle()
    assert (snapshot.up, snapshot.error) == (True, None)
    tasks = {s.labels: s.value for s in snapshot.samples if s.family.name == "bitrix24_tasks"}
    assert tasks[("acme", "2", "0", "view_all", "expired", "6291456")] == 4.0
    assert {labels[1] for labels in tasks} == {"1", "2"}
    assert {labels[3] for labels in tasks} == {"view_all", "view_role_responsible"}
    portal.expire_access_tokens()
    snapshot = await poller.cycle()
    assert snapshot.up
    assert portal.token_requests == 2


async def test_poller_with_a_dead_refresh_token(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """invalid_grant: up is false, one error line, and later cycles ask the server nothing."""
    caplog.set_level(logging.DEBUG)
    config = oauth_config(base, state_file, "not-a-token-the-server-knows")
    poller = PortalPoller(config.portals[0], config, session, lambda snapshot: None)
    snapshots = [await poller.cycle() for _ in range(5)]
    assert [s.up for s in snapshots] == [False] * 5
    assert all(s.error and "oauth.token: invalid_grant" in s.error for s in snapshots)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "invalid_grant" in errors[0].getMessage()
    assert "not-a-token-the-server-knows" not in exporter_log(caplog)
    assert portal.token_requests == 1
    assert portal.count("profile") == 0


# ---- secrets --------------------------------------------------------------------------------


async def test_tokens_never_reach_logs_or_errors(
    portal: FakePortal,
    base: str,
    first_refresh: str,
    state_file: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Across refreshes, a failed save and a dead grant, no token or secret is ever shown."""
    caplog.set_level(logging.DEBUG)
    credential = OAuthCredential("acme", oauth(base, state_file, first_refresh))
    client = client_for(credential, session)
    texts: list[str] = []
    await client.call("profile")
    portal.expire_access_tokens()
    await client.call("profile")
    portal.expire_access_tokens()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(13, "EACCES")))
        with pytest.raises(BitrixError) as failure:
            await client.call("profile")
        texts += [str(failure.value), repr(failure.value)]
    await client.call("profile")
    saved = state_of(state_file)
    assert {saved["access_token"], saved["refresh_token"]} <= set(credential.secrets)
    portal.revoke_refresh_tokens(CLIENT_ID)
    portal.expire_access_tokens()
    with pytest.raises(BitrixError) as failure:
        await client.call("profile")
    texts += [str(failure.value), repr(failure.value), repr(credential)]
    secrets = [*portal.issued_tokens, CLIENT_SECRET]
    assert len(portal.issued_tokens) == 7  # the first refresh token and three token pairs
    shown = "\n".join([exporter_log(caplog), *texts])
    for secret in secrets:
        assert secret not in shown
        # Registered for masking, too, in case a library ever prints one.
        assert mask(f"x{secret}x") == "x<secret>x"


# ---- the fake's side of OAuth ---------------------------------------------------------------


async def test_fake_accepts_bearer_header_and_access_token_param(
    portal: FakePortal, base: str, first_refresh: str, session: aiohttp.ClientSession
) -> None:
    """The three ways of passing a token work; an unknown one is invalid_token."""
    _, body = await token_get(session, base, first_refresh)
    token = body["access_token"]
    url = f"{base}/rest/profile"
    async with session.post(url, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    async with session.post(url, data={"access_token": token}) as response:
        assert response.status == 200
    async with session.post(url, json={"auth": "unknown"}) as response:
        assert (response.status, (await response.json())["error"]) == (401, "invalid_token")
    async with session.post(url) as response:
        assert (response.status, (await response.json())["error"]) == (401, "NO_AUTH_FOUND")


async def test_fake_token_endpoint_errors(
    portal: FakePortal, base: str, first_refresh: str, session: aiohttp.ClientSession
) -> None:
    """Wrong secret: 401 invalid_client; other grant types: 400 invalid_request."""
    params = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": "nope",
        "refresh_token": first_refresh,
    }
    async with session.get(f"{base}/oauth/token/", params=params) as response:
        assert (response.status, (await response.json())["error"]) == (401, "invalid_client")
    params |= {"client_secret": CLIENT_SECRET, "grant_type": "authorization_code"}
    async with session.get(f"{base}/oauth/token/", params=params) as response:
        assert (response.status, (await response.json())["error"]) == (400, "invalid_request")
    assert portal.token_requests == 2
    assert all(r.params["client_secret"] == "<secret>" for r in portal.requests)


async def test_fake_operating_budget_is_per_application(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """Calls with tokens of one app share a budget; another app and a webhook do not."""
    portal = FakePortal(requests_per_second=None, operating_limit=1.0, operating_cost=0.6)
    portal.add_user(FakeUser(1, "Anna", "Admin", admin=True))
    portal.add_user(FakeUser(2, "Boris", "Plain"))
    hook = portal.add_webhook(1, "hooksecret")
    portal.add_oauth_app("app.one", "s1", 1)
    portal.add_oauth_app("app.two", "s2", 2)
    server = await aiohttp_server(portal.app)
    root = str(server.make_url("")).rstrip("/")

    async def token(client_id: str, secret: str) -> str:
        refresh = portal.issue_refresh_token(client_id)
        params = {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": secret,
            "refresh_token": refresh,
        }
        async with session.get(f"{root}/oauth/token/", params=params) as response:
            return str((await response.json())["access_token"])

    first, second, other = (
        await token("app.one", "s1"),
        await token("app.one", "s1"),
        await token("app.two", "s2"),
    )

    async def status(url: str, **body: str) -> int:
        async with session.post(url, json=body) as response:
            return response.status

    assert await status(f"{root}/rest/profile", auth=first) == 200
    assert await status(f"{root}/rest/profile", auth=second) == 200
    assert await status(f"{root}/rest/profile", auth=first) == 429
    assert await status(f"{root}/rest/profile", auth=other) == 200
    assert await status(f"{root}{hook}profile") == 200

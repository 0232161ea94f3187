"""`bitrix24-exporter doctor` against the fake portal: the exact report for each kind of
first-contact problem, the exit codes, the JSON form, and what doctor may send (a bounded
number of reading requests, never a secret on its output)."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from exporter import doctor
from exporter.fakeportal import ROLES, FakePortal, FakeUser
from tests.support import (
    SECRET,
    config_of,
    find_leaks,
    free_port,
    make_portal,
    register_secret,
    require_binary,
)

Serve = Callable[[FakePortal], Awaitable[str]]

# What doctor may call: reading methods only.
READING = {"profile", "scope", "user.get", "tasks.task.counters.get", "im.counters.get", "batch"}


async def run_doctor(raw: dict[str, Any]) -> tuple[str, int]:
    """Doctor's text report and exit code for the config `raw`, run in this process."""
    async with aiohttp.ClientSession() as session:
        report = await doctor.diagnose(config_of(raw), session)
    text = doctor.format_text(report)
    assert not find_leaks([("doctor's report", text), ("json", doctor.format_json(report))])
    return text, report.exit_code


def config(base: str, **portal: Any) -> dict[str, Any]:
    """One portal `acme` on the fake at `base`, polled every minute."""
    entry: dict[str, Any] = {"name": "acme", "webhook": f"{base}/rest/1/{SECRET}/"}
    entry.update(portal)
    return {"poll_interval": "60s", "request_timeout": "5s", "portals": [entry]}


def host_of(base: str) -> str:
    return base.split("://", 1)[1]


REACHABLE = "  OK    reachable: 127.0.0.1 resolves (1 address), HTTP answers (404)"
CREDENTIAL = "  OK    credential: webhook accepted"
ADMIN = "  OK    owner: user 1 (User1 Test), administrator: may read every user's task counters"
SKIPPED = "  SKIP  other checks: they need a reachable portal and a working credential"
NOT_ADMIN = [
    "  FAIL  owner: user 1 (User1 Test) is not an administrator: Bitrix24 answers [] for"
    " the task counters of users it does not head, so tasks.users: all would export next"
    " to nothing",
    "        fix: use a webhook created by a portal administrator, or set tasks.users: self",
]


async def test_a_good_portal_is_all_ok(served: Serve) -> None:
    """A good portal: every check OK, each figure from the fake's answers, exit 0."""
    portal = make_portal(users=3, operating_cost=0.01)
    base = await served(portal)
    text, code = await run_doctor(config(base, tasks={"users": "all"}))
    assert text.splitlines() == [
        f"acme (http://{host_of(base)}/rest/1/<secret>/)",
        REACHABLE,
        CREDENTIAL,
        ADMIN,
        "  OK    scopes: granted: department, im, task, user;"
        " needed: task, im, user_brief or user or user_basic",
        "  OK    users: tasks.users: all selects 3 active employees",
        "  OK    rate limit: 1 request per cycle (4 commands in batches of 50); shortest cycle"
        " 0s from an idle bucket (burst 50), 0.5s sustained at 2 requests/s;"
        " poll_interval 60s fits",
        "  OK    operating: tasks.task.counters.get: 0.01s per call x 3 every 60s = 0.3s per"
        " 10 minutes of operating_limit 480s (0 %)",
        "  OK    operating: im.counters.get: 0.01s per call x 1 every 60s = 0.1s per 10 minutes"
        " of operating_limit 480s (0 %)",
        "  OK    operating: user.get: 0.01s per call x 1 every 600s = 0.01s per 10 minutes of"
        " operating_limit 480s (0 %)",
        "",
        "1 portal: 0 FAIL, 0 WARN: ready to run",
    ]
    assert code == doctor.EXIT_OK
    # A handful of reading requests; never a post.
    assert {r.method for r in portal.requests} <= READING
    assert len(portal.requests) == 5


async def test_a_missing_scope_is_named_with_the_fix(served: Serve) -> None:
    """A webhook without `im`: the scopes line names it and how to tick it; the chat
    counters' operating check is skipped rather than failing a second time."""
    portal = make_portal(users=3)
    portal.add_webhook(1, SECRET, scopes=("task", "user_brief"))
    base = await served(portal)
    text, code = await run_doctor(config(base, tasks={"users": "all"}))
    lines = text.splitlines()
    assert lines[4:6] == [
        "  FAIL  scopes: granted: task, user_brief; missing: im (for im.counters.get)",
        "        fix: edit the webhook in Bitrix24 (Developer resources -> Integrations) and"
        " tick im; its URL stays the same",
    ]
    assert "  SKIP  operating: im.counters.get: not called: scope im is missing (see scopes)" in (
        lines
    )
    assert lines[-1] == "1 portal: 1 FAIL, 0 WARN: fix the FAIL lines, then run doctor again"
    assert code == doctor.EXIT_FAILED
    assert "im.counters.get" not in {r.method for r in portal.requests}


async def test_a_non_admin_with_users_all_fails(served: Serve) -> None:
    """A non-administrator's webhook with `users: all` fails the owner check and says to
    use an administrator's webhook; the same webhook with `users: self` is fine."""
    portal = make_portal(users=3, admin=False)
    base = await served(portal)
    text, code = await run_doctor(config(base, tasks={"users": "all"}))
    assert text.splitlines()[3:5] == NOT_ADMIN
    assert code == doctor.EXIT_FAILED
    text, code = await run_doctor(config(base, tasks={"users": "self"}))
    assert text.splitlines()[3] == (
        "  OK    owner: user 1 (User1 Test), not an administrator: reads only its own task"
        " counters, which is what tasks.users: self asks"
    )
    assert code == doctor.EXIT_OK


async def test_a_load_that_does_not_fit(served: Serve) -> None:
    """120 users in five roles every 5 s: 13 requests need 6.5 s at 2/s, and 600 calls of
    0.5 s each need far more operating time than 480 s per 10 minutes; both lines fail and
    suggest the one poll_interval that fits both."""
    portal = make_portal(users=120, operating_cost=0.5)
    base = await served(portal)
    raw = config(base, tasks={"users": "all", "roles": list(ROLES)})
    raw["poll_interval"] = "5s"
    text, code = await run_doctor(raw)
    suggestion = "set poll_interval: 10m or longer, or poll fewer users, groups or roles"
    assert text.splitlines()[6:12] == [
        "  FAIL  rate limit: 13 requests per cycle (601 commands in batches of 50); shortest"
        " cycle 0s from an idle bucket (burst 50), 6.5s sustained at 2 requests/s;"
        " poll_interval 5s is shorter than the sustained minimum: every cycle would start"
        " later than the one before",
        f"        fix: {suggestion}; on an Enterprise plan, rate_limit: enterprise allows 5"
        " requests/s",
        "  FAIL  operating: tasks.task.counters.get: 0.5s per call x 600 every 6.5s ="
        " 27692s per 10 minutes, more than the 456s of operating_limit 480s leaves",
        f"        fix: {suggestion}: past the limit Bitrix24 blocks the method for the rest"
        " of its 10 minutes (429 OPERATION_TIME_LIMIT)",
        "  OK    operating: im.counters.get: 0.5s per call x 1 every 6.5s = 46.2s per 10"
        " minutes of operating_limit 480s (10 %)",
        "  OK    operating: user.get: 0.5s per call x 3 every 600s = 1.5s per 10 minutes of"
        " operating_limit 480s (0 %)",
    ]
    assert code == doctor.EXIT_FAILED
    # 600 s fits both: 0.5 s x 600 calls x 600 / 600 s = 300 s of the 456 s.
    raw["poll_interval"] = "10m"
    text, code = await run_doctor(raw)
    assert code == doctor.EXIT_OK, text


async def test_a_revoked_webhook(served: Serve) -> None:
    """A revoked webhook: the portal answers, the credential fails with Bitrix24's error and
    the way to a new webhook; nothing after it is checked."""
    portal = make_portal()
    portal.revoke_webhook(SECRET)
    base = await served(portal)
    text, code = await run_doctor(config(base))
    assert text.splitlines()[1:5] == [
        REACHABLE,
        "  FAIL  credential: profile: INVALID_CREDENTIALS: Invalid request credentials (HTTP 401)",
        "        fix: the webhook was deleted, its URL is mistyped or its user was dismissed:"
        " create an inbound webhook in Bitrix24 (Developer resources -> Other -> Inbound"
        " webhook) and put its URL in the config",
        SKIPPED,
    ]
    assert code == doctor.EXIT_FAILED
    assert [r.method for r in portal.requests] == ["profile"]


async def test_an_unreachable_host() -> None:
    """Nothing listens on the port, or the name does not resolve: the reachable line says
    which, and no request is sent."""
    port = free_port()
    text, code = await run_doctor(config(f"http://127.0.0.1:{port}"))
    assert text.splitlines() == [
        f"acme (http://127.0.0.1:{port}/rest/1/<secret>/)",
        f"  FAIL  reachable: cannot connect to 127.0.0.1 port {port}: Connection refused",
        "        fix: check the port in the URL, and that this machine may open HTTP"
        " connections to the portal (firewall, proxy)",
        SKIPPED,
        "",
        "1 portal: 1 FAIL, 0 WARN: fix the FAIL lines, then run doctor again",
    ]
    assert code == doctor.EXIT_FAILED
    # .invalid never resolves (RFC 2606).
    text, _ = await run_doctor(config("https://acme.bitrix24.invalid"))
    assert text.splitlines()[1:3] == [
        "  FAIL  reachable: acme.bitrix24.invalid: the name does not resolve"
        " (Name or service not known)",
        "        fix: check the host name in the config (the portal's address, such as"
        " acme.bitrix24.com) and this machine's DNS",
    ]


async def test_an_untrusted_certificate(tmp_path: Path) -> None:
    """A portal whose TLS certificate this machine does not trust: the reachable line says
    so, and no API request is sent with the credential."""
    subprocess.run(
        [
            require_binary("openssl"),
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=portal",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    portal = make_portal()
    runner = web.AppRunner(portal.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        text, code = await run_doctor(config(f"https://127.0.0.1:{port}"))
    finally:
        await runner.cleanup()
    assert text.splitlines()[1:4] == [
        f"  FAIL  reachable: 127.0.0.1:{port}: the TLS certificate is not trusted"
        " (self-signed certificate)",
        "        fix: a proxy or firewall that intercepts TLS needs its CA certificate in this"
        " machine's trust store (SSL_CERT_FILE); a self-hosted portal needs a valid"
        " certificate",
        SKIPPED,
    ]
    assert code == doctor.EXIT_FAILED
    assert portal.requests == []


async def test_two_problems_at_once(served: Serve) -> None:
    """A non-administrator's webhook without `im` and a user scope: both problems are
    named, each with its fix, and the user count is skipped for want of the scope."""
    portal = make_portal(users=3, admin=False)
    portal.add_webhook(1, SECRET, scopes=("task",))
    base = await served(portal)
    text, code = await run_doctor(config(base, tasks={"users": "all"}))
    assert text.splitlines()[3:10] == [
        *NOT_ADMIN,
        "  FAIL  scopes: granted: task; missing: im (for im.counters.get), user_brief or user"
        " or user_basic (for user.get)",
        "        fix: edit the webhook in Bitrix24 (Developer resources -> Integrations) and"
        " tick im, user_brief; its URL stays the same",
        "  SKIP  users: listing users needs a user scope (see scopes)",
        "  SKIP  rate limit: the number of users is unknown (see users)",
        "",
    ]
    assert code == doctor.EXIT_FAILED


async def test_listed_users_and_im_webhooks(served: Serve) -> None:
    """A list of users names the ones that are missing or inactive (WARN, exit 0); each
    extra im webhook is checked for its user and the im scope."""
    portal = make_portal(users=3)
    portal.add_user(FakeUser(4, "Dana", "Gone", active=False))
    portal.add_webhook(2, "imhookoftwo", scopes=("im",))
    portal.add_webhook(3, "imhookofthree", scopes=("task",))
    base = await served(portal)
    hooks = [f"{base}/rest/2/imhookoftwo/", f"{base}/rest/3/imhookofthree/"]
    raw = config(base, tasks={"users": [1, 2, 4, 9]}, im={"webhooks": hooks})
    text, code = await run_doctor(raw)
    lines = text.splitlines()
    assert lines[5:11] == [
        f"  OK    im webhook: http://{host_of(base)}/rest/2/<secret>/: user 2 (User2 Test),"
        " reads its own chat counters",
        f"  FAIL  im webhook: http://{host_of(base)}/rest/3/<secret>/: user 3 (User3 Test);"
        " scope im is missing",
        "        fix: edit that webhook in Bitrix24 and tick im",
        "  WARN  users: tasks.users lists 4 users; not found or inactive: 4, 9",
        "        fix: remove them from tasks.users: their counters would stay empty",
        "  OK    rate limit: 3 requests per cycle (5 commands in batches of 50, + 2 for im"
        " webhooks); shortest cycle 0s from an idle bucket (burst 50), 1.5s sustained at"
        " 2 requests/s; poll_interval 60s fits",
    ]
    assert code == doctor.EXIT_FAILED


async def test_teams_and_alert_receivers(served: Serve) -> None:
    """Teams need the department scope; each alert receiver's targets are checked without
    posting: a private dialog with an active user or not, a chat whose members the portal
    cannot list (this fake has no im.dialog.users.list), notifications."""
    portal = make_portal(users=3)
    portal.add_webhook(1, SECRET, scopes=("task", "im", "user"))
    base = await served(portal)
    token = "alertmanager-token-0123"
    register_secret(token)
    raw = config(base, tasks={"users": "all"}, teams={"enabled": True})
    raw["alert_receivers"] = [
        {"name": "ops", "portal": "acme", "token": token, "chat": "chat42", "notify_head": True},
        {"name": "dm", "portal": "acme", "token": token, "chat": 7},
        {"name": "anna", "portal": "acme", "token": token, "chat": 2, "notify_user": True},
    ]
    text, code = await run_doctor(raw)
    lines = text.splitlines()
    assert lines[4:8] == [
        "  FAIL  scopes: granted: im, task, user; missing: department (for department.get)",
        "        fix: edit the webhook in Bitrix24 (Developer resources -> Integrations) and"
        " tick department; its URL stays the same",
        "  OK    users: tasks.users: all selects 3 active employees",
        "  SKIP  departments: listing departments needs scope department (see scopes)",
    ]
    assert lines[-7:-1] == [
        "  WARN  alert receiver: ops: chat42: im.dialog.users.list: ERROR_METHOD_NOT_FOUND:"
        " Method not found! (HTTP 404); notify_head: the department's head (teams)",
        "        fix: the portal cannot list chat members: check by hand that user 1 is a member"
        " of chat42",
        "  FAIL  alert receiver: dm: 7: no active user 7",
        "        fix: set chat to an active user's id, or to a chat like chat42",
        "  OK    alert receiver: anna: 2: a private dialog with user 2 (User2 Test);"
        " notify_user: personal notifications (scope im)",
        "",
    ]
    assert code == doctor.EXIT_FAILED
    # Reading only: no message and no notification method was called.
    assert {r.method for r in portal.requests} <= READING | {"im.dialog.users.list"}


async def test_oauth_refresh_and_state_file(served: Serve, tmp_path: Path) -> None:
    """OAuth: the first run refreshes and says so; a second finds a valid token and makes no
    refresh (that would rotate the token a running exporter holds); a state file whose
    directory cannot exist fails before any token request."""
    portal = make_portal(users=2)
    refresh = portal.add_oauth_app("local.app.1", "appsecretvalue", 1)
    base = await served(portal)
    state = tmp_path / "state" / "acme.json"

    def oauth_config(state_file: Path) -> dict[str, Any]:
        raw = config(base)
        del raw["portals"][0]["webhook"]
        raw["portals"][0]["oauth"] = {
            "client_endpoint": f"{base}/rest/",
            "client_id": "local.app.1",
            "client_secret": "appsecretvalue",
            "refresh_token": refresh,
            "state_file": str(state_file),
            "server": f"{base}/",
        }
        return raw

    register_secret("appsecretvalue", refresh)
    text, code = await run_doctor(oauth_config(state))
    lines = text.splitlines()
    assert lines[0] == f"acme (OAuth application local.app.1 at http://{host_of(base)}/...)"
    assert lines[1] == (
        "  OK    reachable: 127.0.0.1 resolves (1 address), HTTP answers (404);"
        " 127.0.0.1 resolves (1 address), HTTP answers (404)"
    )
    assert lines[2] == f"  OK    credential: the token refresh works; the new pair is in {state}"
    assert code == doctor.EXIT_OK
    assert portal.token_requests == 1
    register_secret(*portal.issued_tokens)

    text, code = await run_doctor(oauth_config(state))
    assert text.splitlines()[2] == (
        f"  OK    credential: the access token in {state} is accepted (valid 60 more minutes,"
        " so no refresh was made); the state file is writable"
    )
    assert portal.token_requests == 1

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    text, code = await run_doctor(oauth_config(blocker / "acme.json"))
    assert text.splitlines()[2:4] == [
        f"  FAIL  credential: state file {blocker}/acme.json cannot be written: {blocker} is"
        " not a directory",
        "        fix: the exporter rewrites it on every token refresh: make its directory"
        " writable by the exporter's user (under systemd, StateDirectory= gives"
        " /var/lib/bitrix24-exporter)",
    ]
    assert code == doctor.EXIT_FAILED
    assert portal.token_requests == 1


def test_suggested_interval_is_round_and_never_shorter() -> None:
    """The suggested poll_interval is the first round value at or above the minimum."""
    cases = {0.0: "5s", 5: "5s", 6.5: "10s", 59.9: "60s", 60.1: "90s", 394.7: "10m"}
    assert {s: doctor.nice_interval(s) for s in cases} == cases
    assert doctor.nice_interval(7201) == "3h"


# ---- the command ----------------------------------------------------------------------------


async def run_command(exporter_process: Any, *args: str) -> tuple[int, str, str]:
    """`bitrix24-exporter doctor ARGS` through the fixture that feeds its output to the guard."""
    process = exporter_process(None, "doctor", *args, listen=False)
    code: int = await process.wait_exit()
    return code, process.stdout(), process.stderr()


async def test_the_command_exit_codes_and_json(
    served: Serve, tmp_path: Path, exporter_process: Any
) -> None:
    """`bitrix24-exporter doctor`: exit 0 on a good portal, 1 when a check failed, 2 for a
    config error (each problem on stderr); `--output json` holds the same checks."""
    portal = make_portal(users=2)
    base = await served(portal)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(base)))
    code, out, err = await run_command(exporter_process, "--config", str(path))
    assert (code, err) == (0, ""), out
    assert out.endswith("1 portal: 0 FAIL, 0 WARN: ready to run\n")

    portal.revoke_webhook(SECRET)
    code, out, _ = await run_command(exporter_process, "--config", str(path), "--output", "json")
    data = json.loads(out)
    assert code == data["exit_code"] == 1
    assert data["portals"][0]["checks"][1] == {
        "check": "credential",
        "status": "FAIL",
        "summary": "profile: INVALID_CREDENTIALS: Invalid request credentials (HTTP 401)",
        "fix": "the webhook was deleted, its URL is mistyped or its user was dismissed: create"
        " an inbound webhook in Bitrix24 (Developer resources -> Other -> Inbound webhook)"
        " and put its URL in the config",
    }
    assert SECRET not in out

    path.write_text(yaml.safe_dump({"poll_interval": "soon", "portals": []}))
    code, out, err = await run_command(exporter_process, "--config", str(path))
    assert code == 2
    assert out == ""
    assert f"{path}: poll_interval: must be a duration" in err


@pytest.mark.parametrize("output", ["text", "json"])
async def test_no_secret_in_any_output(served: Serve, output: str) -> None:
    """Doctor's output never holds the webhook secret, whatever the portal says."""
    portal = make_portal(users=2)
    portal.revoke_webhook(SECRET)
    base = await served(portal)
    async with aiohttp.ClientSession() as session:
        report = await doctor.diagnose(config_of(config(base)), session)
    text = doctor.format_json(report) if output == "json" else doctor.format_text(report)
    assert SECRET not in text
    assert "<secret>" in text

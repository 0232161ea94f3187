"""The secret detector (`leak_watch` in tests/conftest.py) catches a leak, and says so loudly.

Every test runs under `leak_watch`: it keeps every record of the exporter's loggers (DEBUG and
up), every response body a test reads from the exporter app or from an exporter process, and
the stdout and stderr of every exporter process (all of them start through the
`exporter_process` fixture), and fails the test if any of them holds a registered secret.
Here a planted secret, made up for this run and known to nobody else, is leaked on purpose
through each of those channels in an inner pytest run, which must fail for each channel and
name it, without printing the secret itself.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, SECRET, find_leaks

INNER_TESTS = '''
"""Tests that leak a planted secret on purpose; run only by tests/test_secrets.py."""

import logging
from typing import Any

from aiohttp import web

from tests.support import config_of, portal_config, register_secret

PLANTED = "{planted}"
register_secret(PLANTED)


async def refusing_portal(aiohttp_server: Any) -> str:
    async def refuse(request: web.Request) -> web.Response:
        body = {{"error": "INVALID_CREDENTIALS", "error_description": f"bad token {{PLANTED}}"}}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/rest/1/{{secret}}/{{method}}", refuse)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def test_leak_in_a_debug_record() -> None:
    logging.getLogger("exporter.planted").debug("the token is %s", PLANTED)


async def test_leak_in_a_response_body(exporter_app: Any, aiohttp_server: Any) -> None:
    # The exporter shows the portal's error text on its landing page, and logs it.
    client = await exporter_app(config_of(portal_config(await refusing_portal(aiohttp_server))))
    assert "acme" in await (await client.get("/")).text()


async def test_leak_in_process_stderr(exporter_process: Any, aiohttp_server: Any) -> None:
    process = exporter_process(portal_config(await refusing_portal(aiohttp_server)))
    await process.wait_ready()


async def test_leak_in_a_process_response_body(
    exporter_process: Any, aiohttp_server: Any
) -> None:
    process = exporter_process(portal_config(await refusing_portal(aiohttp_server)))
    await process.wait_ready()
    assert "acme" in (await process.get("/")).text


def test_no_leak() -> None:
    logging.getLogger("exporter.planted").info("nothing secret here")
'''


def test_planted_leaks_fail_their_tests_loudly(tmp_path: Path) -> None:
    """A planted secret in a log record, a response body or stderr fails its test, unshown."""
    planted = "planted" + secrets.token_hex(12)
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_leaks.py").write_text(INNER_TESTS.format(planted=planted))
    # A session of its own, so that a hung run is stopped together with the exporter
    # processes it started, instead of leaving them orphaned.
    inner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--show-capture=no",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
            "--basetemp",
            str(tmp_path / "inner"),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        # A liveness bound: the inner run takes seconds.
        output, _ = inner.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(inner.pid, signal.SIGKILL)
        output, _ = inner.communicate()
        pytest.fail(f"the inner run hung:\n{output}")
    assert inner.returncode == 1, output
    # The check runs after each test: a leak is an error at its teardown.
    assert "5 passed, 4 errors" in output, output
    failed = [line for line in output.splitlines() if line.startswith("ERROR")]
    for name in (
        "test_leak_in_a_debug_record",
        "test_leak_in_a_response_body",
        "test_leak_in_process_stderr",
        "test_leak_in_a_process_response_body",
    ):
        assert any(name in line for line in failed), output
    assert "secret leaked in log record exporter.planted DEBUG" in output
    body = [line for line in output.splitlines() if "leaked in response body of GET /:" in line]
    assert body and "<LEAKED SECRET #" in body[0]  # the excerpt shows where, not what
    assert "secret leaked in stderr of exporter process" in output
    assert "secret leaked in response body of GET / from exporter process" in output
    assert planted not in output  # loud, but the secret itself is never printed


def test_find_leaks_names_the_place_not_the_secret() -> None:
    """find_leaks reports where a registered secret occurs and shows it replaced."""
    found = find_leaks([("here", f"url /rest/1/{SECRET}/profile"), ("there", "clean")])
    assert len(found) == 1
    assert found[0].startswith("secret leaked in here:")
    assert SECRET not in found[0] and "<LEAKED SECRET #" in found[0]

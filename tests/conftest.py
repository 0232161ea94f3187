"""Fixtures: the secret-leak guard on every test, fake portals on real sockets, and the
exporter as an aiohttp app in the test's process or as a child process.

The helpers the fixtures use are in `tests/support.py`; tests import them from there.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import settings

from exporter.config import Config
from exporter.fakeportal import FakePortal, serve
from exporter.server import build_app
from tests.support import LEAK_LOGGERS, ExporterProcess, LeakWatch, wait_for

# Hypothesis fails an example that takes longer than 200 ms by default: a wall-clock bound
# that a loaded machine breaks. Properties are about answers, not speed (bench/ measures that).
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/ from what the exporter does now (scripts/update-golden)",
    )


@pytest.fixture(autouse=True)
def leak_watch() -> Iterator[LeakWatch]:
    """Fails the test if a secret reached an exporter log record or any text it read."""
    watch = LeakWatch()
    loggers = [logging.getLogger(name) for name in LEAK_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(watch)
        # DEBUG, so that a secret in a debug line is caught too.
        logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(watch)
            logger.setLevel(level)
    leaks = watch.leaks()
    if leaks:
        pytest.fail("\n".join(leaks), pytrace=False)


@pytest.fixture
async def served() -> AsyncIterator[Callable[[FakePortal], Awaitable[str]]]:
    """Start fake portals on 127.0.0.1; returns their base URL; stops them afterwards."""
    runners: list[web.AppRunner] = []

    async def start(portal: FakePortal) -> str:
        runner, url = await serve(portal)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def exporter_app(
    aiohttp_client: Any, leak_watch: LeakWatch
) -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    """Start the exporter app for a config; the poll loop runs with the app.

    Every response body the test reads through the returned client reaches the leak guard.
    """

    async def read(
        session: Any, context: Any, params: aiohttp.TraceResponseChunkReceivedParams
    ) -> None:
        leak_watch.body(f"response body of {params.method} {params.url.path}", params.chunk)

    async def start(config: Config, *, ready: bool = True) -> TestClient[Any, Any]:
        trace = aiohttp.TraceConfig()
        trace.on_response_chunk_received.append(read)
        client: TestClient[Any, Any] = await aiohttp_client(
            build_app(config), trace_configs=[trace]
        )
        if ready:

            async def is_ready() -> bool:
                return (await client.get("/readyz")).status == 200

            await wait_for(is_ready, what="/readyz answering 200")
        return client

    yield start


@pytest.fixture
def log_text(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    caplog.set_level(logging.DEBUG)
    yield lambda: "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture
def exporter_process(
    tmp_path: Path, leak_watch: LeakWatch
) -> Iterator[Callable[..., ExporterProcess]]:
    """Start the exporter as a child process; every one a test starts goes through here.

    `start(raw, *args)` writes `raw` to tmp_path/config.yaml and passes `--config` with it;
    `start(None, *args)` passes only `args`. `program` replaces `python -m exporter` (an
    installed entry point), `listen=False` leaves out `--listen-address`. Each process is
    killed at the end if still running, and its stdout and stderr go to the leak guard.
    """
    started: list[ExporterProcess] = []

    def start(
        raw: dict[str, Any] | None,
        *args: str,
        env: dict[str, str] | None = None,
        program: Sequence[str] | None = None,
        listen: bool = True,
    ) -> ExporterProcess:
        if raw is not None:
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(raw))
            args = ("--config", str(path), *args)
        options: dict[str, Any] = {"env": env, "listen": listen}
        if program is not None:
            options["program"] = program
        process = ExporterProcess(args, workdir=tmp_path, watch=leak_watch, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses started by the test, stopped by PID at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

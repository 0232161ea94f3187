"""Shared fixtures: a fake portal on a real socket, configs pointing at it, and the exporter
running as an aiohttp app (in-process) or as a subprocess (`python -m exporter`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.config import Config, parse_config
from exporter.fakeportal import FakePortal, FakeUser, serve
from exporter.logs import mask
from exporter.server import build_app

SECRET = "t0ps3cr3tw3bh00k"
ROOT = Path(__file__).resolve().parent.parent

# ---- secrets: none may reach a log record or a response body the tests read -------------

# Every secret the tests hand to the exporter (webhook secrets, client secrets, tokens).
# Tests and fixtures add what they create with `register_secret`; tokens the exporter
# itself learns (OAuth) are covered too, through `exporter.logs.mask`'s registry.
SECRETS: set[str] = {SECRET}
# The exporter's own loggers and aiohttp's client side; the fake portal (aiohttp.server,
# aiohttp.web) plays Bitrix24 and its logs are not the exporter's.
LEAK_LOGGERS = ("exporter", "aiohttp.client")


def register_secret(*values: str) -> None:
    """Add strings that must never appear in the exporter's logs or in its responses."""
    SECRETS.update(v for v in values if v)


def find_leaks(texts: Iterable[tuple[str, str]], secrets: Iterable[str] = ()) -> list[str]:
    """One line per text that holds a secret, saying where; the secret itself is never shown.

    `texts` are (where, text) pairs; the secrets are `secrets`, the `SECRETS` registry and
    every string registered with `exporter.logs.add_secrets`.
    """
    known = sorted(set(secrets) | SECRETS)
    found: list[str] = []
    for where, text in texts:
        shown = text
        hits = [i for i, secret in enumerate(known) if secret in text]
        for i in hits:
            shown = shown.replace(known[i], f"<LEAKED SECRET #{i}>")
        if mask(shown) != shown:
            hits.append(-1)
            where += " (a secret the exporter registered, shown as <secret>)"
            shown = mask(shown)
        if hits:
            # Around the first leak, which may be deep in a long body.
            at = max(shown.find("<LEAKED SECRET"), shown.find("<secret>"), 0)
            excerpt = shown[max(0, at - 150) : at + 150]
            excerpt = (
                ("..." if at > 150 else "") + excerpt + ("..." if at + 150 < len(shown) else "")
            )
            found.append(f"secret leaked in {where}: {excerpt!r}")
    return found


class LeakWatch(logging.Handler):
    """Keeps every record of `LEAK_LOGGERS` (DEBUG and up) and every body a test read."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[tuple[str, str]] = []
        self._bodies: set[bytes] = set()  # /metrics repeats itself between cycles

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        self.texts.append((f"log record {record.name} {record.levelname}", text))

    def body(self, where: str, data: bytes) -> None:
        if data not in self._bodies:
            self._bodies.add(data)
            self.texts.append((where, data.decode("utf-8", "replace")))

    def leaks(self) -> list[str]:
        return find_leaks(self.texts)


@pytest.fixture(autouse=True)
def leak_watch() -> Iterator[LeakWatch]:
    """Fails the test if a secret reached an exporter log record or a response body it read."""
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_portal(users: int = 3, *, admin: bool = True, **kwargs: Any) -> FakePortal:
    """A fake portal with `users` active users; user 1 owns the webhook `SECRET`."""
    portal = FakePortal(**kwargs)
    for user_id in range(1, users + 1):
        portal.add_user(FakeUser(user_id, f"User{user_id}", "Test", admin=admin and user_id == 1))
    portal.add_webhook(1, SECRET)
    return portal


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


def portal_config(base_url: str, **overrides: Any) -> dict[str, Any]:
    """A config mapping with one portal `acme` on the fake portal at `base_url`."""
    portal: dict[str, Any] = {
        "name": "acme",
        "webhook": f"{base_url}/rest/1/{SECRET}/",
        "tasks": {"users": "all"},
    }
    portal.update(overrides.pop("portal", {}))
    raw: dict[str, Any] = {"poll_interval": "1s", "request_timeout": "2s", "portals": [portal]}
    raw.update(overrides)
    return raw


def config_of(raw: dict[str, Any]) -> Config:
    return parse_config(raw, source="test.yaml")


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


@pytest.fixture
async def exporter_app(
    aiohttp_client: Any, leak_watch: LeakWatch
) -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    """Start the exporter app for a config; the poll loop runs with the app."""

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

            await wait_for(is_ready)
        return client

    yield start


async def metrics_text(client: TestClient[Any, Any]) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


def series(text: str, metric: str, **labels: str) -> dict[str, float]:
    """Lines of `metric` whose labels include `labels`: {label text: value}."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            found[head] = float(value)
    return found


def value(text: str, metric: str, **labels: str) -> float:
    matches = series(text, metric, **labels)
    assert len(matches) == 1, f"expected one {metric}{labels}, got {matches}"
    return next(iter(matches.values()))


@pytest.fixture
def log_text(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    caplog.set_level(logging.DEBUG)
    yield lambda: "\n".join(r.getMessage() for r in caplog.records)


class ExporterProcess:
    """`python -m exporter` in a subprocess, with its stderr kept for inspection."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"exporter-{self.port}.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", *args, "--listen-address", f"127.0.0.1:{self.port}"],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                if self.proc.poll() is not None:
                    raise AssertionError(f"exporter exited: {self.stderr()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/readyz") as response:
                        return response.status == 200
                return False

            await wait_for(ready, timeout=timeout, step=0.1)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def exporter_process(
    tmp_path: Path, leak_watch: LeakWatch
) -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def start(
        raw: dict[str, Any], *extra: str, env: dict[str, str] | None = None
    ) -> ExporterProcess:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        process = ExporterProcess(["--config", str(path), *extra], env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        leak_watch.body(
            f"stderr of exporter process {process.port}", process.stderr_path.read_bytes()
        )

"""What the tests share, apart from fixtures: constants, the fake portal and configs for it,
one way to read `/metrics`, waiting for a condition, the secret-leak guard and the exporter
in a child process.

Fixtures live in `conftest.py` and use these; tests import from here, never from conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config, parse_config
from exporter.fakeportal import FakePortal, FakeUser, demo_portal
from exporter.logs import mask

ROOT = Path(__file__).resolve().parent.parent
SECRET = "t0ps3cr3tw3bh00k"

# The five counter roles of tasks.task.counters.get, as the public config contract names
# them; test_config and test_fakeportal check that the exporter and the fake agree.
ROLES = (
    "view_all",
    "view_role_responsible",
    "view_role_accomplice",
    "view_role_auditor",
    "view_role_originator",
)


# ---- the fake portal and a config pointing at it -------------------------------------------


def make_portal(users: int = 3, *, admin: bool = True, **kwargs: Any) -> FakePortal:
    """A fake portal with `users` active users; user 1 owns the webhook `SECRET`."""
    portal = FakePortal(**kwargs)
    for user_id in range(1, users + 1):
        portal.add_user(FakeUser(user_id, f"User{user_id}", "Test", admin=admin and user_id == 1))
    portal.add_webhook(1, SECRET)
    return portal


def portal_config(base_url: str, **overrides: Any) -> dict[str, Any]:
    """A config mapping with one portal `acme` on the fake portal at `base_url`.

    `portal={...}` updates the portal's mapping; other keywords are top-level keys.
    """
    portal: dict[str, Any] = {
        "name": "acme",
        "webhook": f"{base_url}/rest/1/{SECRET}/",
        "tasks": {"users": "all"},
    }
    portal.update(overrides.pop("portal", {}))
    raw: dict[str, Any] = {"poll_interval": "1s", "request_timeout": "2s", "portals": [portal]}
    raw.update(overrides)
    return raw


def portal_entry(name: str, base_url: str) -> dict[str, Any]:
    """Another portal for `portal_config(...)["portals"]`, on the webhook `SECRET`."""
    return {"name": name, "webhook": f"{base_url}/rest/1/{SECRET}/", "tasks": {"users": "all"}}


def config_of(raw: dict[str, Any]) -> Config:
    return parse_config(raw, source="test.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_binary(name: str) -> str:
    """Path of an external tool; a missing tool fails the test (CI installs all of them)."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH or in the venv; run scripts/bootstrap")
    return found


# ---- waiting ----------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 30.0,
    step: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll `predicate` until it holds.

    `timeout` is a liveness bound, never a speed goal: it only ends a test that would
    otherwise hang, so it is set far above what the condition takes on a loaded machine.
    """
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(step)


# ---- reading /metrics -------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One sample line of an exposition: its name (with `_total`, `_bucket`, ...), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


@functools.lru_cache(maxsize=16)
def parse_metrics(text: str) -> tuple[Series, ...]:
    """Every sample of a text exposition, read by prometheus_client's own parser.

    A body the parser refuses fails the test: the exposition must be valid to be read.
    """
    return tuple(
        Series(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def series(text: str, metric: str, /, **labels: str) -> list[Series]:
    """Samples called `metric` whose labels include `labels` (an empty list when none)."""
    return [
        s
        for s in parse_metrics(text)
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(text: str, metric: str, /, **labels: str) -> float:
    """The value of the one sample matching `metric` and `labels`; fails if there are 0 or 2+."""
    found = series(text, metric, **labels)
    assert len(found) == 1, f"expected one {metric}{labels}, got {[s.labels for s in found]}"
    return found[0].value


def total(text: str, metric: str, /, **labels: str) -> float:
    """The sum over samples matching `metric` and `labels`; fails if there is none.

    A missing series is never read as 0: a check that waits for `== 0` must not pass
    because the series vanished.
    """
    found = series(text, metric, **labels)
    assert found, f"no {metric}{labels} in the exposition"
    return sum(s.value for s in found)


async def metrics_text(client: TestClient[Any, Any]) -> str:
    """The body of `/metrics` from an in-process exporter app (the `exporter_app` fixture)."""
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


# ---- secrets: none may reach a log record, a response body or a process's output ---------

# Every secret the tests hand to the exporter (webhook secrets, client secrets, tokens,
# basic-auth passwords). Tests add what they create with `register_secret`; tokens the
# exporter itself learns (OAuth) are covered too, through `exporter.logs.mask`'s registry.
SECRETS: set[str] = {SECRET}
# The webhook secret of the seeded demo portal (`demo` and the tests that serve it).
DEMO_SECRET = demo_portal(users=1)[1].split("/")[3]
SECRETS.add(DEMO_SECRET)
# The exporter's own loggers and aiohttp's client side; the fake portal (aiohttp.server,
# aiohttp.web) plays Bitrix24 and its logs are not the exporter's.
LEAK_LOGGERS = ("exporter", "aiohttp.client")


def register_secret(*values: str) -> None:
    """Add strings that must never appear in the exporter's logs, output or responses."""
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
    """Keeps every record of `LEAK_LOGGERS` (DEBUG and up) and every text a test read."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[tuple[str, str]] = []
        self._seen: set[bytes] = set()  # /metrics repeats itself between cycles

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        self.texts.append((f"log record {record.name} {record.levelname}", text))

    def body(self, where: str, data: bytes) -> None:
        """A response body, or a process's output, that the test read."""
        if data not in self._seen:
            self._seen.add(data)
            self.texts.append((where, data.decode("utf-8", "replace")))

    def leaks(self) -> list[str]:
        return find_leaks(self.texts)


def start_process(
    started: list[subprocess.Popen[bytes]],
    args: Sequence[str],
    log: Path,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server a test needs (Prometheus, Alertmanager) in the background and add it
    to `started` (which the test's fixture stops by PID). Its output goes to `log`, in the
    test's tmp_path and kept for failures: never to a pipe nobody reads."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    started.append(proc)
    return proc


# ---- the exporter in a child process ---------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    text: str


class ExporterProcess:
    """The exporter in a child process, started by the `exporter_process` fixture.

    Its stdout and stderr go to files in the test's `tmp_path` (never a pipe nobody reads),
    and every body read with `get` and both outputs reach the leak guard.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        workdir: Path,
        watch: LeakWatch,
        env: dict[str, str] | None = None,
        program: Sequence[str] = (sys.executable, "-m", "exporter"),
        listen: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path = workdir / f"exporter-{self.port}.out"
        self.stderr_path = workdir / f"exporter-{self.port}.err"
        self._watch = watch
        command = [*program, *args]
        if listen:
            command += ["--listen-address", f"127.0.0.1:{self.port}"]
        # The child keeps its own copies of the file descriptors.
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                cwd=ROOT,
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit code; `timeout` is a liveness bound far above any real run."""
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def get(
        self,
        path: str,
        *,
        auth: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        scheme: str | None = None,
        method: str = "GET",
    ) -> Response:
        """One request on a new connection; the body reaches the leak guard."""
        scheme = scheme or ("https" if tls else "http")
        headers = {"Authorization": aiohttp.encode_basic_auth(*auth)} if auth else {}
        url = f"{scheme}://127.0.0.1:{self.port}{path}"
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, headers=headers, ssl=tls or False) as response,
        ):
            data = await response.read()
        self._watch.body(f"response body of {method} {path} from exporter process", data)
        return Response(response.status, dict(response.headers), data.decode("utf-8", "replace"))

    async def metrics(self) -> str:
        response = await self.get("/metrics")
        assert response.status == 200, response
        return response.text

    async def wait_ready(self, timeout: float = 60.0, *, path: str = "/readyz", **get: Any) -> None:
        """Until `path` answers 200; `timeout` is a liveness bound (it takes a second or two)."""

        async def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited: {self.stderr()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                return (await self.get(path, **get)).status == 200
            return False

        await wait_for(ready, timeout=timeout, step=0.1, what=f"{path} answering 200")

    async def wait_answering(self, timeout: float = 60.0, **get: Any) -> None:
        """Until the server answers at all (any status), e.g. behind basic auth."""

        async def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited: {self.stderr()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.get("/healthz", **get)
                return True
            return False

        await wait_for(answers, timeout=timeout, step=0.1, what="the exporter answering")

    def stop(self) -> None:
        """Kill it if it still runs; hand its output to the leak guard."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._watch.body(f"stdout of exporter process {self.port}", self.stdout_path.read_bytes())
        self._watch.body(f"stderr of exporter process {self.port}", self.stderr_path.read_bytes())

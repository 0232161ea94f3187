"""Shared pieces of the benchmarks: machine facts, fake portals and the exporter in their own
processes, leaky-bucket arithmetic, /proc readings and tables.

The fake portals run in a child process (`bench/_fakes.py`) so that their CPU time and memory
are not counted as the exporter's, as with a real remote portal. Each fake answers
`GET /_bench/stats` with what it recorded. The exporter runs either in the benchmark's own
process (`PortalPoller`, or `build_app` on an `AppRunner`) or in a child process
(`bench/_exporter_child.py`) when its memory or its scrape latency is what is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from exporter.config import ROLES, Config, parse_config  # noqa: E402

SECRET = "bench0webhook0secret0value"
PLANS = {"standard": (2.0, 50), "enterprise": (5.0, 250)}
# What Prometheus 2.x sends when it scrapes: OpenMetrics preferred, gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
# For runs where the limit is not what is measured: the client side never waits.
NO_LIMIT = {"requests_per_second": 100000, "burst": 100000}


# ---- machine -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What RESULTS.md records about the machine a run was made on."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if found:
            model = found.group(1).strip()
    ram = "unknown"
    with contextlib.suppress(OSError):
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    from importlib.metadata import version

    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "prometheus_client": version("prometheus_client"),
    }


def print_machine() -> None:
    facts = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    # Other work on the machine skews timings; say how busy it was.
    print("load average at start: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))


# ---- output --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table with aligned columns, so it can be pasted into RESULTS.md."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; with fewer than 100 values p99 is the maximum."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---- configs -------------------------------------------------------------------------------


# The privacy modes' key in benchmark configs (`--privacy`).
PSEUDONYM_KEY = "bench-pseudonym-key-0123456789"
PRIVACY_MODES = ("none", "pseudonymous", "aggregate")


def portal_entry(
    name: str,
    url: str,
    *,
    users: object = "all",
    roles: Sequence[str] = ROLES,
    rate_limit: object = "standard",
    operating_limit: float = 480.0,
    privacy: str = "none",
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "webhook": f"{url}/rest/1/{SECRET}/",
        "rate_limit": rate_limit,
        "operating_limit": operating_limit,
        "tasks": {"users": users, "roles": list(roles)},
    }
    if privacy != "none":
        entry["privacy"] = {"mode": privacy, "pseudonym_key": PSEUDONYM_KEY}
    return entry


def config_of(portals: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"poll_interval": "60s", "request_timeout": "30s", "portals": portals}
    raw.update(settings)
    return raw


def parsed(raw: dict[str, Any]) -> Config:
    return parse_config(raw, source="bench.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- the leaky bucket ----------------------------------------------------------------------


def bucket_level(arrivals: Iterable[float], rate: float, at: float) -> float:
    """The level of a leaky bucket at time `at` after admitting requests at `arrivals`."""
    level, last = 0.0, None
    for t in sorted(a for a in arrivals if a <= at):
        if last is not None:
            level = max(0.0, level - (t - last) * rate)
        level += 1
        last = t
    if last is not None:
        level = max(0.0, level - (at - last) * rate)
    return level


def limit_minimum(requests: int, rate: float, burst: int, level: float = 0.0) -> float:
    """The earliest the last of `requests` can be admitted, from a bucket at `level`."""
    return max(0.0, level + requests - burst) / rate


# ---- fake portals in a child process -------------------------------------------------------


@dataclass
class FakeSpec:
    """One fake portal: `users` active users (user 1, an admin, owns the webhook)."""

    users: int
    requests_per_second: float | None = None
    burst: int = 50
    operating_limit: float | None = 480.0
    operating_window: float = 600.0
    operating_cost: float = 0.0
    operating_charge: float | None = None  # charged per call instead of operating_cost
    other_client_rate: float = 0.0  # another integration's operating seconds per second
    other_client_total: float = 0.0  # ... until it has spent this much
    latency: float = 0.0
    seed: int = 0
    # (user, role) task counter sets given new values per second; 0 leaves every value as it
    # is, which a real portal of thousands of users never does.
    drift: float = 0.0


class FakeFleet:
    """Fake portals served by `bench/_fakes.py` in a child process, one port each."""

    def __init__(
        self, specs: Sequence[FakeSpec], *, cpus: set[int] | None = None, nice: int = 0
    ) -> None:
        self.specs = list(specs)
        self._env = pinned_env(cpus, nice)
        self.urls: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> FakeFleet:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "_fakes.py"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps([s.__dict__ for s in self.specs]).encode() + b"\n")
        await self._proc.stdin.drain()
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the fake portals did not start")
        self.urls = json.loads(line)["urls"]
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()
        if self._proc is not None:
            await stop(self._proc)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def stats(self, index: int = 0, *, since: int = 0, times: bool = False) -> dict[str, Any]:
        """What fake `index` recorded from request number `since` on (see `_fakes.py`)."""
        query = f"?since={since}" + ("&times=1" if times else "")
        async with self._session.get(f"{self.urls[index]}/_bench/stats{query}") as response:
            stats: dict[str, Any] = await response.json()
            return stats


# ---- the exporter in a child process -------------------------------------------------------


class ExporterChild:
    """`bench/_exporter_child.py`: the real app (`build_app` on an `AppRunner`) for a config.

    It prints its RSS before polling starts; `state()` reads its `/_bench/state` route
    (cycles per portal, RSS, peak RSS, CPU seconds).
    """

    def __init__(
        self,
        raw: dict[str, Any],
        *,
        log_level: str = "WARNING",
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.raw = raw
        self._env = pinned_env(cpus) | (env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_level = log_level
        self._proc: asyncio.subprocess.Process | None = None
        self.baseline_rss_kib = 0

    async def __aenter__(self) -> ExporterChild:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-")
        path = Path(self._dir.name) / "config.yaml"
        path.write_text(yaml.safe_dump(self.raw))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "_exporter_child.py"),
            str(path),
            str(self.port),
            self._log_level,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
        )
        assert self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the exporter child did not start")
        self.baseline_rss_kib = json.loads(line)["baseline_rss_kib"]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()
        if self._proc is not None:
            await stop(self._proc)
        self._dir.cleanup()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def wait_ready(self, limit: float = 600.0, step: float = 0.02) -> float:
        """Seconds until /readyz answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise RuntimeError("the exporter child exited")
            with contextlib.suppress(aiohttp.ClientError):
                async with self._session.get(self.url + "/readyz") as response:
                    if response.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(step)
        raise TimeoutError("the exporter did not become ready")

    async def state(self) -> dict[str, Any]:
        async with self._session.get(self.url + "/_bench/state") as response:
            state: dict[str, Any] = await response.json()
            return state

    async def wait_cycles(self, cycles: int, limit: float = 900.0) -> dict[str, Any]:
        """Wait until every portal finished `cycles` cycles and the last one is rendered."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            state = await self.state()
            if state["cycles"] and min(state["cycles"].values()) >= cycles and state["rendered"]:
                return state
            await asyncio.sleep(0.2)
        raise TimeoutError(f"fewer than {cycles} cycles within {limit}s")

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as r:
            return await r.text()


def pinned_env(cpus: set[int] | None, nice: int = 0) -> dict[str, str]:
    """The environment for a child that pins itself to `cpus` (see `pin_from_env`)."""
    env = dict(os.environ)
    env.pop("BENCH_CPUS", None)
    env.pop("BENCH_NICE", None)
    if cpus is not None:
        env["BENCH_CPUS"] = ",".join(str(c) for c in sorted(cpus))
    if nice:
        env["BENCH_NICE"] = str(nice)
    return env


def pin_from_env() -> None:
    """Called first thing in a child: pin the process (and threads it starts) to BENCH_CPUS
    and lower its priority by BENCH_NICE (a busy fake portal must not delay the client)."""
    cpus = os.environ.get("BENCH_CPUS")
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    nice = os.environ.get("BENCH_NICE")
    if nice:
        os.nice(int(nice))


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Stop a child this benchmark started: SIGTERM, then SIGKILL after 5 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# ---- /proc ---------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0])
    return found


def cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def thread_cpu_seconds(pid: int | str = "self") -> dict[str, float]:
    """User plus system CPU time per thread: "main" (the event loop) and "others"."""
    ticks = os.sysconf("SC_CLK_TCK")
    main = float(os.getpid()) if pid == "self" else float(pid)
    found = {"main": 0.0, "others": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            seconds = (int(fields[11]) + int(fields[12])) / ticks
            found["main" if float(task.name) == main else "others"] += seconds
    return found


def count_series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def metric_values(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of `name` whose labels include `labels` (exposition text)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(w in head for w in wanted):
                found.append(float(value))
    return found

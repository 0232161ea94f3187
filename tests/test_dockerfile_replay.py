"""Replay the Dockerfile's install steps without Docker, then run what the image would run.

There is no Docker engine in CI, so the image is never built. Instead this test reads the
Dockerfile, runs its build stage's ENV, WORKDIR, COPY and RUN steps in a temporary
directory standing in for `/` (a clean venv, `pip install .` from PyPI), checks that the
runtime stage's entrypoint exists in the copied venv, starts `bitrix24-exporter demo` as
docker-compose.yml does, and runs the image's HEALTHCHECK command against it.

What it cannot catch: differences between the host's Python and the pinned base image, and
anything about users, file permissions or layers. It installs from the package index, hence
the `integration` marker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.operator_kit_lib import parse_dockerfile, parse_env
from tests.support import ROOT, ExporterProcess, free_port, value

pytestmark = pytest.mark.integration


class Replay:
    """Runs Dockerfile steps with `root` standing in for the image's `/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = root
        self.env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONHOME"}}

    def path(self, image_path: str) -> Path:
        if image_path.startswith("/"):
            return self.root / image_path.lstrip("/")
        return self.cwd / image_path

    def map_command(self, command: str) -> str:
        # Absolute paths of the image live under root; `python` is the host's Python 3.11.
        command = re.sub(r"(?<![\w.$/:])(/[\w./-]+)", lambda m: str(self.path(m.group(1))), command)
        return re.sub(r"(?<![\w/])python(?=\s)", shlex.quote(sys.executable), command, count=1)

    def step(self, instruction: str, args: str) -> None:
        if instruction == "ENV":
            for key, value in parse_env(args).items():
                self.env[key] = value.replace("$PATH", self.env.get("PATH", ""))
        elif instruction == "WORKDIR":
            self.cwd = self.path(args)
            self.cwd.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), args
            target = self.path(dest)
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    destination = target if not dest.endswith("/") else target / src.name
                    shutil.copytree(
                        src, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
        elif instruction == "RUN":
            res = subprocess.run(
                self.map_command(args),
                shell=True,
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert res.returncode == 0, f"RUN {args}\n{res.stdout}\n{res.stderr}"
        else:
            pytest.fail(f"the replay does not know how to run {instruction} in the build stage")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The replayed image: root directory, runtime env, entrypoint, cmd and health check."""
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    runtime = stages[-1]
    copies = [a for i, a in runtime.instructions if i == "COPY" and a.startswith("--from=")]
    assert copies, "the runtime stage copies its venv from the build stage"
    build_name, venv_src, venv_dest = copies[0].removeprefix("--from=").split()
    build = next(s for s in stages if s.name == build_name)

    root = tmp_path_factory.mktemp("image")
    replay = Replay(root)
    for instruction, args in build.instructions:
        replay.step(instruction, args)
    # The runtime stage gets the venv at the same path, so its scripts' shebangs still work.
    assert venv_src == venv_dest

    env = dict(replay.env)
    for instruction, args in runtime.instructions:
        if instruction == "ENV":
            for key, value in parse_env(args).items():
                env[key] = replay.map_command(value).replace("$PATH", os.environ["PATH"])
    by_name = {i: a for i, a in runtime.instructions}
    health = re.sub(r"^(--\S+\s+)*CMD\s+", "", by_name["HEALTHCHECK"])
    return {
        "root": root,
        "venv": replay.path(venv_dest),
        "env": env,
        "entrypoint": json.loads(by_name["ENTRYPOINT"]),
        "cmd": json.loads(by_name["CMD"]),
        "healthcheck": json.loads(health),
    }


@pytest.fixture
def demo(
    image: dict[str, object], exporter_process: Any
) -> Callable[[], Awaitable[ExporterProcess]]:
    """The installed entrypoint in demo mode, as docker-compose.yml runs it."""
    venv = image["venv"]
    assert isinstance(venv, Path)
    entrypoint = image["entrypoint"]
    assert isinstance(entrypoint, list)
    env = image["env"]
    assert isinstance(env, dict)

    async def start() -> ExporterProcess:
        process: ExporterProcess = exporter_process(
            None, "demo", program=[str(venv / "bin" / entrypoint[0])], env=env
        )
        await process.wait_ready()
        return process

    return start


def test_install_gives_the_entrypoint(image: dict[str, object]) -> None:
    """pip install . in a clean venv, as the build stage does, installs the entrypoint."""
    venv = image["venv"]
    assert isinstance(venv, Path)
    assert image["entrypoint"] == ["bitrix24-exporter"]
    binary = venv / "bin" / "bitrix24-exporter"
    res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("bitrix24-exporter ")


def test_default_command_reads_the_mounted_config(image: dict[str, object]) -> None:
    """ENTRYPOINT + CMD read /etc/bitrix24-exporter/config.yaml, with secrets from the
    environment (checked with --check-config)."""
    root = image["root"]
    assert isinstance(root, Path)
    cmd = image["cmd"]
    assert isinstance(cmd, list)
    assert cmd == ["--config", "/etc/bitrix24-exporter/config.yaml"]
    config = root / "etc" / "bitrix24-exporter" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("portals:\n  - name: acme\n    webhook: ${ACME_WEBHOOK}\n", encoding="utf-8")
    env = dict(image["env"])  # type: ignore[call-overload]
    env["ACME_WEBHOOK"] = "https://acme.bitrix24.com/rest/1/s3cr3t/"
    venv = image["venv"]
    assert isinstance(venv, Path)
    args = [str(venv / "bin" / "bitrix24-exporter"), "--config", str(config), "--check-config"]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "s3cr3t" not in res.stdout + res.stderr


async def test_demo_serves_healthz_and_metrics(
    demo: Callable[[], Awaitable[ExporterProcess]],
) -> None:
    """The installed `bitrix24-exporter demo` answers /healthz, and /metrics after its first
    poll cycle has the fake portal up."""
    process = await demo()
    assert (await process.get("/healthz")).text == "ok\n"
    assert value(await process.metrics(), "bitrix24_up", portal="demo") == 1


async def test_healthcheck_command(
    image: dict[str, object], demo: Callable[[], Awaitable[ExporterProcess]]
) -> None:
    """The image's HEALTHCHECK command (Python, no curl) passes against the running
    exporter and fails against a port nobody listens on."""
    health = image["healthcheck"]
    assert isinstance(health, list)
    assert health[0] == "python"
    venv = image["venv"]
    assert isinstance(venv, Path)
    command = [str(venv / "bin" / "python"), *health[1:]]
    env = dict(image["env"])  # type: ignore[call-overload]
    assert env["BITRIX24_EXPORTER_HEALTHCHECK_URL"] == "http://127.0.0.1:9877/healthz"
    process = await demo()
    env["BITRIX24_EXPORTER_HEALTHCHECK_URL"] = f"{process.url}/healthz"
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env["BITRIX24_EXPORTER_HEALTHCHECK_URL"] = f"http://127.0.0.1:{free_port()}/healthz"
    down = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode != 0

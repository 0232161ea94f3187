"""The systemd unit in deploy/systemd/: `systemd-analyze verify` accepts it without a single
complaint, `systemd-analyze security` rates it well hardened, and it runs the exporter the
way the exporter expects (reload by SIGHUP, no restart loop on a config error)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from exporter.cli import EXIT_CONFIG
from tests.support import ROOT, require_binary

UNIT = ROOT / "deploy" / "systemd" / "bitrix24-exporter.service"
INSTALLED = "/opt/bitrix24-exporter/bin/bitrix24-exporter"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed next to this checkout: ExecStart points at this venv's command
    (verify checks that the program exists)."""
    command = Path(sys.executable).parent / "bitrix24-exporter"
    assert command.exists(), "the package is not installed in this venv (scripts/bootstrap)"
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED, str(command)))
    return copy


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 and prints nothing: no unknown key, no bad value."""
    analyze = require_binary("systemd-analyze")
    run = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    """The exposure level `systemd-analyze security` gives is in its "OK" band (below 2)."""
    analyze = require_binary("systemd-analyze")
    run = subprocess.run(
        [analyze, "security", "--offline=yes", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    verdict = run.stdout.strip().splitlines()[-1]
    assert "Overall exposure level" in verdict, run.stdout
    level = float(verdict.split(": ", 1)[1].split()[0])
    assert level < 2.0, verdict


def test_the_unit_runs_the_exporter_as_it_expects() -> None:
    """A dynamic user, a read-only system with a state directory for OAuth, the webhook as
    a credential, reload by SIGHUP, and no restart loop when the config is invalid."""
    unit = settings()
    assert unit["ExecStart"] == [f"{INSTALLED} --config /etc/bitrix24-exporter/config.yaml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["StateDirectory"] == ["bitrix24-exporter"]
    assert unit["LoadCredential"] == ["acme.webhook:/etc/bitrix24-exporter/acme.webhook"]
    assert "webhook_file: ${CREDENTIALS_DIRECTORY}/acme.webhook" in UNIT.read_text()

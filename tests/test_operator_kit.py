"""Static checks of the operator kit: Grafana dashboard, Prometheus rules and their promtool
unit tests, Alertmanager config, Dockerfile and docker-compose stack.

Each test that needs a tool (promtool, amtool, prometheus-alertmanager, hadolint, npx) fails
when the tool is missing: scripts/bootstrap and CI install all of them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import promql_parser
import pytest
import yaml

from tests.operator_kit_lib import (
    ALERTMANAGER,
    ALERTS,
    DASHBOARD,
    RULES,
    SCHEMA_TOOLS,
    TARGET_LABELS,
    alert_rules,
    contract_metrics,
    dashboard_exprs,
    iter_panels,
    load_dashboard,
    parse_dockerfile,
    parse_env,
    recording_rule_names,
    rule_exprs,
    selectors,
    strip_threshold,
)
from tests.support import ROOT, free_port, require_binary

PROM = ROOT / "prometheus"
# Values for the static check; any value works, they only have to make valid PromQL.
STATIC_VALUES = {
    "__rate_interval": "5m",
    "portal": "acme|beta",
    "user": "17",
    "department": "5",
    "role": "view_all",
    "group": "0",
}
RUNBOOK_PREFIX = "https://github.com/example-org/bitrix24-exporter/blob/main/docs/alerts.md#"


def run(*cmd: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- Prometheus rules ------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    """promtool accepts the recording and alert rules."""
    res = run(require_binary("promtool"), "check", "rules", str(RULES), str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(recording_rule_names())} rules found" in res.stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout


def test_promtool_check_config() -> None:
    """The compose stack's prometheus.yml is valid and its rule files load."""
    res = run(require_binary("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("test_file", ["alerts_test.yml", "rules_test.yml"])
def test_promtool_unit_tests(test_file: str) -> None:
    """The promtool unit tests of the alerts and recording rules pass."""
    res = run(require_binary("promtool"), "test", "rules", str(PROM / test_file))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    """Each alert has a promtool case where it fires and one where it stays silent."""
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text(encoding="utf-8"))["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_every_recording_rule_has_a_unit_test() -> None:
    """Each recording rule is checked by a promql_expr_test in rules_test.yml."""
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text(encoding="utf-8"))["tests"]
    tested = {c["expr"] for case in tests for c in case.get("promql_expr_test", [])}
    assert recording_rule_names() - tested == set()


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_metadata(rule: dict[str, Any]) -> None:
    """An alert has a CamelCase Bitrix24 name, a severity, a summary, a description with
    the value, a `for`, and a runbook link to its own section of docs/alerts.md."""
    name = rule["alert"]
    assert re.fullmatch(r"Bitrix24[A-Z][A-Za-z]+", name)
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
    assert rule.get("for"), "every alert waits before firing"
    if not rule["expr"].startswith("absent("):  # absent() is always 1: nothing to show
        assert "$value" in rule["annotations"]["description"]
    assert rule["annotations"]["runbook_url"] == RUNBOOK_PREFIX + name.lower()
    if "user_id" in rule["annotations"]["description"]:
        assert "bitrix24_user_info" in rule["annotations"]["description"], "name the user"


def test_runbook_sections_match_alerts() -> None:
    """docs/alerts.md has exactly one section per alert, in the rules' order."""
    text = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (Bitrix24\w+)\s*$", text, re.M)
    assert sections == [r["alert"] for r in alert_rules()]


# --- PromQL of the dashboard and the rules ---------------------------------------------


def _all_static_exprs() -> list[tuple[str, str]]:
    return [(e.where, e.expr) for e in dashboard_exprs(STATIC_VALUES)] + [
        (e.where, e.expr) for e in rule_exprs()
    ]


@pytest.mark.parametrize(("where", "expr"), _all_static_exprs(), ids=lambda v: str(v)[:60])
def test_promql_parses_and_uses_only_contract_metrics(where: str, expr: str) -> None:
    """Every expression parses and selects only metrics of the contract (docs/architecture.md),
    `up` or a recording rule, with only the labels that metric has."""
    contract = contract_metrics()
    recorded = recording_rule_names()
    found = selectors(expr)  # raises ValueError on a syntax or type error
    assert found, f"{where}: selects no metric"
    for name, matchers in found:
        assert name is not None, f"{where}: selector without a metric name"
        if name in recorded:
            continue
        if name == "up":
            allowed = TARGET_LABELS
        else:
            assert name in contract, f"{where}: {name} is not in the metric contract"
            allowed = contract[name] | TARGET_LABELS
        unknown = {label for label, _ in matchers} - allowed
        assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"


def test_contract_is_read() -> None:
    """The contract parser finds the metrics the kit relies on (guards the doc's format)."""
    contract = contract_metrics()
    assert contract["bitrix24_tasks"] == {
        "portal",
        "user_id",
        "group_id",
        "role",
        "counter",
        "code",
    }
    assert contract["bitrix24_poll_interval_seconds"] == frozenset()
    assert "le" in contract["bitrix24_api_request_duration_seconds_bucket"]
    assert len(contract) >= 20


@pytest.mark.parametrize(
    ("expr", "stripped"),
    [
        ('up{job="bitrix24"} == 0', 'up{job="bitrix24"}'),
        ("x:y:max > 5", "x:y:max"),
        ("sum by (a) (increase(e[10m])) > 0", "sum by (a) (increase(e[10m]))"),
        ("time() - t\n  > ignoring (p) group_left ()\n2 * i", "time() - t"),
        ('absent(up{job="bitrix24"})', 'absent(up{job="bitrix24"})'),
        (
            "(\n  time() - t > ignoring (p) group_left () 2 * i\n)\nor\n(time() - o > on () 2 * i)",
            "(time() - t) or (time() - o)",
        ),
    ],
)
def test_strip_threshold(expr: str, stripped: str) -> None:
    """The integration test's threshold stripping keeps the part that has series."""
    assert strip_threshold(expr) == stripped
    promql_parser.parse(stripped)


# --- Grafana dashboard ------------------------------------------------------------------


def test_dashboard_is_generated_from_the_script() -> None:
    """grafana/dashboards/bitrix24.json is what tools/build_dashboard.py writes."""
    res = run(sys.executable, "tools/build_dashboard.py", "--check")
    assert res.returncode == 0, res.stderr


def test_dashboard_structure() -> None:
    """Fixed uid, current schema, datasource as a variable, the expected variables and rows,
    unique ids, no overlapping panels, and every query on the datasource variable."""
    d = load_dashboard()
    assert d["uid"] == "bitrix24-exporter"
    assert d["schemaVersion"] >= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", "portal", "department", "user", "role", "group"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "bitrix24_user_info" in variables["user"]["query"]
    assert "(?<text>" in variables["user"]["regex"] and "(?<value>" in variables["user"]["regex"]
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Teams", "Tasks", "Chats", "Exporter health"]

    panels = iter_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p.get("description"), f"panel {p['title']!r} explains itself"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]


def test_dashboard_overlapping_kinds_are_never_summed() -> None:
    """im kinds, task roles and task groups overlap: no query sums across them, and no
    time series panel stacks."""
    for panel in iter_panels(load_dashboard()):
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
        assert custom.get("stacking", {"mode": "none"})["mode"] == "none", panel["title"]
        for t in panel.get("targets", []):
            expr = t["expr"]
            for m in re.finditer(r"sum(?: by \(([^)]*)\))? \((bitrix24_\w+)\{([^}]*)\}", expr):
                by = {x.strip() for x in (m.group(1) or "").split(",")}
                metric, matchers = m.group(2), m.group(3)
                if metric == "bitrix24_im_unread":
                    assert "counter" in by or "counter=" in matchers, (panel["title"], expr)
                if metric == "bitrix24_tasks":
                    assert "role" in by or 'role="' in matchers, (panel["title"], expr)
                    assert 'group_id="' in matchers, (panel["title"], expr)


def _typecheck(
    dashboards: dict[str, dict[str, Any]], workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Type-check dashboards (file stem -> JSON) against @grafana/schema's Dashboard type.

    Each becomes `export const d: AsJson<Dashboard> = <json>;` in `workdir/check`, next to a
    link to tools/grafana-schema's node_modules and copies of its tsconfig.json and
    as-json.ts, and is checked by `tsc` with strict on and no output; nothing is written
    into the source tree. AsJson (tools/grafana-schema/as-json.ts) lets enum-typed fields
    hold the plain strings that JSON has.
    """
    if not (SCHEMA_TOOLS / "node_modules" / "@grafana" / "schema").is_dir():
        pytest.fail("run: cd tools/grafana-schema && npm install --no-audit --no-fund")
    npx = require_binary("npx")
    for name in ("tsconfig.json", "as-json.ts"):
        shutil.copyfile(SCHEMA_TOOLS / name, workdir / name)
    check = workdir / "check"
    check.mkdir()
    (check / "node_modules").symlink_to(SCHEMA_TOOLS / "node_modules", target_is_directory=True)
    files = []
    for stem, dashboard in dashboards.items():
        source = (
            "import type { Dashboard } from '@grafana/schema';\n"
            "import type { AsJson } from '../as-json';\n"
            f"export const d: AsJson<Dashboard> = {json.dumps(dashboard, indent=2)};\n"
        )
        (check / f"{stem}.ts").write_text(source, encoding="utf-8")
        files.append(f"{stem}.ts")
    config = {"extends": "../tsconfig.json", "files": files}
    (check / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    # Run from tools/grafana-schema so that npx finds its TypeScript.
    return run(npx, "--no-install", "tsc", "-p", str(check), cwd=SCHEMA_TOOLS)


def test_dashboard_matches_grafana_schema(tmp_path: Path) -> None:
    """The dashboard type-checks against Grafana's published Dashboard type."""
    res = _typecheck({"bitrix24": load_dashboard()}, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_catches_broken_dashboards(tmp_path: Path) -> None:
    """Broken copies fail the same check: an unknown key, a wrong type, a bad enum value."""
    good = load_dashboard()
    unknown_key = copy.deepcopy(good)
    unknown_key["panels"][1]["gridPos"]["yy"] = 3
    wrong_type = copy.deepcopy(good)
    wrong_type["title"] = 123
    bad_enum = copy.deepcopy(good)
    bad_enum["panels"][1]["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolut"
    res = _typecheck(
        {"unknown_key": unknown_key, "wrong_type": wrong_type, "bad_enum": bad_enum}, tmp_path
    )
    assert res.returncode != 0
    out = res.stdout
    assert re.search(r"unknown_key\.ts\(\d+,\d+\): error TS2353: .*'\"yy\"'", out), out
    assert re.search(r"wrong_type\.ts\(\d+,\d+\): error TS2322: Type 'number'", out), out
    assert re.search(r"bad_enum\.ts\(\d+,\d+\): error TS\d+: Type '\"absolut\"'", out), out


# --- Alertmanager -----------------------------------------------------------------------


def test_amtool_check_config() -> None:
    """amtool accepts the Alertmanager configuration."""
    res = run(require_binary("amtool"), "check-config", str(ALERTMANAGER))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=Bitrix24PortalDown", "severity=critical", "portal=acme"], "bitrix24-oncall"),
        (["alertname=Bitrix24ExporterDown", "severity=critical"], "bitrix24-oncall"),
        (["alertname=Bitrix24DataStale", "severity=warning", "portal=acme"], "bitrix24-ops"),
        (["alertname=Bitrix24UserTasksOverdue", "severity=info"], "bitrix24-team-leads"),
        (["alertname=Bitrix24TaskCommentsPilingUp", "severity=info"], "bitrix24-team-leads"),
        (["alertname=NodeDown", "severity=critical"], "default"),
    ],
)
def test_alertmanager_routes(labels: list[str], receiver: str) -> None:
    """Alerts reach the receiver of their severity; other alerts stay on the default."""
    res = run(
        require_binary("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        f"--verify.receivers={receiver}",
        *labels,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_severity_is_routed() -> None:
    """Each severity used by the alerts has a route of its own."""
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    bitrix_route = config["route"]["routes"][0]
    routed = {m for r in bitrix_route["routes"] for m in r["matchers"]}
    used = {f'severity="{r["labels"]["severity"]}"' for r in alert_rules()}
    assert used <= routed


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = require_binary("prometheus-alertmanager")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={ALERTMANAGER}",
            f"--storage.path={tmp_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # a liveness bound: it is ready in about a second
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("alertmanager did not become ready")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_alertmanager_inhibitions(alertmanager: str) -> None:
    """A running Alertmanager mutes per-user alerts of a down portal (not of other portals),
    every alert of a down exporter's job, and PortalDown when credentials are the cause."""
    now = datetime.now(UTC).isoformat()

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {
            "labels": {"alertname": name, "severity": severity, "job": "bitrix24", **labels},
            "annotations": {"summary": name},
            "startsAt": now,
        }

    alerts = [
        alert("Bitrix24PortalDown", "critical", portal="acme"),
        alert("Bitrix24UserTasksOverdue", "info", portal="acme", user_id="17"),
        alert("Bitrix24DataStale", "warning", portal="acme", user_id="17", source="im"),
        alert("Bitrix24RateLimited", "warning", portal="acme"),
        alert("Bitrix24UserTasksOverdue", "info", portal="beta", user_id="3"),
        alert("Bitrix24AuthFailing", "critical", portal="gamma", error="INVALID_CREDENTIALS"),
        alert("Bitrix24PortalDown", "critical", portal="gamma"),
        alert("Bitrix24ExporterDown", "critical", job="bitrix24-eu", instance="eu:9877"),
        alert("Bitrix24TaskCommentsPilingUp", "info", job="bitrix24-eu", portal="eu", user_id="5"),
    ]
    request = urllib.request.Request(
        f"{alertmanager}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200

    expected = {
        ("Bitrix24PortalDown", "acme"): "active",
        ("Bitrix24UserTasksOverdue", "acme"): "suppressed",
        ("Bitrix24DataStale", "acme"): "suppressed",
        ("Bitrix24RateLimited", "acme"): "active",
        ("Bitrix24UserTasksOverdue", "beta"): "active",
        ("Bitrix24AuthFailing", "gamma"): "active",
        ("Bitrix24PortalDown", "gamma"): "suppressed",
        ("Bitrix24ExporterDown", ""): "active",
        ("Bitrix24TaskCommentsPilingUp", "eu"): "suppressed",
    }
    deadline = time.monotonic() + 60  # a liveness bound: inhibitions apply within a second
    while True:
        with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=5) as resp:
            got = {
                (a["labels"]["alertname"], a["labels"].get("portal", "")): a["status"]["state"]
                for a in json.load(resp)
            }
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == expected


# --- Docker -----------------------------------------------------------------------------


def test_hadolint_dockerfile() -> None:
    """hadolint finds nothing to complain about in the Dockerfile."""
    res = run(require_binary("hadolint"), "Dockerfile")
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_essentials() -> None:
    """Pinned slim Python base, multi-stage venv, non-root user, health check on /healthz,
    port 9877, config at /etc/bitrix24-exporter/config.yaml."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert "COPY --from=build /opt/venv /opt/venv" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    # The runtime stage's HEALTHCHECK reads its URL from an ENV of that stage: /healthz.
    runtime = parse_dockerfile(text)[-1]
    health = [args for instruction, args in runtime.instructions if instruction == "HEALTHCHECK"]
    assert len(health) == 1 and "BITRIX24_EXPORTER_HEALTHCHECK_URL" in health[0], health
    env: dict[str, str] = {}
    for instruction, args in runtime.instructions:
        if instruction == "ENV":
            env.update(parse_env(args))
    assert urlsplit(env["BITRIX24_EXPORTER_HEALTHCHECK_URL"]).path == "/healthz"
    assert "curl" not in re.sub(r"#.*", "", text)
    assert re.search(r"^EXPOSE 9877$", text, re.M)
    assert '"/etc/bitrix24-exporter/config.yaml"' in text


def test_dockerignore_keeps_the_context_small() -> None:
    """Only the package sources and metadata go into the build context."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert lines[lines.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!exporter/"]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert f"!{src.rstrip('/')}" in {x.rstrip("/") for x in lines}, src


# --- docker-compose ---------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_mounts_exist() -> None:
    """Every host file or directory the compose stack mounts exists, and the build context
    has a Dockerfile."""
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"exporter", "prometheus", "alertmanager", "grafana"}
    assert (ROOT / services["exporter"]["build"] / "Dockerfile").is_file()
    assert services["exporter"]["command"][0] == "demo"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared {source}"


def _container_path_to_host(service: dict[str, Any], path: str) -> Path | None:
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target) :].lstrip("/")
    return None


def test_compose_wires_prometheus_and_grafana() -> None:
    """Prometheus finds its rule files and scrapes the exporter service; Grafana's
    provisioning points at mounted files and the home dashboard exists."""
    services = _compose()["services"]
    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    host_config = _container_path_to_host(prom, config_path)
    assert host_config is not None and host_config.is_file()
    config = yaml.safe_load(host_config.read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        container = str(Path(config_path).parent / rule_file)
        assert _container_path_to_host(prom, container) is not None, rule_file
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["bitrix24"]["static_configs"][0]["targets"] == ["exporter:9877"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]

    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host_home = _container_path_to_host(grafana, home)
    assert host_home is not None and host_home.resolve() == DASHBOARD
    provider_file = _container_path_to_host(
        grafana, "/etc/grafana/provisioning/dashboards/bitrix24.yaml"
    )
    assert provider_file is not None and provider_file.is_file()
    provider = yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"][0]
    provided = _container_path_to_host(grafana, provider["options"]["path"])
    assert provided is not None and (provided / DASHBOARD.name).is_file()
    ds_file = _container_path_to_host(
        grafana, "/etc/grafana/provisioning/datasources/prometheus.yaml"
    )
    assert ds_file is not None and ds_file.is_file()
    datasource = yaml.safe_load(ds_file.read_text(encoding="utf-8"))["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


def test_node_modules_is_git_ignored() -> None:
    """The Grafana schema tools' node_modules never gets committed."""
    git = shutil.which("git")
    if git is None:
        pytest.fail("git not found")
    res = run(git, "check-ignore", "-q", "tools/grafana-schema/node_modules")
    assert res.returncode == 0

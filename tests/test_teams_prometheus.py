"""The Teams row, the department rules and the department alert against a real Prometheus
scraping the real exporter, once per privacy mode.

Set-up, all on 127.0.0.1: the fake company of `tests.teams_company` in the test's event
loop, the exporter as a subprocess polling it every second with teams enabled and the
mode under test, and Prometheus scraping it every second with rules.yml and a copy of
alerts.yml whose `for:` are 2s. Every new PromQL expression (the Teams row's panels, the
department, role and group variables, the department rules, the department alert without
its threshold) must return data in each mode. Then overdue tasks are raised and
Bitrix24DepartmentTasksOverdue must go pending or firing for the company, labelled with
its name and, where the mode allows, its head.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter import fakeportal
from tests.operator_kit_lib import (
    ALERTS,
    RULES,
    Expr,
    dashboard_exprs,
    load_dashboard,
    rule_exprs,
    strip_threshold,
    wait_until,
)
from tests.support import free_port, require_binary, start_process
from tests.teams_company import KEY, company, hashed, raw_config

pytestmark = pytest.mark.integration

EXPIRED = fakeportal.NEW_COUNTER_CODES["expired"]
NEW_RULES = (
    "job_portal_department_id:bitrix24_department_info:head",
    "job_portal_department_id:bitrix24_department_tasks_expired_per_user:ratio",
    "Bitrix24DepartmentTasksOverdue",
    "Bitrix24DataStale",  # per user, or per portal and source in mode aggregate
)
NEW_VARIABLES = ("department", "role", "group")
# Panels outside the Teams row that must show data in every privacy mode.
EVERY_MODE_PANELS = ("Data age", "Data age per source")
# Template values: every department (the variable's "All"), the default role and group.
VALUES = {
    "__rate_interval": "1m",
    "portal": "acme",
    "department": ".*",
    "user": ".*",
    "role": "view_all",
    "group": "0",
}
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "pseudonymous": {"mode": "pseudonymous", "pseudonym_key": "${ACME_PSEUDONYM_KEY}"},
    "aggregate": {"mode": "aggregate", "min_team_size": 5},
}
# Who heads the company in each mode, as the alert's `head` label (None: no label).
HEADS = {"none": "Quillon Vexlar", "pseudonymous": hashed(900101), "aggregate": None}


def teams_row_titles() -> set[str]:
    """The titles of the panels of the dashboard's Teams row."""
    titles: set[str] = set()
    inside = False
    for panel in load_dashboard()["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == "Teams"
        elif inside:
            titles.add(panel["title"])
    return titles


def new_exprs() -> list[Expr]:
    """Every PromQL expression the teams work added, and the alerts that must have data in
    every privacy mode, with template values filled in."""
    titles = teams_row_titles()
    assert len(titles) == 4
    found = [
        e
        for e in dashboard_exprs(VALUES)
        if any(e.where.startswith(f"panel {t!r}") for t in (*titles, *EVERY_MODE_PANELS))
        or e.where in {f"variable {v}" for v in NEW_VARIABLES}
    ]
    found += [e for e in rule_exprs() if e.where.split()[-1] in NEW_RULES]
    # The Teams row's 4 panels, the data age stat and the data age per source (2 targets).
    assert len(found) == 4 + 3 + len(NEW_VARIABLES) + len(NEW_RULES)
    return found


@pytest.fixture
async def company_url() -> AsyncIterator[tuple[fakeportal.FakePortal, str]]:
    portal = company()
    runner, url = await fakeportal.serve(portal)
    try:
        yield portal, url
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", list(MODES))
async def test_teams_row_rules_and_alert_in_each_privacy_mode(
    mode: str,
    tmp_path: Path,
    company_url: tuple[fakeportal.FakePortal, str],
    processes: list[subprocess.Popen[bytes]],
    exporter_process: Any,
) -> None:
    """Every new expression returns data from a real Prometheus in this mode, the rules are
    healthy, and raised overdue tasks raise the department alert with name and head."""
    portal, url = company_url
    raw = raw_config(url, im={"chats": True})
    if MODES[mode]:
        raw["portals"][0]["privacy"] = MODES[mode]
    exporter_port = exporter_process(raw, env={"ACME_PSEUDONYM_KEY": KEY}).port
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False), "utf-8")
    (tmp_path / "rules.yml").write_text(RULES.read_text(encoding="utf-8"), encoding="utf-8")
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml", "alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "bitrix24",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config), "utf-8")
    prometheus_port = free_port()
    start_process(
        processes,
        [
            require_binary("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        tmp_path / "prometheus.log",
    )
    prometheus = f"http://127.0.0.1:{prometheus_port}"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def query(expr: str) -> list[dict[str, Any]]:
            async with session.post(f"{prometheus}/api/v1/query", data={"query": expr}) as resp:
                body: dict[str, Any] = await resp.json()
            assert body["status"] == "success", f"{expr}: {body}"
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        async def get(path: str) -> dict[str, Any]:
            async with session.get(f"{prometheus}{path}") as resp:
                body: dict[str, Any] = await resp.json()
                return body

        await wait_until(
            lambda: query(
                "job_portal_department_id:bitrix24_department_tasks_expired_per_user:ratio"
            ),
            "the department rules have data",
            30,
        )

        # --- every new expression returns data ------------------------------------------
        empty: list[str] = []
        for item in new_exprs():
            expr = strip_threshold(item.expr) if item.alert else item.expr
            if not await query(expr):
                empty.append(f"{item.where}: {expr}")
        assert not empty, f"mode {mode}: expressions without data:\n" + "\n".join(empty)

        async def rules_healthy() -> bool:
            groups = (await get("/api/v1/rules"))["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return bool(rules) and all(r["health"] == "ok" for r in rules)

        await wait_until(rules_healthy, "every rule evaluated with health ok", 15)

        # --- raising overdue tasks raises the department alert -----------------------------
        def company_alerts(body: dict[str, Any]) -> list[dict[str, Any]]:
            return [
                a
                for a in body["data"]["alerts"]
                if a["labels"]["alertname"] == "Bitrix24DepartmentTasksOverdue"
                and a["labels"].get("department") == "Company"
            ]

        assert company_alerts(await get("/api/v1/alerts")) == []
        for user_id in (900109, 900110):  # Key Accounts, under Field Sales, Sales, Company
            portal.set_task_counters(user_id, "view_all", {"expired": (60, EXPIRED)})

        async def raised() -> list[dict[str, Any]]:
            return company_alerts(await get("/api/v1/alerts"))

        alert = (await wait_until(raised, "Bitrix24DepartmentTasksOverdue for Company", 30))[0]
        assert alert["state"] in {"pending", "firing"}
        labels = alert["labels"]
        assert (labels["severity"], labels["department_id"]) == ("info", "11")
        assert labels.get("head") == HEADS[mode]
        assert alert["annotations"]["summary"].startswith("Department Company on acme has ")

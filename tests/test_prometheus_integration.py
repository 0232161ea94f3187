"""The dashboard and the rules against a real Prometheus scraping the real exporter.

Set-up, all on 127.0.0.1: two fake Bitrix24 portals in the test's event loop ("acme", a
demo portal with named users, and "beta", whose webhook was revoked so it fails with
INVALID_CREDENTIALS), the exporter as a subprocess polling both every second, and Debian's
Prometheus scraping it every second and evaluating rules.yml plus a copy of alerts.yml with
every `for:` shortened to 2s.

Then every PromQL expression of the dashboard (template variables set to real values: the
acme portal, every department, user 1, role view_all, group 0) and of the rules is run
through the HTTP API and must succeed with at least one series. Alert expressions are
normally empty, so each is evaluated without its final threshold comparison (`x > 5` ->
`x`; `absent(up{...})` -> the selector `up{...}`). Finally a user's overdue count is
raised in the fake portal and Bitrix24UserTasksOverdue must become pending or firing for
that user, with their name.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter import fakeportal
from tests.operator_kit_lib import (
    RULES,
    Expr,
    dashboard_exprs,
    rule_exprs,
    short_for_alerts,
    strip_threshold,
    wait_until,
)
from tests.support import free_port, register_secret, require_binary, start_process

pytestmark = pytest.mark.integration

OVERDUE = fakeportal.NEW_COUNTER_CODES["expired"]
BETA_SECRET = "revokedwebhooksecret"
register_secret(BETA_SECRET)
# The user whose overdue count the test raises; demo_portal names user 3 "Clara Schmidt".
RAISED_USER = 3


class Prometheus:
    """Thin async client of the Prometheus HTTP API."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def query(self, expr: str) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/api/v1/query", data={"query": expr}) as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def series_of(self, expr: str) -> list[dict[str, Any]]:
        body = await self.query(expr)
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def get(self, path: str) -> dict[str, Any]:
        async with self.session.get(f"{self.url}{path}") as resp:
            body: dict[str, Any] = await resp.json()
            return body


@pytest.fixture
async def portals() -> AsyncIterator[tuple[fakeportal.FakePortal, str, str]]:
    """acme (healthy, named users, every role and group 7) and beta (revoked webhook)."""
    acme, acme_path = fakeportal.demo_portal(users=4)
    acme.requests_per_second = None  # two portals polled every second: no accidental 503s
    acme.operating_cost = 0.05  # so the operating budget is visibly used
    # The raised user starts well below the alert threshold in every role and group.
    for role in fakeportal.ROLES:
        acme.set_task_counters(RAISED_USER, role, {"expired": (1, OVERDUE)})
    acme.set_task_counters(RAISED_USER, "view_all", {"expired": (1, OVERDUE)}, group_id=7)
    beta = fakeportal.FakePortal(requests_per_second=None)
    beta.add_user(fakeportal.FakeUser(1, "Root", admin=True))
    beta_path = beta.add_webhook(1, BETA_SECRET)
    beta.revoke_webhook(BETA_SECRET)
    acme_runner, acme_url = await fakeportal.serve(acme)
    beta_runner, beta_url = await fakeportal.serve(beta)
    try:
        yield acme, acme_url + acme_path, beta_url + beta_path
    finally:
        await acme_runner.cleanup()
        await beta_runner.cleanup()


@pytest.fixture
def prometheus(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> Callable[[Path], int]:
    """Start Prometheus on a config file; returns its port; stopped by PID at the end."""

    def start(config: Path) -> int:
        port = free_port()
        command = [
            require_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        start_process(processes, command, tmp_path / "prometheus.log")
        return port

    return start


async def test_dashboard_and_rules_against_real_prometheus(
    tmp_path: Path,
    portals: tuple[fakeportal.FakePortal, str, str],
    exporter_process: Any,
    prometheus: Callable[[Path], int],
) -> None:
    """Every dashboard and rule expression returns data from a real Prometheus, the rules
    load healthy, and raising a user's overdue tasks raises Bitrix24UserTasksOverdue."""
    acme, acme_webhook, beta_webhook = portals

    config = {
        "poll_interval": "1s",
        "request_timeout": "2s",
        "portals": [
            {
                "name": "acme",
                "webhook": acme_webhook,
                "tasks": {"users": "all", "groups": [0, 7], "roles": list(fakeportal.ROLES)},
                "im": {"enabled": True, "chats": True},
                "teams": {"enabled": True},
            },
            {"name": "beta", "webhook": beta_webhook},
        ],
    }
    exporter = exporter_process(config)
    exporter_port = exporter.port

    short_for_alerts(tmp_path / "alerts.yml")
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
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config), encoding="utf-8")
    prometheus_port = prometheus(tmp_path / "prometheus.yml")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        prom = Prometheus(f"http://127.0.0.1:{prometheus_port}", session)

        await exporter.wait_ready()

        async def prometheus_ready() -> bool:
            async with session.get(f"{prom.url}/-/ready") as resp:
                return resp.status == 200

        await wait_until(prometheus_ready, "prometheus /-/ready")
        started = time.monotonic()
        await wait_until(
            lambda: prom.series_of('up{job="bitrix24"} == 1'), "first scrape of the exporter"
        )
        first_scrape = time.monotonic() - started
        # rate() and increase() need two samples in their window, and the errors of beta
        # have to show up as a counter.
        for counter in ('bitrix24_api_errors_total{portal="beta"}', "bitrix24_api_requests_total"):
            await wait_until(
                lambda c=counter: prom.series_of(f"increase({c}[1m])"),
                f"two scrapes of {counter}",
            )

        # A burst of rate-limit errors, so the QUERY_LIMIT_EXCEEDED series exists.
        acme.faults.query_limit_burst = 3
        await wait_until(
            lambda: prom.series_of(
                'increase(bitrix24_api_errors_total{error="QUERY_LIMIT_EXCEEDED"}[1m])'
            ),
            "QUERY_LIMIT_EXCEEDED in Prometheus",
        )

        # --- every expression returns data -------------------------------------------------
        values = {
            "__rate_interval": "1m",
            "portal": "acme",
            "user": "1",
            "department": ".*",
            "role": "view_all",
            "group": "0",
        }
        evaluated: list[tuple[str, str, int]] = []
        empty: list[str] = []
        to_run: list[Expr] = dashboard_exprs(values) + rule_exprs()
        for item in to_run:
            expr = item.expr
            if item.alert:
                expr = strip_threshold(expr)
                absent = re.fullmatch(r"absent\((.*)\)", expr, re.S)
                if absent:
                    expr = absent.group(1)
            result = await prom.series_of(expr)
            evaluated.append((item.where, expr, len(result)))
            if not result:
                empty.append(f"{item.where}: {expr}")
        assert not empty, "expressions without data:\n" + "\n".join(empty)
        assert len(to_run) >= 50  # the dashboard's and the rules' expressions were all found

        # --- rules load and evaluate healthy -----------------------------------------------
        async def rules_healthy() -> list[dict[str, Any]]:
            body = await prom.get("/api/v1/rules")
            rules = [r for g in body["data"]["groups"] for r in g["rules"]]
            if rules and all(r["health"] == "ok" for r in rules):
                return rules
            return []

        rules = await wait_until(rules_healthy, "every rule evaluated with health ok")
        assert len(rules) == len(rule_exprs())

        # --- raising a user's overdue tasks raises the alert -------------------------------
        def overdue_alerts(body: dict[str, Any]) -> list[dict[str, Any]]:
            return [
                a
                for a in body["data"]["alerts"]
                if a["labels"]["alertname"] == "Bitrix24UserTasksOverdue"
                and a["labels"]["portal"] == "acme"
                and a["labels"]["user_id"] == str(RAISED_USER)
            ]

        assert overdue_alerts(await prom.get("/api/v1/alerts")) == []
        acme.set_task_counters(RAISED_USER, "view_all", {"expired": (12, OVERDUE)})

        async def raised() -> list[dict[str, Any]]:
            return overdue_alerts(await prom.get("/api/v1/alerts"))

        alerts = await wait_until(raised, "Bitrix24UserTasksOverdue for the raised user")
        assert alerts[0]["state"] in {"pending", "firing"}
        assert alerts[0]["labels"]["severity"] == "info"
        assert alerts[0]["annotations"]["summary"] == (
            "Clara Schmidt (user 3) has 12 overdue tasks on acme"
        )

        # beta's revoked webhook: the portal-level alerts see it.
        down = await prom.series_of('ALERTS{alertname="Bitrix24PortalDown", portal="beta"}')
        auth = await prom.series_of('ALERTS{alertname="Bitrix24AuthFailing", portal="beta"}')
        assert down and auth

    report = "\n".join(f"{n:4d} series  {where}" for where, _, n in evaluated)
    print(f"\nfirst scrape after {first_scrape:.1f}s; {len(evaluated)} expressions:\n{report}")

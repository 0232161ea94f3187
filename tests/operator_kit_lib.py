"""Shared helpers for the operator-kit tests: the metric contract, the dashboard's and the
rules' PromQL expressions, alerts.yml made quick for a real Prometheus, waiting on the
Prometheus API, and reading the Dockerfile.

The metric contract is read from docs/architecture.md, the one place it is written down, so
the dashboard and the rules cannot drift from it unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
import yaml

from tests.support import ROOT

DASHBOARD = ROOT / "grafana" / "dashboards" / "bitrix24.json"
RULES = ROOT / "prometheus" / "rules.yml"
ALERTS = ROOT / "prometheus" / "alerts.yml"
ALERTMANAGER = ROOT / "alertmanager" / "alertmanager.yml"
SCHEMA_TOOLS = ROOT / "tools" / "grafana-schema"

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def contract_metrics() -> dict[str, frozenset[str]]:
    """Metric name -> label names, from the "Metric contract" section of the architecture doc.

    Histograms get their _bucket (with le), _sum and _count series.
    """
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Metric contract", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, frozenset[str]] = {}
    for line in section.splitlines():
        for name, labels in re.findall(r"`(bitrix24_[a-z0-9_]+)(?:\{([a-z0-9_,]*)\})?`", line):
            label_set = frozenset(filter(None, labels.split(",")))
            if "(histogram)" in line:
                metrics[f"{name}_bucket"] = label_set | {"le"}
                metrics[f"{name}_sum"] = label_set
                metrics[f"{name}_count"] = label_set
            else:
                metrics[name] = label_set
    return metrics


def recording_rule_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


@dataclass(frozen=True)
class Expr:
    """One PromQL expression and where it comes from (for test ids and messages)."""

    where: str
    expr: str
    # For an alert: its name and the expression without the final threshold comparison.
    alert: str | None = None


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for p in dashboard.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}) and check none is left over."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def variable_query_expr(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query, re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if m:
        return m.group(1)
    return query


def dashboard_exprs(values: dict[str, str]) -> list[Expr]:
    """Every query of the dashboard (panel targets and variable queries), substituted."""
    dashboard = load_dashboard()
    exprs: list[Expr] = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            inner = variable_query_expr(var["query"])
            exprs.append(Expr(f"variable {var['name']}", substitute(inner, values)))
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []):
            exprs.append(
                Expr(f"panel {panel['title']!r} {t['refId']}", substitute(t["expr"], values))
            )
    return exprs


_COMPARISON = re.compile(r"^(?P<inner>.*?)\s*(?:==|!=|>=|<=|>|<)\s*(?P<rhs>[^()]*?)\s*$", re.S)


def _top_level_or(text: str) -> list[str]:
    """`(a) or (b)` -> ["(a)", "(b)"]: the operands of `or` outside any parentheses."""
    parts: list[str] = []
    depth = start = 0
    for at, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and re.match(r"\sor\s", text[at : at + 4]):
            parts.append(text[start:at])
            start = at + 4
    return [*parts, text[start:]]


def strip_threshold(expr: str) -> str:
    """`x > 5` -> `x`: the part of an alert expression that has series in normal operation.

    Only a trailing comparison against a number or a selector (no parentheses) is removed;
    `a > ignoring(...) group_left () b` becomes `a`; each operand of a top-level `or` in
    parentheses is stripped on its own.
    """
    text = expr.strip()
    operands = [part.strip() for part in _top_level_or(text)]
    if len(operands) > 1 and all(p.startswith("(") and p.endswith(")") for p in operands):
        return " or ".join(f"({strip_threshold(p[1:-1])})" for p in operands)
    # A comparison whose right side has a vector-matching modifier.
    m = re.match(r"^(?P<inner>.*?)\s*(?:==|!=|>=|<=|>|<)\s*(?:ignoring|on)\s*\(", text, re.S)
    if m:
        return m.group("inner")
    m = _COMPARISON.match(text)
    if m and re.fullmatch(r"[\d.e+-]+", m.group("rhs")):
        return m.group("inner")
    return text


def rule_exprs() -> list[Expr]:
    exprs: list[Expr] = []
    for path in (RULES, ALERTS):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                exprs.append(Expr(f"{path.name} {name}", rule["expr"].strip(), rule.get("alert")))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def selectors(expr: str) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """(metric name, [(label, value), ...]) of every vector selector in expr."""
    found: list[tuple[str | None, list[tuple[str, str]]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers if node.matchers else []
            found.append((node.name, [(m.name, m.value) for m in matchers]))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


# --- the Dockerfile ---------------------------------------------------------------------


@dataclass
class Stage:
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile as (INSTRUCTION, arguments) lists; continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if not pending and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    stages: list[Stage] = []
    for line in filter(str.strip, lines):
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            stages.append(Stage(m.group(1) if m else None))
        elif stages:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def parse_env(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


# --- a real Prometheus ------------------------------------------------------------------


def short_for_alerts(target: Path) -> None:
    """alerts.yml with every `for:` at 2s, so pending and firing happen within the test."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    target.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")


# Liveness bound of each wait: every step happens within a few scrapes (1 s apart); this only
# ends a test that would otherwise hang.
LIVENESS = 90.0


async def wait_until(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = LIVENESS, step: float = 0.25
) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (aiohttp.ClientError, OSError) as error:
            last = error
        else:
            if last:
                return last
        await asyncio.sleep(step)
    pytest.fail(f"{what}: not within {timeout}s (last: {last!r})")

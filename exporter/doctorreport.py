"""What `bitrix24-exporter doctor` reports, and how the report is printed.

A `Report` holds one `PortalReport` per portal, each a list of `Check` lines (OK, WARN,
FAIL or SKIP, with the fix in words under every WARN and FAIL). `format_text` and
`format_json` print it; both pass the text through the log mask, so a secret that came
back in some error text is never shown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from exporter.logs import mask

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2

OK: Final = "OK"
WARN: Final = "WARN"
FAIL: Final = "FAIL"
SKIP: Final = "SKIP"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went and, unless OK, the fix."""

    name: str
    status: str  # OK | WARN | FAIL | SKIP
    summary: str
    fix: str = ""


@dataclass(frozen=True)
class PortalReport:
    """Every check of one portal, in the order they ran."""

    name: str
    target: str  # the credential's address, redacted
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Report:
    """The whole run: one report per portal of the config."""

    source: str
    portals: tuple[PortalReport, ...]

    def count(self, status: str) -> int:
        return sum(1 for p in self.portals for c in p.checks if c.status == status)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.count(FAIL) else EXIT_OK


def format_text(report: Report) -> str:
    """The report for a terminal: a block per portal, one line per check, fixes indented."""
    lines: list[str] = []
    for portal in report.portals:
        lines.append(f"{portal.name} ({portal.target})")
        for check in portal.checks:
            lines.append(f"  {check.status:<5} {check.name}: {check.summary}")
            if check.fix:
                lines.append(f"        fix: {check.fix}")
        lines.append("")
    portals = len(report.portals)
    failed, warned = report.count(FAIL), report.count(WARN)
    verdict = "ready to run" if not failed else "fix the FAIL lines, then run doctor again"
    lines.append(
        f"{portals} portal{'s' if portals != 1 else ''}: {failed} FAIL, {warned} WARN: {verdict}"
    )
    return mask("\n".join(lines) + "\n")


def format_json(report: Report) -> str:
    """The report as one JSON document, for scripts."""
    data: dict[str, Any] = {
        "config": report.source,
        "exit_code": report.exit_code,
        "failed": report.count(FAIL),
        "warnings": report.count(WARN),
        "portals": [
            {
                "name": p.name,
                "target": p.target,
                "checks": [
                    {"check": c.name, "status": c.status, "summary": c.summary, "fix": c.fix}
                    for c in p.checks
                ],
            }
            for p in report.portals
        ],
    }
    return mask(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def seconds_text(seconds: float) -> str:
    """A duration for the report: "0s", "0.25s", "10.5s", "1250s".

    >>> [seconds_text(s) for s in (0, 0.25, 10.5, 60, 1249.6)]
    ['0s', '0.25s', '10.5s', '60s', '1250s']
    """
    if seconds >= 100:
        return f"{seconds:.0f}s"
    return f"{seconds:.3g}s"


_NICE: Final = (5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 600, 900, 1200, 1800, 3600)


def nice_interval(seconds: float) -> str:
    """The shortest round poll_interval of at least `seconds`, as the config writes it.

    >>> [nice_interval(s) for s in (0.2, 10.5, 46, 61, 300, 3601)]
    ['5s', '15s', '60s', '90s', '5m', '2h']
    """
    chosen = next((n for n in _NICE if n >= seconds), 3600 * math.ceil(seconds / 3600))
    if chosen % 3600 == 0:
        return f"{chosen // 3600}h"
    if chosen % 60 == 0 and chosen > 60:
        return f"{chosen // 60}m"
    return f"{chosen}s"

"""Helpers shared by the alert tests: Alertmanager webhook bodies and receiver settings."""

from __future__ import annotations

from typing import Any

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert


TOKEN = "alert-t0ken-for-tests"


def receiver(**overrides: Any) -> dict[str, Any]:
    """An `alert_receivers` entry of the config: ops on acme, chat42, notify_user."""
    return {
        "name": "ops",
        "portal": "acme",
        "token": TOKEN,
        "chat": "chat42",
        "notify_user": True,
        "max_per_minute": 20,
        **overrides,
    }


def alert(
    fingerprint: str = "f1",
    *,
    status: str = "firing",
    name: str = "Bitrix24UserTasksOverdue",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    starts_at: str = "2026-01-01T10:00:00Z",
    ends_at: str | None = None,
) -> dict[str, Any]:
    """One alert of a webhook body; a resolved alert ends an hour after it started."""
    return {
        "status": status,
        "labels": {"alertname": name, "severity": "info", "portal": "acme", **(labels or {})},
        "annotations": annotations
        if annotations is not None
        else {"summary": "User has 12 overdue tasks on acme"},
        "startsAt": starts_at,
        "endsAt": ends_at or (ZERO_TIME if status == "firing" else "2026-01-01T11:00:00Z"),
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
        "fingerprint": fingerprint,
    }


def body(
    *alerts: dict[str, Any],
    status: str | None = None,
    group_key: str = '{}:{alertname="Bitrix24UserTasksOverdue"}',
    truncated: int = 0,
) -> dict[str, Any]:
    """A version 4 webhook body; its status is firing while any alert fires."""
    listed = list(alerts) or [alert()]
    firing = any(a["status"] == "firing" for a in listed)
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": truncated,
        "status": status or ("firing" if firing else "resolved"),
        "receiver": "bitrix24",
        "groupLabels": {"alertname": listed[0]["labels"]["alertname"]},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": listed,
    }

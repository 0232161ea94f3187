"""Alertmanager's webhook body (version 4) as frozen data, or one line saying what is wrong.

Alertmanager posts one notification per alert group:

    {"version": "4", "groupKey": "{}:{alertname=\\"X\\"}", "truncatedAlerts": 0,
     "status": "firing", "receiver": "bitrix24-ops", "groupLabels": {...},
     "commonLabels": {...}, "commonAnnotations": {...}, "externalURL": "http://am:9093",
     "alerts": [{"status": "firing", "labels": {...}, "annotations": {...},
                 "startsAt": "2026-01-01T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                 "generatorURL": "http://prometheus:9090/graph?...", "fingerprint": "a1b2"}]}

A firing alert carries the zero time as `endsAt` (Alertmanager hides an end that has not
come yet), so a repeat of the same notification carries the same times; a resolved alert
carries its real end. Keys not listed here are ignored, so a later Alertmanager adding
fields is still understood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from exporter.typenames import TypeWords, type_word

Status = Literal["firing", "resolved"]
STATUSES: tuple[Status, ...] = ("firing", "resolved")


class PayloadRejected(ValueError):
    """A body that is not an Alertmanager webhook payload; the text is one line."""


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of a notification."""

    status: Status
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: str
    ends_at: str
    generator_url: str
    fingerprint: str

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "") or "alert"

    @property
    def identity(self) -> tuple[str, str, str]:
        """What tells this alert apart from a repeat: fingerprint, start and end."""
        return (self.fingerprint, self.starts_at, self.ends_at)


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification of Alertmanager: a group of alerts and what they have in common."""

    status: Status
    group_key: str
    receiver: str
    alerts: tuple[Alert, ...]
    group_labels: Mapping[str, str]
    common_labels: Mapping[str, str]
    common_annotations: Mapping[str, str]
    external_url: str
    truncated: int  # alerts Alertmanager left out (webhook_configs max_alerts)

    @property
    def firing(self) -> tuple[Alert, ...]:
        return tuple(a for a in self.alerts if a.status == "firing")

    @property
    def resolved(self) -> tuple[Alert, ...]:
        return tuple(a for a in self.alerts if a.status == "resolved")


def parse_notification(body: object) -> Notification:
    """A decoded JSON body as a `Notification`; raises `PayloadRejected` naming the key.

    >>> n = parse_notification({"version": "4", "status": "firing", "groupKey": "g",
    ...     "alerts": [{"status": "firing", "labels": {"alertname": "X"},
    ...                 "startsAt": "2026-01-01T10:00:00Z", "fingerprint": "f1"}]})
    >>> n.alerts[0].name, n.alerts[0].identity
    ('X', ('f1', '2026-01-01T10:00:00Z', ''))
    >>> parse_notification({"version": "4", "status": "firing", "groupKey": "g", "alerts": [1]})
    Traceback (most recent call last):
    ...
    exporter.alerts.payload.PayloadRejected: alerts[0]: expected an object, got int
    """
    if not isinstance(body, dict):
        raise PayloadRejected(f"body: expected a JSON object, got {_kind(body)}")
    version = body.get("version")
    if version != "4":
        raise PayloadRejected(f'version: expected "4", got {_show(version)}')
    raw_alerts = body.get("alerts")
    if not isinstance(raw_alerts, list):
        raise PayloadRejected(f"alerts: expected a list, got {_kind(raw_alerts)}")
    if not raw_alerts:
        raise PayloadRejected("alerts: empty")
    truncated = body.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise PayloadRejected(
            f"truncatedAlerts: expected a non-negative integer, got {_show(truncated)}"
        )
    return Notification(
        status=_status(body, "status"),
        group_key=_text(body, "groupKey", required=True),
        receiver=_text(body, "receiver"),
        alerts=tuple(_alert(raw, f"alerts[{i}]") for i, raw in enumerate(raw_alerts)),
        group_labels=_labels(body, "groupLabels"),
        common_labels=_labels(body, "commonLabels"),
        common_annotations=_labels(body, "commonAnnotations"),
        external_url=_text(body, "externalURL"),
        truncated=truncated,
    )


def _alert(raw: object, where: str) -> Alert:
    if not isinstance(raw, dict):
        raise PayloadRejected(f"{where}: expected an object, got {_kind(raw)}")
    return Alert(
        status=_status(raw, "status", where),
        labels=_labels(raw, "labels", where, required=True),
        annotations=_labels(raw, "annotations", where),
        starts_at=_text(raw, "startsAt", where, required=True),
        ends_at=_text(raw, "endsAt", where),
        generator_url=_text(raw, "generatorURL", where),
        fingerprint=_text(raw, "fingerprint", where, required=True),
    )


def _status(raw: dict[str, Any], key: str, where: str = "") -> Status:
    value = raw.get(key)
    for status in STATUSES:
        if value == status:
            return status
    raise PayloadRejected(f'{_at(where, key)}: expected "firing" or "resolved", got {_show(value)}')


def _text(raw: dict[str, Any], key: str, where: str = "", *, required: bool = False) -> str:
    value = raw.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise PayloadRejected(f"{_at(where, key)}: expected a string, got {_kind(value)}")
    if required and not value:
        raise PayloadRejected(f"{_at(where, key)}: empty")
    return value


def _labels(
    raw: dict[str, Any], key: str, where: str = "", *, required: bool = False
) -> Mapping[str, str]:
    value = raw.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise PayloadRejected(f"{_at(where, key)}: expected an object, got {_kind(value)}")
    for name, item in value.items():
        if not isinstance(item, str):
            raise PayloadRejected(
                f"{_at(where, key)}.{_short(name)}: expected a string, got {_kind(item)}"
            )
    return dict(value)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_JSON_WORDS: TypeWords = ((type(None), "null"), (bool, "boolean"), (dict, "object"), (list, "list"))


def _kind(value: object) -> str:
    return type_word(value, _JSON_WORDS)


def _short(text: str, limit: int = 40) -> str:
    """A value from the body, cut and on one line, for an error message."""
    flat = text.replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(_short(value))
    return _kind(value)

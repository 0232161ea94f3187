"""The words of an alert in Bitrix24: a BB-code chat message and short personal notifications.

Pure functions: a `Notification` and the names the portal knows in, text out. Bitrix24 chat
takes BB-code only (`[b]`, `[color=#hex]`, `[url=...]`, `[USER=ID]name[/USER]`, newlines;
no Markdown) and cuts a message longer than 20,000 characters, so a chat message lists
alerts up to a bound, says "and N more" for the rest and always stays under `MAX_CHARS`.

Text from the alerts (labels, annotations) is not trusted to be BB-code: a `[` that would
open a tag gets a zero-width space after it, so `[USER=1]` in a label shows as typed and
mentions nobody. Links keep only http(s) URLs, without any `user:password@`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

from exporter.alerts.payload import Alert, Notification, Status

# Bitrix24 cuts messages at 20,000 characters; stay well below with whole alert blocks.
PORTAL_LIMIT = 20_000
MAX_CHARS = 18_000
# Alerts listed in one chat message and in one personal notification.
MAX_LISTED = 20
MAX_PERSONAL = 3
# Longest summary, description and label value shown.
SUMMARY_CHARS = 300
DESCRIPTION_CHARS = 1_000
VALUE_CHARS = 200

# Labels shown in their own words (or not at all) rather than in the list of other labels.
_OWN_LINE = frozenset(
    {"alertname", "severity", "portal", "user_id", "department_id", "department"}
    | {"head", "head_user_id"}
)
_NOISE = frozenset({"job", "prometheus", "replica", "__name__"})
_COLOURS: Mapping[Status, str] = {"firing": "#d32f2f", "resolved": "#388e3c"}
_TAG_START = re.compile(r"\[(?=/?[A-Za-z*])")
_ZWSP = "\u200b"


@dataclass(frozen=True)
class Names:
    """What the portal calls its users and departments, for mentions; empty when unknown.

    `user_ids` is False when the alerts' user labels are not Bitrix24 user ids (a portal
    in a privacy mode): they are then shown as they are and never turned into mentions.
    """

    users: Mapping[int, str] = field(default_factory=dict)
    departments: Mapping[int, str] = field(default_factory=dict)
    user_ids: bool = True


def escape(text: str) -> str:
    """Text shown as typed: no BB-code tag can start in it.

    >>> escape("[USER=1]x[/USER] at rate(x[5m])")
    '[\\u200bUSER=1]x[\\u200b/USER] at rate(x[5m])'
    """
    return _TAG_START.sub("[" + _ZWSP, text)


def cut(text: str, limit: int) -> str:
    """`text` on at most `limit` characters, an ellipsis marking a cut.

    >>> cut("abcdef", 4)
    'abc…'
    """
    return text if len(text) <= limit else text[: limit - 1] + "…"


def safe_url(url: str) -> str | None:
    """An http(s) URL fit for `[url=...]`: no credentials, no brackets; None otherwise.

    >>> safe_url("http://admin:pw@prom:9090/graph?g0.expr=x[5m]")
    'http://prom:9090/graph?g0.expr=x%5B5m%5D'
    >>> safe_url("javascript:alert(1)") is None
    True
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return quote(clean, safe=":/?#@!$&'()*+,;=%~-._")


def link(url: str, title: str) -> str:
    """A BB-code link, or nothing when the URL is not fit to show."""
    safe = safe_url(url)
    return f"[url={safe}]{title}[/url]" if safe else ""


def positive_id(value: str | None) -> int | None:
    """A label holding a Bitrix24 id (user, department) as an int; None when it is not one.

    >>> positive_id("42"), positive_id("0"), positive_id("x"), positive_id(None)
    (42, None, None, None)
    """
    if value is None or not value.strip().isdigit():
        return None
    number = int(value)
    return number if number > 0 else None


def user_ref(user_id: int, names: Names, *, mention: bool = True) -> str:
    """A user as a mention where the portal knows the name, else as "user N".

    >>> user_ref(3, Names(users={3: "Clara Schmidt"}))
    '[USER=3]Clara Schmidt[/USER]'
    >>> user_ref(4, Names())
    'user 4'
    """
    name = names.users.get(user_id)
    if not name:
        return f"user {user_id}"
    shown = escape(cut(name, VALUE_CHARS))
    return f"[USER={user_id}]{shown}[/USER]" if mention else shown


def headline(alert: Alert) -> str:
    """What the alert says in one line: its summary, else its description, else its name."""
    for key in ("summary", "description"):
        text = " ".join(alert.annotations.get(key, "").split())
        if text:
            return escape(cut(text, SUMMARY_CHARS))
    return escape(alert.name)


def chat_message(notification: Notification, names: Names = Names()) -> str:
    """One chat message for a notification: status, alerts up to a bound, links.

    >>> from exporter.alerts.payload import parse_notification
    >>> n = parse_notification({"version": "4", "status": "firing", "groupKey": "g",
    ...     "externalURL": "http://am:9093",
    ...     "alerts": [{"status": "firing", "fingerprint": "f", "startsAt": "t",
    ...                 "labels": {"alertname": "Bitrix24UserTasksOverdue", "severity": "info",
    ...                            "portal": "acme", "user_id": "3"},
    ...                 "annotations": {"summary": "Clara has 12 overdue tasks"}}]})
    >>> print(chat_message(n, Names(users={3: "Clara Schmidt"})))
    [b][color=#d32f2f]FIRING[/color][/b] [b]Bitrix24UserTasksOverdue[/b] · 1 alert
    <BLANKLINE>
    [b]Bitrix24UserTasksOverdue[/b] · info
    Clara has 12 overdue tasks
    User: [USER=3]Clara Schmidt[/USER] · Portal: acme
    <BLANKLINE>
    [url=http://am:9093]Alertmanager[/url]
    """
    status = notification.status
    # Firing first: in a group that is still firing, those are the ones to act on.
    alerts = [*notification.firing, *notification.resolved]
    mixed = bool(notification.firing) and bool(notification.resolved)
    total = len(alerts) + notification.truncated
    names_in_group = {a.name for a in alerts}
    title = escape(names_in_group.pop()) if len(names_in_group) == 1 else "Alerts"
    header = (
        f"[b][color={_COLOURS[status]}]{status.upper()}[/color][/b] [b]{title}[/b]"
        f" · {total} alert{'' if total == 1 else 's'}"
    )
    footer = link(notification.external_url, "Alertmanager")
    blocks: list[str] = []
    used = len(header) + len(footer) + 40  # the "and N more" line and separators
    for alert in alerts:
        if len(blocks) >= MAX_LISTED:
            break
        block = _alert_block(alert, names, marked=mixed)
        if used + len(block) + 2 > MAX_CHARS and blocks:
            break
        blocks.append(block)
        used += len(block) + 2
    rest = total - len(blocks)
    parts = [header, *blocks]
    if rest > 0:
        parts.append(f"… and {rest} more")
    if footer:
        parts.append(footer)
    return "\n\n".join(parts)


def _alert_block(alert: Alert, names: Names, *, marked: bool) -> str:
    labels = alert.labels
    title = f"[b]{escape(cut(alert.name, VALUE_CHARS))}[/b]"
    if marked:
        title = f"[color={_COLOURS[alert.status]}]{alert.status.upper()}[/color] {title}"
    severity = labels.get("severity")
    lines = [f"{title} · {escape(cut(severity, VALUE_CHARS))}" if severity else title]
    lines.append(headline(alert))
    summary = " ".join(alert.annotations.get("summary", "").split())
    description = " ".join(alert.annotations.get("description", "").split())
    if summary and description and description != summary:
        lines.append(f"[i]{escape(cut(description, DESCRIPTION_CHARS))}[/i]")
    facts = _facts(labels, names)
    if facts:
        lines.append(" · ".join(facts))
    links = [
        link(alert.generator_url, "Source"),
        link(alert.annotations.get("runbook_url", ""), "Runbook"),
    ]
    shown = [item for item in links if item]
    if shown:
        lines.append(" · ".join(shown))
    return "\n".join(lines)


def _facts(labels: Mapping[str, str], names: Names) -> list[str]:
    """The labels that matter, in words: user, department, portal, then the others."""
    facts: list[str] = []
    for key, title in (("user_id", "User"), ("head_user_id", "Head")):
        if labels.get(key):
            facts.append(f"{title}: {_person(labels, key, names)}")
    department_id = positive_id(labels.get("department_id"))
    if department_id is not None:
        name = names.departments.get(department_id)
        shown = escape(cut(name, VALUE_CHARS)) if name else f"department {department_id}"
        facts.append(f"Department: {shown}")
    if labels.get("portal"):
        facts.append(f"Portal: {escape(cut(labels['portal'], VALUE_CHARS))}")
    for key in sorted(labels):
        if key in _OWN_LINE or key in _NOISE:
            continue
        facts.append(f"{escape(cut(key, 60))}: {escape(cut(labels[key], VALUE_CHARS))}")
    return facts


def _person(labels: Mapping[str, str], key: str, names: Names) -> str:
    """A user label as a mention where it is a known user id, else as given."""
    user_id = positive_id(labels[key]) if names.user_ids else None
    if user_id is not None:
        return user_ref(user_id, names)
    # A pseudonym, or the rule's `head` label (a name) next to an empty head_user_id.
    shown = labels.get("head") if key == "head_user_id" else None
    return escape(cut(shown or labels[key], VALUE_CHARS))


def personal_message(
    status: Status,
    alerts: Sequence[Alert],
    names: Names = Names(),
    *,
    department: int | None = None,
) -> str:
    """A short notification for one person: status, each alert's name and what it says.

    `department` is set when the person is told as the head of that department.

    >>> from exporter.alerts.payload import Alert
    >>> a = Alert("firing", {"alertname": "Bitrix24UserTasksOverdue"},
    ...           {"summary": "Clara has 12 overdue tasks"}, "t", "", "", "f")
    >>> personal_message("firing", [a])
    '[b]FIRING[/b] Bitrix24UserTasksOverdue: Clara has 12 overdue tasks'
    """
    head = f"[b]{status.upper()}[/b]"
    if department is not None:
        name = names.departments.get(department)
        where = escape(cut(name, VALUE_CHARS)) if name else f"department {department}"
        head += f" in {where}"
    lines = [f"{escape(alert.name)}: {headline(alert)}" for alert in alerts[:MAX_PERSONAL]]
    if len(alerts) > MAX_PERSONAL:
        lines.append(f"… and {len(alerts) - MAX_PERSONAL} more")
    if len(lines) == 1:
        return f"{head} {lines[0]}"
    return "\n".join([head, *lines])


def mentioned_users(alerts: Iterable[Alert]) -> set[int]:
    """The user ids the alerts' `user_id` and `head_user_id` labels name."""
    found = (positive_id(a.labels.get(k)) for a in alerts for k in ("user_id", "head_user_id"))
    return {user_id for user_id in found if user_id is not None}

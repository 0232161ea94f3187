"""Configuration: YAML in, frozen dataclasses out.

`load_config` reads a file (plus one portal per file in `portals_dir`) and hands the data
to `parse_config`, which expands `${VAR}` references, applies the defaults documented in
docs/architecture.md, rejects unknown keys and checks every value. Each key is declared once,
on the field it fills (`setting`: its checker and its default); `exporter.yamlcheck` walks the
file, so problems are collected rather than raised one by one and a user fixes a broken file
in one pass. Each problem is one line::

    config.yaml: portals[1].tasks.users[0]: must be a positive integer, got 'abc'

Webhook URLs carry a secret in their path. No message and no ``repr`` ever shows it: webhook
values are passed through `redact_url` before they are echoed, and the dataclasses that hold
secrets hide them in ``repr``.

This module never imports aiohttp or prometheus_client, so `--config.check` and the tests
stay cheap.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from exporter.yamlcheck import (
    BAD,
    Check,
    ConfigError,
    Context,
    Invalid,
    Loc,
    Node,
    Problems,
    Section,
    boolean,
    build,
    check_document,
    each,
    kind,
    nested,
    one_of,
    read_yaml,
    reason,
    redact_url,
    resolve_path,
    run,
    section,
    setting,
    show,
)

__all__ = [
    "ENTERPRISE",
    "PRIVACY_MODES",
    "ROLES",
    "STANDARD",
    "AlertReceiver",
    "Config",
    "ConfigError",
    "DepartmentUsers",
    "ImSettings",
    "OAuthAuth",
    "Portal",
    "PrivacyMode",
    "PrivacySettings",
    "RateLimit",
    "TasksSettings",
    "TeamsSettings",
    "WebhookAuth",
    "check_receivers_protected",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_listen_address",
    "redact_url",
]

ROLES: Final[tuple[str, ...]] = (
    "view_all",
    "view_role_responsible",
    "view_role_accomplice",
    "view_role_auditor",
    "view_role_originator",
)

_WEBHOOK_FORM = "https://PORTAL/rest/USER_ID/SECRET/"


# --------------------------------------------------------------------------- value parsers

_DURATION_FORM = "a duration like 500ms, 30s, 5m or 1h30m (a bare number is seconds)"
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS: Final[Mapping[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: object) -> tuple[float | None, str]:
    """Seconds for `value`, or None and the problem."""
    if isinstance(value, bool):
        return None, f"must be {_DURATION_FORM}"
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond float's range
            return None, "must be a finite duration"
    elif isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        # ${VAR} expansion yields strings, so "30" must mean 30 seconds as 30 does.
        seconds = float(value.strip())
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip()):
        seconds = 0.0
        for number, unit in _DURATION_PART_RE.findall(value.strip()):
            # Dividing keeps "500ms" an exact 0.5, which multiplying by 0.001 does not.
            if unit == "ms":
                seconds += float(number) / 1000
            else:
                seconds += float(number) * _UNIT_SECONDS[unit]
    else:
        return None, f"must be {_DURATION_FORM}"
    if not math.isfinite(seconds):
        return None, "must be a finite duration"
    if seconds < 0:
        return None, "must not be negative"
    return seconds, ""


def parse_duration(value: object) -> float:
    """Seconds in `value`: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"`` or a bare number.

    Raises ValueError for anything else, including negative and infinite values.
    """
    seconds, problem = _duration(value)
    if seconds is None:
        raise ValueError(f"duration {problem}, got {show(value)}")
    return seconds


_LISTEN_RE = re.compile(r"\[(?P<ipv6>[^\]]+)\]:(?P<port6>\d+)|(?P<host>[^:\[\]]*):(?P<port>\d+)")
_LISTEN_FORM = "host:port like 0.0.0.0:9877, [::]:9877 or :9877"


def _listen_address(value: object) -> tuple[tuple[str, int] | None, str]:
    if not isinstance(value, str):
        return None, f"must be {_LISTEN_FORM}"
    match = _LISTEN_RE.fullmatch(value.strip())
    if match is None:
        return None, f"must be {_LISTEN_FORM}"
    host = match["ipv6"] if match["ipv6"] is not None else match["host"]
    digits = match["port6"] if match["port6"] is not None else match["port"]
    # int() refuses more than 4300 digits; no port has more than five.
    if len(digits) > 5 or int(digits) > 65535:
        return None, "port must be between 0 and 65535"
    return (host, int(digits)), ""


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 in brackets); an empty host means every interface.

    Raises ValueError for anything else.
    """
    parsed, problem = _listen_address(value)
    if parsed is None:
        raise ValueError(f"listen address {problem}, got {show(value)}")
    return parsed


def _check_webhook_url(value: str) -> tuple[str | None, str]:
    """The normalised webhook URL, or None and the problem (which never quotes the URL)."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        return None, f"must start with http:// or https:// ({_WEBHOOK_FORM})"
    if not parts.hostname:
        return None, f"must include a host ({_WEBHOOK_FORM})"
    if "@" in parts.netloc:
        return None, "must not contain a user name or password before the host"
    try:
        parts.port  # noqa: B018 -- the property is what validates the port
    except ValueError:
        return None, "has an invalid port"
    if "?" in text or "#" in text:
        return None, "must not have a query string or fragment"
    segments = parts.path.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()
    if "rest" not in segments:
        return None, f"path must end in /rest/<user id>/<secret>/ ({_WEBHOOK_FORM})"
    at = segments.index("rest")
    tail = segments[at + 1 :]
    # The documented call form appends the method, optionally with .json or .xml.
    if len(tail) > 2 or (len(tail) == 2 and "." in tail[1]):
        return None, "must end with the secret, without a method name such as /profile or .json"
    if len(tail) < 2 or "" in tail:
        return None, f"path must end in /rest/<user id>/<secret>/ ({_WEBHOOK_FORM})"
    user, secret = tail
    # ASCII only: isdigit() also accepts "²", which int() rejects; int() refuses more
    # than 4300 digits.
    if not (user.isascii() and user.isdigit() and len(user) <= 30) or int(user) == 0:
        return None, "user id in /rest/<user id>/ must be a positive integer"
    prefix = "".join("/" + segment for segment in segments[:at])
    return f"{parts.scheme}://{parts.netloc}{prefix}/rest/{int(user)}/{secret}/", ""


def _check_base_url(value: str, *, rest: bool) -> tuple[str | None, str]:
    """`value` with a trailing slash, or None and the problem; `rest` requires a /rest/ path."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None, "must be an http:// or https:// URL with a host"
    if "?" in text or "#" in text or "@" in parts.netloc:
        return None, "must not have credentials, a query string or a fragment"
    if rest and not parts.path.rstrip("/").endswith("/rest"):
        return None, "must be the portal's REST base, like https://PORTAL/rest/"
    return (text if text.endswith("/") else text + "/"), ""


# --------------------------------------------------------------------------- value checkers
# Each takes a Node and returns its field's type, or reports and abandons the value.


def _text(node: Node) -> str:
    if not isinstance(node.value, str) or not node.value.strip():
        node.fail("must be a non-empty string")
    return node.value.strip()


def _secret_text(node: Node) -> str:
    if not isinstance(node.value, str) or not node.value.strip():
        node.fail("must be a non-empty string", shown=kind(node.value))
    return node.value.strip()


def _secret_file(node: Node) -> str:
    """The stripped content of the file the value names, relative to the file naming it."""
    if not isinstance(node.value, str) or not node.value.strip():
        node.fail("must be a file path")
    path = resolve_path(node.value.strip(), node.base_dir)
    try:
        content = path.read_text(encoding="utf-8").strip()
    except (OSError, ValueError) as err:
        node.fail(f"cannot read file ({reason(err)})", shown=show(str(path)))
    if not content:
        node.fail("file is empty", shown=show(str(path)))
    return content


def _local_path(node: Node) -> str:
    return str(resolve_path(_text(node), node.base_dir))


def _positive_duration(node: Node) -> float:
    seconds, problem = _duration(node.value)
    if seconds is None:
        node.fail(problem)
    if seconds == 0:
        node.fail("must be a positive duration")
    return seconds


def _listen(node: Node) -> str:
    parsed, problem = _listen_address(node.value)
    if parsed is None or not isinstance(node.value, str):
        node.fail(problem)
    return node.value.strip()


def _positive_number(node: Node) -> float:
    value = node.value
    # YAML booleans are Python ints; `true` is never meant as a number here.
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            if math.isfinite(value) and value > 0:
                return float(value)
        except OverflowError:  # an integer beyond float's range
            pass
    node.fail("must be a number greater than 0")


def _int_at_least(minimum: int, problem: str) -> Check[int]:
    def check(node: Node) -> int:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            node.fail(problem)
        return value

    return check


_positive_id = _int_at_least(1, "must be a positive integer")


def _webhook_url(node: Node, value: object) -> WebhookAuth:
    """A webhook from `value` (the node's own, or a file's content), never showing its secret."""
    if not isinstance(value, str):
        node.fail(f"must be a webhook URL like {_WEBHOOK_FORM}", shown=kind(value))
    normalised, problem = _check_webhook_url(value)
    if normalised is None:
        node.fail(problem, shown=repr(redact_url(value)))
    return WebhookAuth(normalised)


def _webhook(node: Node) -> WebhookAuth:
    return _webhook_url(node, node.value)


def _webhook_file(node: Node) -> WebhookAuth:
    return _webhook_url(node, _secret_file(node))


def _base_url(*, rest: bool) -> Check[str]:
    def check(node: Node) -> str:
        if not isinstance(node.value, str):
            node.fail("must be an http:// or https:// URL with a host")
        normalised, problem = _check_base_url(node.value, rest=rest)
        if normalised is None:
            node.fail(problem)
        return normalised

    return check


# --------------------------------------------------------------------------- dataclasses
# Bottom up: a section's fields name the checkers of the sections below it.

_RATE_LIMIT_FORM = "must be standard, enterprise or a mapping with requests_per_second and burst"


@section
class RateLimit:
    """Client-side leaky bucket mirroring the portal's own request limit."""

    requests_per_second: float = setting(_positive_number)
    burst: int = setting(_int_at_least(1, "must be an integer of 1 or more"))


# Bitrix24's published limits: enterprise plans drain 5/s from a bucket of 250, all others
# 2/s from 50.
STANDARD: Final = RateLimit(2.0, 50)
ENTERPRISE: Final = RateLimit(5.0, 250)
_NAMED_RATE_LIMITS: Final = {"standard": STANDARD, "enterprise": ENTERPRISE}


def _rate_limit(node: Node) -> RateLimit:
    if isinstance(node.value, str):
        named = _NAMED_RATE_LIMITS.get(node.value)
        if named is None:
            node.fail(_RATE_LIMIT_FORM)
        return named
    return build(RateLimit, node, form=_RATE_LIMIT_FORM)


@dataclass(frozen=True, repr=False)
class WebhookAuth:
    """An incoming webhook, ``https://PORTAL/rest/USER_ID/SECRET/``.

    `url` is normalised to end with ``/`` so that a method name is a plain concatenation.
    ``repr`` and ``str`` show `redacted`, never the secret.
    """

    url: str

    def __post_init__(self) -> None:
        normalised, problem = _check_webhook_url(self.url)
        if normalised is None:
            raise ValueError(f"webhook URL {problem}, got {redact_url(self.url)!r}")
        # Frozen, so the normalised form has to be written around __setattr__.
        object.__setattr__(self, "url", normalised)

    @property
    def user_id(self) -> int:
        """The id of the user who created the webhook; calls run as that user."""
        return int(self.url.rsplit("/", 3)[1])

    @property
    def secret(self) -> str:
        """The webhook's secret path segment."""
        return self.url.rsplit("/", 2)[1]

    @property
    def redacted(self) -> str:
        """`url` with the secret replaced by ``<secret>``, safe for logs and labels."""
        return self.url[: -len(self.secret) - 1] + "<secret>/"

    def __repr__(self) -> str:
        return f"WebhookAuth(url={self.redacted!r})"

    def __str__(self) -> str:
        return self.redacted


@section
class OAuthAuth:
    """A local OAuth application; tokens rotate, so the current pair lives in `state_file`."""

    client_endpoint: str = setting(_base_url(rest=True))
    client_id: str = setting(_text)
    client_secret: str = setting(
        {"client_secret": _secret_text, "client_secret_file": _secret_file}, repr=False
    )
    state_file: str = setting(_local_path)
    # Only the first refresh token comes from the config; rotated ones are in state_file.
    refresh_token: str | None = setting(_secret_text, default=None, repr=False)
    server: str = setting(_base_url(rest=False), default="https://oauth.bitrix.info/")

    def __post_init__(self) -> None:
        # Callers append paths, so both bases must end with a slash.
        for name in ("client_endpoint", "server"):
            value = getattr(self, name)
            if not value.endswith("/"):
                object.__setattr__(self, name, value + "/")


def _department_ids(node: Node) -> tuple[int, ...]:
    if node.value == []:
        node.fail("must not be empty")
    return each(node, _positive_id, form="must be a list of department ids")


@section
class DepartmentUsers:
    """`tasks.users: {departments: [5, 12]}`: the active employees of these departments and
    of all their sub-departments."""

    departments: tuple[int, ...] = setting(_department_ids)


def _users(node: Node) -> str | tuple[int, ...] | DepartmentUsers:
    form = "must be self, all, a list of user ids or {departments: [ids]}"
    if isinstance(node.value, str):
        if node.value not in ("self", "all"):
            node.fail(form)
        return node.value
    if isinstance(node.value, dict):
        return build(DepartmentUsers, node)
    if node.value == []:
        node.fail("must not be empty (use self or all)")
    return each(node, _positive_id, form=form)


def _exclude_users(node: Node) -> frozenset[int]:
    return frozenset(each(node, _positive_id, form="must be a list of user ids"))


def _groups(node: Node) -> tuple[int, ...]:
    if node.value == []:
        node.fail("must not be empty (0 means all groups)")
    form = "must be a list of group ids (0 means all groups)"
    return each(node, _int_at_least(0, "must be an integer of 0 or more"), form=form)


def _roles(node: Node) -> tuple[str, ...]:
    form = f"must be a non-empty list of roles from {', '.join(ROLES)}"
    if node.value == []:
        node.fail(form)
    return each(node, one_of(ROLES), form=form)


@section
class TasksSettings:
    """What `tasks.task.counters.get` is asked for."""

    enabled: bool = setting(boolean, default=True)
    users: str | tuple[int, ...] | DepartmentUsers = setting(_users, default="self")
    exclude_users: frozenset[int] = setting(_exclude_users, default=frozenset())
    groups: tuple[int, ...] = setting(_groups, default=(0,))
    roles: tuple[str, ...] = setting(_roles, default=("view_all",))


def _im_webhooks(node: Node) -> tuple[WebhookAuth, ...]:
    if not isinstance(node.value, list):
        node.fail("must be a list of webhook URLs", shown=kind(node.value))
    webhooks: list[WebhookAuth] = []
    ok = True
    for item in node.items(""):
        webhook = run(_webhook, item)
        if webhook is BAD:
            ok = False
        elif any(other.user_id == webhook.user_id for other in webhooks):
            # Two webhooks of one user would export the same series twice.
            item.report(
                f"user {webhook.user_id} already has a webhook in this list",
                shown=repr(webhook.redacted),
            )
            ok = False
        else:
            webhooks.append(webhook)
    if not ok:
        raise Invalid
    return tuple(webhooks)


@section
class ImSettings:
    """What `im.counters.get` is asked for; it only ever reports the caller's own counters."""

    enabled: bool = setting(boolean, default=True)
    webhooks: tuple[WebhookAuth, ...] = setting(_im_webhooks, default=())
    chats: bool = setting(boolean, default=False)


_NAME_RE = re.compile(r"[a-zA-Z0-9_.-]+")


def _name(node: Node) -> str:
    if not isinstance(node.value, str) or not _NAME_RE.fullmatch(node.value):
        node.fail("must match [a-zA-Z0-9_.-]+")
    return node.value


@section
class TeamsSettings:
    """Departments (`department.get`) and each watched user's departments (`UF_DEPARTMENT`)."""

    enabled: bool = setting(boolean, default=False)


PrivacyMode = Literal["none", "pseudonymous", "aggregate"]
PRIVACY_MODES: Final[tuple[PrivacyMode, ...]] = ("none", "pseudonymous", "aggregate")
# Shorter keys and tokens could be guessed: a pseudonym key by whoever knows one user's id and
# pseudonym, an alert receiver's token by whoever can reach the exporter.
_MIN_SECRET_LENGTH: Final = 16


def _long_secret(key: str, what: str) -> Mapping[str, Check[str]]:
    """`key` or `key`_file (a file holding it), `what` of at least 16 characters."""

    def check(node: Node, secret: str) -> str:
        if len(secret) < _MIN_SECRET_LENGTH:
            message = f"must be {what} of at least {_MIN_SECRET_LENGTH} characters"
            node.fail(message, shown=f"{len(secret)}")
        return secret

    return {
        key: lambda node: check(node, _secret_text(node)),
        f"{key}_file": lambda node: check(node, _secret_file(node)),
    }


@section
class PrivacySettings:
    """What `/metrics` may tell about a person: everything (``none``), user ids replaced by
    a keyed hash (``pseudonymous``), or department sums only (``aggregate``), each shown
    only where it covers at least `min_team_size` users."""

    mode: PrivacyMode = setting(one_of(PRIVACY_MODES), default="none")
    pseudonym_key: str | None = setting(
        _long_secret("pseudonym_key", "a key"),
        default=None,
        repr=False,
    )
    # With 2, each of the two could work out the other's numbers from the sum.
    min_team_size: int = setting(_int_at_least(3, "must be an integer of 3 or more"), default=5)


def _check_privacy(privacy: PrivacySettings, at: Section) -> PrivacySettings:
    if not at.usable("mode"):
        return privacy  # already reported; the default mode would mislead
    given = [key for key in ("pseudonym_key", "pseudonym_key_file") if at.has(key)]
    if privacy.mode == "pseudonymous" and not given:
        at.report("pseudonym_key", "is required when mode is pseudonymous (or pseudonym_key_file)")
    elif privacy.mode != "pseudonymous" and given and at.ok(given[0]):
        at.report(
            given[0], f"is only used when mode is pseudonymous (mode is {privacy.mode})", shown=None
        )
    return privacy


def _check_portal(portal: Portal, at: Section) -> Portal:
    # Aggregate mode exports department sums only: without departments, nothing at all.
    privacy = at.given.get("privacy")
    if at.ok("privacy") and at.usable("teams") and privacy is not None:
        mode = privacy.child("mode")
        if portal.privacy.mode == "aggregate" and not portal.teams.enabled and mode is not None:
            mode.report("aggregate needs teams.enabled: true")
    return portal


# Typed here: a dict literal of checkers with different types would be inferred as object.
_CREDENTIALS: Final[Mapping[str, Check[WebhookAuth | OAuthAuth]]] = {
    "webhook": _webhook,
    "webhook_file": _webhook_file,
    "oauth": nested(OAuthAuth),
}


@section
class Portal:
    """One Bitrix24 portal: the ``portal`` label, its credential and what to collect."""

    name: str = setting(_name)
    auth: WebhookAuth | OAuthAuth = setting(_CREDENTIALS)
    rate_limit: RateLimit = setting(_rate_limit, default=STANDARD)
    operating_limit: float = setting(_positive_duration, default=480.0)
    # What Bitrix24 sums operating_limit over; another value only for a test portal.
    operating_window: float = setting(_positive_duration, default=600.0)
    tasks: TasksSettings = setting(nested(TasksSettings), default=TasksSettings())
    im: ImSettings = setting(nested(ImSettings), default=ImSettings())
    teams: TeamsSettings = setting(nested(TeamsSettings), default=TeamsSettings())
    privacy: PrivacySettings = setting(
        nested(PrivacySettings, then=_check_privacy), default=PrivacySettings()
    )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret of this portal, for the log redaction to know."""
        found = [webhook.secret for webhook in self.im.webhooks]
        if isinstance(self.auth, WebhookAuth):
            found.append(self.auth.secret)
        else:
            found += [self.auth.client_secret, self.auth.refresh_token or ""]
        found.append(self.privacy.pseudonym_key or "")
        return tuple(secret for secret in found if secret)


_portal = nested(Portal, form="must be a portal mapping", then=_check_portal)


def _portals(node: Node) -> tuple[Portal, ...]:
    return each(node, _portal, form="must be a list of portals", unique=False)


def _int_between(low: int, high: int) -> Check[int]:
    def check(node: Node) -> int:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            node.fail(f"must be an integer from {low} to {high}")
        return value

    return check


# DIALOG_ID of im.message.add: a chat, a workgroup's chat, or a user (a private dialog).
_DIALOG_RE = re.compile(r"(?:chat|sg)?[1-9][0-9]{0,17}")


def _dialog_id(node: Node) -> str:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**18:
        return str(value)
    if not isinstance(value, str) or not _DIALOG_RE.fullmatch(value.strip()):
        node.fail("must be a chat like chat42, a workgroup's chat like sg7, or a user id")
    return value.strip()


@section
class AlertReceiver:
    """Where Alertmanager's notifications to ``POST /alerts/<name>`` are delivered: a chat,
    the user an alert names, the head of its department; sent with `portal`'s credential,
    so its rate limit and budget apply. Without `token`, only the web config's basic auth
    protects the route: see `check_receivers_protected`."""

    name: str = setting(_name)
    portal: str = setting(_text)
    token: str | None = setting(_long_secret("token", "a token"), default=None, repr=False)
    chat: str | None = setting(_dialog_id, default=None)
    notify_user: bool = setting(boolean, default=False)
    notify_head: bool = setting(boolean, default=False)
    # Deliveries beyond this are refused, so a flood cannot spend the budget polling needs.
    max_per_minute: int = setting(_int_between(1, 60), default=6)


def _check_receiver(receiver: AlertReceiver, at: Section) -> AlertReceiver:
    targets = ("chat", "notify_user", "notify_head")
    nothing = receiver.chat is None and not receiver.notify_user and not receiver.notify_head
    if nothing and all(at.usable(key) for key in targets):
        at.node.report("needs a target: chat, notify_user: true or notify_head: true", shown=None)
    return receiver


_receiver = nested(AlertReceiver, form="must be a receiver mapping", then=_check_receiver)


def _alert_receivers(node: Node) -> tuple[AlertReceiver, ...]:
    return each(node, _receiver, form="must be a list of receivers", unique=False)


@section
class Config:
    """The whole configuration; durations are in seconds.

    `portals` holds the inline portals, then those of `portals_dir` (a resolved path).
    """

    listen_address: str = setting(_listen, default="0.0.0.0:9877")
    poll_interval: float = setting(_positive_duration, default=60.0)
    stale_after: float = setting(_positive_duration, default=180.0)
    request_timeout: float = setting(_positive_duration, default=30.0)
    user_refresh_interval: float = setting(_positive_duration, default=600.0)
    portals_dir: str | None = setting(_local_path, default=None)
    portals: tuple[Portal, ...] = setting(_portals, default=())
    alert_receivers: tuple[AlertReceiver, ...] = setting(_alert_receivers, default=())
    source: str = "<config>"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret in the configuration, for the log redaction to know."""
        tokens = tuple(r.token for r in self.alert_receivers if r.token)
        return tuple(secret for portal in self.portals for secret in portal.secrets) + tokens


# --------------------------------------------------------------------------- across keys


def _finish_config(config: Config, at: Section, environ: Mapping[str, str]) -> Config:
    """stale_after's default and floor, the portals of portals_dir, unique portal names,
    receivers' names and portals."""
    inline = at.given["portals"] if at.has("portals") else None
    entries = (
        [(item.loc.path, item) for item in inline.items("")]
        if inline and isinstance(inline.value, list)
        else []
    )
    files = None
    if at.ok("portals_dir") and config.portals_dir is not None:
        files = _portal_files(at.given["portals_dir"], Path(config.portals_dir), environ)
        entries += [(root.loc.source, root) for root, _ in files or ()]
    names = _unique_names(entries, "portal")
    _check_receivers(at.given.get("alert_receivers"), names)
    # Complain about no portals only when nothing else already explains it.
    explained = (inline is not None and inline.value != []) or (
        files is None and at.has("portals_dir")
    )
    if not entries and not explained:
        at.report("portals", "at least one portal is required (portals or portals_dir)")
    found = tuple(portal for _, portal in files or () if isinstance(portal, Portal))
    return replace(
        config,
        stale_after=_stale_after(config, at),
        portals=config.portals + found,
        source=at.node.loc.source,
    )


def _stale_after(config: Config, at: Section) -> float:
    if not at.has("stale_after"):
        # Three missed cycles before data counts as stale, whatever the interval.
        return 3 * config.poll_interval
    poll = config.poll_interval
    # A bad poll_interval is already reported; comparing against its default would mislead.
    if at.ok("stale_after") and at.usable("poll_interval") and config.stale_after < poll:
        at.report("stale_after", f"must be at least poll_interval ({poll:g}s)")
    return config.stale_after


def _portal_files(
    node: Node, directory: Path, environ: Mapping[str, str]
) -> list[tuple[Node, Portal | None]] | None:
    """Each *.yaml / *.yml file in `directory` as a document root and its portal (None if
    bad); None if the directory cannot be read."""
    problems = node.context.problems
    try:
        paths = sorted(
            path
            for path in directory.iterdir()
            if path.suffix in (".yaml", ".yml") and not path.name.startswith(".")
        )
    except (OSError, ValueError) as err:
        node.report(f"cannot read directory ({reason(err)})", shown=show(str(directory)))
        return None
    found: list[tuple[Node, Portal | None]] = []
    for number, path in enumerate(paths, start=1):
        # Sorted after the main file, and relative paths start at this file's directory.
        loc = Loc(str(path), "", (number,))
        context = Context(problems, path.parent)
        try:
            data = read_yaml(path, str(path))
        except ConfigError as error:
            problems.add_line(loc, error.problems[0])
            found.append((Node(None, loc, context), None))
            continue
        root = Node(_expand(loc, data, problems, environ), loc, context)
        if data is None:
            root.report("file is empty; it must be one portal mapping", shown=None)
            found.append((root, None))
            continue
        portal = run(_portal, root)
        found.append((root, None if portal is BAD else portal))
    return found


def _unique_names(entries: list[tuple[str, Node]], what: str) -> list[str]:
    """Each valid name once among (label, mapping) `entries`; the valid names, in order."""
    seen: dict[str, str] = {}
    for label, entry in entries:
        name = entry.child("name")
        if name is None or not isinstance(name.value, str) or not _NAME_RE.fullmatch(name.value):
            continue  # reported by the entry's own check
        if name.value in seen:
            name.report(f"duplicate {what} name (also used by {seen[name.value]})")
        else:
            seen[name.value] = label
    return list(seen)


def _check_receivers(receivers: Node | None, portals: list[str]) -> None:
    """Unique receiver names, and each receiver's portal one of `portals`."""
    if receivers is None or not isinstance(receivers.value, list):
        return
    items = receivers.items("")
    _unique_names([(item.loc.path, item) for item in items], "receiver")
    for item in items:
        portal = item.child("portal")
        named = portal.value.strip() if portal and isinstance(portal.value, str) else None
        if portal and portals and named is not None and named not in portals:
            portal.report(f"must name a portal ({', '.join(portals)})")


def check_receivers_protected(config: Config, web_config_has_basic_auth: bool) -> list[str]:
    """One line per alert receiver that nothing protects, for the caller to fail with.

    A receiver needs a token, or basic auth in the web config (``--web-config-file``), which
    this module never sees: the caller that has loaded both files calls this and raises
    ``ConfigError(lines)`` when there are any, as for any other config problem.
    """
    if web_config_has_basic_auth:
        return []
    return [
        f"{config.source}: alert_receivers[{index}]: needs token or token_file, or"
        " basic_auth_users in the web config: otherwise anyone who reaches the exporter can"
        " post into Bitrix24"
        for index, receiver in enumerate(config.alert_receivers)
        if receiver.token is None
    ]


# --------------------------------------------------------------------------- entry points

_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(loc: Loc, value: object, problems: Problems, environ: Mapping[str, str]) -> object:
    """`value` with ${VAR} replaced in every string; unset variables make the string BAD."""
    if isinstance(value, dict):
        return {
            key: _expand(loc.key(key, index), item, problems, environ)
            for index, (key, item) in enumerate(value.items())
        }
    if isinstance(value, list):
        return [_expand(loc.item(i), item, problems, environ) for i, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    failed = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal failed
        name = match[1]
        if name is None:
            return "${"
        if not _ENV_NAME_RE.fullmatch(name):
            problems.add(loc, f"invalid environment variable name {name!r} in ${{...}}")
            failed = True
            return ""
        if name not in environ:
            problems.add(loc, f"environment variable {name} is not set")
            failed = True
            return ""
        return environ[name]

    expanded = _ENV_RE.sub(substitute, value)
    return BAD if failed else expanded


def parse_config(
    data: object,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Build a `Config` from already-parsed YAML `data`.

    `source` names the file in messages; `environ` (default: os.environ) feeds ``${VAR}``;
    `base_dir` (default: the working directory) anchors relative ``webhook_file``,
    ``client_secret_file``, ``state_file`` and ``portals_dir`` paths. The only I/O is reading
    the files the data names. Raises ConfigError listing every problem in document order.
    """
    env = os.environ if environ is None else environ
    if data is None:
        raise ConfigError([f"{source}: file is empty; it must be a mapping with a portals list"])
    return check_document(
        Config,
        data,
        source=source,
        base_dir=Path() if base_dir is None else base_dir,
        form="the top level must be a mapping",
        expand=lambda loc, value, problems: _expand(loc, value, problems, env),
        then=lambda config, at: _finish_config(config, at, env),
    )


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse the YAML file at `path`, plus any portal files in its `portals_dir`.

    Messages name `path` as given. Raises ConfigError.
    """
    data = read_yaml(Path(path), str(path))
    return parse_config(data, source=str(path), environ=environ, base_dir=Path(path).parent)

"""Configuration: YAML in, frozen dataclasses out.

`load_config` reads a file (plus one portal per file in `portals_dir`) and hands the data
to `parse_config`, which expands `${VAR}` references, applies the defaults documented in
docs/architecture.md, rejects unknown keys and checks every value. Problems are collected
rather than raised one by one, so a user fixes a broken file in one pass; each problem is
one line::

    config.yaml: portals[1].tasks.users[0]: must be a positive integer, got 'abc'

Webhook URLs carry a secret in their path. No message and no ``repr`` ever shows it: webhook
values are passed through `redact_url` before they are echoed, and the dataclasses that hold
secrets hide them in ``repr``.

This module never imports aiohttp or prometheus_client, so `--config.check` and the tests
stay cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

__all__ = [
    "ENTERPRISE",
    "ROLES",
    "STANDARD",
    "Config",
    "ConfigError",
    "ImSettings",
    "OAuthAuth",
    "Portal",
    "RateLimit",
    "TasksSettings",
    "WebhookAuth",
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


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one complete line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class RateLimit:
    """Client-side leaky bucket mirroring the portal's own request limit."""

    requests_per_second: float
    burst: int


# Bitrix24's published limits: enterprise plans drain 5/s from a bucket of 250, all others
# 2/s from 50.
STANDARD: Final = RateLimit(2.0, 50)
ENTERPRISE: Final = RateLimit(5.0, 250)


@dataclass(frozen=True, repr=False)
class WebhookAuth:
    """An incoming webhook, ``https://PORTAL/rest/USER_ID/SECRET/``.

    `url` is normalised to end with ``/`` so that `method_url` is a plain concatenation.
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
    def base(self) -> str:
        """The URL that method names are appended to (same as `url`)."""
        return self.url

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

    def method_url(self, method: str) -> str:
        """The URL to POST a REST `method` (e.g. ``im.counters.get``) to."""
        return self.url + method

    def __repr__(self) -> str:
        return f"WebhookAuth(url={self.redacted!r})"

    def __str__(self) -> str:
        return self.redacted


@dataclass(frozen=True)
class OAuthAuth:
    """A local OAuth application; tokens rotate, so the current pair lives in `state_file`."""

    client_endpoint: str
    client_id: str
    client_secret: str = field(repr=False)
    # Only the first refresh token comes from the config; rotated ones are in state_file.
    refresh_token: str | None = field(repr=False)
    state_file: str
    server: str = "https://oauth.bitrix.info/"

    def __post_init__(self) -> None:
        # Callers append paths, so both bases must end with a slash.
        for name in ("client_endpoint", "server"):
            value = getattr(self, name)
            if not value.endswith("/"):
                object.__setattr__(self, name, value + "/")


@dataclass(frozen=True)
class TasksSettings:
    """What `tasks.task.counters.get` is asked for."""

    enabled: bool = True
    users: str | tuple[int, ...] = "self"
    exclude_users: frozenset[int] = frozenset()
    groups: tuple[int, ...] = (0,)
    roles: tuple[str, ...] = ("view_all",)


@dataclass(frozen=True)
class ImSettings:
    """What `im.counters.get` is asked for; it only ever reports the caller's own counters."""

    enabled: bool = True
    webhooks: tuple[WebhookAuth, ...] = ()
    chats: bool = False


@dataclass(frozen=True)
class Portal:
    """One Bitrix24 portal: the ``portal`` label, its credential and what to collect."""

    name: str
    auth: WebhookAuth | OAuthAuth
    rate_limit: RateLimit = STANDARD
    operating_limit: float = 480.0
    operating_window: float = 600.0  # what Bitrix24 sums operating_limit over
    tasks: TasksSettings = TasksSettings()
    im: ImSettings = ImSettings()


@dataclass(frozen=True)
class Config:
    """The whole configuration; durations are in seconds."""

    portals: tuple[Portal, ...]
    listen_address: str = "0.0.0.0:9877"
    poll_interval: float = 60.0
    stale_after: float = 180.0
    request_timeout: float = 30.0
    user_refresh_interval: float = 600.0
    portals_dir: str | None = None
    source: str = "<config>"


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
        raise ValueError(f"duration {problem}, got {_show(value)}")
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
        raise ValueError(f"listen address {problem}, got {_show(value)}")
    return parsed


_SCHEME_HOST_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/]*)")
_REST_USER_RE = re.compile(r"/rest/\d+/")


def redact_url(url: str) -> str:
    """`url` with everything that may be secret removed, for messages and logs.

    After ``/rest/<user id>/`` comes the webhook secret, which becomes ``<secret>``; a URL
    without that part shows only ``scheme://host[:port]/...``. Credentials in the host part,
    the query and the fragment are always dropped.
    """
    text = re.split(r"[?#]", url.strip(), maxsplit=1)[0]
    head, path = "", text
    scheme_host = _SCHEME_HOST_RE.match(text)
    if scheme_host is not None:
        head = scheme_host[1] + scheme_host[2].rpartition("@")[2]
        path = text[scheme_host.end() :]
    rest_user = _REST_USER_RE.search(path)
    if rest_user is not None:
        tail = path[rest_user.end() :]
        hidden = ("<secret>/" if tail.endswith("/") else "<secret>") if tail else ""
        return head + path[: rest_user.end()] + hidden
    if head:
        return head + ("/..." if path.strip("/") else path)
    return "<redacted>"


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


# --------------------------------------------------------------------------- messages


class _Marker:
    """A sentinel type, so that mypy can tell it from real values."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Stands in for a value whose problem is already reported (an unset ${VAR}, a bad entry),
# so later checks stay quiet about it instead of piling on follow-up errors.
_BAD: Final = _Marker("_BAD")
_NOTHING: Final = _Marker("_NOTHING")


def _show(value: object) -> str:
    """`value` as a message shows it: YAML-like scalars, strings quoted, URLs redacted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "://" in value or "/rest/" in value:
            value = redact_url(value)
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        if not value:
            return "[]"
        if len(value) <= 5 and not any(isinstance(item, list | dict) for item in value):
            return "[" + ", ".join(_show(item) for item in value) + "]"
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "{}" if not value else "a mapping"
    return repr(str(value))


def _kind(value: object) -> str:
    """What sort of value `value` is, for secrets whose content must not be echoed."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class _Loc:
    """Where a value sits: file, dotted key path, and a sort key in document order."""

    source: str
    path: str
    order: tuple[int, ...]

    def key(self, name: object, index: int) -> _Loc:
        shown = str(name)
        if not shown.isprintable():
            shown = repr(shown)  # a key with a newline must not split its problem's line
        path = f"{self.path}.{shown}" if self.path else shown
        return _Loc(self.source, path, (*self.order, index))

    def item(self, index: int) -> _Loc:
        return _Loc(self.source, f"{self.path}[{index}]", (*self.order, index))

    def missing(self, name: str) -> _Loc:
        # -1 sorts a missing key after its parent's own problems and before its siblings.
        return self.key(name, -1)


class _Problems:
    def __init__(self) -> None:
        self._items: list[tuple[tuple[int, ...], int, str]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, loc: _Loc, problem: str, given: object = _NOTHING) -> None:
        """Record `problem`; `given` is shown with `_show`, or as is when a str was prepared."""
        self.add_shown(loc, problem, None if given is _NOTHING else _show(given))

    def add_shown(self, loc: _Loc, problem: str, shown: str | None) -> None:
        where = f"{loc.source}: {loc.path}: " if loc.path else f"{loc.source}: "
        self.add_line(loc, where + problem + ("" if shown is None else f", got {shown}"))

    def add_line(self, loc: _Loc, line: str) -> None:
        """Record a finished line (a YAML error already names file, line and column)."""
        self._items.append((loc.order, len(self._items), line))

    def lines(self) -> list[str]:
        return [line for _, _, line in sorted(self._items)]


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently let win."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            # Keys from a `<<` merge may legitimately be overridden.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path, shown: str) -> tuple[object, str | None]:
    """The parsed document, or None and a one-line problem naming file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return None, f"{shown}: cannot read file ({err.strerror or err})"
    except UnicodeDecodeError:
        return None, f"{shown}: cannot read file (not UTF-8 text)"
    try:
        return yaml.load(text, Loader=_StrictLoader), None
    except RecursionError:
        return None, f"{shown}: invalid YAML: nested too deeply"
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        what = err.problem or err.context or "cannot parse"
        if err.problem and err.context:
            what += f" ({err.context})"
        return None, f"{where}: invalid YAML: {what}"
    except yaml.YAMLError as err:
        return None, f"{shown}: invalid YAML: {' '.join(str(err).split())}"


# --------------------------------------------------------------------------- the parser

_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_RE = re.compile(r"[a-zA-Z0-9_.-]+")
_AUTH_KEYS: Final = ("webhook", "webhook_file", "oauth")
_RATE_LIMIT_FORM = "must be standard, enterprise or a mapping with requests_per_second and burst"

_Field = tuple[_Loc, object]
_ValueParser = Callable[[_Loc, object], object]


class _Parser:
    """One run of parse_config: the environment it expands from and the problems found so far."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems = _Problems()

    # ----------------------------------------------------------------- generic helpers

    def expand(self, loc: _Loc, value: object) -> object:
        """`value` with ${VAR} replaced in every string; unset variables become _BAD."""
        if isinstance(value, dict):
            return {
                key: self.expand(loc.key(key, index), item)
                for index, (key, item) in enumerate(value.items())
            }
        if isinstance(value, list):
            return [self.expand(loc.item(index), item) for index, item in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        failed = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal failed
            name = match[1]
            if name is None:
                return "${"
            if not _ENV_NAME_RE.fullmatch(name):
                self.problems.add(loc, f"invalid environment variable name {name!r} in ${{...}}")
                failed = True
                return ""
            if name not in self.environ:
                self.problems.add(loc, f"environment variable {name} is not set")
                failed = True
                return ""
            return self.environ[name]

        expanded = _ENV_RE.sub(substitute, value)
        return _BAD if failed else expanded

    def mapping(
        self, loc: _Loc, value: object, known: Iterable[str], form: str = "must be a mapping"
    ) -> dict[str, _Field] | None:
        """The known keys of mapping `value` that are set (null counts as not set)."""
        if not isinstance(value, dict):
            self.problems.add(loc, form, value)
            return None
        known = tuple(known)
        fields: dict[str, _Field] = {}
        for index, (key, item) in enumerate(value.items()):
            if key not in known:
                self.problems.add(loc.key(key, index), f"unknown key (known: {', '.join(known)})")
            elif item is not None:
                fields[key] = (loc.key(key, index), item)
        return fields

    def fill(
        self, fields: Mapping[str, _Field], parsers: Mapping[str, _ValueParser]
    ) -> dict[str, Any]:
        """Keyword arguments for a dataclass: each valid value that was set, parsed.

        Values that are not set are left out, so the dataclass defaults are the only ones.
        """
        kwargs: dict[str, Any] = {}
        for key, parse in parsers.items():
            if key in fields:
                loc, value = fields[key]
                parsed = _BAD if value is _BAD else parse(loc, value)
                if parsed is not _BAD:
                    kwargs[key] = parsed
        return kwargs

    def boolean(self, loc: _Loc, value: object) -> object:
        if not isinstance(value, bool):
            self.problems.add(loc, "must be true or false", value)
            return _BAD
        return value

    def text(self, loc: _Loc, value: object) -> object:
        if not isinstance(value, str) or not value.strip():
            self.problems.add(loc, "must be a non-empty string", value)
            return _BAD
        return value.strip()

    def secret_text(self, loc: _Loc, value: object) -> object:
        if not isinstance(value, str) or not value.strip():
            self.problems.add_shown(loc, "must be a non-empty string", _kind(value))
            return _BAD
        return value.strip()

    def positive_duration(self, loc: _Loc, value: object) -> object:
        seconds, problem = _duration(value)
        if seconds is None:
            self.problems.add(loc, problem, value)
            return _BAD
        if seconds == 0:
            self.problems.add(loc, "must be a positive duration", value)
            return _BAD
        return seconds

    def listen_address(self, loc: _Loc, value: object) -> object:
        parsed, problem = _listen_address(value)
        if parsed is None:
            self.problems.add(loc, problem, value)
            return _BAD
        assert isinstance(value, str)
        return value.strip()

    def int_list(
        self, loc: _Loc, value: object, *, minimum: int, form: str, item_form: str
    ) -> tuple[int, ...] | None:
        """A list of integers >= `minimum`, each listed once; None after a problem."""
        if not isinstance(value, list):
            self.problems.add(loc, form, value)
            return None
        items: list[int] = []
        ok = True
        for index, item in enumerate(value):
            if item is _BAD:
                ok = False
            elif isinstance(item, bool) or not isinstance(item, int) or item < minimum:
                self.problems.add(loc.item(index), item_form, item)
                ok = False
            elif item in items:
                self.problems.add(loc.item(index), "is listed twice", item)
                ok = False
            else:
                items.append(item)
        return tuple(items) if ok else None

    def local_path(self, value: str, base_dir: Path) -> Path:
        # Relative to the file that names it, not to wherever the exporter was started.
        path = Path(value)
        # ~user of a user that does not exist stays as written (and is then not found).
        with contextlib.suppress(RuntimeError):
            path = path.expanduser()
        return base_dir / path

    def read_secret_file(self, loc: _Loc, value: object, base_dir: Path) -> str | None:
        """The stripped content of the file named by `value`; None after a problem."""
        if not isinstance(value, str) or not value.strip():
            self.problems.add(loc, "must be a file path", value)
            return None
        path = self.local_path(value.strip(), base_dir)
        try:
            content = path.read_text(encoding="utf-8").strip()
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            self.problems.add(loc, f"cannot read file ({reason})", str(path))
            return None
        except UnicodeDecodeError:
            self.problems.add(loc, "cannot read file (not UTF-8 text)", str(path))
            return None
        if not content:
            self.problems.add(loc, "file is empty", str(path))
            return None
        return content

    def webhook(self, loc: _Loc, value: object) -> WebhookAuth | None:
        if not isinstance(value, str):
            self.problems.add_shown(
                loc, f"must be a webhook URL like {_WEBHOOK_FORM}", _kind(value)
            )
            return None
        normalised, problem = _check_webhook_url(value)
        if normalised is None:
            self.problems.add_shown(loc, problem, repr(redact_url(value)))
            return None
        return WebhookAuth(normalised)

    # ----------------------------------------------------------------- sections

    def config(self, data: object, source: str, base_dir: Path) -> Config | None:
        root = _Loc(source, "", (0,))
        if data is None:
            self.problems.add(root, "file is empty; it must be a mapping with a portals list")
            return None
        data = self.expand(root, data)
        fields = self.mapping(root, data, _TOP_KEYS, "the top level must be a mapping")
        if fields is None:
            return None
        kwargs = self.fill(
            fields,
            {
                "listen_address": self.listen_address,
                "poll_interval": self.positive_duration,
                "stale_after": self.positive_duration,
                "request_timeout": self.positive_duration,
                "user_refresh_interval": self.positive_duration,
                "portals_dir": self.text,
            },
        )
        self.check_stale_after(fields, kwargs)

        names: dict[str, str] = {}
        portals: list[Portal | None] = []
        if "portals" in fields and fields["portals"][1] is not _BAD:
            loc, value = fields["portals"]
            if not isinstance(value, list):
                self.problems.add(loc, "must be a list of portals", value)
            else:
                for index, item in enumerate(value):
                    item_loc = loc.item(index)
                    portals.append(self.portal(item_loc, item, base_dir, names, item_loc.path))
        if "portals_dir" in kwargs:
            portals_dir = self.local_path(kwargs["portals_dir"], base_dir)
            kwargs["portals_dir"] = str(portals_dir)
            portals.extend(self.portal_files(fields["portals_dir"][0], portals_dir, names))
        # Complain about no portals only when nothing else already explains it.
        portals_empty = "portals" not in fields or fields["portals"][1] == []
        portals_dir_ok = "portals_dir" not in fields or "portals_dir" in kwargs
        if not portals and portals_empty and portals_dir_ok:
            where = fields["portals"][0] if "portals" in fields else root.missing("portals")
            given = fields["portals"][1] if "portals" in fields else _NOTHING
            self.problems.add(
                where, "at least one portal is required (portals or portals_dir)", given
            )
        if any(portal is None for portal in portals):
            return None
        return Config(portals=tuple(p for p in portals if p is not None), source=source, **kwargs)

    def check_stale_after(self, fields: Mapping[str, _Field], kwargs: dict[str, Any]) -> None:
        poll = kwargs.get("poll_interval", Config.poll_interval)
        if "poll_interval" in fields and "poll_interval" not in kwargs:
            return  # already reported; comparing against a default would mislead
        if "stale_after" not in fields:
            # Three missed cycles before data counts as stale, whatever the interval.
            kwargs["stale_after"] = 3 * poll
        elif "stale_after" in kwargs and kwargs["stale_after"] < poll:
            loc, value = fields["stale_after"]
            self.problems.add(loc, f"must be at least poll_interval ({poll:g}s)", value)

    def portal_files(
        self, loc: _Loc, directory: Path, names: dict[str, str]
    ) -> list[Portal | None]:
        try:
            files = sorted(
                path
                for path in directory.iterdir()
                if path.suffix in (".yaml", ".yml") and not path.name.startswith(".")
            )
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            self.problems.add(loc, f"cannot read directory ({reason})", str(directory))
            return [None]
        portals: list[Portal | None] = []
        for number, path in enumerate(files, start=1):
            shown = str(path)
            data, problem = _read_yaml(path, shown)
            root = _Loc(shown, "", (number,))
            if problem is not None:
                self.problems.add_line(root, problem)
                portals.append(None)
            elif data is None:
                self.problems.add(root, "file is empty; it must be one portal mapping")
                portals.append(None)
            else:
                data = self.expand(root, data)
                portals.append(self.portal(root, data, path.parent, names, shown))
        return portals

    def portal(
        self, loc: _Loc, value: object, base_dir: Path, names: dict[str, str], label: str
    ) -> Portal | None:
        if value is _BAD:
            return None
        fields = self.mapping(loc, value, _PORTAL_KEYS, "must be a portal mapping")
        if fields is None:
            return None
        before = len(self.problems)
        name = self.portal_name(loc, fields, names, label)
        auth = self.portal_auth(loc, fields, base_dir)
        kwargs = self.fill(
            fields,
            {
                "rate_limit": self.rate_limit,
                "operating_limit": self.positive_duration,
                "operating_window": self.positive_duration,
                "tasks": self.tasks,
                "im": self.im,
            },
        )
        if name is None or auth is None or len(self.problems) > before:
            return None
        return Portal(name=name, auth=auth, **kwargs)

    def portal_name(
        self, loc: _Loc, fields: Mapping[str, _Field], names: dict[str, str], label: str
    ) -> str | None:
        if "name" not in fields:
            self.problems.add(loc.missing("name"), "is required")
            return None
        name_loc, name = fields["name"]
        if name is _BAD:
            return None
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            self.problems.add(name_loc, "must match [a-zA-Z0-9_.-]+", name)
            return None
        if name in names:
            self.problems.add(name_loc, f"duplicate portal name (also used by {names[name]})", name)
            return None
        names[name] = label
        return name

    def portal_auth(
        self, loc: _Loc, fields: Mapping[str, _Field], base_dir: Path
    ) -> WebhookAuth | OAuthAuth | None:
        given = [key for key in fields if key in _AUTH_KEYS]
        if not given:
            self.problems.add(loc, "one of webhook, webhook_file or oauth is required")
            return None
        for key in given[1:]:
            self.problems.add(
                fields[key][0],
                f"cannot be combined with {given[0]}; use exactly one of "
                "webhook, webhook_file or oauth",
            )
        auths: list[WebhookAuth | OAuthAuth | None] = []
        for key in given:
            key_loc, value = fields[key]
            if value is _BAD:
                auths.append(None)
            elif key == "webhook":
                auths.append(self.webhook(key_loc, value))
            elif key == "webhook_file":
                content = self.read_secret_file(key_loc, value, base_dir)
                auths.append(None if content is None else self.webhook(key_loc, content))
            else:
                auths.append(self.oauth(key_loc, value, base_dir))
        return auths[0] if len(auths) == 1 else None

    def oauth(self, loc: _Loc, value: object, base_dir: Path) -> OAuthAuth | None:
        fields = self.mapping(loc, value, _OAUTH_KEYS)
        if fields is None:
            return None
        before = len(self.problems)
        for key in ("client_endpoint", "client_id", "state_file"):
            if key not in fields:
                self.problems.add(loc.missing(key), "is required")
        secret_keys = [key for key in fields if key in ("client_secret", "client_secret_file")]
        if not secret_keys:
            self.problems.add(loc, "one of client_secret or client_secret_file is required")
        elif len(secret_keys) == 2:
            self.problems.add(
                fields[secret_keys[1]][0], f"cannot be combined with {secret_keys[0]}"
            )

        def state_file(at: _Loc, path: object) -> object:
            checked = self.text(at, path)
            return checked if checked is _BAD else str(self.local_path(str(checked), base_dir))

        kwargs = self.fill(
            fields,
            {
                "client_endpoint": lambda at, url: self.base_url(at, url, rest=True),
                "client_id": self.text,
                "client_secret": self.secret_text,
                "refresh_token": self.secret_text,
                "state_file": state_file,
                "server": lambda at, url: self.base_url(at, url, rest=False),
            },
        )
        if "client_secret_file" in fields and fields["client_secret_file"][1] is not _BAD:
            secret = self.read_secret_file(*fields["client_secret_file"], base_dir)
            if secret is not None:
                kwargs["client_secret"] = secret
        if len(self.problems) > before:
            return None
        kwargs.setdefault("refresh_token", None)
        return OAuthAuth(**kwargs)

    def base_url(self, loc: _Loc, value: object, *, rest: bool) -> object:
        if not isinstance(value, str):
            self.problems.add(loc, "must be an http:// or https:// URL with a host", value)
            return _BAD
        normalised, problem = _check_base_url(value, rest=rest)
        if normalised is None:
            self.problems.add(loc, problem, value)
            return _BAD
        return normalised

    def rate_limit(self, loc: _Loc, value: object) -> object:
        if isinstance(value, str):
            if value == "standard":
                return STANDARD
            if value == "enterprise":
                return ENTERPRISE
            self.problems.add(loc, _RATE_LIMIT_FORM, value)
            return _BAD
        fields = self.mapping(loc, value, ("requests_per_second", "burst"), _RATE_LIMIT_FORM)
        if fields is None:
            return _BAD
        for key in ("requests_per_second", "burst"):
            if key not in fields:
                self.problems.add(loc.missing(key), "is required")
        kwargs = self.fill(
            fields, {"requests_per_second": self.positive_number, "burst": self.burst}
        )
        if len(kwargs) < 2:
            return _BAD
        return RateLimit(**kwargs)

    def positive_number(self, loc: _Loc, value: object) -> object:
        # YAML booleans are Python ints; `true` is never meant as a number here.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            finite = number and math.isfinite(value)  # type: ignore[arg-type]
        except OverflowError:  # an integer beyond float's range
            finite = False
        if finite and value > 0:  # type: ignore[operator]
            return float(value)  # type: ignore[arg-type]
        self.problems.add(loc, "must be a number greater than 0", value)
        return _BAD

    def burst(self, loc: _Loc, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problems.add(loc, "must be an integer of 1 or more", value)
            return _BAD
        return value

    def tasks(self, loc: _Loc, value: object) -> object:
        fields = self.mapping(loc, value, _TASKS_KEYS)
        if fields is None:
            return _BAD
        before = len(self.problems)
        kwargs = self.fill(
            fields,
            {
                "enabled": self.boolean,
                "users": self.users,
                "exclude_users": self.exclude_users,
                "groups": self.groups,
                "roles": self.roles,
            },
        )
        return _BAD if len(self.problems) > before else TasksSettings(**kwargs)

    def users(self, loc: _Loc, value: object) -> object:
        form = "must be self, all or a list of user ids"
        if isinstance(value, str):
            if value in ("self", "all"):
                return value
            self.problems.add(loc, form, value)
            return _BAD
        if isinstance(value, list) and not value:
            self.problems.add(loc, "must not be empty (use self or all)", value)
            return _BAD
        ids = self.int_list(
            loc, value, minimum=1, form=form, item_form="must be a positive integer"
        )
        return _BAD if ids is None else ids

    def exclude_users(self, loc: _Loc, value: object) -> object:
        ids = self.int_list(
            loc,
            value,
            minimum=1,
            form="must be a list of user ids",
            item_form="must be a positive integer",
        )
        return _BAD if ids is None else frozenset(ids)

    def groups(self, loc: _Loc, value: object) -> object:
        if isinstance(value, list) and not value:
            self.problems.add(loc, "must not be empty (0 means all groups)", value)
            return _BAD
        ids = self.int_list(
            loc,
            value,
            minimum=0,
            form="must be a list of group ids (0 means all groups)",
            item_form="must be an integer of 0 or more",
        )
        return _BAD if ids is None else ids

    def roles(self, loc: _Loc, value: object) -> object:
        if not isinstance(value, list) or not value:
            self.problems.add(
                loc, f"must be a non-empty list of roles from {', '.join(ROLES)}", value
            )
            return _BAD
        roles: list[str] = []
        for index, role in enumerate(value):
            if role is _BAD:
                continue
            if role not in ROLES:
                self.problems.add(loc.item(index), f"must be one of {', '.join(ROLES)}", role)
            elif role in roles:
                self.problems.add(loc.item(index), "is listed twice", role)
            else:
                roles.append(role)
        return tuple(roles) if len(roles) == len(value) else _BAD

    def im(self, loc: _Loc, value: object) -> object:
        fields = self.mapping(loc, value, _IM_KEYS)
        if fields is None:
            return _BAD
        before = len(self.problems)
        kwargs = self.fill(
            fields, {"enabled": self.boolean, "webhooks": self.im_webhooks, "chats": self.boolean}
        )
        return _BAD if len(self.problems) > before else ImSettings(**kwargs)

    def im_webhooks(self, loc: _Loc, value: object) -> object:
        if not isinstance(value, list):
            self.problems.add_shown(loc, "must be a list of webhook URLs", _kind(value))
            return _BAD
        webhooks: list[WebhookAuth] = []
        for index, item in enumerate(value):
            if item is _BAD:
                continue
            webhook = self.webhook(loc.item(index), item)
            if webhook is None:
                continue
            if any(other.user_id == webhook.user_id for other in webhooks):
                # Two webhooks of one user would export the same series twice.
                self.problems.add_shown(
                    loc.item(index),
                    f"user {webhook.user_id} already has a webhook in this list",
                    repr(webhook.redacted),
                )
                continue
            webhooks.append(webhook)
        return tuple(webhooks) if len(webhooks) == len(value) else _BAD


_TOP_KEYS: Final = (
    "listen_address",
    "poll_interval",
    "stale_after",
    "request_timeout",
    "user_refresh_interval",
    "portals_dir",
    "portals",
)
_PORTAL_KEYS: Final = (
    "name",
    "webhook",
    "webhook_file",
    "oauth",
    "rate_limit",
    "operating_limit",
    "operating_window",
    "tasks",
    "im",
)
_OAUTH_KEYS: Final = (
    "client_endpoint",
    "client_id",
    "client_secret",
    "client_secret_file",
    "refresh_token",
    "state_file",
    "server",
)
_TASKS_KEYS: Final = ("enabled", "users", "exclude_users", "groups", "roles")
_IM_KEYS: Final = ("enabled", "webhooks", "chats")


# --------------------------------------------------------------------------- entry points


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
    parser = _Parser(os.environ if environ is None else environ)
    try:
        config = parser.config(data, source, Path() if base_dir is None else base_dir)
    except RecursionError:
        # A YAML alias inside its own anchor (`a: &x [*x]`) makes the data contain itself.
        raise ConfigError(
            [f"{source}: nested too deeply, or an alias (*name) refers to its own anchor"]
        ) from None
    if len(parser.problems) or config is None:
        raise ConfigError(parser.problems.lines())
    return config


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse the YAML file at `path`, plus any portal files in its `portals_dir`.

    Messages name `path` as given. Raises ConfigError.
    """
    data, problem = _read_yaml(Path(path), str(path))
    if problem is not None:
        raise ConfigError([problem])
    return parse_config(data, source=str(path), environ=environ, base_dir=Path(path).parent)

"""TLS, basic auth and response headers for the exporter's own endpoints (`--web-config-file`).

The file has the format of Prometheus' exporter-toolkit, so one web config serves every
exporter on a host (docs/web-config.md)::

    tls_server_config:
      cert_file: server.pem          # relative paths: against this file's directory
      key_file: server.key
    basic_auth_users:
      prometheus: $2b$10$...         # bcrypt hashes only

`load_web_config` parses it strictly: unknown keys and bad values are errors, one line each
(``web.yml: tls_server_config.client_auth_type: must be one of ..., got 'x'``), and no
message ever echoes a password hash or an inline key. `build_ssl_context` turns the TLS
part into an `ssl.SSLContext`.

`WebSecurity` is what the server uses. It re-reads the web config when its mtime changes,
and the certificate, key and client CA files when theirs do, so a new password or a renewed
certificate takes effect without a restart; a broken new file keeps the last good one and
logs one error. TLS handshakes pick up new certificates through the SNI callback, which
runs on every handshake (with or without SNI) and may swap in a freshly loaded context.
Its `middleware` answers 401 with ``WWW-Authenticate`` unless the request carries the
credentials of a configured user, and adds the configured headers to every response.

Python's ssl module cannot do everything Go's crypto/tls does; what differs is rejected
with a message saying so (``RequireAnyClientCert``, ``client_allowed_sans``) or documented
and ignored (``curve_preferences``, ``http2``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import bcrypt
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from exporter.config import ConfigError, parse_duration

__all__ = [
    "CIPHER_SUITES",
    "CLIENT_AUTH_TYPES",
    "CURVES",
    "HEADERS",
    "REALM",
    "TLS_VERSIONS",
    "BasicAuth",
    "HTTPServerConfig",
    "RateLimitConfig",
    "TLSServerConfig",
    "WebConfig",
    "WebSecurity",
    "build_ssl_context",
    "load_web_config",
    "parse_web_config",
]

log = logging.getLogger(__name__)

REALM: Final = "bitrix24-exporter"

CLIENT_AUTH_TYPES: Final[tuple[str, ...]] = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)

_VERIFY_MODES: Final[Mapping[str, ssl.VerifyMode]] = {
    "NoClientCert": ssl.CERT_NONE,
    # Python's ssl cannot ask for a certificate without verifying it. Go accepts any client
    # under RequestClientCert and the exporter never looks at an unverified certificate, so
    # not asking for one admits exactly the same clients.
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

_REQUIRE_ANY = (
    "is not supported: Python's ssl module cannot require a client certificate without"
    " verifying it; use RequireAndVerifyClientCert with client_ca_file"
)

TLS_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's names (crypto/tls CipherSuites(), what exporter-toolkit accepts) for TLS 1.2 and
# below, mapped to OpenSSL's. TLS 1.3 suites are accepted and, as in Go, change nothing:
# neither Go nor Python lets a server choose them.
CIPHER_SUITES: Final[Mapping[str, str | None]] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}

# Validated so that a file valid for exporter-toolkit is valid here, but not applied:
# Python 3.11's ssl can set one ECDH curve and no X25519, while OpenSSL's default group
# order (X25519, P-256, ...) is already what these lists usually ask for.
CURVES: Final[tuple[str, ...]] = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# Which headers may be set and, where the value is an enumeration, its values; as in
# exporter-toolkit, which keeps the list closed for consistency across exporters.
HEADERS: Final[Mapping[str, tuple[str, ...]]] = {
    "Content-Security-Policy": (),
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
}

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS: Final = (
    "cert_file",
    "key_file",
    "cert",
    "key",
    "client_ca_file",
    "client_ca",
    "client_auth_type",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
_HTTP_KEYS: Final = ("http2", "headers")
_RATE_LIMIT_KEYS: Final = ("interval", "burst")

_BCRYPT_RE = re.compile(rb"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_FORM = "a bcrypt hash like $2b$10$ followed by 53 characters"


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class TLSServerConfig:
    """`tls_server_config`; paths are already resolved against the web config's directory."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    # Inline PEM, as exporter-toolkit's `cert`, `key` and `client_ca`.
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """The files whose changes make a new handshake load a new context."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    @property
    def restart_only(self) -> tuple[object, ...]:
        """Settings a context swapped in by the SNI callback cannot change reliably: OpenSSL
        copies them into a connection when it creates it, before the callback runs."""
        return (
            self.client_auth_type,
            self.min_version,
            self.max_version,
            self.cipher_suites,
            self.prefer_server_cipher_suites,
        )

    def with_restart_only_of(self, other: TLSServerConfig) -> TLSServerConfig:
        """These certificate, key and CA sources with `other`'s `restart_only` settings."""
        return replace(
            self,
            client_auth_type=other.client_auth_type,
            min_version=other.min_version,
            max_version=other.max_version,
            cipher_suites=other.cipher_suites,
            prefer_server_cipher_suites=other.prefer_server_cipher_suites,
        )


@dataclass(frozen=True)
class HTTPServerConfig:
    """`http_server_config`. `http2` is accepted and ignored: aiohttp serves HTTP/1.1 only."""

    http2: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RateLimitConfig:
    """A token bucket over all requests: one token every `interval` seconds, `burst` at most."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    """A parsed web config file. `users` maps user names to bcrypt hashes."""

    source: str = "<web config>"
    tls: TLSServerConfig | None = None
    http: HTTPServerConfig = field(default_factory=HTTPServerConfig)
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    rate_limit: RateLimitConfig | None = None

    @property
    def bcrypt_cost(self) -> int:
        """The cost an unknown user's check runs at, so that it takes as long as a known one's."""
        costs = [int(h.split(b"$")[2]) for h in self.users.values()]
        return max(costs, default=10)


# --------------------------------------------------------------------------- parsing


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, path: str, problem: str, given: str | None = None) -> None:
        where = f"{self.source}: {path}: " if path else f"{self.source}: "
        self.lines.append(where + problem + ("" if given is None else f", got {given}"))


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _mapping(
    problems: _Problems, path: str, value: object, known: Sequence[str], form: str
) -> dict[str, Any]:
    """The known keys of `value` that are set (null counts as not set, as in Go)."""
    if not isinstance(value, dict):
        problems.add(path, form, _show(value))
        return {}
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            problems.add(where, f"unknown key (known: {', '.join(known)})")
        elif item is not None:
            fields[key] = item
    return fields


def _one_of(problems: _Problems, path: str, value: object, allowed: Sequence[str]) -> bool:
    if isinstance(value, str) and value in allowed:
        return True
    problems.add(path, f"must be one of {', '.join(allowed)}", _show(value))
    return False


def _string_list(problems: _Problems, path: str, value: object) -> list[tuple[str, object]]:
    if not isinstance(value, list):
        problems.add(path, "must be a list of strings", _show(value))
        return []
    return [(f"{path}[{i}]", item) for i, item in enumerate(value)]


def parse_web_config(data: object, *, source: str, base_dir: Path) -> WebConfig:
    """`WebConfig` from the YAML document `data`; ConfigError with one line per problem.

    Pure: no file is read, so certificates are checked by `build_ssl_context`.
    """
    problems = _Problems(source)
    if data is None:
        # An empty file is valid for exporter-toolkit too: plain HTTP, no auth.
        return WebConfig(source=source)
    if not isinstance(data, dict):
        problems.add("", f"must be a mapping with {', '.join(_TOP_KEYS)}", _show(data))
        raise ConfigError(problems.lines)
    tls: TLSServerConfig | None = None
    http = HTTPServerConfig()
    users: dict[str, bytes] = {}
    rate_limit: RateLimitConfig | None = None
    # Section by section in the file's order, so the messages come in the order a reader
    # of the file meets the problems.
    for key, value in data.items():
        if key == "tls_server_config":
            tls = _parse_tls(problems, value, base_dir)
        elif key == "http_server_config":
            http = _parse_http(problems, value)
        elif key == "basic_auth_users":
            users = _parse_users(problems, value)
        elif key == "rate_limit":
            rate_limit = _parse_rate_limit(problems, value)
        else:
            problems.add(str(key), f"unknown key (known: {', '.join(_TOP_KEYS)})")
    if problems.lines:
        raise ConfigError(problems.lines)
    return WebConfig(source=source, tls=tls, http=http, users=users, rate_limit=rate_limit)


def _parse_tls(problems: _Problems, value: object, base_dir: Path) -> TLSServerConfig | None:
    if value is None:
        return None
    at = "tls_server_config"
    fields = _mapping(problems, at, value, _TLS_KEYS, "must be a mapping")
    if not fields:
        return None
    before = len(problems.lines)
    kwargs: dict[str, Any] = {}
    for name in ("cert_file", "key_file", "client_ca_file"):
        if name in fields:
            item = fields[name]
            if isinstance(item, str) and item.strip():
                kwargs[name] = base_dir / Path(item.strip()).expanduser()
            else:
                problems.add(f"{at}.{name}", "must be a file path", _show(item))
    for name in ("cert", "key", "client_ca"):
        if name in fields:
            item = fields[name]
            if isinstance(item, str) and "-----BEGIN " in item:
                kwargs[name] = item
            else:
                # Never shown: an inline key is a secret.
                problems.add(f"{at}.{name}", "must be PEM text (-----BEGIN ...)")
    for inline, path in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if inline in fields and path in fields:
            problems.add(f"{at}.{inline}", f"set only one of {inline} and {path}")
    has_cert = "cert_file" in fields or "cert" in fields
    has_key = "key_file" in fields or "key" in fields
    if has_cert and not has_key:
        problems.add(f"{at}.key_file", "missing: a certificate needs key_file (or an inline key)")
    elif has_key and not has_cert:
        problems.add(f"{at}.cert_file", "missing: a key needs cert_file (or an inline cert)")
    elif not has_cert:
        problems.add(f"{at}.cert_file", "missing: TLS needs cert_file and key_file")

    auth = fields.get("client_auth_type", "NoClientCert")
    if auth in ("RequireAnyClientCert", "RequireClientCert"):
        problems.add(f"{at}.client_auth_type", f"{auth} {_REQUIRE_ANY}")
    elif _one_of(problems, f"{at}.client_auth_type", auth, CLIENT_AUTH_TYPES):
        kwargs["client_auth_type"] = auth
        has_ca = "client_ca_file" in fields or "client_ca" in fields
        if has_ca and auth == "NoClientCert":
            ca_key = "client_ca_file" if "client_ca_file" in fields else "client_ca"
            problems.add(
                f"{at}.{ca_key}",
                "is set but client_auth_type is NoClientCert; set client_auth_type to"
                " RequireAndVerifyClientCert (or VerifyClientCertIfGiven)",
            )
    if "client_allowed_sans" in fields:
        problems.add(
            f"{at}.client_allowed_sans",
            "is not supported: Python's ssl module has no hook to check a client"
            " certificate's names during the handshake",
        )

    versions = list(TLS_VERSIONS)
    for name in ("min_version", "max_version"):
        if name in fields and _one_of(problems, f"{at}.{name}", fields[name], versions):
            kwargs[name] = fields[name]
    low, high = kwargs.get("min_version", "TLS12"), kwargs.get("max_version", "TLS13")
    if versions.index(high) < versions.index(low):
        problems.add(f"{at}.max_version", f"must not be below min_version ({low})", repr(high))

    if "cipher_suites" in fields:
        suites = []
        for where, item in _string_list(problems, f"{at}.cipher_suites", fields["cipher_suites"]):
            if isinstance(item, str) and item in CIPHER_SUITES:
                suites.append(item)
            else:
                problems.add(
                    where,
                    "must be a cipher suite exporter-toolkit knows, such as"
                    " TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (list: docs/web-config.md)",
                    _show(item),
                )
        kwargs["cipher_suites"] = tuple(suites)
    if "prefer_server_cipher_suites" in fields:
        item = fields["prefer_server_cipher_suites"]
        if isinstance(item, bool):
            kwargs["prefer_server_cipher_suites"] = item
        else:
            problems.add(f"{at}.prefer_server_cipher_suites", "must be true or false", _show(item))
    if "curve_preferences" in fields:
        curves = []
        for where, item in _string_list(
            problems, f"{at}.curve_preferences", fields["curve_preferences"]
        ):
            if _one_of(problems, where, item, CURVES):
                assert isinstance(item, str)
                curves.append(item)
        kwargs["curve_preferences"] = tuple(curves)
    if len(problems.lines) > before:
        return None
    return TLSServerConfig(**kwargs)


def _parse_http(problems: _Problems, value: object) -> HTTPServerConfig:
    if value is None:
        return HTTPServerConfig()
    at = "http_server_config"
    fields = _mapping(problems, at, value, _HTTP_KEYS, "must be a mapping")
    http2 = fields.get("http2", True)
    if not isinstance(http2, bool):
        problems.add(f"{at}.http2", "must be true or false", _show(http2))
        http2 = True
    headers: dict[str, str] = {}
    if "headers" in fields:
        raw = fields["headers"]
        if not isinstance(raw, dict):
            problems.add(f"{at}.headers", "must be a mapping of header names to values", _show(raw))
            raw = {}
        for name, header_value in raw.items():
            where = f"{at}.headers.{name}"
            if name not in HEADERS:
                problems.add(where, f"cannot be configured (allowed: {', '.join(HEADERS)})")
            elif header_value is None or header_value == "":
                continue  # blank means unset, as documented by exporter-toolkit
            elif not isinstance(header_value, str) or "\n" in header_value or "\r" in header_value:
                problems.add(where, "must be a single-line string", _show(header_value))
            elif HEADERS[name] and header_value not in HEADERS[name]:
                problems.add(
                    where, f"must be one of {', '.join(HEADERS[name])}", _show(header_value)
                )
            else:
                headers[name] = header_value
    return HTTPServerConfig(http2=http2, headers=headers)


def _parse_users(problems: _Problems, value: object) -> dict[str, bytes]:
    if value is None:
        return {}
    at = "basic_auth_users"
    if not isinstance(value, dict):
        problems.add(at, "must be a mapping of user names to bcrypt hashes", _show(value))
        return {}
    users: dict[str, bytes] = {}
    for name, hashed in value.items():
        if not isinstance(name, str) or not name:
            problems.add(at, "user names must be non-empty strings", _show(name))
            continue
        where = f"{at}.{name}"
        if ":" in name:
            problems.add(where, "a user name cannot contain ':' (Basic auth splits on it)")
            continue
        raw = hashed.strip().encode("utf-8") if isinstance(hashed, str) else b""
        match = _BCRYPT_RE.fullmatch(raw)
        if match is None:
            # Never shown: someone may have put the password itself here.
            problems.add(where, f"must be {_BCRYPT_FORM}, got a value that is not one")
        elif not 4 <= int(match[1]) <= 31:
            problems.add(
                where, f"must be {_BCRYPT_FORM} with a cost from 4 to 31", match[1].decode()
            )
        else:
            users[name] = raw
    return users


def _parse_rate_limit(problems: _Problems, value: object) -> RateLimitConfig | None:
    if value is None:
        return None
    at = "rate_limit"
    fields = _mapping(problems, at, value, _RATE_LIMIT_KEYS, "must be a mapping")
    try:
        interval = parse_duration(fields.get("interval", 0))
    except ValueError:
        problems.add(
            f"{at}.interval", "must be a duration like 100ms or 1s", _show(fields["interval"])
        )
        return None
    if interval == 0:
        return None  # 0 disables the limiter, as in exporter-toolkit
    burst = fields.get("burst")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        problems.add(f"{at}.burst", "must be a positive integer when interval is set", _show(burst))
        return None
    return RateLimitConfig(interval=interval, burst=burst)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, as Go's strict YAML decoding does."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and parse the web config file; ConfigError with one line per problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{source}: cannot read file ({err.strerror or err})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: cannot read file (not UTF-8 text)"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError([f"{where}: invalid YAML: {err.problem or err.context}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: invalid YAML: {' '.join(str(err).split())}"]) from None
    return parse_web_config(data, source=source, base_dir=Path(path).parent)


# --------------------------------------------------------------------------- TLS


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _EncryptedKeyError


def _read_pem(problems: _Problems, at: str, path: Path, marker: str, what: str) -> None:
    try:
        content = path.read_bytes()
    except OSError as err:
        problems.add(at, f"cannot read file ({err.strerror or err})", repr(str(path)))
        return
    if marker.encode() not in content:
        problems.add(at, f"no PEM {what} in file", repr(str(path)))


@contextmanager
def _pem_files(tls: TLSServerConfig) -> Iterator[tuple[Path | None, Path | None]]:
    """Paths of the certificate and key, inline PEM written to a private temporary
    directory because `load_cert_chain` only reads files."""
    if tls.cert is None and tls.key is None:
        yield tls.cert_file, tls.key_file
        return
    with tempfile.TemporaryDirectory(prefix="bitrix24-exporter-tls-") as tmp:
        cert, key = tls.cert_file, tls.key_file
        if tls.cert is not None:
            cert = Path(tmp, "cert.pem")
            cert.write_text(tls.cert, encoding="utf-8")
        if tls.key is not None:
            key = Path(tmp, "key.pem")
            key.touch(mode=0o600)
            key.write_text(tls.key, encoding="utf-8")
        yield cert, key


def build_ssl_context(tls: TLSServerConfig, source: str) -> ssl.SSLContext:
    """A server `ssl.SSLContext` for `tls`, reading its files; ConfigError if one is bad."""
    at = "tls_server_config"
    problems = _Problems(source)
    if tls.cert_file is not None:
        _read_pem(
            problems, f"{at}.cert_file", tls.cert_file, "-----BEGIN CERTIFICATE", "certificate"
        )
    if tls.key_file is not None:
        _read_pem(problems, f"{at}.key_file", tls.key_file, "PRIVATE KEY-----", "private key")
    if tls.client_ca_file is not None:
        _read_pem(
            problems,
            f"{at}.client_ca_file",
            tls.client_ca_file,
            "-----BEGIN CERTIFICATE",
            "certificate",
        )
    if problems.lines:
        raise ConfigError(problems.lines)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    legacy = [name for s in tls.cipher_suites if (name := CIPHER_SUITES[s]) is not None]
    if legacy:
        context.set_ciphers(":".join(legacy))

    key_at = f"{at}.key_file" if tls.key_file is not None else f"{at}.key"
    with _pem_files(tls) as (cert, key):
        assert cert is not None and key is not None  # parse_web_config saw to that
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except _EncryptedKeyError:
            problems.add(key_at, "the key is encrypted; give an unencrypted key")
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                problems.add(key_at, "does not belong to the certificate")
            else:
                problems.add(at, f"cannot load the certificate and key ({_ssl_reason(err)})")
    if problems.lines:
        raise ConfigError(problems.lines)

    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    try:
        if tls.client_ca_file is not None:
            context.load_verify_locations(cafile=tls.client_ca_file)
        elif tls.client_ca is not None:
            context.load_verify_locations(cadata=tls.client_ca)
        elif context.verify_mode != ssl.CERT_NONE:
            # Go verifies against the system roots when no client CA is given.
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    except ssl.SSLError as err:
        ca_at = f"{at}.client_ca_file" if tls.client_ca_file is not None else f"{at}.client_ca"
        problems.add(ca_at, f"cannot load the CA certificates ({_ssl_reason(err)})")
        raise ConfigError(problems.lines) from None
    return context


def _ssl_reason(err: ssl.SSLError) -> str:
    return str(err.reason or err.strerror or err).replace("_", " ").lower()


# --------------------------------------------------------------------------- basic auth


def _check_password(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False  # longer than bcrypt's 72 bytes, which Go's bcrypt refuses too


# The salt and digest of a hash nobody knows the password of. Its cost field is rewritten
# to the configured users' cost: bcrypt's time depends on the cost alone, so an unknown
# user's check takes as long as a known user's and answers give no user names away.
_DUMMY_TAIL: Final = bcrypt.hashpw(secrets.token_bytes(18), bcrypt.gensalt(4))[7:]


def _dummy_hash(cost: int) -> bytes:
    return b"$2b$%02d$" % cost + _DUMMY_TAIL


def _parse_authorization(header: str | None) -> tuple[bytes, bytes] | None:
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


class BasicAuth:
    """Checks Basic credentials against bcrypt hashes without blocking the event loop.

    bcrypt is slow by design, so each check runs in a thread, one at a time (a burst of
    wrong passwords then costs one core, not all of them), and results are cached for
    `ttl` seconds keyed by user, stored hash and a keyed digest of the password, as
    exporter-toolkit caches them; a changed hash in the file is a different key.
    """

    def __init__(self, *, ttl: float = 60.0, size: int = 100) -> None:
        self._ttl = ttl
        self._size = size
        self._digest_key = secrets.token_bytes(32)
        self._cache: dict[tuple[bytes, bytes, bytes], tuple[bool, float]] = {}
        self._lock = asyncio.Lock()

    async def check(self, config: WebConfig, authorization: str | None) -> bool:
        credentials = _parse_authorization(authorization)
        if credentials is None:
            return False
        user, password = credentials
        try:
            stored = config.users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            stored = None
        hashed = stored if stored is not None else _dummy_hash(config.bcrypt_cost)
        key = (user, hashed, hmac.digest(self._digest_key, password, "sha256"))
        ok = self._cached(key)
        if ok is None:
            async with self._lock:
                # Identical scrapes queued behind the lock find the first one's answer here.
                ok = self._cached(key)
                if ok is None:
                    loop = asyncio.get_running_loop()
                    ok = await loop.run_in_executor(None, _check_password, password, hashed)
                    self._store(key, ok)
        return ok and stored is not None

    def _cached(self, key: tuple[bytes, bytes, bytes]) -> bool | None:
        entry = self._cache.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _store(self, key: tuple[bytes, bytes, bytes], ok: bool) -> None:
        now = time.monotonic()
        if len(self._cache) >= self._size:
            self._cache = {k: v for k, v in self._cache.items() if v[1] >= now}
            while len(self._cache) >= self._size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key] = (ok, now + self._ttl)


class _TokenBucket:
    def __init__(self, limit: RateLimitConfig) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(
            self.limit.burst, self._tokens + (now - self._last) / self.limit.interval
        )
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


# --------------------------------------------------------------------------- the runtime

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    # The inode catches files replaced by rename and Kubernetes' symlink swaps even when
    # the new file has the old mtime and size.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Loaded:
    config: WebConfig
    context: ssl.SSLContext | None
    key: tuple[_Fingerprint, tuple[_Fingerprint, ...]]


class WebSecurity:
    """The web config in force: TLS contexts, basic auth and headers, re-read on change.

    Construct it from the file (ConfigError if the file or a certificate is bad), serve with
    `ssl_context` and put `middleware` in front of every handler.
    """

    def __init__(self, path: str | Path, *, auth: BasicAuth | None = None) -> None:
        self._path = Path(path)
        self._source = str(path)
        web_fp = _fingerprint(self._path)
        config = load_web_config(self._path)
        files_fp = tuple(_fingerprint(p) for p in (config.tls.files if config.tls else ()))
        context = build_ssl_context(config.tls, self._source) if config.tls else None
        self._good = _Loaded(config, context, (web_fp, files_fp))
        self._parsed_fp = web_fp
        self._candidate: WebConfig | None = config
        self._failed_key: tuple[_Fingerprint, tuple[_Fingerprint, ...]] | None = None
        self._auth = auth or BasicAuth()
        self._bucket = _TokenBucket(config.rate_limit) if config.rate_limit else None
        self._started_tls = config.tls
        if context is not None:
            # The listening context: every handshake starts on it and its callback swaps in
            # the newest context when the certificate or CA files have changed.
            context.sni_callback = self._on_handshake
        self.ssl_context: ssl.SSLContext | None = context
        if config.tls is not None and config.tls.curve_preferences:
            log.info(
                "%s: curve_preferences is accepted but not applied (see docs/web-config.md)", path
            )

    @property
    def config(self) -> WebConfig:
        """The last good web config (without checking the file)."""
        return self._good.config

    def refresh(self) -> WebConfig:
        """The web config in force, re-read first if the file or its TLS files changed."""
        web_fp = _fingerprint(self._path)
        if web_fp != self._parsed_fp:
            self._parsed_fp = web_fp
            try:
                self._candidate = load_web_config(self._path)
            except ConfigError as error:
                self._candidate = None
                self._report(error.problems)
        candidate = self._candidate
        if candidate is None:
            return self._good.config
        files = candidate.tls.files if candidate.tls else ()
        key = (web_fp, tuple(_fingerprint(p) for p in files))
        if key in (self._good.key, self._failed_key):
            return self._good.config
        try:
            self._good = self._load(candidate, key)
        except ConfigError as error:
            self._failed_key = key
            self._report(error.problems)
            return self._good.config
        limit = self._good.config.rate_limit
        if limit is None:
            self._bucket = None
        elif self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit)
        log.info("%s: web config loaded", self._source)
        return self._good.config

    def _load(
        self, config: WebConfig, key: tuple[_Fingerprint, tuple[_Fingerprint, ...]]
    ) -> _Loaded:
        if (config.tls is None) != (self._started_tls is None):
            raise ConfigError(
                [
                    f"{self._source}: tls_server_config: TLS cannot be turned on or off while"
                    " running; restart the exporter"
                ]
            )
        if config.tls is None or self._started_tls is None:
            return _Loaded(config, None, key)
        # New certificate, key and CA files with the settings the server started with: a
        # connection would otherwise mix the two (say, requiring a client certificate with
        # no CA left to verify it against).
        started = self._started_tls
        context = build_ssl_context(config.tls.with_restart_only_of(started), self._source)
        if config.tls.restart_only != started.restart_only:
            log.warning(
                "%s: tls_server_config: certificates and CAs are reloaded, but changes to"
                " client_auth_type, min_version, max_version, cipher_suites and"
                " prefer_server_cipher_suites take effect after a restart",
                self._source,
            )
        return _Loaded(config, context, key)

    def _report(self, problems: Sequence[str]) -> None:
        log.error("web config reload failed, keeping the last good one: %s", "; ".join(problems))

    def _on_handshake(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        try:
            self.refresh()
            newest = self._good.context
            if newest is not None and newest is not ssl_object.context:
                ssl_object.context = newest
        except Exception:
            # An exception here would abort the handshake with a bare alert; serve what the
            # connection already has and say why.
            log.exception("%s: cannot reload TLS settings for a new connection", self._source)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Rate limit, basic auth and headers, for every path including /healthz."""
        config = self.refresh()
        headers = config.http.headers
        if self._bucket is not None and not self._bucket.allow():
            response: web.StreamResponse = web.Response(status=429, text="Too Many Requests\n")
        elif config.users and not await self._auth.check(
            config, request.headers.get(hdrs.AUTHORIZATION)
        ):
            response = web.Response(
                status=401,
                text="Unauthorized\n",
                headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}"'},
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                exc.headers.update(headers)
                raise
        if not response.prepared:
            response.headers.update(headers)
        return response

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
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import bcrypt
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from exporter import yamlcheck
from exporter.config import parse_duration
from exporter.filestamp import FileStamp, file_stamp
from exporter.yamlcheck import ConfigError, Node, Section, boolean, one_of, section, setting

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

_BCRYPT_RE = re.compile(rb"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_FORM = "a bcrypt hash like $2b$10$ followed by 53 characters"


# --------------------------------------------------------------------------- checkers


def _file(node: Node) -> Path:
    if not isinstance(node.value, str) or not node.value.strip():
        node.fail("must be a file path")
    return yamlcheck.resolve_path(node.value.strip(), node.base_dir)


def _pem(node: Node) -> str:
    if not isinstance(node.value, str) or "-----BEGIN " not in node.value:
        node.fail("must be PEM text (-----BEGIN ...)", shown=None)  # an inline key is a secret
    return node.value


def _client_auth_type(node: Node) -> str:
    if node.value in ("RequireAnyClientCert", "RequireClientCert"):
        node.fail(f"{node.value} {_REQUIRE_ANY}", shown=None)
    return one_of(CLIENT_AUTH_TYPES)(node)


def _client_allowed_sans(node: Node) -> tuple[str, ...]:
    node.fail(
        "is not supported: Python's ssl module has no hook to check a client"
        " certificate's names during the handshake",
        shown=None,
    )


def _cipher_suite(node: Node) -> str:
    if not isinstance(node.value, str) or node.value not in CIPHER_SUITES:
        node.fail(
            "must be a cipher suite exporter-toolkit knows, such as"
            " TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (list: docs/web-config.md)"
        )
    return node.value


def _cipher_suites(node: Node) -> tuple[str, ...]:
    return yamlcheck.each(node, _cipher_suite, form="must be a list of strings", unique=False)


def _curves(node: Node) -> tuple[str, ...]:
    return yamlcheck.each(node, one_of(CURVES), form="must be a list of strings", unique=False)


def _headers(node: Node) -> Mapping[str, str]:
    headers: dict[str, str] = {}
    ok = True
    for name, item in node.entries("must be a mapping of header names to values"):
        value = item.value
        if not isinstance(name, str) or name not in HEADERS:
            item.report(f"cannot be configured (allowed: {', '.join(HEADERS)})", shown=None)
        elif value is None or value == "":
            continue  # blank means unset, as documented by exporter-toolkit
        elif not isinstance(value, str) or "\n" in value or "\r" in value:
            item.report("must be a single-line string")
        elif HEADERS[name] and value not in HEADERS[name]:
            item.report(f"must be one of {', '.join(HEADERS[name])}")
        else:
            headers[name] = value
            continue
        ok = False
    if not ok:
        raise yamlcheck.Invalid
    return headers


def _users(node: Node) -> Mapping[str, bytes]:
    # Hashes are never shown: someone may have put the password itself there.
    if not isinstance(node.value, dict):
        node.fail(
            "must be a mapping of user names to bcrypt hashes", shown=yamlcheck.kind(node.value)
        )
    users: dict[str, bytes] = {}
    for name, item in node.entries(""):
        if not isinstance(name, str) or not name:
            node.report("user names must be non-empty strings", shown=yamlcheck.show(name))
            continue
        if ":" in name:
            item.report("a user name cannot contain ':' (Basic auth splits on it)", shown=None)
            continue
        raw = item.value.strip().encode("utf-8") if isinstance(item.value, str) else b""
        match = _BCRYPT_RE.fullmatch(raw)
        if match is None:
            item.report(f"must be {_BCRYPT_FORM}", shown="a value that is not one")
        elif not 4 <= int(match[1]) <= 31:
            item.report(f"must be {_BCRYPT_FORM} with a cost from 4 to 31", shown=match[1].decode())
        else:
            users[name] = raw
    if len(users) < len(node.value):
        raise yamlcheck.Invalid
    return users


def _interval(node: Node) -> float:
    try:
        return parse_duration(node.value)
    except ValueError:
        node.fail("must be a duration like 100ms or 1s")


def _burst(node: Node) -> int:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        node.fail("must be a positive integer when interval is set")
    return value


# --------------------------------------------------------------------------- dataclasses


@section
class TLSServerConfig:
    """`tls_server_config`; paths are already resolved against the web config's directory."""

    cert_file: Path | None = setting(_file, default=None)
    key_file: Path | None = setting(_file, default=None)
    # Inline PEM, as exporter-toolkit's `cert`, `key` and `client_ca`.
    cert: str | None = setting(_pem, default=None, repr=False)
    key: str | None = setting(_pem, default=None, repr=False)
    client_ca_file: Path | None = setting(_file, default=None)
    client_ca: str | None = setting(_pem, default=None, repr=False)
    client_auth_type: str = setting(_client_auth_type, default="NoClientCert")
    # exporter-toolkit's key, always refused: so never anything but empty.
    client_allowed_sans: tuple[str, ...] = setting(_client_allowed_sans, default=())
    min_version: str = setting(one_of(TLS_VERSIONS), default="TLS12")
    max_version: str = setting(one_of(TLS_VERSIONS), default="TLS13")
    cipher_suites: tuple[str, ...] = setting(_cipher_suites, default=())
    prefer_server_cipher_suites: bool = setting(boolean, default=True)
    curve_preferences: tuple[str, ...] = setting(_curves, default=())

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


def _check_tls(tls: TLSServerConfig, at: Section) -> TLSServerConfig:
    for inline, path in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if at.has(inline) and at.has(path):
            at.report(inline, f"set only one of {inline} and {path}", shown=None)
    has_cert = at.has("cert_file") or at.has("cert")
    has_key = at.has("key_file") or at.has("key")
    if has_cert and not has_key:
        at.report("key_file", "missing: a certificate needs key_file (or an inline key)")
    elif has_key and not has_cert:
        at.report("cert_file", "missing: a key needs cert_file (or an inline cert)")
    elif not has_cert:
        at.report("cert_file", "missing: TLS needs cert_file and key_file")
    has_ca = at.has("client_ca_file") or at.has("client_ca")
    if has_ca and at.usable("client_auth_type") and tls.client_auth_type == "NoClientCert":
        at.report(
            "client_ca_file" if at.has("client_ca_file") else "client_ca",
            "is set but client_auth_type is NoClientCert; set client_auth_type to"
            " RequireAndVerifyClientCert (or VerifyClientCertIfGiven)",
            shown=None,
        )
    versions = list(TLS_VERSIONS)
    if versions.index(tls.max_version) < versions.index(tls.min_version):
        at.report("max_version", f"must not be below min_version ({tls.min_version})")
    return tls


def _tls(node: Node) -> TLSServerConfig | None:
    # A section that sets nothing means plain HTTP, as in exporter-toolkit.
    if isinstance(node.value, dict) and all(value is None for value in node.value.values()):
        return None
    return yamlcheck.build(TLSServerConfig, node, then=_check_tls)


@section
class HTTPServerConfig:
    """`http_server_config`. `http2` is accepted and ignored: aiohttp serves HTTP/1.1 only."""

    http2: bool = setting(boolean, default=True)
    headers: Mapping[str, str] = setting(_headers, default_factory=dict)


@section
class RateLimitConfig:
    """A token bucket over all requests: one token every `interval` seconds, `burst` at most.

    An interval of 0 turns the limit off, as in exporter-toolkit.
    """

    interval: float = setting(_interval, default=0.0)
    burst: int = setting(_burst, default=0)


def _check_burst(limit: RateLimitConfig, at: Section) -> RateLimitConfig:
    if limit.interval > 0 and at.usable("burst") and limit.burst < 1:
        at.report("burst", "must be a positive integer when interval is set")
    return limit


def _rate_limit(node: Node) -> RateLimitConfig | None:
    limit = yamlcheck.build(RateLimitConfig, node, then=_check_burst)
    return limit if limit.interval > 0 else None


@section
class WebConfig:
    """A parsed web config file. `users` maps user names to bcrypt hashes."""

    tls: TLSServerConfig | None = setting(_tls, key="tls_server_config", default=None)
    http: HTTPServerConfig = setting(
        yamlcheck.nested(HTTPServerConfig),
        key="http_server_config",
        default_factory=HTTPServerConfig,
    )
    users: Mapping[str, bytes] = setting(
        _users, key="basic_auth_users", default_factory=dict, repr=False
    )
    rate_limit: RateLimitConfig | None = setting(_rate_limit, default=None)
    source: str = "<web config>"

    @property
    def bcrypt_cost(self) -> int:
        """The cost an unknown user's check runs at, so that it takes as long as a known one's."""
        costs = [int(h.split(b"$")[2]) for h in self.users.values()]
        return max(costs, default=10)


# --------------------------------------------------------------------------- parsing


def parse_web_config(data: object, *, source: str, base_dir: Path) -> WebConfig:
    """`WebConfig` from the YAML document `data`; ConfigError with one line per problem.

    Pure: no file is read, so certificates are checked by `build_ssl_context`.
    """
    if data is None:
        # An empty file is valid for exporter-toolkit too: plain HTTP, no auth.
        return WebConfig(source=source)
    config = yamlcheck.check_document(
        WebConfig,
        data,
        source=source,
        base_dir=base_dir,
        form=f"must be a mapping with {', '.join(yamlcheck.known_keys(WebConfig))}",
    )
    return replace(config, source=source)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and parse the web config file; ConfigError with one line per problem."""
    data = yamlcheck.read_yaml(Path(path), str(path))
    return parse_web_config(data, source=str(path), base_dir=Path(path).parent)


# --------------------------------------------------------------------------- TLS


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _EncryptedKeyError


def _read_pem(
    problems: yamlcheck.Problems, at: yamlcheck.Loc, path: Path, marker: str, what: str
) -> None:
    try:
        content = path.read_bytes()
    except OSError as err:
        problems.add(at, f"cannot read file ({yamlcheck.reason(err)})", yamlcheck.show(str(path)))
        return
    if marker.encode() not in content:
        problems.add(at, f"no PEM {what} in file", yamlcheck.show(str(path)))


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
    at = yamlcheck.Loc(source).key("tls_server_config")
    problems = yamlcheck.Problems()
    if tls.cert_file is not None:
        _read_pem(
            problems, at.key("cert_file"), tls.cert_file, "-----BEGIN CERTIFICATE", "certificate"
        )
    if tls.key_file is not None:
        _read_pem(problems, at.key("key_file"), tls.key_file, "PRIVATE KEY-----", "private key")
    if tls.client_ca_file is not None:
        _read_pem(
            problems,
            at.key("client_ca_file"),
            tls.client_ca_file,
            "-----BEGIN CERTIFICATE",
            "certificate",
        )
    if len(problems):
        raise ConfigError(problems.lines())

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

    key_at = at.key("key_file") if tls.key_file is not None else at.key("key")
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
    if len(problems):
        raise ConfigError(problems.lines())

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
        ca_at = at.key("client_ca_file") if tls.client_ca_file is not None else at.key("client_ca")
        problems.add(ca_at, f"cannot load the CA certificates ({_ssl_reason(err)})")
        raise ConfigError(problems.lines()) from None
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


@dataclass(frozen=True)
class _Loaded:
    config: WebConfig
    context: ssl.SSLContext | None
    key: tuple[FileStamp | None, tuple[FileStamp | None, ...]]


class WebSecurity:
    """The web config in force: TLS contexts, basic auth and headers, re-read on change.

    Construct it from the file (ConfigError if the file or a certificate is bad), serve with
    `ssl_context` and put `middleware` in front of every handler.
    """

    def __init__(self, path: str | Path, *, auth: BasicAuth | None = None) -> None:
        self._path = Path(path)
        self._source = str(path)
        web_fp = file_stamp(self._path)
        config = load_web_config(self._path)
        files_fp = tuple(file_stamp(p) for p in (config.tls.files if config.tls else ()))
        context = build_ssl_context(config.tls, self._source) if config.tls else None
        self._good = _Loaded(config, context, (web_fp, files_fp))
        self._parsed_fp = web_fp
        self._candidate: WebConfig | None = config
        self._failed_key: tuple[FileStamp | None, tuple[FileStamp | None, ...]] | None = None
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
        web_fp = file_stamp(self._path)
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
        key = (web_fp, tuple(file_stamp(p) for p in files))
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
        self, config: WebConfig, key: tuple[FileStamp | None, tuple[FileStamp | None, ...]]
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

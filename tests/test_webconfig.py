"""`--web-config-file`: strict parsing with exact messages, basic auth, headers, TLS with
certificates made by the test (openssl), client certificates, rotation without restart, the
web config re-read on change, and a real Prometheus scraping over TLS with basic auth.

The end-to-end tests run `python -m exporter` against a fake portal served in the test's
event loop, so they only await (never block) while the exporter runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.config import ConfigError
from exporter.fakeportal import demo_portal
from exporter.webconfig import (
    REALM,
    TLSServerConfig,
    WebSecurity,
    build_ssl_context,
    load_web_config,
    parse_web_config,
)
from tests.support import (
    ROOT,
    ExporterProcess,
    Response,
    free_port,
    register_secret,
    require_binary,
    wait_for,
)

# A cheap cost keeps most tests fast; a realistic one where Prometheus logs in.
CHEAP = 4

# Basic-auth passwords the tests log in with: secrets, never to be shown.
PASSWORD = "pr0m3th3us-b4s1c-p4ss"
OTHER_PASSWORD = "gr4f4n4-b4s1c-p4ss"
WRONG = "wr0ng-b4s1c-p4ss"
register_secret(PASSWORD, OTHER_PASSWORD, WRONG)


def hashpw(password: str, cost: int = CHEAP) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def write_yaml(path: Path, data: object) -> Path:
    """Write `data` atomically (rename), as config management and Kubernetes do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    """A CA, two server certificates (serials 1001, 1002), a client certificate the CA
    signed and a self-signed one it did not."""

    dir: Path
    ca: Path
    server: tuple[Path, Path]
    server2: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]


def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(
        [require_binary("openssl"), *args],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _key_and_csr(directory: Path, name: str, cn: str) -> None:
    _openssl(
        directory,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}"),
    )


def _sign(directory: Path, name: str, serial: int, usage: str) -> tuple[Path, Path]:
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        f"extendedKeyUsage={usage}\n"
    )
    _openssl(
        directory,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", ext.name),
    )
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        d,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    for name in ("server", "server2"):
        _key_and_csr(d, name, "localhost")
    _key_and_csr(d, "client", "prometheus")
    _openssl(
        d,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", "stranger.key", "-out", "stranger.pem", "-days", "2"),
        *("-subj", "/CN=stranger"),
    )
    return Pki(
        dir=d,
        ca=d / "ca.pem",
        server=_sign(d, "server", 1001, "serverAuth"),
        server2=_sign(d, "server2", 1002, "serverAuth"),
        client=_sign(d, "client", 2001, "clientAuth"),
        stranger=(d / "stranger.pem", d / "stranger.key"),
    )


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def install_server_cert(pki: Pki, pair: tuple[Path, Path], directory: Path) -> None:
    """Copy a certificate and key to server.pem / server.key in `directory`, by rename."""
    for source, target in zip(pair, ("server.pem", "server.key"), strict=True):
        tmp = directory / (target + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, directory / target)


# --------------------------------------------------------------------------- the table


_TLS_KEYS = (
    "cert_file, key_file, cert, key, client_ca_file, client_ca, client_auth_type, "
    "client_allowed_sans, min_version, max_version, cipher_suites, "
    "prefer_server_cipher_suites, curve_preferences"
)
_TOP = "tls_server_config, http_server_config, basic_auth_users, rate_limit"
_AUTH_TYPES = (
    "NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, "
    "RequireAndVerifyClientCert"
)
_HEADERS = (
    "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, "
    "X-Frame-Options, X-XSS-Protection"
)
_BCRYPT = "must be a bcrypt hash like $2b$10$ followed by 53 characters"
_GOOD_HASH = "$2b$04$" + "a" * 53

BAD_WEB_CONFIGS: list[tuple[str, str, list[str]]] = [
    (
        "not a mapping",
        "- tls_server_config\n",
        [f"web.yml: must be a mapping with {_TOP}, got ['tls_server_config']"],
    ),
    (
        "unknown keys at the top and inside sections",
        "tls_config: {}\n"
        "tls_server_config:\n  certfile: c.pem\n  key_file: k.pem\n"
        "http_server_config:\n  http3: true\n",
        [
            f"web.yml: tls_config: unknown key (known: {_TOP})",
            "web.yml: tls_server_config.cert_file: missing: a key needs cert_file (or an inline"
            " cert)",
            f"web.yml: tls_server_config.certfile: unknown key (known: {_TLS_KEYS})",
            "web.yml: http_server_config.http3: unknown key (known: http2, headers)",
        ],
    ),
    (
        "client_auth_type not one of Go's names",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: x\n",
        [f"web.yml: tls_server_config.client_auth_type: must be one of {_AUTH_TYPES}, got 'x'"],
    ),
    (
        "client CA without an auth type that asks for certificates",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_ca_file: ca.pem\n",
        [
            "web.yml: tls_server_config.client_ca_file: is set but client_auth_type is"
            " NoClientCert; set client_auth_type to RequireAndVerifyClientCert (or"
            " VerifyClientCertIfGiven)"
        ],
    ),
    (
        "certificate without key, and a TLS section without a certificate",
        "tls_server_config:\n  cert_file: c.pem\n",
        [
            "web.yml: tls_server_config.key_file: missing: a certificate needs key_file (or an"
            " inline key)"
        ],
    ),
    (
        "a TLS section with settings but no certificate",
        "tls_server_config:\n  min_version: TLS13\n",
        ["web.yml: tls_server_config.cert_file: missing: TLS needs cert_file and key_file"],
    ),
    (
        "inline and file forms together; an inline key that is not PEM is not echoed",
        "tls_server_config:\n  cert_file: c.pem\n  cert: '-----BEGIN CERTIFICATE-----'\n"
        "  key: hunter2\n",
        [
            "web.yml: tls_server_config.cert: set only one of cert and cert_file",
            "web.yml: tls_server_config.key: must be PEM text (-----BEGIN ...)",
        ],
    ),
    (
        "RequireAnyClientCert cannot be done with Python's ssl",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"
        "  client_auth_type: RequireAnyClientCert\n  client_allowed_sans: [a]\n",
        [
            "web.yml: tls_server_config.client_auth_type: RequireAnyClientCert is not supported:"
            " Python's ssl module cannot require a client certificate without verifying it; use"
            " RequireAndVerifyClientCert with client_ca_file",
            "web.yml: tls_server_config.client_allowed_sans: is not supported: Python's ssl"
            " module has no hook to check a client certificate's names during the handshake",
        ],
    ),
    (
        "TLS versions",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  min_version: TLS14\n"
        "  max_version: TLS12\n",
        [
            "web.yml: tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13,"
            " got 'TLS14'",
        ],
    ),
    (
        "max_version below min_version",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  min_version: TLS13\n"
        "  max_version: TLS12\n",
        [
            "web.yml: tls_server_config.max_version: must not be below min_version (TLS13),"
            " got 'TLS12'"
        ],
    ),
    (
        "cipher suites, curves and the server preference flag",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"
        "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_RSA_WITH_RC4_128_SHA]\n"
        "  prefer_server_cipher_suites: 'yes'\n  curve_preferences: [X25519, P256]\n",
        [
            "web.yml: tls_server_config.cipher_suites[1]: must be a cipher suite exporter-toolkit"
            " knows, such as TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (list: docs/web-config.md),"
            " got 'TLS_RSA_WITH_RC4_128_SHA'",
            "web.yml: tls_server_config.prefer_server_cipher_suites: must be true or false,"
            " got 'yes'",
            "web.yml: tls_server_config.curve_preferences[1]: must be one of CurveP256,"
            " CurveP384, CurveP521, X25519, got 'P256'",
        ],
    ),
    (
        "headers outside exporter-toolkit's list, and values outside their enumeration",
        "http_server_config:\n  http2: 1\n  headers:\n    Server: nginx\n"
        "    X-Frame-Options: allow\n    X-Content-Type-Options: sniff\n",
        [
            "web.yml: http_server_config.http2: must be true or false, got 1",
            f"web.yml: http_server_config.headers.Server: cannot be configured (allowed:"
            f" {_HEADERS})",
            "web.yml: http_server_config.headers.X-Frame-Options: must be one of deny,"
            " sameorigin, got 'allow'",
            "web.yml: http_server_config.headers.X-Content-Type-Options: must be one of nosniff,"
            " got 'sniff'",
        ],
    ),
    (
        "users: a plain password is refused and not echoed; a bad cost; a colon in a name",
        "basic_auth_users:\n  alice: hunter2\n  bob: '$2b$03$" + "a" * 53 + "'\n"
        "  'c:d': '" + _GOOD_HASH + "'\n  eve: 42\n",
        [
            f"web.yml: basic_auth_users.alice: {_BCRYPT}, got a value that is not one",
            f"web.yml: basic_auth_users.bob: {_BCRYPT} with a cost from 4 to 31, got 03",
            "web.yml: basic_auth_users.c:d: a user name cannot contain ':' (Basic auth splits"
            " on it)",
            f"web.yml: basic_auth_users.eve: {_BCRYPT}, got a value that is not one",
        ],
    ),
    (
        "users not a mapping",
        "basic_auth_users: [alice]\n",
        ["web.yml: basic_auth_users: must be a mapping of user names to bcrypt hashes, got a list"],
    ),
    (
        "rate limit",
        "rate_limit:\n  interval: 1s\n  burst: 0\n  bursts: 3\n",
        [
            "web.yml: rate_limit.burst: must be a positive integer when interval is set, got 0",
            "web.yml: rate_limit.bursts: unknown key (known: interval, burst)",
        ],
    ),
    (
        "nesting too deep for the YAML parser",
        "rate_limit: " + "[" * 2000 + "\n",
        ["web.yml: invalid YAML: nested too deeply"],
    ),
    (
        "an integer too long for Python",
        "rate_limit:\n  interval: 1s\n  burst: " + "9" * 5000 + "\n",
        ["web.yml:3:10: invalid YAML: integer with too many digits"],
    ),
    (
        "a character YAML does not allow",
        'basic_auth_users:\n  alice: "\x00"\n',
        ["web.yml:2:11: invalid YAML: character 0x0000 is not allowed"],
    ),
    (
        "duplicate keys",
        "basic_auth_users: {}\nbasic_auth_users: {}\n",
        ["web.yml:2:1: invalid YAML: duplicate key 'basic_auth_users'"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in BAD_WEB_CONFIGS],
)
def test_bad_web_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: list[str]
) -> None:
    """Each bad web config gives exactly these lines, one per problem, file and key named, in
    document order (a missing key where it belongs: after its section, before its siblings)."""
    monkeypatch.chdir(tmp_path)
    Path("web.yml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_web_config("web.yml")
    assert caught.value.problems == expected


def test_bad_certificate_files(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Certificate, key and CA files are read at load: missing, not PEM, or not a pair."""
    monkeypatch.chdir(tmp_path)
    Path("notpem.txt").write_text("hello\n")
    shutil.copyfile(pki.server[0], "server.pem")
    shutil.copyfile(pki.server2[1], "other.key")
    shutil.copyfile(pki.ca, "ca.pem")
    cases = [
        (
            {"cert_file": "missing.pem", "key_file": "notpem.txt"},
            [
                "web.yml: tls_server_config.cert_file: cannot read file (No such file or"
                " directory), got 'missing.pem'",
                "web.yml: tls_server_config.key_file: no PEM private key in file, got 'notpem.txt'",
            ],
        ),
        (
            {"cert_file": "server.pem", "key_file": "other.key"},
            ["web.yml: tls_server_config.key_file: does not belong to the certificate"],
        ),
        (
            {
                "cert_file": "server.pem",
                "key_file": str(pki.server[1]),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": "notpem.txt",
            },
            [
                "web.yml: tls_server_config.client_ca_file: no PEM certificate in file, got"
                " 'notpem.txt'"
            ],
        ),
    ]
    for tls, expected in cases:
        write_yaml(Path("web.yml"), {"tls_server_config": tls})
        with pytest.raises(ConfigError) as caught:
            WebSecurity("web.yml")
        assert caught.value.problems == expected


def test_good_web_config(tmp_path: Path, pki: Pki) -> None:
    """Every supported key parses; relative paths resolve against the file's directory."""
    (tmp_path / "tls").mkdir()
    for source, name in ((pki.server[0], "s.pem"), (pki.server[1], "s.key"), (pki.ca, "ca.pem")):
        shutil.copyfile(source, tmp_path / "tls" / name)
    path = write_yaml(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": "tls/s.pem",
                "key_file": "tls/s.key",
                "client_ca_file": "tls/ca.pem",
                "client_auth_type": "VerifyClientCertIfGiven",
                "min_version": "TLS13",
                "max_version": "TLS13",
                "cipher_suites": ["TLS_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"],
                "prefer_server_cipher_suites": False,
                "curve_preferences": ["X25519", "CurveP256"],
            },
            "http_server_config": {"http2": False, "headers": {"X-Frame-Options": "deny"}},
            "basic_auth_users": {"alice": hashpw("a"), "bob": hashpw("b", 5)},
            "rate_limit": {"interval": "100ms", "burst": 5},
        },
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "tls/s.pem"
    assert config.tls.client_ca_file == tmp_path / "tls/ca.pem"
    assert config.tls.min_version == "TLS13"
    assert config.tls.curve_preferences == ("X25519", "CurveP256")
    assert config.http.headers == {"X-Frame-Options": "deny"}
    assert sorted(config.users) == ["alice", "bob"]
    assert config.bcrypt_cost == 5
    assert config.rate_limit is not None and config.rate_limit.interval == 0.1
    context = build_ssl_context(config.tls, str(path))
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    # The hashes stand for passwords: the config's repr (in a log line or a traceback)
    # never shows them.
    assert config.users
    for hashed in config.users.values():
        assert hashed.decode() not in repr(config)


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """A `<<` merge copies a mapping's keys, and keys written beside it override them."""
    path = tmp_path / "web.yml"
    path.write_text(
        "http_server_config:\n  headers: &strict\n    X-Frame-Options: deny\n"
        "    X-Content-Type-Options: nosniff\n"
        "  http2: false\n"
        "rate_limit: {interval: 1s, burst: 3}\n"
        "basic_auth_users:\n  <<: {alice: '" + _GOOD_HASH + "'}\n  alice: '" + _GOOD_HASH + "'\n",
        encoding="utf-8",
    )
    config = load_web_config(path)
    assert config.http.headers == {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
    assert list(config.users) == ["alice"]


def test_docs_example_is_valid() -> None:
    """The example web config in docs/web-config.md parses."""
    text = (ROOT / "docs" / "web-config.md").read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    base = Path("/etc/bitrix24-exporter")
    config = parse_web_config(yaml.safe_load(block), source="web.yml", base_dir=base)
    assert config.tls is not None and config.tls.key_file == base / "tls/server.key"
    assert list(config.users) == ["prometheus"]
    assert config.http.headers["X-Frame-Options"] == "deny"


def test_empty_file_is_plain_http_without_auth(tmp_path: Path) -> None:
    """An empty web config, as in exporter-toolkit, means no TLS and no auth."""
    (tmp_path / "web.yml").write_text("")
    security = WebSecurity(tmp_path / "web.yml")
    assert security.ssl_context is None
    assert not security.config.users


def test_inline_certificate_and_key(pki: Pki) -> None:
    """PEM given inline (`cert`, `key`, `client_ca`) loads like the file forms."""
    tls = TLSServerConfig(
        cert=pki.server[0].read_text(),
        key=pki.server[1].read_text(),
        client_ca=pki.ca.read_text(),
        client_auth_type="RequireAndVerifyClientCert",
    )
    context = build_ssl_context(tls, "web.yml")
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


# --------------------------------------------------------------------------- in-process


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@pytest.fixture
async def guarded(
    tmp_path: Path, aiohttp_client: Any
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[TestClient[Any, Any]]]]:
    """A tiny app behind `WebSecurity.middleware`, from a web config mapping."""

    async def start(data: dict[str, Any]) -> TestClient[Any, Any]:
        path = write_yaml(tmp_path / "web.yml", data)
        security = WebSecurity(path)
        app = web.Application(middlewares=[security.middleware])
        app.router.add_get("/", _ok)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    yield start


async def test_rate_limit(guarded: Callable[..., Awaitable[TestClient[Any, Any]]]) -> None:
    """With rate_limit, requests beyond the burst get 429 until a token comes back."""
    client = await guarded({"rate_limit": {"interval": "1h", "burst": 2}})
    statuses = [(await client.get("/")).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_malformed_authorization_headers(
    guarded: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    """Other schemes, bad base64, no colon and over-long passwords are all plain 401s."""
    client = await guarded({"basic_auth_users": {"alice": hashpw("pw")}})
    for header in (
        "Bearer abc",
        "Basic !!!",
        "Basic YWxpY2U=",  # "alice", no colon
        aiohttp.encode_basic_auth("alice", "x" * 100),  # bcrypt refuses > 72 bytes
        aiohttp.encode_basic_auth("\u00e4lice", "pw", encoding="latin1"),
    ):
        response = await client.get("/", headers={"Authorization": header})
        assert response.status == 401, header
        assert response.headers["WWW-Authenticate"] == f'Basic realm="{REALM}"'
    good = {"Authorization": aiohttp.encode_basic_auth("alice", "pw")}
    assert (await client.get("/", headers=good)).status == 200


async def test_turning_tls_on_needs_a_restart(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that would switch TLS on keeps the running config and logs one error."""
    path = write_yaml(tmp_path / "web.yml", {"basic_auth_users": {"alice": hashpw("a")}})
    security = WebSecurity(path)
    write_yaml(
        path,
        {"tls_server_config": {"cert_file": str(pki.server[0]), "key_file": str(pki.server[1])}},
    )
    caplog.set_level(logging.ERROR, logger="exporter.webconfig")
    for _ in range(3):
        assert "alice" in security.refresh().users
    errors = [r.getMessage() for r in caplog.records]
    assert errors == [
        "web config reload failed, keeping the last good one: "
        f"{path}: tls_server_config: TLS cannot be turned on or off while running; restart the"
        " exporter"
    ]


async def test_restart_only_tls_settings_wait_for_a_restart(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that changes min_version still rotates the certificate but keeps the TLS
    versions the server started with, and warns once that a restart is needed."""
    tls = {"cert_file": str(pki.server[0]), "key_file": str(pki.server[1])}
    path = write_yaml(tmp_path / "web.yml", {"tls_server_config": tls})
    security = WebSecurity(path)
    server = await asyncio.start_server(
        lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=security.ssl_context
    )
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    tls12 = client_context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    caplog.set_level(logging.WARNING, logger="exporter.webconfig")
    try:
        assert await peer_serial(url, tls12) == f"{1001:04X}"
        rotated = {"cert_file": str(pki.server2[0]), "key_file": str(pki.server2[1])}
        write_yaml(path, {"tls_server_config": {**rotated, "min_version": "TLS13"}})
        for _ in range(3):
            assert await peer_serial(url, tls12) == f"{1002:04X}"
    finally:
        server.close()
        await server.wait_closed()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "take effect after a restart" in warnings[0], warnings


# --------------------------------------------------------------------------- end to end


@dataclass
class Running:
    process: ExporterProcess
    web_yml: Path
    tls: ssl.SSLContext | None

    async def get(
        self, path: str, *, auth: tuple[str, str] | None = None, tls: ssl.SSLContext | None = None
    ) -> Response:
        return await self.process.get(path, auth=auth, tls=tls or self.tls)

    def log(self) -> str:
        return self.process.stderr()


@pytest.fixture
async def exporter(
    tmp_path: Path, served: Callable[..., Awaitable[str]], exporter_process: Any
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Start `python -m exporter --web-config-file web.yml` against a fake portal."""
    portal, hook = demo_portal(users=2)
    base_url = await served(portal)
    config = write_yaml(
        tmp_path / "config.yaml",
        {
            "poll_interval": "1s",
            "request_timeout": "2s",
            "portals": [{"name": "demo", "webhook": base_url + hook}],
        },
    )

    async def start(web_config: dict[str, Any], *, tls: ssl.SSLContext | None = None) -> Running:
        web_yml = write_yaml(tmp_path / "web.yml", web_config)
        process = exporter_process(None, "--config", str(config), "--web-config-file", str(web_yml))
        await process.wait_answering(tls=tls)
        return Running(process, web_yml, tls)

    yield start


HEADERS_CONFIG = {
    "X-Frame-Options": "deny",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'",
}


async def test_basic_auth_and_headers(exporter: Callable[..., Awaitable[Running]]) -> None:
    """No or wrong credentials get 401 with WWW-Authenticate on every path, /healthz
    included; the right ones get 200; the configured headers are on every response."""
    running = await exporter(
        {
            "basic_auth_users": {
                "prometheus": hashpw(PASSWORD),
                "grafana": hashpw(OTHER_PASSWORD),
            },
            "http_server_config": {"headers": HEADERS_CONFIG},
        }
    )
    for path in ("/metrics", "/healthz", "/", "/no-such-page"):
        for auth in (None, ("prometheus", WRONG), ("nobody", PASSWORD), ("grafana", PASSWORD)):
            response = await running.get(path, auth=auth)
            assert response.status == 401, (path, auth)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="bitrix24-exporter"'
            assert HEADERS_CONFIG.items() <= response.headers.items()
    for path, expected in (("/metrics", 200), ("/healthz", 200), ("/no-such-page", 404)):
        response = await running.get(path, auth=("prometheus", PASSWORD))
        assert response.status == expected, path
        assert HEADERS_CONFIG.items() <= response.headers.items()
        assert "WWW-Authenticate" not in response.headers


async def test_unknown_user_costs_as_much_as_a_wrong_password(
    guarded: Callable[..., Awaitable[TestClient[Any, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown user is checked against a dummy hash of the users' own cost, so its 401
    costs one bcrypt check as long as a known user's: timing names no users.

    bcrypt's time depends on the cost alone, so the hashes checked are compared, not timed;
    `bench/basic_auth.py` times both.
    """
    checked: list[bytes] = []
    check = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return check(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    stored = hashpw(PASSWORD, 6).encode()
    client = await guarded({"basic_auth_users": {"prometheus": stored.decode()}})
    for user in ("prometheus", "mallory"):
        header = {"Authorization": aiohttp.encode_basic_auth(user, WRONG)}
        assert (await client.get("/", headers=header)).status == 401
    assert len(checked) == 2, checked
    known, unknown = checked
    assert known == stored
    assert unknown != stored and unknown[:7] == stored[:7] == b"$2b$06$"


async def test_web_config_is_re_read(exporter: Callable[..., Awaitable[Running]]) -> None:
    """A new password hash in the file takes effect without a restart; a broken file keeps
    the last good one and logs one error however many requests arrive."""
    running = await exporter({"basic_auth_users": {"prometheus": hashpw(PASSWORD)}})
    assert (await running.get("/healthz", auth=("prometheus", PASSWORD))).status == 200

    write_yaml(running.web_yml, {"basic_auth_users": {"prometheus": hashpw(OTHER_PASSWORD)}})
    assert (await running.get("/healthz", auth=("prometheus", PASSWORD))).status == 401
    assert (await running.get("/healthz", auth=("prometheus", OTHER_PASSWORD))).status == 200

    running.web_yml.write_text("basic_auth_users:\n  prometheus: new-but-not-hashed\n")
    for _ in range(3):
        response = await running.get("/healthz", auth=("prometheus", OTHER_PASSWORD))
        assert response.status == 200
    failures = [line for line in running.log().splitlines() if "reload failed" in line]
    assert len(failures) == 1, running.log()
    assert failures[0].endswith(
        "web config reload failed, keeping the last good one: "
        f"{running.web_yml}: basic_auth_users.prometheus: {_BCRYPT}, got a value that is not one"
    )
    assert "new-but-not-hashed" not in running.log()


async def test_https(exporter: Callable[..., Awaitable[Running]], pki: Pki) -> None:
    """With a certificate and key, the exporter speaks HTTPS only."""
    tls = client_context(pki)
    running = await exporter(
        {
            "tls_server_config": {
                "cert_file": str(pki.server[0]),
                "key_file": str(pki.server[1]),
            },
            "basic_auth_users": {"prometheus": hashpw(PASSWORD)},
        },
        tls=tls,
    )
    assert (await running.get("/metrics", auth=("prometheus", PASSWORD))).status == 200
    assert (await running.get("/metrics")).status == 401
    with pytest.raises(aiohttp.ClientError):
        await running.process.get("/metrics", auth=("prometheus", PASSWORD), scheme="http")


async def test_client_certificates(
    exporter: Callable[..., Awaitable[Running]], pki: Pki, tmp_path: Path
) -> None:
    """RequireAndVerifyClientCert: no certificate and a certificate from another issuer are
    refused in the handshake; one the client CA signed gets in. A replaced client CA file
    applies to the next handshake without a restart."""
    signed = client_context(pki, pki.client)
    stranger = client_context(pki, pki.stranger)
    ca_file = tmp_path / "client-ca.pem"
    shutil.copyfile(pki.ca, ca_file)
    running = await exporter(
        {
            "tls_server_config": {
                "cert_file": str(pki.server[0]),
                "key_file": str(pki.server[1]),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": ca_file.name,
            }
        },
        tls=signed,
    )
    assert (await running.get("/metrics")).status == 200
    for refused in (client_context(pki), stranger):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await running.get("/metrics", tls=refused)

    # Trust only the self-signed stranger from now on.
    shutil.copyfile(pki.stranger[0], tmp_path / "client-ca.tmp")
    os.replace(tmp_path / "client-ca.tmp", ca_file)
    assert (await running.get("/metrics", tls=stranger)).status == 200
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await running.get("/metrics", tls=signed)


async def peer_serial(running: Running | str, tls: ssl.SSLContext) -> str:
    if isinstance(running, Running):
        host, port = "127.0.0.1", running.process.port
    else:
        host, port_text = running.removeprefix("https://").rsplit(":", 1)
        port = int(port_text)
    _, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        cert = writer.get_extra_info("peercert")
        return str(cert["serialNumber"])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_certificate_rotation(
    exporter: Callable[..., Awaitable[Running]], pki: Pki, tmp_path: Path
) -> None:
    """Replacing the certificate and key files changes what the next handshake presents,
    without a restart; a broken replacement keeps the last good certificate."""
    tls = client_context(pki)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    install_server_cert(pki, pki.server, tls_dir)
    running = await exporter(
        {
            "tls_server_config": {
                "cert_file": "tls/server.pem",
                "key_file": "tls/server.key",
            }
        },
        tls=tls,
    )
    assert await peer_serial(running, tls) == f"{1001:04X}"

    install_server_cert(pki, pki.server2, tls_dir)
    assert await peer_serial(running, tls) == f"{1002:04X}"
    assert (await running.get("/healthz")).status == 200

    # Half a rotation (a certificate whose key has not arrived yet) keeps serving 1002.
    shutil.copyfile(pki.server[0], tls_dir / "server.tmp")
    os.replace(tls_dir / "server.tmp", tls_dir / "server.pem")
    for _ in range(3):
        assert await peer_serial(running, tls) == f"{1002:04X}"
    failures = [line for line in running.log().splitlines() if "reload failed" in line]
    assert len(failures) == 1, running.log()
    assert "tls_server_config.key_file: does not belong to the certificate" in failures[0]
    # The key arrives: the rotation completes.
    install_server_cert(pki, pki.server, tls_dir)
    assert await peer_serial(running, tls) == f"{1001:04X}"


# --------------------------------------------------------------------------- Prometheus


@pytest.mark.integration
async def test_prometheus_scrapes_over_tls_with_basic_auth(
    exporter: Callable[..., Awaitable[Running]], pki: Pki, tmp_path: Path
) -> None:
    """A real Prometheus scrapes /metrics over HTTPS with basic auth: `up` is 1 and the
    exporter's series arrive; a job with a wrong password sees `up` 0."""
    binary = require_binary("prometheus")
    tls = client_context(pki)
    running = await exporter(
        {
            "tls_server_config": {
                "cert_file": str(pki.server[0]),
                "key_file": str(pki.server[1]),
            },
            "basic_auth_users": {"prometheus": hashpw(PASSWORD, 10)},
        },
        tls=tls,
    )
    target = f"127.0.0.1:{running.process.port}"

    def job(name: str, password: str) -> dict[str, Any]:
        return {
            "job_name": name,
            "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca)},
            "basic_auth": {"username": "prometheus", "password": password},
            "static_configs": [{"targets": [target]}],
        }

    prom_config = write_yaml(
        tmp_path / "prometheus.yml",
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [job("good", PASSWORD), job("bad", WRONG)],
        },
    )
    port = free_port()
    prom_log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={prom_config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        async with aiohttp.ClientSession() as session:

            async def query(expr: str) -> dict[str, float]:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(api, params={"query": expr}) as response:
                        if response.status == 200:
                            body = await response.json()
                            return {
                                r["metric"].get("job", ""): float(r["value"][1])
                                for r in body["data"]["result"]
                            }
                return {}

            async def scraped() -> bool:
                if proc.returncode is not None:
                    raise AssertionError((tmp_path / "prometheus.log").read_text())
                up = await query("up")
                series = await query("bitrix24_up")
                return up == {"good": 1.0, "bad": 0.0} and "good" in series

            try:
                await wait_for(scraped, timeout=30, step=0.5)
            except AssertionError:
                raise AssertionError(
                    f"up={await query('up')}\n{(tmp_path / 'prometheus.log').read_text()}"
                ) from None
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        prom_log.close()

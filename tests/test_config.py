"""Tests for exporter.config: good files, defaults, and a table of bad files with exact messages."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from exporter import fakeportal
from exporter.config import (
    ENTERPRISE,
    ROLES,
    STANDARD,
    AlertReceiver,
    Config,
    ConfigError,
    DepartmentUsers,
    ImSettings,
    OAuthAuth,
    Portal,
    PrivacySettings,
    RateLimit,
    TasksSettings,
    TeamsSettings,
    WebhookAuth,
    check_receivers_protected,
    load_config,
    parse_config,
    parse_duration,
    parse_listen_address,
    redact_url,
)
from tests import support

REPO = support.ROOT
# Every webhook URL in the bad-config table uses this secret; no message may contain it.
SECRET = "s3cr3tt0k3n"
HOOK = f"https://acme.bitrix24.com/rest/1/{SECRET}/"
_DURATION = "must be a duration like 500ms, 30s, 5m or 1h30m (a bare number is seconds)"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_problems(path: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --------------------------------------------------------------------------- good files


def test_example_config_loads() -> None:
    """config.example.yaml loads once the variables it references are set."""
    config = load_config(REPO / "config.example.yaml", environ={"ACME_WEBHOOK": HOOK})
    assert config == Config(
        portals=(Portal(name="acme", auth=WebhookAuth(HOOK)),),
        source=str(REPO / "config.example.yaml"),
    )


def test_example_config_needs_its_variable() -> None:
    """Without ACME_WEBHOOK the example fails and names the key and the variable."""
    problems = load_problems(str(REPO / "config.example.yaml"))
    assert problems == [
        f"{REPO / 'config.example.yaml'}: portals[0].webhook: "
        "environment variable ACME_WEBHOOK is not set"
    ]


def test_example_alert_receivers_are_valid(tmp_path: Path) -> None:
    """The commented alert_receivers example in config.example.yaml is valid uncommented."""
    text = (REPO / "config.example.yaml").read_text(encoding="utf-8")
    head, example = text.split("# alert_receivers:\n", 1)
    lines = [line.removeprefix("# ") for line in example.splitlines()]
    path = write(tmp_path, "config.yaml", head + "alert_receivers:\n" + "\n".join(lines))
    config = load_config(path, environ={"ACME_WEBHOOK": HOOK, "ALERTS_TOKEN": "a" * 16})
    assert config.alert_receivers == (
        AlertReceiver(name="ops", portal="acme", token="a" * 16, chat="chat42"),
    )


def test_minimal_config_gets_every_default() -> None:
    """A portal with only a name and a webhook gets the documented defaults everywhere."""
    config = parse_config({"portals": [{"name": "acme", "webhook": HOOK}]}, environ={})
    assert config.listen_address == "0.0.0.0:9877"
    assert config.poll_interval == 60.0
    assert config.stale_after == 180.0
    assert config.request_timeout == 30.0
    assert config.user_refresh_interval == 600.0
    assert config.portals_dir is None
    assert config.source == "<config>"
    portal = config.portals[0]
    assert portal.rate_limit == STANDARD == RateLimit(2.0, 50)
    assert (portal.operating_limit, portal.operating_window) == (480.0, 600.0)
    assert portal.tasks == TasksSettings(
        enabled=True, users="self", exclude_users=frozenset(), groups=(0,), roles=("view_all",)
    )
    assert portal.im == ImSettings(enabled=True, webhooks=(), chats=False)
    assert portal.teams == TeamsSettings(enabled=False)
    assert portal.privacy == PrivacySettings(mode="none", pseudonym_key=None, min_team_size=5)


def test_null_values_take_defaults() -> None:
    """A key left empty in YAML (null) behaves as if it were not written."""
    config = parse_config(
        {"poll_interval": None, "portals": [{"name": "a", "webhook": HOOK, "tasks": None}]},
        environ={},
    )
    assert config.poll_interval == 60.0
    assert config.portals[0].tasks == TasksSettings()


def test_stale_after_defaults_to_three_poll_intervals() -> None:
    """Without stale_after, data goes stale after three poll intervals."""
    config = parse_config(
        {"poll_interval": "20s", "portals": [{"name": "a", "webhook": HOOK}]}, environ={}
    )
    assert config.stale_after == 60.0


def test_every_key_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each documented key is read into its field."""
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "config.yaml",
        f"""\
        listen_address: "[::1]:9100"
        poll_interval: 30
        stale_after: 1h30m
        request_timeout: 500ms
        user_refresh_interval: 5m
        portals:
          - name: acme.prod-1
            webhook: https://acme.bitrix24.com:8443/sub/rest/07/{SECRET}
            rate_limit: enterprise
            operating_limit: 7m
            operating_window: 30s
            tasks:
              enabled: no
              users: [1, 17, 42]
              exclude_users: [17]
              groups: [0, 5]
              roles: [view_role_responsible, view_role_auditor]
            im:
              enabled: false
              webhooks: ["http://acme.local/rest/17/other/"]
              chats: yes
          - name: beta
            webhook: http://127.0.0.1:8080/rest/3/abc/
            rate_limit: {{requests_per_second: 0.5, burst: 10}}
            tasks: {{users: all}}
            teams: {{enabled: true}}
            privacy: {{mode: aggregate, min_team_size: 8}}
          - name: gamma
            webhook: http://127.0.0.1:8080/rest/4/def/
            tasks: {{users: {{departments: [5, 12]}}}}
            privacy: {{mode: pseudonymous, pseudonym_key_file: pseudonym.key}}
        """,
    )
    write(tmp_path, "pseudonym.key", "0123456789abcdef0123\n")
    config = load_config("config.yaml", environ={})
    assert config.listen_address == "[::1]:9100"
    assert (config.poll_interval, config.stale_after) == (30.0, 5400.0)
    assert (config.request_timeout, config.user_refresh_interval) == (0.5, 300.0)
    acme, beta, gamma = config.portals
    assert acme.name == "acme.prod-1"
    assert acme.auth == WebhookAuth(f"https://acme.bitrix24.com:8443/sub/rest/7/{SECRET}/")
    assert acme.rate_limit == ENTERPRISE == RateLimit(5.0, 250)
    assert (acme.operating_limit, acme.operating_window) == (420.0, 30.0)
    assert acme.tasks == TasksSettings(
        enabled=False,
        users=(1, 17, 42),
        exclude_users=frozenset({17}),
        groups=(0, 5),
        roles=("view_role_responsible", "view_role_auditor"),
    )
    assert acme.im == ImSettings(
        enabled=False, webhooks=(WebhookAuth("http://acme.local/rest/17/other/"),), chats=True
    )
    assert beta.rate_limit == RateLimit(0.5, 10)
    assert beta.tasks.users == "all"
    assert beta.teams == TeamsSettings(enabled=True)
    assert beta.privacy == PrivacySettings(mode="aggregate", min_team_size=8)
    assert gamma.tasks.users == DepartmentUsers(departments=(5, 12))
    assert gamma.privacy.mode == "pseudonymous"
    assert gamma.privacy.pseudonym_key == "0123456789abcdef0123"
    assert config.source == "config.yaml"


def test_env_expansion() -> None:
    """${VAR} is replaced in every string, also inside longer strings; $${ stays literal."""
    config = parse_config(
        {
            "poll_interval": "${POLL}",
            "portals": [
                {
                    "name": "${NAME}-x",
                    "webhook": "https://${HOST}/rest/1/${SECRET}/",
                    "tasks": {"users": "${USERS}"},
                },
                {"name": "b", "webhook": "http://b/rest/2/a$${b}c/"},
            ],
        },
        environ={
            "POLL": "15s",
            "NAME": "acme",
            "HOST": "acme.example",
            "SECRET": "x",
            "USERS": "all",
        },
    )
    assert config.poll_interval == 15.0
    first, second = config.portals
    assert first.name == "acme-x"
    assert first.auth == WebhookAuth("https://acme.example/rest/1/x/")
    assert first.tasks.users == "all"
    assert isinstance(second.auth, WebhookAuth)
    assert second.auth.secret == "a${b}c"


def test_env_expansion_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit environ, os.environ is used."""
    monkeypatch.setenv("BX_TEST_WEBHOOK", HOOK)
    config = parse_config({"portals": [{"name": "a", "webhook": "${BX_TEST_WEBHOOK}"}]})
    assert config.portals[0].auth == WebhookAuth(HOOK)


def test_webhook_file_relative_to_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """webhook_file is read and stripped, relative to the config file's directory."""
    write(tmp_path, "etc/secrets/acme", f"\n  {HOOK}  \n")
    write(tmp_path, "etc/config.yaml", "portals: [{name: acme, webhook_file: secrets/acme}]\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/config.yaml", environ={})
    assert config.portals[0].auth == WebhookAuth(HOOK)


def test_oauth(tmp_path: Path) -> None:
    """An oauth block becomes OAuthAuth; the secret may come from a file; paths are anchored."""
    write(tmp_path, "oauth-secret", "file-secret\n")
    config = parse_config(
        {
            "portals": [
                {
                    "name": "a",
                    "oauth": {
                        "client_endpoint": "https://a.bitrix24.com/rest",
                        "client_id": "app.1",
                        "client_secret": "inline-secret",
                        "refresh_token": "refresh-1",
                        "state_file": "state/a.json",
                    },
                },
                {
                    "name": "b",
                    "oauth": {
                        "client_endpoint": "https://b.bitrix24.ru/rest/",
                        "client_id": "app.2",
                        "client_secret_file": "oauth-secret",
                        "state_file": "/var/lib/b.json",
                        "server": "https://oauth.bitrix24.tech",
                    },
                },
            ]
        },
        environ={},
        base_dir=tmp_path,
    )
    a, b = (portal.auth for portal in config.portals)
    assert a == OAuthAuth(
        client_endpoint="https://a.bitrix24.com/rest/",
        client_id="app.1",
        client_secret="inline-secret",
        refresh_token="refresh-1",
        state_file=str(tmp_path / "state/a.json"),
        server="https://oauth.bitrix.info/",
    )
    assert b == OAuthAuth(
        client_endpoint="https://b.bitrix24.ru/rest/",
        client_id="app.2",
        client_secret="file-secret",
        refresh_token=None,
        state_file="/var/lib/b.json",
        server="https://oauth.bitrix24.tech/",
    )


def test_portals_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each *.yaml / *.yml in portals_dir adds one portal, after the inline ones, by file name."""
    write(
        tmp_path,
        "config.yaml",
        f"portals_dir: portals.d\nportals: [{{name: main, webhook: '{HOOK}'}}]\n",
    )
    write(tmp_path, "portals.d/b.yml", "name: b\nwebhook_file: b.secret\n")
    write(tmp_path, "portals.d/b.secret", "http://b.local/rest/2/x/\n")
    write(tmp_path, "portals.d/a.yaml", "name: a\nwebhook: ${A_HOOK}\ntasks: {users: all}\n")
    write(tmp_path, "portals.d/notes.txt", "not a portal\n")
    write(tmp_path, "portals.d/.hidden.yaml", "broken: [\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("config.yaml", environ={"A_HOOK": "http://a.local/rest/1/y/"})
    assert [portal.name for portal in config.portals] == ["main", "a", "b"]
    assert config.portals[2].auth == WebhookAuth("http://b.local/rest/2/x/")
    assert config.portals[1].tasks.users == "all"
    assert config.portals_dir == "portals.d"


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """A `<<` merge copies a mapping's keys, and keys written beside it override them."""
    path = write(
        tmp_path,
        "config.yaml",
        f"""\
        portals:
          - &acme
            name: acme
            webhook: {HOOK}
            tasks: {{users: all, groups: [0, 7]}}
          - <<: *acme
            name: beta
        """,
    )
    acme, beta = load_config(path, environ={}).portals
    assert (acme.name, beta.name) == ("acme", "beta")
    assert beta.auth == acme.auth and beta.tasks == acme.tasks
    assert beta.tasks.groups == (0, 7)


def test_portals_dir_alone(tmp_path: Path) -> None:
    """portals_dir may supply every portal."""
    write(tmp_path, "p/a.yaml", f"name: a\nwebhook: {HOOK}\n")
    config = load_config(write(tmp_path, "c.yaml", "portals_dir: p\n"), environ={})
    assert [portal.name for portal in config.portals] == ["a"]


# --------------------------------------------------------------------------- secrets


def test_webhook_auth_parts() -> None:
    """WebhookAuth normalises the URL and exposes user id and secret."""
    auth = WebhookAuth("https://acme.bitrix24.com/rest/1/s3cr3t")
    assert auth.url == "https://acme.bitrix24.com/rest/1/s3cr3t/"
    assert auth.user_id == 1
    assert auth.secret == "s3cr3t"
    assert auth.redacted == "https://acme.bitrix24.com/rest/1/<secret>/"


def test_webhook_auth_rejects_bad_url_without_leaking() -> None:
    """Constructing WebhookAuth from a bad URL raises a ValueError that hides the secret."""
    with pytest.raises(ValueError) as caught:
        WebhookAuth(f"https://acme.bitrix24.com/rest/1/{SECRET}/profile")
    assert SECRET not in str(caught.value)
    assert "<secret>" in str(caught.value)


def test_no_secret_in_repr() -> None:
    """repr and str of the config objects never contain a secret."""
    config = parse_config(
        {
            "portals": [
                {
                    "name": "a",
                    "webhook": HOOK,
                    "im": {"webhooks": [f"https://acme.bitrix24.com/rest/2/{SECRET}x/"]},
                },
                {
                    "name": "b",
                    "oauth": {
                        "client_endpoint": "https://b/rest/",
                        "client_id": "app",
                        "client_secret": SECRET,
                        "refresh_token": SECRET + "r",
                        "state_file": "/s.json",
                    },
                },
            ]
        },
        environ={},
    )
    for text in (repr(config), str(config), str(config.portals[0].auth)):
        assert SECRET not in text
    assert str(config.portals[0].auth) == "https://acme.bitrix24.com/rest/1/<secret>/"


def test_alert_receivers(tmp_path: Path) -> None:
    """Receivers read every key, a chat may be a user id written as a number, and a receiver
    without a token is one check_receivers_protected reports unless basic auth protects all."""
    write(tmp_path, "alerts.token", "file-token-0123456789\n")
    config = parse_config(
        {
            "portals": [{"name": "acme", "webhook": HOOK}],
            "alert_receivers": [
                {"name": "ops", "portal": "acme", "token": "t" * 16, "chat": "sg7"},
                {
                    "name": "people",
                    "portal": "acme",
                    "token_file": "alerts.token",
                    "chat": 42,
                    "notify_user": True,
                    "notify_head": True,
                    "max_per_minute": 2,
                },
                {"name": "open", "portal": "acme", "notify_user": True},
            ],
        },
        source="c.yaml",
        environ={},
        base_dir=tmp_path,
    )
    ops, people, open_ = config.alert_receivers
    assert ops == AlertReceiver(name="ops", portal="acme", token="t" * 16, chat="sg7")
    assert (ops.notify_user, ops.notify_head, ops.max_per_minute) == (False, False, 6)
    assert people == AlertReceiver(
        name="people",
        portal="acme",
        token="file-token-0123456789",
        chat="42",
        notify_user=True,
        notify_head=True,
        max_per_minute=2,
    )
    assert open_.token is None and open_.chat is None
    assert "t" * 16 not in repr(config) and "file-token" not in repr(config)
    assert {"t" * 16, "file-token-0123456789"} <= set(config.secrets)
    assert check_receivers_protected(config, web_config_has_basic_auth=True) == []
    assert check_receivers_protected(config, web_config_has_basic_auth=False) == [
        "c.yaml: alert_receivers[2]: needs token or token_file, or basic_auth_users in the web"
        " config: otherwise anyone who reaches the exporter can post into Bitrix24"
    ]


def test_secrets_are_collected_and_hidden() -> None:
    """Config.secrets lists every secret the file holds (what log redaction is given), and
    none of them shows in repr."""
    key = SECRET + "-pseudonyms"
    config = parse_config(
        {
            "portals": [
                {
                    "name": "a",
                    "webhook": HOOK,
                    "im": {"webhooks": [f"https://acme.bitrix24.com/rest/2/{SECRET}x/"]},
                    "privacy": {"mode": "pseudonymous", "pseudonym_key": key},
                },
                {
                    "name": "b",
                    "oauth": {
                        "client_endpoint": "https://b/rest/",
                        "client_id": "app",
                        "client_secret": SECRET + "c",
                        "refresh_token": SECRET + "r",
                        "state_file": "/s.json",
                    },
                },
            ]
        },
        environ={},
    )
    assert sorted(config.secrets) == sorted([SECRET, SECRET + "x", key, SECRET + "c", SECRET + "r"])
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://a.bitrix24.com/rest/1/s3cr3t/", "https://a.bitrix24.com/rest/1/<secret>/"),
        ("https://a.bitrix24.com/rest/1/s3cr3t", "https://a.bitrix24.com/rest/1/<secret>"),
        ("https://a:8443/x/rest/12/s3cr3t/profile.json", "https://a:8443/x/rest/12/<secret>"),
        ("https://a/rest/1/", "https://a/rest/1/"),
        ("https://user:pw@a/rest/1/s3cr3t/?auth=s3cr3t#s3cr3t", "https://a/rest/1/<secret>/"),
        ("https://a.bitrix24.com/rest/s3cr3t/", "https://a.bitrix24.com/..."),
        ("http://a.bitrix24.com", "http://a.bitrix24.com"),
        ("http://a.bitrix24.com/", "http://a.bitrix24.com/"),
        ("a.bitrix24.com/rest/1/s3cr3t/", "a.bitrix24.com/rest/1/<secret>/"),
        ("s3cr3t", "<redacted>"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    """redact_url keeps scheme, host, port and user id and hides everything else."""
    assert redact_url(url) == redacted


# --------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        ("0s", 0.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (60, 60.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    """Durations accept ms/s/m/h units, combinations, and bare numbers of seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", f"{_DURATION}, got 'fast'"),
        ("", f"{_DURATION}, got ''"),
        ("5 m", f"{_DURATION}, got '5 m'"),
        ("1d", f"{_DURATION}, got '1d'"),
        ("-5s", f"{_DURATION}, got '-5s'"),
        (True, f"{_DURATION}, got true"),
        (None, f"{_DURATION}, got null"),
        ([1], f"{_DURATION}, got [1]"),
        (-1, "must not be negative, got -1"),
        (float("inf"), "must be a finite duration, got inf"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    """Anything else is a ValueError that says what is accepted and what was given."""
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == "duration " + message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9877", ("0.0.0.0", 9877)),
        ("localhost:0", ("localhost", 0)),
        (":9877", ("", 9877)),
        ("[::]:9877", ("::", 9877)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_parse_listen_address(value: str, expected: tuple[str, int]) -> None:
    """host:port splits into a host (empty: every interface) and a port."""
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize("value", ["9877", "0.0.0.0", "::1:9877", "host:99999", "host:port", ""])
def test_parse_listen_address_rejects(value: str) -> None:
    """Anything but host:port with a port up to 65535 is a ValueError."""
    with pytest.raises(ValueError, match="listen address"):
        parse_listen_address(value)


def test_roles() -> None:
    """The config and the fake portal know the five counter roles of the contract."""
    assert ROLES == fakeportal.ROLES == support.ROLES


# --------------------------------------------------------------------------- bad files

_KNOWN_TOP = (
    "listen_address, poll_interval, stale_after, request_timeout, user_refresh_interval, "
    "portals_dir, portals, alert_receivers"
)
_KNOWN_TASKS = "enabled, users, exclude_users, groups, roles"
_ROLE_LIST = ", ".join(ROLES)
_FORM = "(https://PORTAL/rest/USER_ID/SECRET/)"
_ONE_AUTH = "use exactly one of webhook, webhook_file or oauth"
_USERS_FORM = "must be self, all, a list of user ids or {departments: [ids]}"

BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    (
        "empty file",
        "",
        ["config.yaml: file is empty; it must be a mapping with a portals list"],
    ),
    (
        "comments only",
        "# nothing here\n",
        ["config.yaml: file is empty; it must be a mapping with a portals list"],
    ),
    (
        "top level is a list",
        "- name: acme\n",
        ["config.yaml: the top level must be a mapping, got a list of 1 items"],
    ),
    (
        "top level is a string",
        "portals\n",
        ["config.yaml: the top level must be a mapping, got 'portals'"],
    ),
    (
        "yaml syntax error",
        """\
        portals:
          - name: acme
           webhook: x
        """,
        [
            "config.yaml:3:4: invalid YAML: expected <block end>, but found "
            "'<block mapping start>' (while parsing a block collection)"
        ],
    ),
    (
        "duplicate key",
        f"""\
        portals:
          - name: acme
            webhook: {HOOK}
            name: beta
        """,
        ["config.yaml:4:5: invalid YAML: duplicate key 'name'"],
    ),
    (
        "an alias inside its own anchor",
        "portals: &p [*p]\n",
        ["config.yaml: nested too deeply, or an alias (*name) refers to its own anchor"],
    ),
    (
        "nesting too deep for the YAML parser",
        "portals: " + "[" * 2000 + "\n",
        ["config.yaml: invalid YAML: nested too deeply"],
    ),
    (
        "an integer too long for Python",
        "poll_interval: " + "9" * 5000 + "\n",
        ["config.yaml:1:16: invalid YAML: integer with too many digits"],
    ),
    (
        "a character YAML does not allow",
        'portals:\n  - name: "a\x00"\n',
        ["config.yaml:2:13: invalid YAML: character 0x0000 is not allowed"],
    ),
    (
        "no portals at all",
        "poll_interval: 30s\n",
        ["config.yaml: portals: at least one portal is required (portals or portals_dir)"],
    ),
    (
        "empty portals list",
        "portals: []\n",
        ["config.yaml: portals: at least one portal is required (portals or portals_dir), got []"],
    ),
    (
        "portals is not a list",
        "portals: {name: acme}\n",
        ["config.yaml: portals: must be a list of portals, got a mapping"],
    ),
    (
        "portal is not a mapping",
        "portals: [acme]\n",
        ["config.yaml: portals[0]: must be a portal mapping, got 'acme'"],
    ),
    (
        "unknown keys at every level",
        f"""\
        pol_interval: 30s
        portals:
          - name: acme
            webhook: {HOOK}
            task: {{}}
            tasks:
              role: [view_all]
            im:
              chat: true
            rate_limit: {{requests_per_second: 1, burst: 5, bursts: 6}}
        """,
        [
            f"config.yaml: pol_interval: unknown key (known: {_KNOWN_TOP})",
            "config.yaml: portals[0].task: unknown key (known: name, webhook, webhook_file, "
            "oauth, rate_limit, operating_limit, operating_window, tasks, im, teams, privacy)",
            f"config.yaml: portals[0].tasks.role: unknown key (known: {_KNOWN_TASKS})",
            "config.yaml: portals[0].im.chat: unknown key (known: enabled, webhooks, chats)",
            "config.yaml: portals[0].rate_limit.bursts: unknown key (known: requests_per_second, "
            "burst)",
        ],
    ),
    (
        "webhook with a method name",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}profile
          - name: b
            webhook: https://acme.bitrix24.com/rest/1/{SECRET}.json
          - name: c
            webhook: https://acme.bitrix24.com/rest/1/{SECRET}/tasks.task.counters.get.json
        """,
        [
            "config.yaml: portals[0].webhook: must end with the secret, without a method name "
            "such as /profile or .json, got 'https://acme.bitrix24.com/rest/1/<secret>'",
            "config.yaml: portals[1].webhook: must end with the secret, without a method name "
            "such as /profile or .json, got 'https://acme.bitrix24.com/rest/1/<secret>'",
            "config.yaml: portals[2].webhook: must end with the secret, without a method name "
            "such as /profile or .json, got 'https://acme.bitrix24.com/rest/1/<secret>'",
        ],
    ),
    (
        "webhook scheme, host, port, query",
        f"""\
        portals:
          - name: a
            webhook: ftp://acme.bitrix24.com/rest/1/{SECRET}/
          - name: b
            webhook: acme.bitrix24.com/rest/1/{SECRET}/
          - name: c
            webhook: https:///rest/1/{SECRET}/
          - name: d
            webhook: https://acme.bitrix24.com:http/rest/1/{SECRET}/
          - name: e
            webhook: https://acme.bitrix24.com/rest/1/{SECRET}/?auth={SECRET}
          - name: f
            webhook: https://admin:{SECRET}@acme.bitrix24.com/rest/1/{SECRET}/
        """,
        [
            f"config.yaml: portals[0].webhook: must start with http:// or https:// {_FORM}, "
            "got 'ftp://acme.bitrix24.com/rest/1/<secret>/'",
            f"config.yaml: portals[1].webhook: must start with http:// or https:// {_FORM}, "
            "got 'acme.bitrix24.com/rest/1/<secret>/'",
            f"config.yaml: portals[2].webhook: must include a host {_FORM}, "
            "got 'https:///rest/1/<secret>/'",
            "config.yaml: portals[3].webhook: has an invalid port, "
            "got 'https://acme.bitrix24.com:http/rest/1/<secret>/'",
            "config.yaml: portals[4].webhook: must not have a query string or fragment, "
            "got 'https://acme.bitrix24.com/rest/1/<secret>/'",
            "config.yaml: portals[5].webhook: must not contain a user name or password before "
            "the host, got 'https://acme.bitrix24.com/rest/1/<secret>/'",
        ],
    ),
    (
        "webhook path",
        f"""\
        portals:
          - name: a
            webhook: https://acme.bitrix24.com/rest/0/{SECRET}/
          - name: b
            webhook: https://acme.bitrix24.com/rest/admin/{SECRET}/
          - name: c
            webhook: https://acme.bitrix24.com/rest/1/
          - name: d
            webhook: https://acme.bitrix24.com/{SECRET}/
          - name: e
            webhook: 42
        """,
        [
            "config.yaml: portals[0].webhook: user id in /rest/<user id>/ must be a positive "
            "integer, got 'https://acme.bitrix24.com/rest/0/<secret>/'",
            "config.yaml: portals[1].webhook: user id in /rest/<user id>/ must be a positive "
            "integer, got 'https://acme.bitrix24.com/...'",
            "config.yaml: portals[2].webhook: path must end in /rest/<user id>/<secret>/ "
            f"{_FORM}, got 'https://acme.bitrix24.com/rest/1/'",
            "config.yaml: portals[3].webhook: path must end in /rest/<user id>/<secret>/ "
            f"{_FORM}, got 'https://acme.bitrix24.com/...'",
            "config.yaml: portals[4].webhook: must be a webhook URL like "
            "https://PORTAL/rest/USER_ID/SECRET/, got an integer",
        ],
    ),
    (
        "credentials: none, two, three",
        f"""\
        portals:
          - name: a
          - name: b
            webhook: {HOOK}
            webhook_file: /run/secrets/b
          - name: c
            oauth: {{}}
            webhook: {HOOK}
            webhook_file: /run/secrets/c
        """,
        [
            "config.yaml: portals[0]: one of webhook, webhook_file or oauth is required",
            f"config.yaml: portals[1].webhook_file: cannot be combined with webhook; {_ONE_AUTH}",
            "config.yaml: portals[1].webhook_file: cannot read file (No such file or directory), "
            "got '/run/secrets/b'",
            "config.yaml: portals[2].oauth: one of client_secret or client_secret_file is required",
            "config.yaml: portals[2].oauth.client_endpoint: is required",
            "config.yaml: portals[2].oauth.client_id: is required",
            "config.yaml: portals[2].oauth.state_file: is required",
            f"config.yaml: portals[2].webhook: cannot be combined with oauth; {_ONE_AUTH}",
            f"config.yaml: portals[2].webhook_file: cannot be combined with oauth; {_ONE_AUTH}",
            "config.yaml: portals[2].webhook_file: cannot read file (No such file or directory), "
            "got '/run/secrets/c'",
        ],
    ),
    (
        "webhook_file missing, empty, bad content",
        """\
        portals:
          - name: a
            webhook_file: secrets/missing
          - name: b
            webhook_file: empty.secret
          - name: c
            webhook_file: bad.secret
          - name: d
            webhook_file: [x]
        """,
        [
            "config.yaml: portals[0].webhook_file: cannot read file (No such file or directory), "
            "got 'secrets/missing'",
            "config.yaml: portals[1].webhook_file: file is empty, got 'empty.secret'",
            "config.yaml: portals[2].webhook_file: must end with the secret, without a method "
            "name such as /profile or .json, got 'https://acme.bitrix24.com/rest/1/<secret>/'",
            "config.yaml: portals[3].webhook_file: must be a file path, got ['x']",
        ],
    ),
    (
        "environment variables",
        """\
        listen_address: ${LISTEN}
        portals:
          - name: ${PORTAL_NAME}
            webhook: https://acme.bitrix24.com/rest/1/${ACME_SECRET}/
            tasks:
              users: [1, "${USER_TWO}"]
              roles: ["${bad-name}"]
        """,
        [
            "config.yaml: listen_address: environment variable LISTEN is not set",
            "config.yaml: portals[0].name: environment variable PORTAL_NAME is not set",
            "config.yaml: portals[0].webhook: environment variable ACME_SECRET is not set",
            "config.yaml: portals[0].tasks.users[1]: environment variable USER_TWO is not set",
            "config.yaml: portals[0].tasks.roles[0]: invalid environment variable name "
            "'bad-name' in ${...}",
        ],
    ),
    (
        "portal names",
        f"""\
        portals:
          - name: acme corp
            webhook: {HOOK}
          - name: beta
            webhook: {HOOK}
          - name: beta
            webhook: {HOOK}
          - name: 7
            webhook: {HOOK}
          - webhook: {HOOK}
        """,
        [
            "config.yaml: portals[0].name: must match [a-zA-Z0-9_.-]+, got 'acme corp'",
            "config.yaml: portals[2].name: duplicate portal name (also used by portals[1]), "
            "got 'beta'",
            "config.yaml: portals[3].name: must match [a-zA-Z0-9_.-]+, got 7",
            "config.yaml: portals[4].name: is required",
        ],
    ),
    (
        "rate limits",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}
            rate_limit: premium
          - name: b
            webhook: {HOOK}
            rate_limit: {{requests_per_second: 0, burst: 0.5}}
          - name: c
            webhook: {HOOK}
            rate_limit: {{burst: 10}}
          - name: d
            webhook: {HOOK}
            rate_limit: 5
          - name: e
            webhook: {HOOK}
            rate_limit: {{requests_per_second: true, burst: true}}
        """,
        [
            "config.yaml: portals[0].rate_limit: must be standard, enterprise or a mapping with "
            "requests_per_second and burst, got 'premium'",
            "config.yaml: portals[1].rate_limit.requests_per_second: must be a number greater "
            "than 0, got 0",
            "config.yaml: portals[1].rate_limit.burst: must be an integer of 1 or more, got 0.5",
            "config.yaml: portals[2].rate_limit.requests_per_second: is required",
            "config.yaml: portals[3].rate_limit: must be standard, enterprise or a mapping with "
            "requests_per_second and burst, got 5",
            "config.yaml: portals[4].rate_limit.requests_per_second: must be a number greater "
            "than 0, got true",
            "config.yaml: portals[4].rate_limit.burst: must be an integer of 1 or more, got true",
        ],
    ),
    (
        "durations",
        f"""\
        poll_interval: fast
        request_timeout: 0
        user_refresh_interval: -10
        portals:
          - name: a
            webhook: {HOOK}
            operating_limit: 8 min
        """,
        [
            f"config.yaml: poll_interval: {_DURATION}, got 'fast'",
            "config.yaml: request_timeout: must be a positive duration, got 0",
            "config.yaml: user_refresh_interval: must not be negative, got -10",
            f"config.yaml: portals[0].operating_limit: {_DURATION}, got '8 min'",
        ],
    ),
    (
        "stale_after shorter than poll_interval",
        f"""\
        poll_interval: 2m
        stale_after: 90s
        portals: [{{name: a, webhook: "{HOOK}"}}]
        """,
        ["config.yaml: stale_after: must be at least poll_interval (120s), got '90s'"],
    ),
    (
        "stale_after shorter than the default poll_interval",
        f"""\
        stale_after: 30s
        portals: [{{name: a, webhook: "{HOOK}"}}]
        """,
        ["config.yaml: stale_after: must be at least poll_interval (60s), got '30s'"],
    ),
    (
        "listen address",
        f"""\
        listen_address: 9877
        portals: [{{name: a, webhook: "{HOOK}"}}]
        """,
        [
            "config.yaml: listen_address: must be host:port like 0.0.0.0:9877, [::]:9877 or "
            ":9877, got 9877"
        ],
    ),
    (
        "task users",
        f"""\
        portals:
          - {{name: a, webhook: "{HOOK}", tasks: {{users: everyone}}}}
          - {{name: b, webhook: "{HOOK}", tasks: {{users: []}}}}
          - {{name: c, webhook: "{HOOK}", tasks: {{users: [abc, 0, -3, true, 5, 5, 1.5]}}}}
          - {{name: d, webhook: "{HOOK}", tasks: {{users: 5, exclude_users: 5}}}}
          - {{name: e, webhook: "{HOOK}", tasks: {{exclude_users: [0, x]}}}}
        """,
        [
            f"config.yaml: portals[0].tasks.users: {_USERS_FORM}, got 'everyone'",
            "config.yaml: portals[1].tasks.users: must not be empty (use self or all), got []",
            "config.yaml: portals[2].tasks.users[0]: must be a positive integer, got 'abc'",
            "config.yaml: portals[2].tasks.users[1]: must be a positive integer, got 0",
            "config.yaml: portals[2].tasks.users[2]: must be a positive integer, got -3",
            "config.yaml: portals[2].tasks.users[3]: must be a positive integer, got true",
            "config.yaml: portals[2].tasks.users[5]: is listed twice, got 5",
            "config.yaml: portals[2].tasks.users[6]: must be a positive integer, got 1.5",
            f"config.yaml: portals[3].tasks.users: {_USERS_FORM}, got 5",
            "config.yaml: portals[3].tasks.exclude_users: must be a list of user ids, got 5",
            "config.yaml: portals[4].tasks.exclude_users[0]: must be a positive integer, got 0",
            "config.yaml: portals[4].tasks.exclude_users[1]: must be a positive integer, got 'x'",
        ],
    ),
    (
        "task users by department",
        f"""\
        portals:
          - {{name: a, webhook: "{HOOK}", tasks: {{users: {{departments: []}}}}}}
          - {{name: b, webhook: "{HOOK}", tasks: {{users: {{departments: [5, 0, x, 5]}}}}}}
          - {{name: c, webhook: "{HOOK}", tasks: {{users: {{department: [5]}}}}}}
          - {{name: d, webhook: "{HOOK}", tasks: {{users: {{departments: 5}}}}}}
        """,
        [
            "config.yaml: portals[0].tasks.users.departments: must not be empty, got []",
            "config.yaml: portals[1].tasks.users.departments[1]: must be a positive integer, got 0",
            "config.yaml: portals[1].tasks.users.departments[2]: must be a positive integer, "
            "got 'x'",
            "config.yaml: portals[1].tasks.users.departments[3]: is listed twice, got 5",
            "config.yaml: portals[2].tasks.users.departments: is required",
            "config.yaml: portals[2].tasks.users.department: unknown key (known: departments)",
            "config.yaml: portals[3].tasks.users.departments: must be a list of department ids, "
            "got 5",
        ],
    ),
    (
        "teams and privacy",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}
            privacy: {{mode: aggregate}}
          - name: b
            webhook: {HOOK}
            teams: {{enabled: true}}
            privacy: {{mode: pseudonymous}}
          - name: c
            webhook: {HOOK}
            privacy: {{mode: none, pseudonym_key: {SECRET}-long-enough}}
          - name: d
            webhook: {HOOK}
            teams: {{enabled: yes please, departments: true}}
            privacy: {{mode: anonymous, min_team_size: 2, pseudonym_key: {SECRET}-long-enough}}
          - name: e
            webhook: {HOOK}
            privacy:
              mode: pseudonymous
              pseudonym_key: {SECRET}
              pseudonym_key_file: /run/secrets/pseudonyms
          - name: f
            webhook: {HOOK}
            privacy: {{mode: pseudonymous, pseudonym_key_file: empty.secret}}
          - name: g
            webhook: {HOOK}
            privacy: {{mode: aggregate, pseudonym_key: ["{SECRET}"], min_team_size: 3}}
            teams: {{enabled: true}}
        """,
        [
            "config.yaml: portals[0].privacy.mode: aggregate needs teams.enabled: true, "
            "got 'aggregate'",
            "config.yaml: portals[1].privacy.pseudonym_key: is required when mode is "
            "pseudonymous (or pseudonym_key_file)",
            "config.yaml: portals[2].privacy.pseudonym_key: is only used when mode is "
            "pseudonymous (mode is none)",
            "config.yaml: portals[3].teams.enabled: must be true or false, got 'yes please'",
            "config.yaml: portals[3].teams.departments: unknown key (known: enabled)",
            "config.yaml: portals[3].privacy.mode: must be one of none, pseudonymous, aggregate, "
            "got 'anonymous'",
            "config.yaml: portals[3].privacy.min_team_size: must be an integer of 3 or more, got 2",
            "config.yaml: portals[4].privacy.pseudonym_key: must be a key of at least 16 "
            "characters, got 11",
            "config.yaml: portals[4].privacy.pseudonym_key_file: cannot be combined with "
            "pseudonym_key; use at most one of pseudonym_key or pseudonym_key_file",
            "config.yaml: portals[4].privacy.pseudonym_key_file: cannot read file (No such file "
            "or directory), got '/run/secrets/pseudonyms'",
            "config.yaml: portals[5].privacy.pseudonym_key_file: file is empty, got 'empty.secret'",
            "config.yaml: portals[6].privacy.pseudonym_key: must be a non-empty string, got a list",
        ],
    ),
    (
        "alert receivers",
        f"""\
        portals:
          - {{name: acme, webhook: "{HOOK}"}}
          - {{name: beta, webhook: "{HOOK}"}}
        alert_receivers:
          - name: ops
            portal: acme
            token: {SECRET}-alerts
            chat: chat42
          - name: ops
            portal: gamma
            token: {SECRET}
            notify_user: true
          - name: on call
            portal: acme
            token_file: /run/secrets/alerts
            chat: group7
            max_per_minute: 0
          - name: quiet
            portal: beta
            token: ["{SECRET}"]
          - portal: acme
            chat: 0
            notify_head: "no"
            max_per_minute: 61
          - name: idle
            portal: acme
            token: {SECRET}-alerts
        """,
        [
            "config.yaml: alert_receivers[1].name: duplicate receiver name (also used by "
            "alert_receivers[0]), got 'ops'",
            "config.yaml: alert_receivers[1].portal: must name a portal (acme, beta), got 'gamma'",
            "config.yaml: alert_receivers[1].token: must be a token of at least 16 characters, "
            "got 11",
            "config.yaml: alert_receivers[2].name: must match [a-zA-Z0-9_.-]+, got 'on call'",
            "config.yaml: alert_receivers[2].token_file: cannot read file (No such file or "
            "directory), got '/run/secrets/alerts'",
            "config.yaml: alert_receivers[2].chat: must be a chat like chat42, a workgroup's "
            "chat like sg7, or a user id, got 'group7'",
            "config.yaml: alert_receivers[2].max_per_minute: must be an integer from 1 to 60, "
            "got 0",
            "config.yaml: alert_receivers[3]: needs a target: chat, notify_user: true or "
            "notify_head: true",
            "config.yaml: alert_receivers[3].token: must be a non-empty string, got a list",
            "config.yaml: alert_receivers[4].name: is required",
            "config.yaml: alert_receivers[4].chat: must be a chat like chat42, a workgroup's "
            "chat like sg7, or a user id, got 0",
            "config.yaml: alert_receivers[4].notify_head: must be true or false, got 'no'",
            "config.yaml: alert_receivers[4].max_per_minute: must be an integer from 1 to 60, "
            "got 61",
            "config.yaml: alert_receivers[5]: needs a target: chat, notify_user: true or "
            "notify_head: true",
        ],
    ),
    (
        "alert receivers of the wrong shape",
        f"""\
        portals: [{{name: acme, webhook: "{HOOK}"}}]
        alert_receivers: {{name: ops}}
        """,
        ["config.yaml: alert_receivers: must be a list of receivers, got a mapping"],
    ),
    (
        "task groups and roles",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}
            tasks:
              groups: [0, -1, "7", 0]
              roles: [view_all, owner, view_all]
          - name: b
            webhook: {HOOK}
            tasks: {{groups: [], roles: []}}
          - name: c
            webhook: {HOOK}
            tasks: {{groups: 0, roles: view_all}}
        """,
        [
            "config.yaml: portals[0].tasks.groups[1]: must be an integer of 0 or more, got -1",
            "config.yaml: portals[0].tasks.groups[2]: must be an integer of 0 or more, got '7'",
            "config.yaml: portals[0].tasks.groups[3]: is listed twice, got 0",
            f"config.yaml: portals[0].tasks.roles[1]: must be one of {_ROLE_LIST}, got 'owner'",
            "config.yaml: portals[0].tasks.roles[2]: is listed twice, got 'view_all'",
            "config.yaml: portals[1].tasks.groups: must not be empty (0 means all groups), got []",
            f"config.yaml: portals[1].tasks.roles: must be a non-empty list of roles from "
            f"{_ROLE_LIST}, got []",
            "config.yaml: portals[2].tasks.groups: must be a list of group ids (0 means all "
            "groups), got 0",
            f"config.yaml: portals[2].tasks.roles: must be a non-empty list of roles from "
            f"{_ROLE_LIST}, got 'view_all'",
        ],
    ),
    (
        "booleans and sections of the wrong type",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}
            tasks: {{enabled: "true"}}
            im: {{enabled: 1, chats: "no"}}
          - name: b
            webhook: {HOOK}
            tasks: true
            im: [enabled]
        """,
        [
            "config.yaml: portals[0].tasks.enabled: must be true or false, got 'true'",
            "config.yaml: portals[0].im.enabled: must be true or false, got 1",
            "config.yaml: portals[0].im.chats: must be true or false, got 'no'",
            "config.yaml: portals[1].tasks: must be a mapping, got true",
            "config.yaml: portals[1].im: must be a mapping, got ['enabled']",
        ],
    ),
    (
        "im webhooks",
        f"""\
        portals:
          - name: a
            webhook: {HOOK}
            im:
              webhooks:
                - https://acme.bitrix24.com/rest/5/{SECRET}/
                - https://acme.bitrix24.com/rest/5/{SECRET}x
                - https://acme.bitrix24.com/rest/6/{SECRET}/im.counters.get
                - {{url: x}}
          - name: b
            webhook: {HOOK}
            im: {{webhooks: https://acme.bitrix24.com/rest/7/{SECRET}/}}
        """,
        [
            "config.yaml: portals[0].im.webhooks[1]: user 5 already has a webhook in this list, "
            "got 'https://acme.bitrix24.com/rest/5/<secret>/'",
            "config.yaml: portals[0].im.webhooks[2]: must end with the secret, without a method "
            "name such as /profile or .json, got 'https://acme.bitrix24.com/rest/6/<secret>'",
            "config.yaml: portals[0].im.webhooks[3]: must be a webhook URL like "
            "https://PORTAL/rest/USER_ID/SECRET/, got a mapping",
            "config.yaml: portals[1].im.webhooks: must be a list of webhook URLs, got a string",
        ],
    ),
    (
        "oauth values",
        f"""\
        portals:
          - name: a
            oauth:
              client_endpoint: https://acme.bitrix24.com/
              client_id: ""
              client_secret: 12345
              client_secret_file: /run/secrets/a
              refresh_token: [{SECRET}]
              state_file: 5
              server: oauth.bitrix.info
        """,
        [
            "config.yaml: portals[0].oauth.client_endpoint: must be the portal's REST base, "
            "like https://PORTAL/rest/, got 'https://acme.bitrix24.com/'",
            "config.yaml: portals[0].oauth.client_id: must be a non-empty string, got ''",
            "config.yaml: portals[0].oauth.client_secret: must be a non-empty string, "
            "got an integer",
            "config.yaml: portals[0].oauth.client_secret_file: cannot be combined with "
            "client_secret; use exactly one of client_secret or client_secret_file",
            "config.yaml: portals[0].oauth.client_secret_file: cannot read file (No such file or "
            "directory), got '/run/secrets/a'",
            "config.yaml: portals[0].oauth.refresh_token: must be a non-empty string, got a list",
            "config.yaml: portals[0].oauth.state_file: must be a non-empty string, got 5",
            "config.yaml: portals[0].oauth.server: must be an http:// or https:// URL with a "
            "host, got 'oauth.bitrix.info'",
        ],
    ),
    (
        "many problems in one file, listed in document order",
        f"""\
        listen_address: nowhere
        poll_interval: 1m
        stale_after: 10s
        portals:
          - name: acme
            webhook: {HOOK}profile
            tasks:
              users: [abc]
              roles: [owner]
          - name: acme
            webhook: ${{BETA_WEBHOOK}}
            rate_limit: turbo
        portals_dir: /nonexistent/portals.d
        """,
        [
            "config.yaml: listen_address: must be host:port like 0.0.0.0:9877, [::]:9877 or "
            ":9877, got 'nowhere'",
            "config.yaml: stale_after: must be at least poll_interval (60s), got '10s'",
            "config.yaml: portals[0].webhook: must end with the secret, without a method name "
            "such as /profile or .json, got 'https://acme.bitrix24.com/rest/1/<secret>'",
            "config.yaml: portals[0].tasks.users[0]: must be a positive integer, got 'abc'",
            f"config.yaml: portals[0].tasks.roles[0]: must be one of {_ROLE_LIST}, got 'owner'",
            "config.yaml: portals[1].name: duplicate portal name (also used by portals[0]), "
            "got 'acme'",
            "config.yaml: portals[1].webhook: environment variable BETA_WEBHOOK is not set",
            "config.yaml: portals[1].rate_limit: must be standard, enterprise or a mapping with "
            "requests_per_second and burst, got 'turbo'",
            "config.yaml: portals_dir: cannot read directory (No such file or directory), "
            "got '/nonexistent/portals.d'",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in BAD_CONFIGS],
)
def test_bad_config(
    text: str, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bad file fails with exactly the listed problems, in document order."""
    write(tmp_path, "empty.secret", "\n")
    write(tmp_path, "bad.secret", f"{HOOK}profile/\n")
    write(tmp_path, "config.yaml", text)
    monkeypatch.chdir(tmp_path)
    problems = load_problems("config.yaml")
    # Checked first, so that a leak fails here without the secret in an assertion diff.
    assert not [line for line in problems if SECRET in line], "a problem shows the secret"
    assert problems == expected


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config file that cannot be read is one problem naming it."""
    monkeypatch.chdir(tmp_path)
    assert load_problems("nope.yaml") == ["nope.yaml: cannot read file (No such file or directory)"]


def test_portals_dir_problems_name_their_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Problems in portals_dir files name that file and key paths inside it, after the main file."""
    write(tmp_path, "config.yaml", f"portals_dir: p\nportals: [{{name: a, webhook: '{HOOK}'}}]\n")
    write(tmp_path, "p/1.yaml", f"name: a\nwebhook: {HOOK}\n")
    write(tmp_path, "p/2.yaml", f"name: b\nwebhook: {HOOK}x/profile\ntasks: {{users: [0]}}\n")
    write(tmp_path, "p/3.yml", "name: c\n  webhook: x\n")
    write(tmp_path, "p/4.yaml", "")
    write(tmp_path, "p/5.yaml", "- name: e\n")
    write(tmp_path, "p/6.yaml", f"name: a\nwebhook: {HOOK}\n")
    monkeypatch.chdir(tmp_path)
    problems = load_problems("config.yaml")
    assert problems == [
        "p/1.yaml: name: duplicate portal name (also used by portals[0]), got 'a'",
        "p/2.yaml: webhook: must end with the secret, without a method name such as /profile "
        "or .json, got 'https://acme.bitrix24.com/rest/1/<secret>'",
        "p/2.yaml: tasks.users[0]: must be a positive integer, got 0",
        "p/3.yml:2:10: invalid YAML: mapping values are not allowed here",
        "p/4.yaml: file is empty; it must be one portal mapping",
        "p/5.yaml: must be a portal mapping, got a list of 1 items",
        "p/6.yaml: name: duplicate portal name (also used by portals[0]), got 'a'",
    ]
    assert not any(SECRET in line for line in problems)


def test_parse_config_collects_without_a_file() -> None:
    """parse_config reports against the given source and raises one ConfigError for all."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"portals": [{"name": "a"}], "poll_interval": "x"}, source="inline")
    assert caught.value.problems == [
        "inline: portals[0]: one of webhook, webhook_file or oauth is required",
        f"inline: poll_interval: {_DURATION}, got 'x'",
    ]

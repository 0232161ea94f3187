"""Property-based tests: whatever Bitrix24 or a config file says, the exporter never crashes.

Arbitrary JSON (wrong types, missing keys, `[]` for objects, huge numbers, numbers as
strings, unicode, lone surrogates from `\\ud800` escapes) goes into every mapping function,
into a whole poll cycle over real HTTP, and arbitrary data and YAML into the config parser.
What may come out is a typed error (`PayloadError`, `NoAccess`, `ConfigError`) or a clean
result; a snapshot always renders to exposition that prometheus_client's parsers accept, and
the renderer agrees with prometheus_client's own `generate_latest` sample for sample.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import fakeportal, metrics
from exporter.bitrix import OPERATING_WINDOW, ClientStats, RetryPolicy, new_session, php_query
from exporter.config import ConfigError, load_config, parse_config
from exporter.mapping import (
    NoAccess,
    PayloadError,
    Sample,
    im_counter_samples,
    parse_profile,
    parse_users,
    task_counter_samples,
    to_number,
    to_user_id,
)
from exporter.poller import PortalPoller
from exporter.render import ExporterInfo, assemble, portal_blocks
from exporter.snapshot import PortalSnapshot, Status
from exporter.sources.im import METHOD as IM_METHOD
from exporter.sources.tasks import METHOD as TASKS_METHOD
from tests.support import portal_config, register_secret

# ---- arbitrary JSON, as it could arrive on the wire --------------------------------------

HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1, -(2**63) - 1])
NUMERIC_TEXT = st.from_regex(r"\A\s*[-+]?\d{1,30}(\.\d{1,10})?([eE][-+]?\d{1,4})?\s*\Z")
ODD_TEXT = st.sampled_from(
    ["", " ", "NaN", "inf", "-Infinity", "1e999", "²", "١٢", "0x1F", "1_000", "\ud800", "\udfff"]
)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.one_of(st.characters(), SURROGATE), max_size=6),
    st.sampled_from(['"', "\\", "\n", '\\"\n', "}", "{", "=", ",", " "]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    NUMERIC_TEXT,
    ODD_TEXT,
)
KEYS = st.one_of(
    TEXT,
    st.sampled_from(
        ["ID", "ADMIN", "NAME", "LAST_NAME", "TYPE", "CHAT", "DIALOG", "LINES", "ALL", "NOTIFY"]
    ),
    st.sampled_from(["counter", "code", "expired", "new_comments", "0", "1", "result"]),
    st.sampled_from(["\ud800", "ex\udfffpired", "имя", "\x00", 'a"b\\c\nd']),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4), st.just([])
    ),
    max_leaves=16,
)


def wire(value: object) -> Any:
    """What the exporter decodes after the value went through JSON (as a real body would)."""
    return json.loads(json.dumps(value))


NUMBERISH = st.one_of(
    st.integers(-5, 10**6), st.floats(allow_nan=True), NUMERIC_TEXT, ODD_TEXT, HUGE, JSON
)
TASKS_RESULT = st.one_of(
    JSON,
    st.dictionaries(
        KEYS,
        st.one_of(
            JSON, st.fixed_dictionaries({}, optional={"counter": NUMBERISH, "code": SCALARS})
        ),
        max_size=5,
    ),
)
IM_RESULT = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "TYPE": st.one_of(JSON, st.dictionaries(KEYS, NUMBERISH, max_size=5)),
            "CHAT": st.one_of(JSON, st.dictionaries(KEYS, NUMBERISH, max_size=4)),
            "DIALOG": st.one_of(JSON, st.dictionaries(KEYS, NUMBERISH, max_size=4)),
            "CHANNEL_COMMENT": st.dictionaries(
                KEYS, st.dictionaries(KEYS, NUMBERISH, max_size=3), max_size=3
            ),
            "CHAT_UNREAD": JSON,
        },
    ),
)
PROFILE_RESULT = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "ID": st.one_of(st.integers(1, 10**6).map(str), NUMBERISH),
            "ADMIN": st.one_of(st.booleans(), SCALARS),
            "NAME": SCALARS,
            "LAST_NAME": SCALARS,
        },
    ),
)
USERS_RESULT = st.one_of(JSON, st.lists(PROFILE_RESULT, max_size=5))

MAPPING_SETTINGS = settings(max_examples=200, deadline=None)


def check_samples(samples: list[Sample]) -> None:
    for sample in samples:
        assert isinstance(sample.value, float) and math.isfinite(sample.value)
        assert len(sample.labels) == len(sample.family.labels)
        assert all(isinstance(label, str) for label in sample.labels)


# ---- the mapping functions -----------------------------------------------------------------


@MAPPING_SETTINGS
@given(result=TASKS_RESULT)
def test_task_counters_never_crash(result: object) -> None:
    """Any tasks.task.counters.get result maps to finite samples or a typed error."""
    try:
        samples = task_counter_samples("acme", 7, 0, "view_all", wire(result))
    except (PayloadError, NoAccess):
        return
    check_samples(samples)
    # A plain integer counter is always taken, with its value.
    for name, entry in wire(result).items():
        counter = entry.get("counter") if isinstance(entry, dict) else None
        if type(counter) is int and abs(counter) < 2**53:
            assert any(s.labels[4] == str(name) and s.value == counter for s in samples)


@MAPPING_SETTINGS
@given(result=IM_RESULT, chats=st.booleans())
def test_im_counters_never_crash(result: object, chats: bool) -> None:
    """Any im.counters.get result maps to finite samples or a PayloadError."""
    try:
        samples = im_counter_samples("acme", 7, wire(result), chats=chats)
    except PayloadError:
        return
    check_samples(samples)
    assert chats or all(s.family is metrics.IM_UNREAD for s in samples)


@MAPPING_SETTINGS
@given(result=PROFILE_RESULT)
def test_profile_never_crashes(result: object) -> None:
    """Any profile result is a Profile with a positive id, or a typed error."""
    try:
        profile = parse_profile(wire(result))
    except (PayloadError, NoAccess):
        return
    assert profile.user_id > 0 and isinstance(profile.admin, bool)
    assert isinstance(profile.name, str)


@MAPPING_SETTINGS
@given(result=USERS_RESULT)
def test_users_never_crash(result: object) -> None:
    """Any user.get page is a list of records with positive ids, or a PayloadError."""
    try:
        users = parse_users(wire(result))
    except PayloadError:
        return
    assert all(u.user_id > 0 and isinstance(u.name, str) for u in users)


@MAPPING_SETTINGS
@given(value=NUMBERISH)
def test_numbers_and_ids_are_total(value: object) -> None:
    """to_number and to_user_id answer a finite number, a positive int or None, never raise."""
    number = to_number(wire(value))
    assert number is None or (isinstance(number, float) and math.isfinite(number))
    user_id = to_user_id(wire(value))
    assert user_id is None or (type(user_id) is int and user_id > 0)


# ---- the config parser ---------------------------------------------------------------------

CONFIG_SECRET = "c0nf1gs3cr3tt0k3n"
register_secret(CONFIG_SECRET)
SOURCE = "fuzz.yaml"

# Paths stay relative names that do not exist, so the parser never wanders the file system.
PATHS = st.one_of(
    st.sampled_from(["missing.txt", "no/such/file", "state.json", "", "a\x00b", "~nosuchuser/x"]),
    SCALARS.filter(lambda v: not isinstance(v, str) or not v.startswith(("/", "~", ".."))),
)
WEBHOOKS = st.one_of(
    st.sampled_from(
        [
            f"https://acme.bitrix24.com/rest/1/{CONFIG_SECRET}/",
            f"http://127.0.0.1:1/rest/7/{CONFIG_SECRET}",
            f"ftp://acme/rest/1/{CONFIG_SECRET}/",
            f"https://acme.bitrix24.com/rest/x/{CONFIG_SECRET}/",
            f"https:///rest/1/{CONFIG_SECRET}/",
            f"https://acme.bitrix24.com/rest/²/{CONFIG_SECRET}/",
            f"https://acme.bitrix24.com/rest/{'9' * 5000}/{CONFIG_SECRET}/",
            "${ACME_WEBHOOK}",
            "${MISSING}",
            "$${ESCAPED}",
        ]
    ),
    SCALARS,
    JSON,
)
DURATIONS = st.one_of(
    st.sampled_from(["500ms", "1s", "30s", "5m", "1h30m", "0", "-1s", "1e999", "s", "${POLL}"]),
    SCALARS,
)
TASKS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "enabled": SCALARS,
            "users": st.one_of(st.sampled_from(["self", "all"]), st.lists(SCALARS), SCALARS),
            "exclude_users": st.one_of(st.lists(SCALARS), SCALARS),
            "groups": st.one_of(st.lists(st.integers(-2, 9)), JSON),
            "roles": st.one_of(
                st.lists(st.sampled_from(["view_all", "view_role_auditor", "boss"])), JSON
            ),
            "junk": SCALARS,
        },
    ),
)
OAUTH = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "client_endpoint": st.one_of(st.just("https://acme.bitrix24.com/rest/"), SCALARS),
            "client_id": SCALARS,
            "client_secret": st.one_of(st.just(CONFIG_SECRET), SCALARS),
            "client_secret_file": PATHS,
            "refresh_token": st.one_of(st.just(CONFIG_SECRET), SCALARS),
            "state_file": PATHS,
            "server": SCALARS,
        },
    ),
)
PORTAL = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(st.sampled_from(["acme", "b.2", "bad name", ""]), SCALARS),
            "webhook": WEBHOOKS,
            "webhook_file": PATHS,
            "oauth": OAUTH,
            "rate_limit": st.one_of(
                st.sampled_from(["standard", "enterprise", "huge"]),
                st.fixed_dictionaries(
                    {}, optional={"requests_per_second": SCALARS, "burst": SCALARS}
                ),
                JSON,
            ),
            "operating_limit": DURATIONS,
            "tasks": TASKS,
            "im": st.one_of(
                JSON,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "enabled": SCALARS,
                        "webhooks": st.one_of(st.lists(WEBHOOKS, max_size=3), JSON),
                        "chats": SCALARS,
                    },
                ),
            ),
            "surprise": SCALARS,
        },
    ),
)
CONFIG = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "listen_address": st.one_of(
                st.sampled_from([":9877", "[::]:1", "x:y", ":١٢", ":" + "9" * 5000]), SCALARS
            ),
            "poll_interval": DURATIONS,
            "stale_after": DURATIONS,
            "request_timeout": DURATIONS,
            "user_refresh_interval": DURATIONS,
            "portals_dir": PATHS,
            "portals": st.one_of(st.lists(PORTAL, max_size=3), JSON),
            "unknown_key": SCALARS,
        },
    ),
)
ENVIRON = {
    "ACME_WEBHOOK": f"https://acme.bitrix24.com/rest/1/{CONFIG_SECRET}/",
    "POLL": "30s",
}


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


def assert_config_error(error: ConfigError, source: str) -> None:
    assert error.problems, "a ConfigError without a problem"
    for line in error.problems:
        assert line.startswith(source), line
        assert "\n" not in line, line
        assert CONFIG_SECRET not in line, line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CONFIG)
# At least one good mapping every run, so that the success path is always checked.
@example(data={"portals": [{"name": "acme", "webhook": "${ACME_WEBHOOK}"}]})
def test_config_data_gives_a_config_or_config_error(data: object, empty_dir: Path) -> None:
    """Any mapping is a Config or a ConfigError whose every line names the source."""
    try:
        config = parse_config(data, source=SOURCE, environ=ENVIRON, base_dir=empty_dir)
    except ConfigError as error:
        assert_config_error(error, SOURCE)
        return
    assert config.portals and config.source == SOURCE
    assert CONFIG_SECRET not in repr(config)


@settings(max_examples=150, deadline=None)
@given(
    document=st.one_of(
        CONFIG.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        st.text(max_size=200),
        st.text(alphabet=string.printable, max_size=200),
        st.sampled_from(
            ["", "portals: [", "a: !!python/object:os.system x", "x: &a [*a]", "- !!binary AAA"]
        ),
    )
)
# At least one good file every run, so that the success path is always checked.
@example(
    document="portals:\n  - name: acme\n    webhook: ${ACME_WEBHOOK}\npoll_interval: ${POLL}\n"
)
def test_config_files_give_a_config_or_config_error(document: str, empty_dir: Path) -> None:
    """Any file, valid YAML or not, is a Config or a ConfigError whose lines name the file."""
    path = empty_dir / "fuzz-config.yaml"
    try:
        path.write_text(document, encoding="utf-8")
    except UnicodeEncodeError:
        path.write_bytes(document.encode("utf-8", "surrogatepass"))
    try:
        config = load_config(path, environ=ENVIRON)
    except ConfigError as error:
        assert_config_error(error, str(path))
        return
    assert config.portals and config.source == str(path)
    assert CONFIG_SECRET not in repr(config)


# ---- a whole poll cycle against a portal answering arbitrary JSON -------------------------

STATUSES = st.sampled_from([200, 200, 200, 200, 400, 401, 404, 429, 500, 502, 503])
TIME_BLOCK = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "duration": NUMBERISH,
            "operating": NUMBERISH,
            "operating_reset_at": NUMBERISH,
            "start": NUMBERISH,
        },
    ),
)


def envelope(result: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"result": result},
        optional={
            "total": SCALARS,
            "next": SCALARS,
            "time": TIME_BLOCK,
            "error": SCALARS,
            "error_description": SCALARS,
        },
    )


def reply(result: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[int, str]]:
    """(status, body): mostly an envelope, sometimes any JSON or not JSON at all."""
    body = st.one_of(
        envelope(result).map(json.dumps),
        envelope(result).map(json.dumps),
        JSON.map(json.dumps),
        st.sampled_from(["", "<html>502 Bad Gateway</html>", '{"result":', "null", "[]"]),
    )
    return st.tuples(STATUSES, body)


COMMAND = st.one_of(
    st.tuples(st.just("result"), st.one_of(TASKS_RESULT, IM_RESULT, USERS_RESULT)),
    st.tuples(st.just("error"), JSON),
    st.tuples(st.just("missing"), st.none()),
)
BATCH = st.one_of(
    reply(JSON),
    st.tuples(
        STATUSES,
        st.fixed_dictionaries(
            {
                "commands": st.lists(COMMAND, min_size=1, max_size=6),
                "times": st.lists(TIME_BLOCK, min_size=1, max_size=3),
                "section": st.sampled_from(["dict", "dict", "list", "scalar"]),
            }
        ),
    ),
)
PORTAL_SETTINGS = st.sampled_from(
    [
        {"tasks": {"users": "all"}, "im": {"chats": True}},
        {"tasks": {"users": [1, 2, 3]}, "im": {"chats": False}},
        {"tasks": {"users": "self", "roles": ["view_all", "view_role_auditor"]}},
    ]
)

SECRET = "pr0p3rtyw3bh00ks3cr3t"
register_secret(SECRET)


def batch_body(status: int, spec: Any, commands: dict[str, Any]) -> tuple[int, str]:
    if isinstance(spec, str):
        return status, spec
    result: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    times: dict[str, Any] = {}
    for index, key in enumerate(commands):
        kind, value = spec["commands"][index % len(spec["commands"])]
        if kind == "result":
            result[key] = value
        elif kind == "error":
            errors[key] = value
        times[key] = spec["times"][index % len(spec["times"])]
    sections: Any = {"result": result, "result_error": errors, "result_time": times}
    if spec["section"] == "list":
        sections = {"result": list(result.values()), "result_error": [], "result_time": []}
    elif spec["section"] == "scalar":
        sections = 0
    return status, json.dumps({"result": sections})


def portal_app(replies: dict[str, Any]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method == "batch":
            try:
                payload = await request.json()
                commands = payload.get("cmd", {})
            except ValueError:
                commands = {}
            status, body = batch_body(*replies["batch"], commands)
        else:
            status, body = replies.get(method, (404, '{"error":"ERROR_METHOD_NOT_FOUND"}'))
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/rest/1/{secret}/{method}", handle)
    return app


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def exporter_records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("exporter")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def two_cycles(replies: dict[str, Any], settings_: dict[str, Any]) -> list[PortalSnapshot]:
    runner = web.AppRunner(portal_app(replies), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    raw = {
        "poll_interval": "1s",
        "request_timeout": "2s",
        "portals": [
            {"name": "fuzz", "webhook": f"http://127.0.0.1:{port}/rest/1/{SECRET}/", **settings_}
        ],
    }
    config = parse_config(raw, source="fuzz.yaml")
    snapshots: list[PortalSnapshot] = []
    try:
        async with new_session() as session:
            # No sleeping between retries: the answers are instant and the budget is what
            # is under test, not the backoff.
            poller = PortalPoller(
                config.portals[0], config, session, snapshots.append, retry=RetryPolicy(base=0)
            )
            for _ in range(2):
                try:
                    # A liveness bound: against instant answers a cycle takes milliseconds.
                    snapshots.append(await asyncio.wait_for(poller.cycle(), 5))
                except TimeoutError:
                    # Only a method over its operating budget may hold a cycle back, and
                    # never for longer than the portal's window, whatever the answer said.
                    waits = [
                        poller.main.budget.calls_that_fit(method, 1)
                        for method in (TASKS_METHOD, IM_METHOD)
                    ]
                    assert any(fit == 0 for fit, _ in waits), waits
                    assert all(wait <= OPERATING_WINDOW + 1 for _, wait in waits), waits
                    break
    finally:
        await runner.cleanup()
    return snapshots


def parse_both(snapshot: PortalSnapshot) -> None:
    exposition = assemble([portal_blocks(snapshot)], ExporterInfo(poll_interval=1.0))
    text = list(text_string_to_metric_families(exposition.text.decode("utf-8")))
    assert any(f.name == "bitrix24_up" for f in text)
    om = list(openmetrics_families(exposition.openmetrics.decode("utf-8")))
    assert any(f.name == "bitrix24_up" for f in om)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    replies=st.fixed_dictionaries(
        {
            "profile": reply(PROFILE_RESULT),
            "user.get": reply(USERS_RESULT),
            "batch": BATCH,
        }
    ),
    portal=PORTAL_SETTINGS,
)
@example(
    # Lone surrogates (a "\ud800" escape is valid JSON) in a name and a counter.
    replies={
        "profile": (200, json.dumps({"result": {"ID": "1", "ADMIN": True, "NAME": "\ud800"}})),
        "user.get": (200, json.dumps({"result": [{"ID": "2", "NAME": "x\udfff"}], "total": 1})),
        "batch": (
            200,
            {
                "commands": [("result", {"\ud800": {"counter": 1, "code": "\udfff"}})],
                "times": [{}],
                "section": "dict",
            },
        ),
    },
    portal={"tasks": {"users": "all"}, "im": {"chats": True}},
)
@example(
    # Time blocks with NaN, Infinity and an integer beyond float; then one whose reset is
    # decades ahead (a skewed clock) with the method over its budget.
    replies={
        "profile": (200, json.dumps({"result": {"ID": "1", "ADMIN": True}})),
        "user.get": (200, json.dumps({"result": [], "total": 0})),
        "batch": (
            200,
            {
                "commands": [("result", {"expired": {"counter": 1, "code": 1}})],
                "times": [
                    {"duration": math.nan, "operating": math.nan, "operating_reset_at": math.inf},
                    {"duration": 0.1, "operating": 10**400},
                ],
                "section": "dict",
            },
        ),
    },
    portal={"tasks": {"users": [1, 2, 3]}, "im": {"chats": False}},
)
@example(
    replies={
        "profile": (200, json.dumps({"result": {"ID": "1", "ADMIN": True}})),
        "user.get": (200, json.dumps({"result": [], "total": 0})),
        "batch": (
            200,
            {
                "commands": [("result", {"expired": {"counter": 1, "code": 1}})],
                "times": [{"duration": 0.1, "operating": 1000, "operating_reset_at": 1e12}],
                "section": "dict",
            },
        ),
    },
    portal={"tasks": {"users": "self"}},
)
def test_poll_cycle_survives_any_answer(
    replies: dict[str, Any], portal: dict[str, Any], exporter_records: Records
) -> None:
    """Whatever the portal answers, a cycle ends (or waits at most the window) and renders."""
    exporter_records.records.clear()
    snapshots = asyncio.run(two_cycles(replies, portal))
    for snapshot in snapshots:
        assert snapshot.name == "fuzz"
        parse_both(snapshot)
    crashed = [
        r.getMessage()
        for r in exporter_records.records
        if r.exc_info or "poll cycle failed" in r.getMessage()
    ]
    assert crashed == []


# ---- the renderer against prometheus_client --------------------------------------------

LABEL_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(['"', "\\", "\n", '\\n"', 'a"b\\c\nd', "ünïcødé", "日本語", "\t", "\r"]),
)
VALUES = st.one_of(
    st.floats(allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324, 1e-10, 123456789012.0]),
    st.integers(-(2**62), 2**62).map(float),
)


class Families:
    """The same samples as a prometheus_client custom collector."""

    def __init__(self, samples: list[Sample], names: list[tuple[int, str]]) -> None:
        self.samples = samples
        self.names = names

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for family in (metrics.TASKS, metrics.IM_UNREAD):
            gauge = GaugeMetricFamily(family.name, family.help, labels=family.labels)
            for sample in self.samples:
                if sample.family is family:
                    gauge.add_metric(list(sample.labels), sample.value)
            yield gauge
        info = GaugeMetricFamily(
            metrics.USER_INFO.name, metrics.USER_INFO.help, labels=metrics.USER_INFO.labels
        )
        for user_id, name in self.names:
            info.add_metric(["acme", str(user_id), name], 1.0)
        yield info


LINE = re.compile(r"^(?P<name>[a-z0-9_]+)\{(?P<labels>.*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sample_lines(text: str, names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Sample lines as (name, labels with their escaped text, value text), label order aside."""
    found = []
    for line in text.split("\n"):  # not splitlines(): "\x85" is no line break here
        if line.startswith(names):
            match = LINE.match(line)
            assert match is not None, line
            labels = sorted(LABEL.findall(match["labels"]))
            found.append((match["name"], repr(labels), match["value"]))
    return sorted(found)


@settings(max_examples=200, deadline=None)
@given(
    tasks=st.lists(st.tuples(st.lists(LABEL_TEXT, min_size=4, max_size=4), VALUES), max_size=6),
    im=st.lists(st.tuples(LABEL_TEXT, VALUES), max_size=4),
    names=st.lists(st.tuples(st.integers(1, 10**9), LABEL_TEXT), max_size=4),
)
def test_renderer_matches_generate_latest(
    tasks: list[tuple[list[str], float]],
    im: list[tuple[str, float]],
    names: list[tuple[int, str]],
) -> None:
    """Label escaping and value text are exactly prometheus_client's for the same samples."""
    samples = [Sample(metrics.TASKS, ("acme", "1", *labels), value) for labels, value in tasks]
    samples += [Sample(metrics.IM_UNREAD, ("acme", "1", kind), value) for kind, value in im]
    snapshot = PortalSnapshot(
        name="acme",
        up=True,
        samples=tuple(samples),
        statuses=(Status(1, "tasks", True, 1.7e9),),
        user_names=tuple(names),
        stats=ClientStats(),
        operating_limit=480.0,
        duration=0.5,
        behind=0.0,
        cycles=1,
    )
    ours = assemble([portal_blocks(snapshot)], ExporterInfo(poll_interval=60.0)).text.decode()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(samples, names))  # type: ignore[arg-type]
    theirs = generate_latest(registry).decode()
    watched = (
        metrics.TASKS.name + "{",
        metrics.IM_UNREAD.name + "{",
        metrics.USER_INFO.name + "{",
    )
    assert sample_lines(ours, watched) == sample_lines(theirs, watched)
    # And both parse to the same families and values.
    mine = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(ours)
        for s in f.samples
        if s.name.startswith(tuple(w[:-1] for w in watched))
    }
    reference = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(theirs)
        for s in f.samples
    }
    assert mine == reference


async def test_error_text_with_a_lone_surrogate(
    exporter_app: Any, aiohttp_server: Any, exporter_records: Records
) -> None:
    """A portal error text holding "\\ud800": the landing page and /metrics still answer."""

    async def refuse(request: web.Request) -> web.Response:
        body = {"error": "INVALID_CREDENTIALS", "error_description": "bad \ud800 token"}
        return web.Response(status=401, text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post("/rest/1/{secret}/{method}", refuse)
    server = await aiohttp_server(app)
    raw = portal_config(str(server.make_url("")).rstrip("/"))
    client = await exporter_app(parse_config(raw, source="test.yaml"))
    landing = await client.get("/")
    assert landing.status == 200
    assert "bad ? token" in await landing.text()
    assert (await client.get("/metrics")).status == 200
    assert not [r for r in exporter_records.records if r.exc_info]


@settings(max_examples=300, deadline=None)
@given(
    params=st.dictionaries(
        st.text(string.ascii_letters, min_size=1, max_size=8),
        st.one_of(
            st.integers(),
            st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
            st.text(st.sampled_from("a&=+% #?[]/.~-_ü"), max_size=8),
            st.lists(st.integers(0, 99), min_size=1, max_size=3),
            st.dictionaries(st.sampled_from(["ID", "ACTIVE"]), st.booleans(), min_size=1),
        ),
        max_size=5,
    )
)
@example(params={"userId": 12345, "groupId": 0, "type": "view_role_responsible"})
@example(params={"q": "a&b=c+d%"})
def test_php_query_reads_back_as_php_parses_it(params: dict[str, Any]) -> None:
    """Whatever the values, PHP's parse_str (the fake portal's) reads back what was meant:
    strings and numbers as text, lists in order, booleans as Y/N."""

    def as_php(value: Any) -> Any:
        if isinstance(value, bool):
            return "Y" if value else "N"
        if isinstance(value, dict):
            return {k: as_php(v) for k, v in value.items()}
        if isinstance(value, list):
            return [as_php(v) for v in value]
        return str(value)

    assert fakeportal.parse_php_query(php_query(params)) == as_php(params)

"""The whole exposition, pinned: `bitrix24-exporter --once` against the seeded demo portal.

The output is compared line by line with `tests/golden/once.prom`, and a difference fails
with a unified diff. After an intended change (a new series, a HELP text, a label), rewrite
the file with

    scripts/update-golden

(which runs this test with `--update-golden`) and review the diff before committing it.

What changes from run to run is normalised explicitly, never compared: the values listed in
`VARIABLE` become `<normalised>`, the version labels of `bitrix24_exporter_build_info`
become `<version>`, and families not named `bitrix24_*` (prometheus_client's process and
Python collectors) are left out. Everything else (names, HELP and TYPE lines, labels and
their order, every counter value, sample order) is compared as printed.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from typing import Any

import pytest

from exporter.fakeportal import demo_portal
from tests.support import ROLES, ROOT, require_binary

GOLDEN = ROOT / "tests" / "golden" / "once.prom"

# The values that change from run to run, and why.
VARIABLE = {
    "bitrix24_last_success_timestamp_seconds": "the wall-clock time of the fetch",
    "bitrix24_config_last_reload_success_timestamp_seconds": "the wall-clock start time",
    "bitrix24_poll_duration_seconds": "how long the cycle took",
    "bitrix24_poll_behind_seconds": "how late the cycle started",
    "bitrix24_api_request_duration_seconds_sum": "how long the requests took",
    # The +Inf bucket is the request count and is kept.
    "bitrix24_api_request_duration_seconds_bucket": "how long each request took",
    "bitrix24_rate_limit_wait_seconds_total": "time spent in the client's own bucket",
}
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
COMMENT = re.compile(r"^# (?:HELP|TYPE) (?P<name>\S+)")
VERSION = re.compile(r'((?:^|,|\{)(?:version|python_version)=)"[^"]*"')


def normalise(exposition: str) -> str:
    """The exposition with what varies between runs replaced or left out (see VARIABLE)."""
    kept: list[str] = []
    for line in exposition.splitlines():
        comment = COMMENT.match(line)
        if comment is not None:
            if comment["name"].startswith("bitrix24_"):
                kept.append(line)
            continue
        sample = SAMPLE.match(line)
        assert sample is not None, f"not a sample line: {line!r}"
        name, labels, value = sample["name"], sample["labels"] or "", sample["value"]
        if not name.startswith("bitrix24_"):
            continue
        if name == "bitrix24_exporter_build_info":
            labels = VERSION.sub(r'\1"<version>"', labels)
        if name in VARIABLE and 'le="+Inf"' not in labels:
            value = "<normalised>"
        kept.append(f"{name}{labels} {value}")
    return "\n".join(kept) + "\n"


async def test_once_against_the_demo_portal_matches_the_golden_file(
    served: Any, exporter_process: Any, request: pytest.FixtureRequest
) -> None:
    """Every family, HELP text, label and value of one cycle is what tests/golden/ holds."""
    portal, path = demo_portal()
    raw = {
        "poll_interval": "60s",
        "portals": [
            {
                "name": "demo",
                "webhook": await served(portal) + path,
                "tasks": {"users": "all", "groups": [0, 7], "roles": list(ROLES)},
                "im": {"enabled": True, "chats": True},
            }
        ],
    }
    once = exporter_process(raw, "--once", listen=False)
    assert await once.wait_exit() == 0, once.stderr()
    actual = normalise(once.stdout())
    if request.config.getoption("--update-golden"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(actual, encoding="utf-8")
        return
    expected = GOLDEN.read_text(encoding="utf-8")
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=str(GOLDEN.relative_to(ROOT)),
            tofile="bitrix24-exporter --once (normalised)",
        )
        pytest.fail(
            "the exposition differs from the golden file; if the change is intended, run"
            " scripts/update-golden and review the diff:\n" + "".join(diff),
            pytrace=False,
        )


def test_normalise_replaces_only_what_varies() -> None:
    """Timestamps, durations and versions go; counts, labels and the +Inf bucket stay."""
    text = (
        "# HELP bitrix24_up Whether the portal answered.\n"
        "# TYPE bitrix24_up gauge\n"
        'bitrix24_up{portal="demo"} 1.0\n'
        'bitrix24_exporter_build_info{version="0.1.0",python_version="3.11.7"} 1.0\n'
        'bitrix24_poll_duration_seconds{portal="demo"} 0.0175\n'
        'bitrix24_api_request_duration_seconds_bucket{portal="demo",le="0.05"} 5.0\n'
        'bitrix24_api_request_duration_seconds_bucket{portal="demo",le="+Inf"} 5.0\n'
        "# HELP process_open_fds Number of open file descriptors.\n"
        "process_open_fds 12.0\n"
    )
    assert normalise(text) == (
        "# HELP bitrix24_up Whether the portal answered.\n"
        "# TYPE bitrix24_up gauge\n"
        'bitrix24_up{portal="demo"} 1.0\n'
        'bitrix24_exporter_build_info{version="<version>",python_version="<version>"} 1.0\n'
        'bitrix24_poll_duration_seconds{portal="demo"} <normalised>\n'
        'bitrix24_api_request_duration_seconds_bucket{portal="demo",le="0.05"} <normalised>\n'
        'bitrix24_api_request_duration_seconds_bucket{portal="demo",le="+Inf"} 5.0\n'
    )


def test_golden_file_is_a_valid_exposition() -> None:
    """The golden file itself passes `promtool check metrics` once its placeholders are
    numbers, so that it stays an exposition a reader can trust."""
    text = GOLDEN.read_text(encoding="utf-8")
    text = text.replace("<normalised>", "0").replace("<version>", "x")
    check = subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()

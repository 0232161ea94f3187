"""Tests for static sharding: the stable hash, shard resolution, portal selection, and two
real exporter processes splitting one config between them."""

from __future__ import annotations

import collections
import dataclasses
import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from exporter import fakeportal
from exporter.cli import load_shard_config, main
from exporter.config import Config, parse_config
from exporter.sharding import Shard, resolve_shard, select_portals, shard_of
from tests.support import series, value

HOOK = "https://acme.bitrix24.com/rest/1/s3cr3t/"


def make_config(names: list[str]) -> Config:
    return parse_config({"portals": [{"name": n, "webhook": HOOK} for n in names]})


BASE = make_config(["base"])


def config_of(names: list[str]) -> Config:
    """Like `make_config` but without parsing, for the property test's arbitrary names."""
    portal = BASE.portals[0]
    return dataclasses.replace(
        BASE, portals=tuple(dataclasses.replace(portal, name=n) for n in names)
    )


# ----------------------------------------------------------------------------- the hash

# Pinned: if this table changes, every deployment's portals move between replicas.
PINNED_3 = {
    "acme": 0,
    "beta": 0,
    "gamma": 0,
    "delta": 1,
    "epsilon": 2,
    "zeta": 1,
    "eta": 2,
    "theta": 0,
    "iota": 1,
    "kappa": 0,
    "acme.bitrix24.com": 0,
    "портал": 0,
    "": 1,
}


@pytest.mark.parametrize(("name", "shard"), PINNED_3.items())
def test_shard_of_is_pinned_for_three_shards(name: str, shard: int) -> None:
    """The assignment is sha256-based and fixed; a change of algorithm fails here."""
    assert shard_of(name, 3) == shard


def test_shard_of_one_shard_takes_everything() -> None:
    """With a single shard every portal belongs to shard 0."""
    assert {shard_of(name, 1) for name in PINNED_3} == {0}


@pytest.mark.parametrize("count", [0, -1])
def test_shard_of_rejects_a_count_below_one(count: int) -> None:
    """A shard count below one is a programming error, not a silent modulo."""
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("acme", count)


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_shard_of_spreads_1000_names_evenly(count: int) -> None:
    """1000 similar names land within 30 % of an even share on every shard."""
    sizes = collections.Counter(shard_of(f"portal-{i}", count) for i in range(1000))
    assert set(sizes) == set(range(count))
    even = 1000 / count
    assert all(0.7 * even <= size <= 1.3 * even for size in sizes.values()), sizes


@given(
    names=st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=20),
        unique=True,
        max_size=40,
    ),
    count=st.integers(min_value=1, max_value=12),
)
def test_every_portal_lands_on_exactly_one_shard(names: list[str], count: int) -> None:
    """Across all indexes each portal is selected once, and the shards keep config order."""
    config = config_of(names)
    shards = [select_portals(config, Shard(i, count)).portals for i in range(count)]
    seen = collections.Counter(p.name for portals in shards for p in portals)
    assert seen == collections.Counter(names)
    for index, portals in enumerate(shards):
        assert [p.name for p in portals] == [n for n in names if shard_of(n, count) == index]


# ----------------------------------------------------------------------------- resolve_shard

RESOLVED: list[tuple[int | None, int | None, Mapping[str, str], Shard | None]] = [
    (None, None, {}, None),
    # A pod name alone never turns sharding on: every container has a HOSTNAME.
    (None, None, {"HOSTNAME": "bitrix24-exporter-2"}, None),
    (1, 3, {}, Shard(1, 3)),
    (0, 1, {}, Shard(0, 1)),
    (None, None, {"BITRIX24_SHARD_INDEX": "1", "BITRIX24_SHARD_COUNT": "2"}, Shard(1, 2)),
    (None, None, {"BITRIX24_SHARD_INDEX": " 1 ", "BITRIX24_SHARD_COUNT": "2"}, Shard(1, 2)),
    (None, None, {"BITRIX24_SHARD_COUNT": "3", "HOSTNAME": "bitrix24-exporter-2"}, Shard(2, 3)),
    (None, 3, {"HOSTNAME": "bitrix24-exporter-2"}, Shard(2, 3)),
    (None, 3, {"POD_NAME": "web-0", "HOSTNAME": "custom-2"}, Shard(0, 3)),
    (None, 3, {"POD_NAME": "", "HOSTNAME": "bitrix24-exporter-1"}, Shard(1, 3)),
    # Flags win over the environment, the environment over the pod name.
    (0, 2, {"BITRIX24_SHARD_INDEX": "1", "BITRIX24_SHARD_COUNT": "5"}, Shard(0, 2)),
    (None, 4, {"BITRIX24_SHARD_INDEX": "3", "HOSTNAME": "x-1"}, Shard(3, 4)),
    # An empty variable (Kubernetes' value for a missing source) counts as unset.
    (None, None, {"BITRIX24_SHARD_INDEX": "", "BITRIX24_SHARD_COUNT": ""}, None),
]


@pytest.mark.parametrize(("index", "count", "environ", "expected"), RESOLVED)
def test_resolve_shard(
    index: int | None, count: int | None, environ: Mapping[str, str], expected: Shard | None
) -> None:
    """Flags, then BITRIX24_SHARD_*, then a StatefulSet pod name's ordinal."""
    assert resolve_shard(index, count, environ) == expected


RESOLVE_ERRORS: list[tuple[int | None, int | None, Mapping[str, str], str]] = [
    (
        1,
        None,
        {},
        "--shard-index is 1 but the shard count is unknown:"
        " pass --shard-count or set BITRIX24_SHARD_COUNT",
    ),
    (
        None,
        None,
        {"BITRIX24_SHARD_INDEX": "0"},
        "BITRIX24_SHARD_INDEX is 0 but the shard count is unknown:"
        " pass --shard-count or set BITRIX24_SHARD_COUNT",
    ),
    (
        None,
        2,
        {},
        "--shard-count is 2 but the shard index is unknown: pass --shard-index, set"
        " BITRIX24_SHARD_INDEX, or run as a StatefulSet pod named NAME-N"
        " (neither POD_NAME nor HOSTNAME is set)",
    ),
    (
        None,
        2,
        {"HOSTNAME": "bitrix24-exporter-7d9f8-x2k9p"},
        "--shard-count is 2 but the shard index is unknown: pass --shard-index, set"
        " BITRIX24_SHARD_INDEX, or run as a StatefulSet pod named NAME-N"
        " (HOSTNAME='bitrix24-exporter-7d9f8-x2k9p' does not end in -N)",
    ),
    (0, 0, {}, "--shard-count: must be at least 1, got 0"),
    (
        None,
        None,
        {"BITRIX24_SHARD_COUNT": "-2"},
        "BITRIX24_SHARD_COUNT: must be at least 1, got -2",
    ),
    (-1, 2, {}, "--shard-index: must not be negative, got -1"),
    (
        2,
        2,
        {},
        "--shard-index: shard index 2 is out of range for 2 shard(s) (0 to 1);"
        " is --shard-count smaller than the number of replicas?",
    ),
    (
        None,
        None,
        {"BITRIX24_SHARD_COUNT": "2", "HOSTNAME": "bitrix24-exporter-2"},
        "the pod name (HOSTNAME='bitrix24-exporter-2'): shard index 2 is out of range for"
        " 2 shard(s) (0 to 1); is BITRIX24_SHARD_COUNT smaller than the number of replicas?",
    ),
    (
        None,
        None,
        {"BITRIX24_SHARD_COUNT": "two"},
        "BITRIX24_SHARD_COUNT: must be a whole number, got 'two'",
    ),
    (
        None,
        2,
        {"BITRIX24_SHARD_INDEX": "1.0"},
        "BITRIX24_SHARD_INDEX: must be a whole number, got '1.0'",
    ),
]


@pytest.mark.parametrize(("index", "count", "environ", "message"), RESOLVE_ERRORS)
def test_resolve_shard_errors(
    index: int | None, count: int | None, environ: Mapping[str, str], message: str
) -> None:
    """Every impossible combination is one line naming where the bad value came from."""
    with pytest.raises(ValueError) as caught:
        resolve_shard(index, count, environ)
    assert str(caught.value) == message


# ----------------------------------------------------------------------------- select_portals

SIX = [f"portal-{i}" for i in range(6)]
SHARD_0_OF_2 = ["portal-2", "portal-5"]
SHARD_1_OF_2 = ["portal-0", "portal-1", "portal-3", "portal-4"]


def test_select_portals_without_a_shard_is_the_config_itself() -> None:
    """No sharding means every portal, and the very same config object."""
    config = make_config(SIX)
    assert select_portals(config, None) is config


def test_select_portals_keeps_everything_but_the_portals() -> None:
    """Only `portals` changes; intervals and the rest of the config stay."""
    config = dataclasses.replace(make_config(SIX), poll_interval=7.0)
    mine = select_portals(config, Shard(0, 2))
    assert [p.name for p in mine.portals] == SHARD_0_OF_2
    assert dataclasses.replace(mine, portals=config.portals) == config


def test_an_empty_shard_is_allowed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """More replicas than portals leaves some shards empty: a warning, not an error."""
    config = make_config(["acme"])  # shard 0 of 3, per the pinned table
    with caplog.at_level(logging.INFO, logger="exporter.sharding"):
        mine = select_portals(config, Shard(1, 3))
    assert mine.portals == ()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "shard 1 of 3: none of the 1 portals hashes to this shard" in caplog.text


def write_config(path: Path, names: list[str], webhook: str = HOOK) -> Path:
    portals = [{"name": n, "webhook": webhook} for n in names]
    path.write_text(yaml.safe_dump({"poll_interval": "1s", "portals": portals}))
    return path


def test_reload_loader_applies_the_shard(tmp_path: Path) -> None:
    """What SIGHUP and /-/reload load is already reduced to this shard's portals."""
    path = write_config(tmp_path / "config.yaml", SIX)
    assert [p.name for p in load_shard_config(str(path), Shard(1, 2)).portals] == SHARD_1_OF_2
    assert [p.name for p in load_shard_config(str(path), None).portals] == SIX


def test_check_config_says_how_many_portals_the_shard_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config reports the whole config and this shard's share of it."""
    path = write_config(tmp_path / "config.yaml", SIX)
    argv = ["--config", str(path), "--check-config", "--shard-index", "0", "--shard-count", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"{path}: OK, 6 portal(s); shard 0 of 2 polls 2 of them\n"


def test_a_bad_shard_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard error is reported like a config error: one line on stderr, exit status 2."""
    path = write_config(tmp_path / "config.yaml", SIX)
    assert main(["--config", str(path), "--shard-index", "3", "--shard-count", "2"]) == 2
    assert capsys.readouterr().err == (
        "--shard-index: shard index 3 is out of range for 2 shard(s) (0 to 1);"
        " is --shard-count smaller than the number of replicas?\n"
    )


# ----------------------------------------------------------------------------- end to end


def shards_of(text: str) -> list[str]:
    """The portals a replica's /metrics has `bitrix24_up` for, sorted."""
    return sorted(s.labels["portal"] for s in series(text, "bitrix24_up"))


EXPECTED = [SHARD_0_OF_2, SHARD_1_OF_2]


async def test_two_replicas_split_the_portals(
    tmp_path: Path, served: Any, exporter_process: Any
) -> None:
    """Two real processes, one config: each portal's bitrix24_up is on exactly one of them."""
    portal, path = fakeportal.demo_portal()
    config = write_config(tmp_path / "config.yaml", SIX, await served(portal) + path)
    replicas = [
        exporter_process(
            None, "--config", str(config), "--shard-index", str(index), "--shard-count", "2"
        )
        for index in range(2)
    ]
    bodies = []
    for replica in replicas:
        await replica.wait_ready()
        bodies.append(await replica.metrics())
    for replica in replicas:
        replica.proc.send_signal(signal.SIGTERM)
    assert [await replica.wait_exit() for replica in replicas] == [0, 0]
    assert [shards_of(body) for body in bodies] == EXPECTED
    for index, body in enumerate(bodies):
        assert value(body, "bitrix24_exporter_shard", index=str(index), count="2") == 1


async def test_once_polls_only_this_shard(
    tmp_path: Path, served: Any, exporter_process: Any
) -> None:
    """--once runs one cycle of this shard's portals and prints the shard gauge."""
    portal, path = fakeportal.demo_portal()
    config = write_config(tmp_path / "config.yaml", SIX, await served(portal) + path)
    once = exporter_process(
        None,
        "--config",
        str(config),
        "--once",
        "--shard-index",
        "1",
        "--shard-count",
        "2",
        listen=False,
    )
    assert await once.wait_exit() == 0, once.stderr()
    body = once.stdout()
    assert shards_of(body) == SHARD_1_OF_2
    assert value(body, "bitrix24_exporter_shard", index="1", count="2") == 1

"""Static sharding: which portals this replica polls.

With ``--shard-count N`` the exporter runs as N replicas and each polls only its own share
of the configured portals. A portal belongs to exactly one shard, decided by `shard_of`;
every replica reads the same config and keeps the portals of its own index. Nothing is
shared between replicas, so a portal is never split across them: Bitrix24's rate limit and
operating budget are per portal (and source address and credential), and two replicas
polling one portal would spend one budget without coordinating (docs/sharding.md).

The index comes from ``--shard-index``, ``BITRIX24_SHARD_INDEX`` or, in a StatefulSet, from
the pod name's ordinal (``bitrix24-exporter-2`` is shard 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from exporter.config import Config

__all__ = ["Shard", "resolve_shard", "select_portals", "shard_of"]

log = logging.getLogger(__name__)

ENV_INDEX = "BITRIX24_SHARD_INDEX"
ENV_COUNT = "BITRIX24_SHARD_COUNT"
# POD_NAME first: it is set on purpose (downward API), while a pod spec's `hostname` can
# change HOSTNAME.
POD_NAME_VARS = ("POD_NAME", "HOSTNAME")

_ORDINAL_RE = re.compile(r".+-(\d+)")
_INT_RE = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Shard:
    """This process is shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


def shard_of(portal_name: str, count: int) -> int:
    """The shard that polls `portal_name` when there are `count` shards.

    The first 8 bytes of the SHA-256 of the UTF-8 name, read as a big-endian unsigned
    integer, modulo `count`. This is a public contract: changing it moves portals, and with
    them their series, between replicas. Python's `hash()` would not do: it is salted per
    process, so two replicas would disagree.
    """
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    digest = hashlib.sha256(portal_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        # Kubernetes sets an env var to "" when its source is empty; that means "not set".
        return None
    if not _INT_RE.fullmatch(raw):
        raise ValueError(f"{name}: must be a whole number, got {raw!r}")
    return int(raw)


def _pod_ordinal(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """The ordinal at the end of the pod name, and a description of where it was looked for."""
    for name in POD_NAME_VARS:
        value = environ.get(name, "").strip()
        if value:
            match = _ORDINAL_RE.fullmatch(value)
            if match:
                return int(match.group(1)), f"{name}={value!r}"
            return None, f"{name}={value!r} does not end in -N"
    return None, f"neither {' nor '.join(POD_NAME_VARS)} is set"


def resolve_shard(index: int | None, count: int | None, environ: Mapping[str, str]) -> Shard | None:
    """This process's shard from the flags, then the environment, then the pod name.

    `index` and `count` are the flag values (None: not given). The index falls back to
    ``BITRIX24_SHARD_INDEX`` and then to the ordinal of a StatefulSet pod name (``POD_NAME``
    or ``HOSTNAME`` ending in ``-N``); the count falls back to ``BITRIX24_SHARD_COUNT``. The
    pod name is only read once a count is known: every container has a HOSTNAME, and a
    Deployment's pod names can end in digits too. Returns None when nothing asks for
    sharding. Raises ValueError with a one-line message.
    """
    count_source = "--shard-count"
    if count is None:
        count, count_source = _env_int(environ, ENV_COUNT), ENV_COUNT
    index_source = "--shard-index"
    if index is None:
        index, index_source = _env_int(environ, ENV_INDEX), ENV_INDEX
    if count is None:
        if index is None:
            return None
        raise ValueError(
            f"{index_source} is {index} but the shard count is unknown:"
            f" pass --shard-count or set {ENV_COUNT}"
        )
    if count < 1:
        raise ValueError(f"{count_source}: must be at least 1, got {count}")
    if index is None:
        index, where = _pod_ordinal(environ)
        if index is None:
            raise ValueError(
                f"{count_source} is {count} but the shard index is unknown: pass --shard-index,"
                f" set {ENV_INDEX}, or run as a StatefulSet pod named NAME-N ({where})"
            )
        index_source = f"the pod name ({where})"
    if index < 0:
        raise ValueError(f"{index_source}: must not be negative, got {index}")
    if index >= count:
        raise ValueError(
            f"{index_source}: shard index {index} is out of range for {count} shard(s)"
            f" (0 to {count - 1}); is {count_source} smaller than the number of replicas?"
        )
    return Shard(index, count)


def select_portals(config: Config, shard: Shard | None) -> Config:
    """`config` with only the portals of `shard` (all of them when `shard` is None).

    A shard without portals is allowed: with more replicas than portals some must be empty.
    It still serves its own metrics and is ready at once.
    """
    if shard is None:
        return config
    mine = tuple(p for p in config.portals if shard_of(p.name, shard.count) == shard.index)
    if mine:
        log.info(
            "%s: polling %d of %d portals: %s",
            shard,
            len(mine),
            len(config.portals),
            ", ".join(p.name for p in mine),
        )
    else:
        log.warning(
            "%s: none of the %d portals hashes to this shard; it polls nothing"
            " (more replicas than needed?)",
            shard,
            len(config.portals),
        )
    return dataclasses.replace(config, portals=mine)

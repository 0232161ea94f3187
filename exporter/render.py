"""Snapshots to exposition bytes, once per poll cycle rather than once per scrape.

A portal's snapshot becomes per-family blocks of sample lines when its cycle ends: the
sources' series arrive already written (`exporter.lines`), the health and client series
are written here. The body is the families' headers with every portal's block under them,
in the Prometheus text format 0.0.4 and in OpenMetrics 1.0.0. Sample lines are the same in
both formats (only the headers and the trailing `# EOF` differ), so the two bodies are
lists of parts that share every block of sample lines; a scrape sends the parts one after
the other, or one of the two prepared gzip bodies.

Each gzip body is spliced from raw deflate segments, each compressed on its own and ended
on a byte boundary (a sync flush), under one gzip header and trailer: a block of lines is
compressed once for both formats, and not again while it is unchanged. Blocks smaller
than `PART_SIZE` are compressed together with their neighbours into one segment (many
portals give many small blocks, which alone would compress poorly); a segment is reused
as long as its blocks are the same objects. The plain bodies hold the blocks themselves,
never a joined copy of them: with many portals such a copy was one more byte kept per
byte of sample lines.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain
from typing import cast

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import generate_latest as text_generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as _untyped_om_generate

from exporter import __version__, heap, metrics
from exporter.lines import encode, format_value, sample_line
from exporter.metrics import (
    DURATION_BUCKETS,
    PORTAL_HEAD_FAMILIES,
    PORTAL_TAIL_FAMILIES,
    Family,
)
from exporter.snapshot import PortalSnapshot
from exporter.sources import source_families

log = logging.getLogger(__name__)

# prometheus_client leaves it untyped; its behaviour is plain.
om_generate_latest = cast(Callable[[CollectorRegistry], bytes], _untyped_om_generate)

GZIP_LEVEL = 1  # level 1 is ~10x faster than 9 and only ~15 % larger on exposition text
# Smaller blocks are compressed together with their neighbours: deflate segments long
# enough to compress well.
PART_SIZE = 64 * 1024

# Blocks of sample lines compressed together into one deflate segment.
Group = tuple[bytes, ...]


@dataclass(frozen=True)
class Exposition:
    """One rendered body in both formats: parts to send in order, and gzipped."""

    text_parts: tuple[bytes, ...]
    openmetrics_parts: tuple[bytes, ...]
    text_gzip: bytes
    openmetrics_gzip: bytes

    @property
    def text(self) -> bytes:
        return b"".join(self.text_parts)

    @property
    def openmetrics(self) -> bytes:
        return b"".join(self.openmetrics_parts)


@dataclass
class ExporterInfo:
    """Process-wide facts rendered next to the portals' families."""

    poll_interval: float
    shard: tuple[int, int] | None = None
    reload_successful: bool = True
    reload_timestamp: float | None = None
    # Counter families kept outside the portals (the alert receivers'): label values ->
    # count, updated in place on the event loop.
    counters: dict[Family, Mapping[tuple[str, ...], float]] = field(default_factory=dict)


PORTAL_FAMILIES = (*PORTAL_HEAD_FAMILIES, *source_families(), *PORTAL_TAIL_FAMILIES)
GLOBAL_FAMILIES = (
    metrics.BUILD_INFO,
    metrics.SHARD,
    metrics.POLL_INTERVAL,
    metrics.RELOAD_OK,
    metrics.RELOAD_TIME,
    metrics.ALERT_NOTIFICATIONS,
    metrics.ALERT_DELIVERIES,
)


def _line(name: str, family: Family, values: Iterable[str], value: float) -> str:
    return sample_line(name, family.labels, values, value)


def _header(family: Family, *, openmetrics: bool) -> str:
    name = family.name
    if family.kind == "counter" and not openmetrics:
        name += "_total"
    doc = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    if openmetrics:
        doc = doc.replace('"', '\\"')
    return f"# HELP {name} {doc}\n# TYPE {name} {family.kind}\n"


# The same header objects every time, so that their compressed segments are reused.
_HEADERS = {
    (family, openmetrics): encode(_header(family, openmetrics=openmetrics))
    for family in (*GLOBAL_FAMILIES, *PORTAL_FAMILIES)
    for openmetrics in (False, True)
}


def portal_blocks(snap: PortalSnapshot) -> dict[Family, bytes]:
    """Sample lines of one portal, per family."""
    lines: dict[Family, list[str]] = {f: [] for f in PORTAL_FAMILIES}
    p = snap.name
    lines[metrics.UP].append(_line(metrics.UP.name, metrics.UP, (p,), 1.0 if snap.up else 0.0))
    if snap.duration is not None:
        lines[metrics.POLL_DURATION].append(
            _line(metrics.POLL_DURATION.name, metrics.POLL_DURATION, (p,), snap.duration)
        )
    lines[metrics.POLL_BEHIND].append(
        _line(metrics.POLL_BEHIND.name, metrics.POLL_BEHIND, (p,), snap.behind)
    )
    for status in snap.statuses:
        key = (p, str(status.user_id), status.source)
        lines[metrics.COLLECT_SUCCESS].append(
            _line(metrics.COLLECT_SUCCESS.name, metrics.COLLECT_SUCCESS, key, float(status.success))
        )
        if status.last_success is not None:
            lines[metrics.LAST_SUCCESS].append(
                _line(metrics.LAST_SUCCESS.name, metrics.LAST_SUCCESS, key, status.last_success)
            )
    for health in snap.health:
        for family, count in (
            (metrics.COLLECT_USERS, health.users),
            (metrics.COLLECT_SUCCESS_USERS, health.succeeded),
        ):
            lines[family].append(_line(family.name, family, (p, health.source), float(count)))
        if health.oldest_success is not None:
            oldest = metrics.COLLECT_OLDEST_SUCCESS
            lines[oldest].append(
                _line(oldest.name, oldest, (p, health.source), health.oldest_success)
            )
    for user_id, name in snap.user_names:
        lines[metrics.USER_INFO].append(
            _line(metrics.USER_INFO.name, metrics.USER_INFO, (p, str(user_id), name), 1.0)
        )
    stats = snap.stats
    requests = metrics.API_REQUESTS
    for (method, code), count in sorted(stats.requests.items()):
        lines[requests].append(_line(requests.name + "_total", requests, (p, method, code), count))
    errors = metrics.API_ERRORS
    for (method, error), count in sorted(stats.errors.items()):
        lines[errors].append(_line(errors.name + "_total", errors, (p, method, error), count))
    hist = metrics.API_REQUEST_DURATION
    cumulative = 0
    bucket_family = Family(hist.name, hist.help, hist.kind, ("portal", "le"))
    for bound, count in zip(DURATION_BUCKETS, stats.duration_buckets, strict=True):
        cumulative += count
        lines[hist].append(
            _line(hist.name + "_bucket", bucket_family, (p, format_value(bound)), cumulative)
        )
    lines[hist].append(
        _line(hist.name + "_bucket", bucket_family, (p, "+Inf"), stats.duration_count)
    )
    lines[hist].append(_line(hist.name + "_count", hist, (p,), stats.duration_count))
    lines[hist].append(_line(hist.name + "_sum", hist, (p,), stats.duration_sum))
    wait = metrics.RATE_LIMIT_WAIT
    lines[wait].append(_line(wait.name + "_total", wait, (p,), stats.rate_limit_wait))
    for method, seconds in sorted(stats.operating.items()):
        lines[metrics.API_OPERATING].append(
            _line(metrics.API_OPERATING.name, metrics.API_OPERATING, (p, method), seconds)
        )
    lines[metrics.API_OPERATING_LIMIT].append(
        _line(
            metrics.API_OPERATING_LIMIT.name,
            metrics.API_OPERATING_LIMIT,
            (p,),
            snap.operating_limit,
        )
    )
    blocks = {family: encode("".join(block)) for family, block in lines.items() if block}
    for family, block in snap.samples.blocks.items():
        if block.data:
            blocks[family] = block.data
    return blocks


def global_blocks(info: ExporterInfo) -> dict[Family, str]:
    blocks = {
        metrics.BUILD_INFO: _line(
            metrics.BUILD_INFO.name,
            metrics.BUILD_INFO,
            (__version__, platform.python_version()),
            1.0,
        ),
        metrics.POLL_INTERVAL: _line(
            metrics.POLL_INTERVAL.name, metrics.POLL_INTERVAL, (), info.poll_interval
        ),
        metrics.RELOAD_OK: _line(
            metrics.RELOAD_OK.name, metrics.RELOAD_OK, (), float(info.reload_successful)
        ),
    }
    if info.shard is not None:
        index, count = info.shard
        blocks[metrics.SHARD] = _line(
            metrics.SHARD.name, metrics.SHARD, (str(index), str(count)), 1.0
        )
    if info.reload_timestamp is not None:
        blocks[metrics.RELOAD_TIME] = _line(
            metrics.RELOAD_TIME.name, metrics.RELOAD_TIME, (), info.reload_timestamp
        )
    for family, counts in info.counters.items():
        rows = sorted(counts.items())
        if rows:
            blocks[family] = "".join(
                _line(family.name + "_total", family, labels, count) for labels, count in rows
            )
    return blocks


def _process_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


_PROCESS = _process_registry()


class Segments:
    """Deflate segments of earlier bodies, reused while their blocks stay the same.

    Only the render thread (or `render_now`'s caller) uses it, one assembly at a time. What an
    assembly did not use is dropped after it.
    """

    def __init__(self) -> None:
        # Each entry keeps its blocks alive, so that their ids cannot be reused meanwhile.
        self._deflated: dict[tuple[int, ...], tuple[Group, bytes]] = {}
        self._used: dict[tuple[int, ...], tuple[Group, bytes]] = {}

    def deflate(self, group: Group) -> bytes:
        """A raw deflate segment of the blocks one after the other, ended on a byte
        boundary, never final."""
        key = tuple(map(id, group))
        entry = self._used.get(key) or self._deflated.get(key)
        if entry is None:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
            deflated = [compressor.compress(block) for block in group]
            deflated.append(compressor.flush(zlib.Z_SYNC_FLUSH))
            entry = (group, b"".join(deflated))
        self._used[key] = entry
        return entry[1]

    def done(self) -> None:
        """Forget what the last assembly did not use."""
        self._deflated, self._used = self._used, {}


# gzip (RFC 1952): magic, deflate, no flags, no mtime, "fastest" (level 1), unknown OS.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
# The last deflate block: final, empty.
_DEFLATE_END = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush()


def _gzip(groups: Iterable[Group], segments: Segments) -> bytes:
    crc = size = 0
    deflated = [_GZIP_HEADER]
    for group in groups:
        for block in group:
            crc = zlib.crc32(block, crc)
            size += len(block)
        deflated.append(segments.deflate(group))
    deflated += (_DEFLATE_END, struct.pack("<II", crc, size & 0xFFFFFFFF))
    return b"".join(deflated)


def _groups(blocks: Iterable[bytes]) -> list[Group]:
    """A family's blocks (one per portal) in groups compressed together: small neighbours
    up to `PART_SIZE`, big ones alone."""
    groups: list[Group] = []
    pending: list[bytes] = []
    size = 0
    for block in blocks:
        if len(block) >= PART_SIZE:
            if pending:
                groups.append(tuple(pending))
                pending, size = [], 0
            groups.append((block,))
            continue
        pending.append(block)
        size += len(block)
        if size >= PART_SIZE:
            groups.append(tuple(pending))
            pending, size = [], 0
    if pending:
        groups.append(tuple(pending))
    return groups


def assemble(
    portals: Iterable[Mapping[Family, bytes]],
    info: ExporterInfo,
    *,
    segments: Segments | None = None,
) -> Exposition:
    """The full body: global families, then every portal family, then process metrics."""
    segments = segments or Segments()
    portal_list = list(portals)
    blocks = global_blocks(info)
    text: list[str] = []
    om: list[str] = []
    for family in GLOBAL_FAMILIES:
        if family in blocks:
            text += (_header(family, openmetrics=False), blocks[family])
            om += (_header(family, openmetrics=True), blocks[family])
    text_groups: list[Group] = [(encode("".join(text)),)]
    om_groups: list[Group] = [(encode("".join(om)),)]
    for family in PORTAL_FAMILIES:
        found = [p[family] for p in portal_list if family in p]
        if not found:
            continue
        text_groups.append((_HEADERS[family, False],))
        om_groups.append((_HEADERS[family, True],))
        shared = _groups(found)
        text_groups += shared
        om_groups += shared
    text_groups.append((text_generate_latest(_PROCESS),))
    om_groups.append((om_generate_latest(_PROCESS),))  # ends with "# EOF\n"
    exposition = Exposition(
        text_parts=tuple(chain.from_iterable(text_groups)),
        openmetrics_parts=tuple(chain.from_iterable(om_groups)),
        text_gzip=_gzip(text_groups, segments),
        openmetrics_gzip=_gzip(om_groups, segments),
    )
    segments.done()
    return exposition


@dataclass
class Publisher:
    """Holds the current exposition; portals hand in snapshots, scrapes read `current`."""

    info: ExporterInfo
    snapshots: dict[str, PortalSnapshot] = field(default_factory=dict)
    current: Exposition | None = None
    # Portals whose snapshot is in `current` (readiness means "on /metrics", not "polled").
    rendered: frozenset[str] = frozenset()
    # Bodies assembled, and coalescing windows that rendered (the benchmarks report both).
    assemblies: int = 0
    windows: int = 0
    # Called with every published snapshot, on the event loop (the status page's history).
    listeners: list[Callable[[PortalSnapshot], None]] = field(default_factory=list)
    _blocks: dict[str, dict[Family, bytes]] = field(default_factory=dict)
    _segments: Segments = field(default_factory=Segments)
    _dirty: set[str] = field(default_factory=set)
    _stale: bool = False

    def __post_init__(self) -> None:
        self.current = assemble((), self.info)
        self._changed = asyncio.Event()
        self._rendering = asyncio.Lock()

    def publish(self, snapshot: PortalSnapshot) -> None:
        self.snapshots[snapshot.name] = snapshot
        self._dirty.add(snapshot.name)
        self._changed.set()
        for listener in self.listeners:
            listener(snapshot)

    def remove(self, portal: str) -> None:
        self.snapshots.pop(portal, None)
        self._blocks.pop(portal, None)
        self._dirty.discard(portal)
        self._stale = True
        self._changed.set()

    def touch(self) -> None:
        """Re-render after a change of `info` (a reload)."""
        self._stale = True
        self._changed.set()

    def render_now(self) -> Exposition:
        """Render pending snapshots in the calling thread (for --once)."""
        self._blocks.update(_render_blocks(self._take_dirty()))
        self.current = assemble(self._ordered_blocks(), self.info, segments=self._segments)
        self.assemblies += 1
        self.rendered = frozenset(self._blocks)
        return self.current

    def _take_dirty(self) -> dict[str, PortalSnapshot]:
        dirty, self._dirty = self._dirty, set()
        self._stale = False
        return {name: self.snapshots[name] for name in dirty if name in self.snapshots}

    def _info_now(self) -> ExporterInfo:
        """`info` with its counters copied here on the event loop: the worker thread that
        renders must see them as they are now, not half-way through an update."""
        counters: dict[Family, Mapping[tuple[str, ...], float]] = {
            family: dict(counts) for family, counts in self.info.counters.items()
        }
        return replace(self.info, counters=counters)

    def _ordered_blocks(self) -> list[dict[Family, bytes]]:
        return [self._blocks[name] for name in sorted(self._blocks)]

    async def flush(self) -> None:
        """Render what is pending now, in a worker thread, and wait for it.

        Rendering runs in a thread so that scrapes keep being answered meanwhile; the
        shared dicts are only touched on the event loop, and one render runs at a time so
        that an older body never replaces a newer one.
        """
        loop = asyncio.get_running_loop()
        async with self._rendering:
            if not (self._dirty or self._stale):
                return
            fresh = await loop.run_in_executor(None, _render_blocks, self._take_dirty())
            self._blocks.update(fresh)
            names = frozenset(self._blocks)
            self.current = await loop.run_in_executor(
                None,
                partial(assemble, segments=self._segments),
                self._ordered_blocks(),
                self._info_now(),
            )
            self.assemblies += 1
            self.rendered = names

    async def run(self, *, min_gap: float = 0.2) -> None:
        """Re-render whenever snapshots arrive, coalescing bursts (many portals at once).

        What a render leaves alive (snapshots, plans, fetch stores) is frozen out of later
        garbage collections, as is what the process built at start, and the free heap
        pages go back to the system (`exporter.heap`).
        """
        loop = asyncio.get_running_loop()
        heap.take_over()
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                self.windows += 1
                try:
                    await self.flush()
                except Exception:
                    # A render bug must not freeze /metrics for good: keep serving the last
                    # body, say so, and render again with the next snapshot.
                    log.exception("rendering the exposition failed; serving the previous one")
                heap.settle()
                await loop.run_in_executor(None, heap.trim)
                await asyncio.sleep(min_gap)
        finally:
            heap.hand_back()


def _render_blocks(snapshots: dict[str, PortalSnapshot]) -> dict[str, dict[Family, bytes]]:
    return {name: portal_blocks(snap) for name, snap in snapshots.items()}

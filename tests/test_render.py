"""The renderer's own parts: series kept as lines read back as the samples they were, and the
gzip bodies spliced from reused deflate segments decompress to the plain bodies."""

from __future__ import annotations

import gc
import gzip
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import heap, metrics
from exporter.lines import Series
from exporter.mapping import Sample
from exporter.metrics import Family
from exporter.render import PART_SIZE, ExporterInfo, Segments, assemble
from exporter.server import slices

LABEL_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(['"', "\\", "\n", '\\n"', 'a"b\\c\nd', "ünïcødé", "日本語", "\t", "\x85"]),
)
VALUES = st.one_of(
    st.floats(allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, 1e308, 5e-324, 1e-10, 123456789012.0, 1e22]),
)


@settings(max_examples=200, deadline=None)
@given(
    tasks=st.lists(st.tuples(st.lists(LABEL_TEXT, min_size=4, max_size=4), VALUES), max_size=6),
    im=st.lists(st.tuples(LABEL_TEXT, VALUES), max_size=4),
)
def test_series_read_back_as_the_samples_they_were(
    tasks: list[tuple[list[str], float]], im: list[tuple[str, float]]
) -> None:
    """Any label text and value survives being kept as an exposition line."""
    samples = [Sample(metrics.TASKS, ("acme", "1", *labels), value) for labels, value in tasks]
    samples += [Sample(metrics.IM_UNREAD, ("acme", "1", kind), value) for kind, value in im]
    series = Series.of(samples)
    by_family = sorted(samples, key=lambda s: s.family is not metrics.TASKS)
    assert list(series) == by_family
    assert len(series) == len(samples)


def a_block(rnd: random.Random, family: Family, portal: str, size: int) -> bytes:
    """About `size` bytes of sample lines of `family` for one portal."""
    lines = []
    while sum(map(len, lines)) < size:
        labels = ",".join(f'{name}="{portal}{rnd.randrange(10**6)}"' for name in family.labels)
        lines.append(f"{family.name}{{{labels}}} {rnd.randrange(100)}.0\n".encode())
    return b"".join(lines)


def test_gzip_bodies_are_the_plain_bodies_while_blocks_come_and_go() -> None:
    """Portals with blocks below, around and far above a part's size, assembled again and
    again with the same segments while some blocks change: every gzip body decompresses
    to its plain body, which is what an assembly from scratch gives."""
    rnd = random.Random(13)
    families = (metrics.UP, metrics.TASKS, metrics.IM_UNREAD)
    sizes = (30, 2_000, PART_SIZE - 100, PART_SIZE, 3 * PART_SIZE)
    portals = [
        {family: a_block(rnd, family, f"p{index}", rnd.choice(sizes)) for family in families}
        for index in range(12)
    ]
    info = ExporterInfo(poll_interval=60.0)
    segments = Segments()
    previous = None
    for round_ in range(6):
        if round_ % 2:
            for portal in rnd.sample(portals, 3):  # some portals' blocks change
                family = rnd.choice(families)
                portal[family] = a_block(rnd, family, "new", rnd.choice(sizes))
        exposition = assemble(portals, info, segments=segments)
        assert gzip.decompress(exposition.text_gzip) == exposition.text
        assert gzip.decompress(exposition.openmetrics_gzip) == exposition.openmetrics
        fresh = assemble(portals, info)  # nothing reused
        assert _without_process(fresh.text) == _without_process(exposition.text)
        if previous is not None and round_ % 2 == 0:
            assert _without_process(exposition.text) == _without_process(previous.text)
        previous = exposition
    # The process metrics change between assemblies; everything before them is the same.
    again = assemble(portals, info, segments=segments)
    assert _without_process(again.text) == _without_process(previous.text)


def test_plain_bodies_hold_the_blocks_themselves() -> None:
    """Many portals' small blocks are compressed together but never copied into a joined
    part: each block is in both plain bodies as the very object the portal handed in."""
    rnd = random.Random(5)
    portals = [
        {metrics.TASKS: a_block(rnd, metrics.TASKS, f"p{index}", 3_000)} for index in range(60)
    ]
    exposition = assemble(portals, ExporterInfo(poll_interval=60.0))
    blocks = [portal[metrics.TASKS] for portal in portals]
    for parts in (exposition.text_parts, exposition.openmetrics_parts):
        held = {id(part) for part in parts}
        assert all(id(block) in held for block in blocks)
    assert gzip.decompress(exposition.openmetrics_gzip) == exposition.openmetrics


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=40), max_size=12),
    first=st.integers(1, 20),
    size=st.integers(1, 30),
    join=st.integers(1, 25),
)
def test_slices_cut_big_parts_and_join_small_ones(
    parts: list[bytes], first: int, size: int, join: int
) -> None:
    """Whatever the parts, the pieces are the body in order; a big part is only ever cut
    into views of itself (the body's first at most `first` bytes, then `size`), and only
    small parts are copied, joined into pieces shorter than twice `join`."""
    pieces = list(slices(parts, first, size, join))
    assert b"".join(pieces) == b"".join(parts)
    for number, piece in enumerate(pieces):
        assert len(piece) > 0
        if isinstance(piece, memoryview):
            assert any(piece.obj is part for part in parts if len(part) >= join)
            assert len(piece) <= (first if number == 0 else max(first, size))
        else:
            assert len(piece) < 2 * join


def _without_process(body: bytes) -> bytes:
    return body[: body.index(b"# HELP process_")] if b"# HELP process_" in body else body


def test_the_collector_is_handed_back_as_it_was() -> None:
    """Taking the collector over nests (several apps in one process) and is undone whole."""
    before = gc.get_threshold()
    heap.take_over()
    heap.take_over()
    assert gc.get_threshold()[2] == heap.FULL_NEVER and gc.get_freeze_count() > 0
    heap.hand_back()
    assert gc.get_threshold()[2] == heap.FULL_NEVER
    heap.hand_back()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

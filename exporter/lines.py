"""Sample lines of the exposition, written once per series when its value is fetched.

A sample line reads the same in the Prometheus text format and in OpenMetrics (only the
family headers differ), so a fetched series is turned into its line right away: label
values escaped and the value written as prometheus_client writes them, encoded to UTF-8.
A portal's series are then kept as bytes per family (`Series`), which is all the renderer
needs and a fraction of the memory of an object per series, and none of it is for the
garbage collector to walk. Iterating a `Series` still gives `Sample`s, read back from the
lines, for the code that wants values rather than text.

>>> from exporter.metrics import IM_UNREAD
>>> sample = Sample(IM_UNREAD, ("acme", "1", 'say "hi"'), 3.0)
>>> sample_line(IM_UNREAD.name, IM_UNREAD.labels, sample.labels, sample.value)
'bitrix24_im_unread{portal="acme",user_id="1",counter="say \\\\"hi\\\\""} 3.0\\n'
>>> list(Series.of([sample])) == [sample]
True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from typing import cast

from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

from exporter.mapping import Sample
from exporter.metrics import Family

# prometheus_client leaves it untyped; its behaviour is plain.
_go_float = cast(Callable[[float], str], _untyped_float_to_go_string)
# Counters are mostly small whole numbers: their text looked up rather than worked out.
# (0 is left out: -0.0 equals 0.0 but is written "-0.0".)
_SMALL = {float(n): _go_float(n) for n in range(1, 1_000)}

# One fetch's lines: family name, its lines, family name, its lines, ... Names rather than
# `Family` objects, so that the tuple holds no object the garbage collector tracks.
Lines = tuple[str | bytes, ...]


def format_value(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's float formatting)."""
    text = _SMALL.get(value)
    return text if text is not None else _go_float(value)


def escape_label(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


@cache
def _template(name: str, label_names: tuple[str, ...]) -> str:
    """A `str.format` template of a family's lines (names never hold braces)."""
    if not label_names:
        return name + " {}\n"
    return name + "{{" + ",".join(f'{key}="{{}}"' for key in label_names) + "}} {}\n"


def sample_line(
    name: str, label_names: tuple[str, ...], label_values: Iterable[str], value: float
) -> str:
    """One line of exposition text, as prometheus_client's generate_latest writes it."""
    values = [escape_label(v) for v in label_values]
    if len(values) != len(label_names):
        raise ValueError(f"{name}: {len(label_names)} labels, {len(values)} values")
    return _template(name, label_names).format(*values, format_value(value))


def encode(text: str) -> bytes:
    # "replace": a lone surrogate (a "\ud800" escape is valid JSON) in a name or counter
    # from the portal becomes "?" instead of failing the render.
    return text.encode("utf-8", "replace")


def encode_samples(samples: Iterable[Sample], families: dict[str, Family]) -> Lines:
    """The samples' lines grouped by family, each family's in the samples' order.

    Every family met is recorded in `families` (by name), for reading the lines back.
    """
    grouped: dict[str, list[str]] = {}
    for sample in samples:
        family = sample.family
        lines = grouped.get(family.name)
        if lines is None:
            lines = grouped[family.name] = []
            families.setdefault(family.name, family)
        lines.append(sample_line(family.name, family.labels, sample.labels, sample.value))
    flat: list[str | bytes] = []
    for name, lines in grouped.items():
        flat += (name, encode("".join(lines)))
    return tuple(flat)


class Block:
    """One family's lines of one portal, as pieces joined once, when first read.

    A block is made on the event loop from references (cheap) and joined by whoever reads
    it first, usually the render thread; `Block.later` makes one whose lines are written
    then. Two threads reading it at once may both make it; each gets the same bytes.
    """

    __slots__ = ("_data", "_make", "_pieces", "family")

    def __init__(self, family: Family, pieces: Iterable[bytes | memoryview]) -> None:
        self.family = family
        self._pieces: tuple[bytes | memoryview, ...] | None = tuple(pieces)
        self._make: Callable[[], bytes] | None = None
        self._data: bytes | None = None

    @classmethod
    def later(cls, family: Family, make: Callable[[], bytes]) -> Block:
        """A block whose lines `make` writes when the block is first read."""
        block = cls(family, ())
        block._make = make
        return block

    @property
    def data(self) -> bytes:
        data = self._data
        if data is None:
            pieces, make = self._pieces, self._make
            if pieces is None:  # made by another thread meanwhile (it sets _data first)
                return cast(bytes, self._data)
            data = make() if make is not None else b"".join(pieces)
            self._data = data
            self._pieces = None
            self._make = None
        return data


class Series:
    """A portal's fetched series: per family, its sample lines in fetch order."""

    __slots__ = ("_blocks",)

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        self._blocks: dict[Family, Block] = {b.family: b for b in blocks}

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> Series:
        families: dict[str, Family] = {}
        lines = encode_samples(samples, families)
        return cls(
            Block(families[cast(str, name)], (cast(bytes, data),))
            for name, data in zip(lines[::2], lines[1::2], strict=True)
        )

    @property
    def blocks(self) -> Mapping[Family, Block]:
        return self._blocks

    def block(self, family: Family) -> Block | None:
        return self._blocks.get(family)

    def __iter__(self) -> Iterator[Sample]:
        for family, block in self._blocks.items():
            yield from read_samples(family, block.data)

    def __len__(self) -> int:
        return sum(block.data.count(b"\n") for block in self._blocks.values())

    def __bool__(self) -> bool:
        return any(block.data for block in self._blocks.values())

    def __repr__(self) -> str:
        return f"Series({len(self)} samples in {len(self._blocks)} families)"


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def unescape(text: str) -> str:
    """A label value as it was before it was written into a line."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: "\n" if m[1] == "n" else m[1], text)


def read_samples(family: Family, data: bytes) -> Iterator[Sample]:
    """The samples of `family` back from its lines (a lone surrogate reads back as "?")."""
    for line in data.decode("utf-8").split("\n"):  # not splitlines(): "\x85" is no break here
        if not line:
            continue
        head, _, value = line.rpartition(" ")
        brace = head.find("{")
        labels = (
            tuple(unescape(v) for _, v in _LABEL.findall(head, brace + 1, len(head) - 1))
            if brace >= 0
            else ()
        )
        yield Sample(family, labels, float(value))

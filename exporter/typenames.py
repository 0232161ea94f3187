"""The sort of a decoded JSON or YAML value, in words an error message shows its reader.

Each reader has its own vocabulary (JSON's "object", YAML's "a mapping"), written as a table
of (Python type, word); the first type the value is an instance of names it. `bool` is an
`int` in Python, so a table lists `bool` before `int`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import UnionType

TypeWords = Sequence[tuple[type | UnionType, str]]


def type_word(value: object, words: TypeWords) -> str:
    """The word of the first type in `words` that `value` is, else Python's name of its type.

    >>> type_word(True, ((bool, "boolean"), (int, "integer"))), type_word(1.5, ())
    ('boolean', 'float')
    """
    for kind, word in words:
        if isinstance(value, kind):
            return word
    return type(value).__name__

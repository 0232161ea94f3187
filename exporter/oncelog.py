"""Saying a problem once: when it starts or changes, and once more when it ends.

A portal that fails every cycle would otherwise write the same line every poll interval
(or thousands of lines a cycle, one per command). A `OnceLog` remembers what it said
under a key; it outlives a config reload, so what was said before a reload is not said
again after it.
"""

from __future__ import annotations

import logging


class OnceLog:
    """Log lines keyed by what they are about, each written once until resolved."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._said: dict[str, str] = {}

    def say(
        self, key: str, message: str, level: int = logging.WARNING, *, signature: str | None = None
    ) -> None:
        """Log `message` unless the same `signature` (else the same text) was said for `key`."""
        mark = message if signature is None else signature
        if self._said.get(key) != mark:
            self._said[key] = mark
            self._log.log(level, "%s", message)

    def resolve(self, key: str, message: str | None = None) -> None:
        """The problem under `key` is over: log `message` if one was said, and forget it."""
        if self._said.pop(key, None) is not None and message is not None:
            self._log.info("%s", message)

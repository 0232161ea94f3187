"""Logging setup: text or JSON lines on stderr, with every known secret masked.

The exporter's own messages never contain a secret; the mask is the second line of
defence for text that comes from elsewhere (a library's exception, a URL in a traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time

_SECRETS: set[str] = set()


def add_secrets(*secrets: str) -> None:
    """Register strings to mask in every log line (webhook secrets, tokens)."""
    _SECRETS.update(s for s in secrets if s and len(s) >= 4)


def mask(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "<secret>")
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return mask(json.dumps(entry, ensure_ascii=False))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

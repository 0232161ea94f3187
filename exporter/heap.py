"""The process heap: what the exporter does so that its memory stays small and its garbage
collections short.

CPython's full collection walks every object it tracks while holding the interpreter, so
no scrape is answered meanwhile: ~0.1 s per 200,000 objects on a small machine. Most of
those objects live as long as the process (modules, the app) or as long as a portal's
user list (its plan of commands), and walking them finds nothing. `settle()` collects
what is garbage now and freezes the rest out of later collections (`gc.freeze`), once at
start and after every render; then a full collection walks only what was made since.
A frozen object that is later dropped is still freed, by its reference count; only one
caught in a reference cycle would stay. Few are: on a portal failing a fifth of its
requests, under one object per cycle.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect the garbage there is, then leave everything alive out of later collections."""
    gc.collect()
    gc.freeze()

"""The process heap: what the exporter does so that its memory stays small and its garbage
collections short, however it is started (no environment variable needed).

**Garbage collection.** CPython's full collection walks every object it tracks while
holding the interpreter, so no scrape is answered meanwhile: ~0.1 s per 200,000 objects on
a small machine. Most of those objects live as long as the process (modules, the app) or
as long as a portal's user list (its plan of commands), and walking them finds nothing.
`settle()` collects what is garbage now and freezes the rest out of later collections
(`gc.freeze`), once at start and after every render; a full collection then walks only
what was made since. A frozen object that is later dropped is still freed, by its
reference count; only one caught in a reference cycle would stay. Few are: on a portal
failing a fifth of its requests, under one object per cycle.

The collector's own full collections would still run in the middle of a cycle, walking
the decoded answers a big portal's cycle holds until its last batch is in (~30,000 at
100,000 series, 20 to 40 ms). `take_over()` leaves full collections to `settle()` alone,
after every render, when those answers are gone; young collections run as they always do.

**glibc malloc.** Left as it comes, glibc keeps freed memory that the exporter's pattern
(multi-MB bodies and blocks of sample lines made and dropped once per cycle, by the event
loop and the render thread) never reuses well: the render thread gets arenas of its own,
and once a big buffer is freed the mmap threshold rises to its size, after which such
buffers come from the heap and stay there. `tune_malloc()` caps the arenas at two and fixes
the mmap threshold at 128 KiB (big buffers are mapped and unmapped, so freeing one returns
it), unless the environment sets these itself; `trim()` returns free heap pages after a
render. Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024

# gc threshold for full collections: the number of middle-generation collections between
# two full ones, i.e. never in the lifetime of a process.
FULL_NEVER = 2**31 - 1

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            _libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
            _libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            _libc.mallopt.restype = ctypes.c_int
            _libc.malloc_trim.argtypes = (ctypes.c_size_t,)
            _libc.malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            return None
    return _libc


def tune_malloc() -> None:
    """Apply the malloc settings above (call before any thread starts: arenas are per thread)."""
    libc = _glibc()
    if libc is None:
        return
    for variable, parameter, value in (
        ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    ):
        if variable not in os.environ and libc.mallopt(parameter, value) != 1:
            log.debug("mallopt(%d, %d) refused", parameter, value)


def trim() -> None:
    """Give free heap pages back to the system (takes a few ms; releases the GIL)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_holders: list[int] = []  # the full-collection threshold before the first take_over()


def take_over() -> None:
    """Full collections only from `settle()`; then settle the heap the process starts with.

    Undone by as many `hand_back()` calls (several apps may run in one process, as in tests).
    """
    young, middle, full = gc.get_threshold()
    _holders.append(full)
    gc.set_threshold(young, middle, FULL_NEVER)
    settle()


def hand_back() -> None:
    """The collector as it was, once the last `take_over()` is undone; nothing frozen."""
    if not _holders:
        return
    full = _holders.pop()
    if not _holders:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, full)
        gc.unfreeze()


def settle() -> None:
    """Collect the garbage there is, then leave everything alive out of later collections."""
    gc.collect()
    gc.freeze()

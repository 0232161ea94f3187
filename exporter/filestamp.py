"""Whether a file changed since it was last looked at, without reading it."""

from __future__ import annotations

import os

__all__ = ["FileStamp", "file_stamp"]

FileStamp = tuple[int, int, int]  # (inode, size, mtime_ns)


def file_stamp(path: str | os.PathLike[str]) -> FileStamp | None:
    """The stamp of the file at `path`, or None when there is none (or it cannot be read).

    The inode catches files replaced by rename and Kubernetes' symlink swaps even when the
    new file has the old mtime and size.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns

"""Writing small files so that a job killed mid-write leaves the old file or the new one, never half of one."""

import contextlib
import os


@contextlib.contextmanager
def replaced_atomically(path: str):
    """Opens <path>.tmp for writing; once the block ends without an error, renames it over `path` (one step on POSIX,
    so a reader, or a re-run after a kill, never sees a partial file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yield f
    os.replace(tmp, path)

"""Advisory file locks: one process at a time on a run folder or a cache build.

The operating system releases a lock when its process ends, however it ends, so a lock is never
left stale by a killed run. Where ``fcntl`` is missing (Windows) locking is skipped.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from distill.errors import RunFolderError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["exclusive", "locked"]


@contextlib.contextmanager
def exclusive(path: Path, *, wait: bool, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed, holding the owner's pid and host).

    Args:
        path: The lock file.
        wait: Wait for another holder to finish; otherwise raise at once.
        what: What the lock guards, for the error message.

    Raises:
        RunFolderError: ``wait`` is false and another process holds the lock.
    """
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise RunFolderError(f"{what or path} is in use by another distill process ({holder}); wait for it to "
                                 "finish, or use another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(folder: Path, main: bool = True) -> contextlib.AbstractContextManager[None]:
    """Hold the run folder's lock (``.<name>.lock`` beside it) for a command on it; a second
    process on the same folder is refused with the holder's pid and host. Only the main process
    of a multi-process run takes it."""
    if not main:
        return contextlib.nullcontext()
    folder = Path(folder)
    return exclusive(folder.with_name(f".{folder.name}.lock"), wait=False, what=f"run folder {folder}")

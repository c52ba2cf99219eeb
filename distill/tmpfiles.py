"""Temporary names of atomic writes (``NAME.tmp-<pid>``), and the sweep of those a killed
process left behind.

Every file distill writes for keeps goes first to a temporary name and is then renamed, so a
reader never sees half of it. A process killed between the two (``kill -9``, a power cut)
leaves the temporary behind; :func:`remove_abandoned` deletes those whose process no longer
runs, and never one a live process may still be writing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["remove_abandoned", "temporary_name"]

log = logging.getLogger(__name__)


def temporary_name(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def remove_abandoned(folder: Path, name: str = "*") -> list[Path]:
    """Delete the ``NAME.tmp-<pid>`` files and folders in ``folder`` (``NAME`` a glob pattern)
    whose process no longer runs; returns what was deleted."""
    removed = []
    for tmp in folder.glob(f"{name}.tmp-*") if folder.is_dir() else ():
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        log.info("removing %s, left half-written by a process that no longer runs", tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed

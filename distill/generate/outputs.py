"""The files of one output: their names, the meta file that pins a run's settings, appending rows
safely, and reading back what a run already did (the resume)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.errors import DataError, DistillError
from distill.generate.prompts import prompt_key

__all__ = [
    "META_FORMAT",
    "Appender",
    "OutputPaths",
    "completion_digest",
    "load_done",
    "open_output",
    "read_rows",
    "write_meta",
    "write_rows_atomically",
]

# Every module of the package logs as "distill.generate", the name its lines have always carried.
log = logging.getLogger(__package__)

META_FORMAT = "distill-generate/1"
"""The ``format`` of a meta file."""


@dataclass(frozen=True)
class OutputPaths:
    """The files of one output (or one shard of it)."""

    output: Path
    """Kept samples."""
    rejected: Path
    """Rejected samples, with the reason."""
    meta: Path
    """Settings and teacher identity."""
    checksums: Path
    """SHA-256 of the data files (written by a merge)."""

    @classmethod
    def of(cls, output: Path, shard: tuple[int, int] | None = None) -> OutputPaths:
        """Paths for ``--output output`` (and ``--shard``): ``gen.jsonl`` -> ``gen.rejected.jsonl``, ..."""
        stem = output.name[: -len(output.suffix)] if output.suffix else output.name
        if shard is not None:
            stem = f"{stem}.shard-{shard[0]}-of-{shard[1]}"
        folder = output.parent
        return cls(folder / f"{stem}{output.suffix}", folder / f"{stem}.rejected.jsonl",
                   folder / f"{stem}.meta.json", folder / f"{stem}.sha256")


def write_meta(paths: OutputPaths, header: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the meta file, or check the existing one when the output already holds rows.

    Raises:
        DistillError: The output was made with other settings or by another teacher, or has no meta file.
    """
    started = any(p.is_file() and p.stat().st_size > 0 for p in (paths.output, paths.rejected))
    if started and not paths.meta.is_file():
        raise DistillError(f"{paths.output} exists but {paths.meta.name} (its settings) does not; "
                           "move or delete the output to start over")
    if started:
        try:
            old = json.loads(paths.meta.read_text())
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot read {paths.meta}: {exc}") from None
        diffs = []
        for part, values in header.items():
            before = old.get(part)
            if isinstance(values, dict) and isinstance(before, dict):
                diffs += [f"{part}.{k}: {before.get(k)!r} -> {values.get(k)!r}"
                          for k in sorted(set(values) | set(before)) if before.get(k) != values.get(k)]
            elif before != values:
                diffs.append(f"{part}: {before!r} -> {values!r}")
        if diffs:
            raise DistillError(
                f"{paths.output} was generated with other settings ({'; '.join(diffs)}). Run with the same "
                f"settings to resume it, or delete {paths.output.name}, {paths.rejected.name} and "
                f"{paths.meta.name} to start over")
        return
    meta = {"format": META_FORMAT, **header, **extra,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = paths.meta.with_name(paths.meta.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, paths.meta)


def read_rows(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL file this module wrote; an unfinished last line (a kill mid-write) is cut
    off, or with ``repair=False`` refused."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise DistillError(f"{path} ends in an unfinished line (its run was interrupted); resume that run first")
        log.warning("%s: dropping an unfinished last line (an interrupted write)", path)
        with path.open("r+b") as handle:
            handle.truncate(end)
    rows = []
    # Split on "\n" alone: completions may hold other line breaks (U+2028) that JSON leaves as they are.
    for lineno, line in enumerate(data[:end].decode("utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON; the file was changed by hand?") from None
    return rows


def _row_key(row: dict[str, Any], answered: bool) -> str:
    """Prompt key of an output row (``answered``: its chat ends with the completion) or rejected row."""
    messages = row.get("messages")
    if messages is not None and answered:
        messages = messages[:-1]
    return prompt_key(row.get("prompt"), messages)


def completion_digest(text: str) -> str:
    """SHA-256 of a completion: what the duplicate check compares."""
    return hashlib.sha256(text.encode()).hexdigest()


class Appender:
    """Appends JSONL rows and syncs them to disk; holds an exclusive lock so two runs cannot share a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = path.open("a", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this platform
            pass
        except OSError:
            self._handle.close()
            raise DistillError(f"{path} is being written by another run") from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` and sync them to disk."""
        if rows:
            self._handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file, which releases the lock."""
        self._handle.close()


@contextmanager
def open_output(paths: OutputPaths) -> Iterator[tuple[Appender, Appender]]:
    """The output and rejected files, opened for appending and locked (the output first, so a second
    run on the same output stops there); both are closed on leaving."""
    out = Appender(paths.output)
    rejected: Appender | None = None
    try:
        rejected = Appender(paths.rejected)
        yield out, rejected
    finally:
        out.close()
        if rejected is not None:
            rejected.close()


def load_done(paths: OutputPaths, n: int) -> tuple[dict[str, set[int]], dict[str, set[str]]]:
    """Sample indices already written or rejected per prompt key, and digests of kept completions
    of prompts still missing samples."""
    done: dict[str, set[int]] = {}
    kept: dict[str, set[str]] = {}
    for path, answered in ((paths.output, True), (paths.rejected, False)):
        for row in read_rows(path):
            key = _row_key(row, answered)
            done.setdefault(key, set()).add(int(row["sample"]))
            if answered:
                kept.setdefault(key, set()).add(completion_digest(row["completion"]))
    return done, {k: v for k, v in kept.items() if len(done[k]) < n}


def write_rows_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``path`` as JSONL rows in one step: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

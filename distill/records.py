"""The JSON files distill writes into run folders, read back with one-line errors when damaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.errors import RunFolderError

__all__ = ["read_evaluation", "read_json", "read_json_lines"]


def read_json(path: Path, fix: str = "", kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (a dict by default).

    Args:
        path: The file.
        fix: What to do about a damaged file, added to the error (``run 'distill eval RUN' again``).
        kind: The type the value must have.

    Raises:
        RunFolderError: A file that is not JSON, or not the kind of value distill writes there.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else exc.msg
        raise RunFolderError(f"{path} is damaged (not JSON: {reason}){'; ' + fix if fix else ''}") from None
    if not isinstance(value, kind):
        raise RunFolderError(f"{path} is damaged (a JSON {type(value).__name__}, not the {kind.__name__} distill "
                             f"writes){'; ' + fix if fix else ''}")
    return value


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a last line cut short (a kill or a full disk while it was
    written) is left out, a damaged line before it is an error."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by an interrupted write
            raise RunFolderError(f"{path}:{number}: damaged (not JSON)") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def read_evaluation(path: Path) -> dict[str, Any]:
    """A run's ``eval.json``: its metric and a dict of measured models."""
    fix = f"measure the run again with 'distill eval {path.parent}'"
    summary = read_json(path, fix)
    if not isinstance(summary.get("models"), dict) or not isinstance(summary.get("metric"), str) or not all(
            isinstance(m, dict) for m in summary["models"].values()):
        raise RunFolderError(f"{path} is damaged (it lacks the metric and models distill writes); {fix}")
    return summary

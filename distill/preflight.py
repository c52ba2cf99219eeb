"""A recipe's files on this machine, checked before anything runs (``distill validate``, and a
staged run before its first stage trains, so that a typo in a later stage's path costs nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.models.sources import RUNS, resolve_source

__all__ = ["local_paths", "missing_paths", "not_found"]


def local_paths(recipe: Any) -> list[tuple[str, Path]]:
    """The recipe's paths on this machine that must exist (sources that are not Hub ids or
    packages), each with the field that names it. A ``pkg://`` source is resolved here: a package
    that is not installed is a one-line error naming what to install."""
    paths = [("data.path", recipe.data.path)] + [(f"data.mix.{i}.path", m.path) for i, m in enumerate(recipe.data.mix)]
    if recipe.data.test_path is not None:
        paths.append(("data.test_path", recipe.data.test_path))
    for i, task in enumerate(recipe.evaluate.suite):  # tasks of the user's own, read after training
        if not isinstance(task, str):
            files = (("path", task.path), ("test", task.test))
            paths += [(f"evaluate.suite.{i}.{field}", path) for field, path in files if path is not None]
    for role in ("teacher", "student"):
        source = getattr(recipe, role).source
        # A Hub id is "name" or "owner/name"; anything deeper is a local folder (a run's student, say).
        if source and source.startswith("run:"):
            paths.append((f"{role}.source", RUNS / source[len("run:"):] / "student" / "distill.json"))
        elif source and source.startswith("pkg://"):
            resolve_source(source)
        elif source and (source.startswith((".", "/", "~")) or source.count("/") > 1
                         or Path(source).suffix in (".safetensors", ".gguf")):
            paths.append((f"{role}.source", Path(source).expanduser()))
    if recipe.data.format == "hf-dataset" and not Path(recipe.data.path).exists():
        paths = [p for p in paths if p[0] != "data.path"]  # a Hub dataset id
    return [(name, Path(str(path)).expanduser()) for name, path in paths]


def missing_paths(recipe: Any) -> list[tuple[str, str, Path]]:
    """``(field, key, path)`` of every path of the recipe and its stages that does not exist: the
    field as shown (a stage's own paths are named by their stage) and its ``--set`` key. A later
    stage's student is the one the stage before it trains, so it is not looked for."""
    own = local_paths(recipe)
    paths = [(name, name, path) for name, path in own] + [
        (f"stages.{i} ({recipe.stages[i].name}) {name}", f"stages.{i}.{name}", path)
        for i, stage in enumerate(recipe.stage_recipes())
        for name, path in local_paths(stage) if (name, path) not in own and not (i and name == "student.source")]
    return [p for p in dict.fromkeys(paths) if not p[2].exists()]


def not_found(name: Any, missing: list[tuple[str, str, Path]]) -> str:
    """The error for the ``missing`` paths of recipe ``name``, with how to point the recipe elsewhere."""
    shown = "; ".join(f"{field} {path}" for field, _, path in missing)
    return (f"{name}: not found: {shown} (relative paths are read from the working directory, {Path.cwd()}; "
            f"give others with --set {missing[0][1]}=PATH)")

"""Where model weights come from: local folders, files, installed packages or the Hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from distill.errors import ModelError

__all__ = ["RUNS", "resolve_source"]


#: Where ``run:NAME`` sources are found: recipes' default run folders.
RUNS = Path("runs")


def resolve_source(source: str) -> str:
    """Turn a recipe's ``source`` into something ``from_pretrained`` or a file reader accepts.

    ``pkg://package/sub/dir`` points into an installed Python package (found without importing
    it); ``run:NAME`` is the student another recipe trained, ``runs/NAME/student`` (that
    recipe's default folder, whatever this recipe's ``output_dir``); an existing local path is
    returned as is; anything else is taken as a Hub id.

    Raises:
        ModelError: The package is not installed, the path inside it does not exist, or the
            named run has no trained student yet.
    """
    if source.startswith("run:"):
        name = source[len("run:") :]
        if not name or "/" in name or ".." in name:
            raise ModelError(f"model source {source}: 'run:' takes a run name (the recipe's name), "
                             "e.g. run:trec-teacher")
        path = RUNS / name / "student"
        if not (path / "distill.json").is_file():
            raise ModelError(f"model source {source}: {path} holds no trained student yet; run that recipe first "
                             f"(distill run recipes/{name}.yaml, or the recipe named '{name}')")
        return str(path)
    if source.startswith("pkg://"):
        package, _, sub = source[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model source {source}: Python package '{package}' is not installed "
                f"(pip install {package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.exists():
            raise ModelError(f"model source {source}: {path} does not exist")
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    looks_local = source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".gguf"))
    if looks_local or source.count("/") > 1:
        raise ModelError(f"model source {source}: no such file or folder")
    return source

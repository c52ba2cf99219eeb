"""One recipe over several seeds: ``distill run RECIPE --seeds 0 1 2``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import PartialState

from distill.compare import write_comparison
from distill.config import Recipe
from distill.errors import RecipeError
from distill.runner import as_recipe, run

__all__ = ["run_seeds", "seed_folder"]


def seed_folder(base: Path, seed: int) -> Path:
    """The run folder of one seed: ``runs/NAME-s0`` for the recipe's ``runs/NAME``."""
    return base.with_name(f"{base.name}-s{seed}")


def run_seeds(recipe: Recipe | str | Path | dict[str, Any], seeds: list[int], overrides: list[str] | None = None
              ) -> Path:
    """Run the recipe once per seed, each in its own folder (resumable, a finished one reused),
    then write the aggregate report (mean +- std per model, a row per seed) into
    ``runs/NAME-seeds/``. Returns the path of its ``report.md``."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds: give distinct seeds, got {seeds}")
    base = as_recipe(recipe, overrides).run_dir()
    folders = [run(recipe, [*(overrides or []), f"seed={seed}", f"output_dir={seed_folder(base, seed)}"]).folder
               for seed in seeds]
    out = base.with_name(f"{base.name}-seeds")
    if not PartialState().is_main_process:
        return out / "report.md"
    seeds_text = ", ".join(str(s) for s in seeds)
    return write_comparison(folders, out, f"{base.name}: seeds {seeds_text}")

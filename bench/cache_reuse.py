"""What the teacher cache's reuse of rows saves when the corpus changes, against fresh builds.

Builds the teacher cache of a recipe (by default ``recipes/minilm-general.yaml``: all of Brown)
in a new cache folder, then, in the same folder, the caches of two changed corpora: a random
half of it (``data.weight=0.5``) and all of it plus another corpus (``data.mix``: WikiText-2's
validation text, one paragraph a line). Each changed build is timed beside a fresh build of the
same corpus in an empty folder, which runs the teacher on every text. Prints, per build: the
examples, the texts the teacher ran on, the seconds, the fresh build's seconds and the ratio,
and the largest difference between the two caches' rows (the teacher's batches differ, so
float rounding may).

    python bench/cache_reuse.py [--recipe recipes/minilm-general.yaml] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.caching import open_teacher_cache
from distill.config import load_recipe
from distill.models.load import load_teacher
from distill.tasks import build_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Counting:
    """The teacher, counting the texts it runs on."""

    def __init__(self, teacher) -> None:
        self.teacher, self.texts = teacher, 0
        self.module = teacher.module

    def __call__(self, inputs):
        self.texts += len(inputs["text"])
        return self.teacher(inputs)


def build(recipe_path: str, overrides: list[str], cache_dir: Path, teacher) -> tuple[object, int, int, float]:
    """A cache of the recipe's corpus (with ``overrides``) in ``cache_dir``: it, examples, teacher texts, seconds."""
    recipe = load_recipe(recipe_path, [*overrides, f"cache.dir={cache_dir}"])
    task = build_task(recipe.task, recipe.data)
    counting = Counting(teacher)
    start = time.perf_counter()
    cache = open_teacher_cache(recipe, counting, task)
    return cache, len(task.train), counting.texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/minilm-general.yaml")
    parser.add_argument("--extra", type=Path, default=DATA / "wikitext-2" / "valid.txt", help="the corpus mixed in")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(load_recipe(args.recipe))
    changes = {"a random half (data.weight=0.5)": ["data.weight=0.5"],
               f"plus {args.extra.parent.name}/{args.extra.name} (data.mix)": [f"data.mix=[{{path: {args.extra}}}]"]}
    with tempfile.TemporaryDirectory() as shared:
        _, examples, texts, seconds = build(args.recipe, [], Path(shared), teacher)
        print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}; recipe {args.recipe}")
        print(f"first build: {examples} examples, the teacher ran on {texts} texts, {seconds:.1f}s")
        print()
        print("| corpus | examples | teacher texts (reuse) | seconds (reuse) | teacher texts (fresh) | "
              "seconds (fresh) | fresh / reuse | largest row difference |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, overrides in changes.items():
            reused, examples, texts, seconds = build(args.recipe, overrides, Path(shared), teacher)
            with tempfile.TemporaryDirectory() as empty:
                fresh, _, fresh_texts, fresh_seconds = build(args.recipe, overrides, Path(empty), teacher)
                diff = max(float(np.abs(reused.arrays[k] - fresh.arrays[k]).max()) for k in fresh.arrays)
            print(f"| {name} | {examples} | {texts} | {seconds:.1f} | {fresh_texts} | {fresh_seconds:.1f} | "
                  f"{fresh_seconds / seconds:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

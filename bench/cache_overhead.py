"""Cost of an epoch trained from the teacher cache vs a plain student epoch (no teacher).

Side by side in one process, on the Fashion-MNIST recipe's teacher and student, in alternating
repeats; prints the median ratio and its spread, and the online-teacher ratio for contrast.

    python bench/cache_overhead.py [--recipe recipes/fashion-mnist.yaml] [--repeats 3] [--batches N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.batches import ShuffledBatches
from distill.caching import open_teacher_cache
from distill.config import load_recipe
from distill.models.load import load_teacher
from distill.models.student import build_student
from distill.runner import build_loss_terms
from distill.step import distill_step
from distill.tasks import build_task


def epoch_seconds(mode: str, recipe, task, teacher, cache, terms, limit: int | None = None) -> float:
    student = build_student(recipe, teacher, task)
    student.module.train()
    optimizer = torch.optim.AdamW(student.module.parameters(), lr=recipe.train.lr)
    batches = ShuffledBatches(task.train, recipe.train.batch_size, recipe.seed)
    start = time.perf_counter()
    for i, batch in enumerate(batches.epoch(0)):
        if limit is not None and i == limit:
            break
        if mode == "plain":
            t_out, use_terms = None, []
        elif mode == "cached":
            t_out, use_terms = cache.lookup(batch["index"]), terms
        else:
            with torch.no_grad():
                t_out, use_terms = teacher(batch["inputs"]), terms
        weight = recipe.task_loss_weight if mode != "plain" else 1.0
        parts = distill_step(student, batch, t_out, use_terms, torch.nn.ModuleDict(), task.task_loss, weight, True)
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/fashion-mnist.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, help="time only the first N batches of each epoch")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    task = build_task(recipe.task, recipe.data)
    teacher = load_teacher(recipe)
    terms = build_loss_terms(recipe.losses, task.output)
    cache = open_teacher_cache(recipe, teacher, task)
    times: dict[str, list[float]] = {"plain": [], "cached": [], "online": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(epoch_seconds(mode, recipe, task, teacher, cache, terms, args.batches))
    ratios = [c / p for c, p in zip(times["cached"], times["plain"], strict=True)]
    online = [o / p for o, p in zip(times["online"], times["plain"], strict=True)]
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    for mode, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{mode:>6} epoch: median {statistics.median(values):.1f}s  (runs: {runs})")
    for name, values in (("cached", ratios), ("online", online)):
        print(f"{name} / plain epoch: median {statistics.median(values):.3f}x  "
              f"(min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()

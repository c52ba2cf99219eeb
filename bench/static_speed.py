"""Sentences per second of a trained static student and of the teacher, encoding the STS-B test set.

Encodes all test sentences in batches (tokenisation included), in inference mode, alternating
the two models repeat by repeat so that load changes hit both; prints medians and the ratio.

    python bench/static_speed.py [--student runs/sts-static/student] [--batch-size 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.config import load_recipe
from distill.data import read_stsb
from distill.models.static import load_static
from distill.runner import load_teacher


def sentences_per_second(model, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            model({"text": texts[i : i + batch_size]})
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/sts-static.yaml")
    parser.add_argument("--student", default="runs/sts-static/student")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    pairs = read_stsb(recipe.data.path, "test")
    texts = pairs.first + pairs.second
    models = {"student": load_static(args.student), "teacher": load_teacher(recipe)}
    for model in models.values():
        model.module.eval()
        sentences_per_second(model, texts[: args.batch_size], args.batch_size)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            speeds[name].append(sentences_per_second(model, texts, args.batch_size))
    print(f"{len(texts)} sentences, batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    for name, values in speeds.items():
        print(f"{name}: median {statistics.median(values):,.0f} sentences/s (min {min(values):,.0f}, "
              f"max {max(values):,.0f})")
    ratio = [s / t for s, t in zip(speeds["student"], speeds["teacher"], strict=True)]
    print(f"student / teacher: median {statistics.median(ratio):.1f}x")


if __name__ == "__main__":
    main()

"""Fashion-MNIST: distilled student vs the same student trained without the teacher, over seeds.

Trains the teacher once (recipes/fashion-mnist-teacher.yaml) if its run is missing, then runs
recipes/fashion-mnist.yaml for each seed and prints test accuracy per seed, mean and spread.

    python bench/fashion_mnist_seeds.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default="recipes/fashion-mnist.yaml")
    args = parser.parse_args()
    if not (Path("runs/fashion-mnist-teacher/student") / "distill.json").is_file():
        distill.run("recipes/fashion-mnist-teacher.yaml")
    rows = []
    for seed in args.seeds:
        result = distill.run(args.recipe, [f"seed={seed}", f"output_dir=runs/fashion-mnist-seed{seed}"])
        rows.append({role: m["accuracy"] for role, m in result.models.items()} | {"seed": seed})
        sizes = {role: m["parameters"] for role, m in result.models.items()}
    print(f"\nparameters: {json.dumps(sizes)}  (teacher / student = {sizes['teacher'] / sizes['student']:.1f}x)")
    print("| seed | teacher | distilled student | baseline student | gain |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['teacher']:.2f} | {r['student']:.2f} | {r['baseline']:.2f} | "
              f"{r['student'] - r['baseline']:+.2f} |")
    for role in ("student", "baseline"):
        values = [r[role] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{role}: mean {statistics.mean(values):.2f} +- {spread:.2f} (std over {len(values)} seeds)")
    gains = [r["student"] - r["baseline"] for r in rows]
    print(f"gain: mean {statistics.mean(gains):+.2f}, distilled wins {sum(g > 0 for g in gains)}/{len(gains)} seeds")


if __name__ == "__main__":
    main()

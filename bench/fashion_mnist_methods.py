"""Fashion-MNIST: every distillation family on one teacher/student pair, over seeds, vs the baseline.

Trains the teacher once (recipes/fashion-mnist-teacher.yaml) if its run is missing, then, for
each seed, the student of recipes/fashion-mnist.yaml with each method's losses (same budget,
same data order) and the same student without a teacher. Prints test accuracy per seed, mean
and spread, and the gain over the baseline; --write puts the table into docs/results.md.

    python bench/fashion_mnist_methods.py [--seeds 0 1 2] [--methods kd hint] [--write docs/results.md]
    python bench/fashion_mnist_methods.py --collect --write docs/results.md   # tabulate finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _markdown import write_section

import distill

TEACHER = Path("runs/fashion-mnist-teacher/student")
RECIPE = "recipes/fashion-mnist.yaml"
FEATURES = {"student": ["features.12"], "teacher": ["features.12"]}  # last conv stage, 14x14
STAGES = {"student": ["features.5", "features.12"], "teacher": ["features.5", "features.12"]}
POOLED = {"student": ["features.15"], "teacher": ["features.15"]}  # pooled penultimate vector

#: name -> (family, losses, task-loss weight). Each adds its distillation loss to the task loss.
METHODS: dict[str, tuple[str, list[dict[str, Any]], float]] = {
    "kd": ("response", [{"name": "kd", "weight": 0.5, "params": {"temperature": 1.0}}], 0.5),
    "dkd": ("response", [{"name": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}}],
            1.0),
    "hint": ("feature", [{"name": "hint", "weight": 1.0, "layers": FEATURES}], 1.0),
    "attention_transfer": ("feature", [{"name": "attention_transfer", "weight": 1000.0, "layers": STAGES}], 1.0),
    "rkd": ("relation", [{"name": "rkd_distance", "weight": 25.0, "layers": POOLED},
                         {"name": "rkd_angle", "weight": 50.0, "layers": POOLED}], 1.0),
    "sp": ("relation", [{"name": "sp", "weight": 3000.0, "layers": FEATURES}], 1.0),
    "crd": ("relation", [{"name": "crd", "weight": 0.8, "layers": POOLED}], 1.0),
}


def _accuracy(folder: Path, role: str) -> float:
    return json.loads((folder / "eval.json").read_text())["models"][role]["accuracy"]


def run_method(name: str, seed: int, root: Path, extra: list[str]) -> dict[str, Any]:
    """Run one method on one seed (or reuse its finished run folder); returns accuracies and time."""
    family, losses, task_weight = METHODS[name]
    folder = root / f"{name}-s{seed}"
    overrides = [f"seed={seed}", f"output_dir={folder}", f"losses={json.dumps(losses)}",
                 f"task_loss_weight={task_weight}", f"baseline={'true' if name == 'kd' else 'false'}", *extra]
    start = time.perf_counter()
    distill.run(RECIPE, overrides)
    row = {"method": name, "family": family, "seed": seed, "accuracy": _accuracy(folder, "student"),
           "teacher": _accuracy(folder, "teacher"), "seconds": time.perf_counter() - start}
    if name == "kd":
        row["baseline"] = _accuracy(folder, "baseline")
    return row


def collect(name: str, seed: int, root: Path) -> dict[str, Any] | None:
    """The row of a run that already finished (its ``eval.json``), or ``None``."""
    folder = root / f"{name}-s{seed}"
    if not (folder / "eval.json").is_file():
        return None
    row = {"method": name, "family": METHODS[name][0], "seed": seed, "accuracy": _accuracy(folder, "student"),
           "teacher": _accuracy(folder, "teacher")}
    if name == "kd":
        row["baseline"] = _accuracy(folder, "baseline")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy per seed, mean +- std, gain over the baseline of the same seeds."""
    seeds = sorted({r["seed"] for r in rows})
    baseline = {r["seed"]: r["baseline"] for r in rows if "baseline" in r}
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    head = "| method | family | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | gain vs baseline | wins |"
    lines = [head, "|" + "---|" * (len(seeds) + 5)]

    def line(name: str, family: str, acc: dict[int, float]) -> str:
        values = [acc[s] for s in seeds if s in acc]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " | ".join(f"{acc[s]:.2f}" if s in acc else "-" for s in seeds)
        gains = [acc[s] - baseline[s] for s in seeds if s in acc and s in baseline]
        gain = f"{statistics.mean(gains):+.2f}" if gains and name not in ("baseline", "teacher") else ""
        wins = f"{sum(g > 0 for g in gains)}/{len(gains)}" if gains and name not in ("baseline", "teacher") else ""
        return f"| {name} | {family} | {cells} | {statistics.mean(values):.2f} ± {std:.2f} | {gain} | {wins} |"

    teacher = {r["seed"]: r["teacher"] for r in rows}
    lines.append(line("teacher", "-", teacher))
    if baseline:
        lines.append(line("baseline", "no teacher", baseline))
    for name, per_seed in by_method.items():
        lines.append(line(name, METHODS[name][0], {s: r["accuracy"] for s, r in per_seed.items()}))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--root", type=Path, default=Path("runs/fm-methods"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override")
    parser.add_argument("--write", type=Path, help="update this markdown file between the markers")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate the runs already finished under --root")
    args = parser.parse_args()
    if not (TEACHER / "distill.json").is_file():
        distill.run("recipes/fashion-mnist-teacher.yaml")
    methods = ["kd"] + [m for m in args.methods if m != "kd"]  # kd's run also trains the baseline
    rows = []
    for seed in args.seeds:
        for name in methods:
            if args.collect:
                row = collect(name, seed, args.root)
                if row is None:
                    continue
                rows.append(row)
            else:
                rows.append(run_method(name, seed, args.root, args.extra))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    if not args.collect:
        seconds = {m: statistics.median(r["seconds"] for r in rows if r["method"] == m) for m in methods}
        text += "\n\nMedian wall time per run (student training + evaluation; kd's includes the baseline): " + \
            ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
    print(text)
    if args.write:
        write_section(args.write, "fashion-mnist-methods", text)


if __name__ == "__main__":
    main()

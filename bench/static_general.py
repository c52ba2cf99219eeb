"""Label-free static student of all-MiniLM-L6-v2 against Model2Vec, side by side, on the evaluation suite.

Runs ``recipes/minilm-static-general.yaml`` once per seed (``runs/minilm-static-general-s<seed>``,
reused when finished), then loads every seed's student, Model2Vec's model built from the same
teacher, and the teacher into one process. Each is scored on the suite (STS12-16 and STS-B test:
Spearman x 100 of cosine; SST-2 and TREC: accuracy of a logistic-regression probe on frozen
embeddings); each static model's speed is measured in turn, repeat by repeat, encoding the
suite's STS-B test sentences in batches of 1,024 (tokenisation included).

    python bench/static_general.py [--seeds 0 1 2] [--model2vec runs/model2vec-minilm-256] [--repeats 30]
        [--write docs/results.md]

Build the Model2Vec model as ``bench/sts_family.py``'s docstring says (``distill(teacher,
pca_dims=256)`` with model2vec 0.10.0, in an environment of its own).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _markdown import write_section
from sts_family import Model2VecAdapter, speeds_in_turn

import distill
from distill.config import load_recipe
from distill.evaluate import folder_size
from distill.models.load import load_model
from distill.suite import SUITE_TASKS, read_stsb_test, run_suite

RECIPE = "recipes/minilm-static-general.yaml"
STS = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb"]


def run_seeds(seeds: list[int]) -> list[Path]:
    folders = []
    for seed in seeds:
        recipe = load_recipe(RECIPE, [f"seed={seed}", f"output_dir=runs/minilm-static-general-s{seed}"])
        if not (recipe.run_dir() / "eval.json").is_file():
            distill.run(recipe)
        folders.append(recipe.run_dir())
    return folders


def row(name: str, scores: dict[str, float], teacher: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "scores": scores, "sts_avg": float(np.mean([scores[t] for t in STS])),
            "teacher_avg": float(np.mean([teacher[t] for t in STS])), **extra}


def table(rows: list[dict[str, Any]], tasks: list[str], reference: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(tasks) + " | STS avg (6) | size (MB) | sentences/s | speed vs Model2Vec |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for r in rows:
        cells = []
        for t in tasks:
            value, spread = r["scores"][t], r.get("spread", {}).get(t)
            mark = "**" if r["name"] != reference["name"] and value > reference["scores"][t] else ""
            cells.append(f"{mark}{value:.2f}{' ± ' + format(spread, '.2f') if spread is not None else ''}{mark}")
        speed_cell = f"{r['speed']:,.0f}" if "speed" in r else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        size = f"{r['size_bytes'] / 1e6:.1f}" if "size_bytes" in r else ""
        tail = f" | {r['sts_avg']:.2f} | {size} | {speed_cell} | {ratio} |"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model2vec", type=Path, default=Path("runs/model2vec-minilm-256"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--write", type=Path, help="update this markdown file between the static-general markers")
    args = parser.parse_args()
    folders = run_seeds(args.seeds)
    recipe = load_recipe(folders[0] / "recipe.yaml")
    tasks = [t for t in SUITE_TASKS if t in recipe.evaluate.suite]
    evals = [json.loads((f / "eval.json").read_text()) for f in folders]
    teacher = evals[0]["suite"]["teacher"]
    rows = [row("teacher all-MiniLM-L6-v2", teacher, teacher, {}),
            row("derived static student, before training", evals[0]["suite"]["baseline"], teacher, {})]
    models: dict[str, Any] = {}
    for seed, folder, summary in zip(args.seeds, folders, evals, strict=True):
        name = f"distilled on Brown, seed {seed}"
        models[name] = load_model(recipe.student, recipe.student_kind, str(folder / "student"))
        rows.append(row(name, summary["suite"]["student"], teacher, {"size_bytes": folder_size(folder / "student")}))
    seeds = [r for r in rows if r["name"].startswith("distilled")]
    mean = {t: float(np.mean([r["scores"][t] for r in seeds])) for t in tasks}
    spread = {t: float(np.std([r["scores"][t] for r in seeds])) for t in tasks}
    reference = Model2VecAdapter(args.model2vec)
    m2v_scores = run_suite(lambda texts: reference({"text": texts})["embedding"].numpy(), tasks,
                           Path(recipe.evaluate.suite_data))
    m2v = row("Model2Vec 0.10.0, `distill(teacher, pca_dims=256)`", m2v_scores, teacher,
              {"size_bytes": folder_size(args.model2vec)})
    models[m2v["name"]] = reference
    first, second, _ = read_stsb_test(Path(recipe.evaluate.suite_data) / "stsbenchmark")
    texts = sorted(set(first + second), key=len)
    batches = [texts[i : i + 1024] for i in range(0, len(texts), 1024)]
    speeds = speeds_in_turn(models, batches, args.repeats)
    for r in [*rows, m2v]:
        if r["name"] in speeds:
            r["speed"] = statistics.median(speeds[r["name"]])
            # The ratio per repeat, then the median: a load change hits both models of a repeat alike.
            r["ratio"] = statistics.median(a / b for a, b in zip(speeds[r["name"]], speeds[m2v["name"]], strict=True))
    rows.append(row(f"distilled on Brown, mean ± std of {len(seeds)} seeds", mean, teacher, {"spread": spread}))
    rows.append(m2v)
    text = table(rows, tasks, m2v) + (
        f"\n\nBold: above Model2Vec. Speed: the {len(texts):,} distinct STS-B test sentences in batches of 1,024, "
        f"{torch.get_num_threads()} torch threads, models in turn, {args.repeats} repeats: the median speed, and the "
        "median of the per-repeat ratios to Model2Vec.")
    print(text)
    if args.write:
        write_section(args.write, "static-general", text)


if __name__ == "__main__":
    main()

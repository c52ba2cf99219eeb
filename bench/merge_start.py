"""How much of its start a label-free student should keep: ``train.merge_start`` swept after the fact.

A label-free run saves the derived student before training as its baseline and the trained
student beside it. ``train.merge_start: s`` saves ``(1 - s) * trained + s * start`` instead.
This script mixes the two saved students of finished runs at each share (the same function the
training loop calls, :func:`distill.models.weights.merge_start`) and scores every mix on the evaluation
suite with the suite's own scoring, so a share can be chosen without retraining.

    python bench/merge_start.py runs/exp-ref [runs/...] [--shares 0 0.2 0.3 0.5] [--threads 1]
    python bench/merge_start.py runs/demo-minilm-sts/sts   # a later stage: its start is the stage before's student

Each RUN must hold ``student/`` and its ``recipe.yaml``. Its start is the saved student its
recipe loads (a later stage starts from the student of the stage before it), else its
``baseline/`` (a label-free run with ``baseline: true`` saves the derived student there), unless
``--start`` names it. Prints one row per run and share: the six STS tasks' average, SST-2, TREC
and the average of all eight.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill.config import load_recipe
from distill.models.load import load_model
from distill.models.weights import merge_start, start_weights
from distill.suite import SUITE_TASKS, run_suite
from distill.tasks.embedding import encode_texts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STS = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb"]


def start_of(run: Path) -> Path:
    """The saved student ``run`` started from: the folder its recipe loads, else its baseline."""
    student = load_recipe(run / "recipe.yaml").student
    loaded = student.derive is None and student.source and Path(student.source).is_dir()
    return Path(student.source) if loaded else run / "baseline"


def sweep(run: Path, begin: Path, shares: list[float], data: Path) -> list[tuple[float, dict]]:
    """Suite scores of the run's student mixed with the saved student ``begin`` at each share."""
    recipe = load_recipe(run / "recipe.yaml")
    spec = recipe.teacher  # pooling, normalisation and truncation: a derived student keeps the teacher's
    kind = recipe.student_kind
    start = start_weights(load_model(spec, kind, source=str(begin)))
    student = load_model(spec, kind, source=str(run / "student"))
    trained = start_weights(student)
    tasks = [t for t in recipe.evaluate.suite if t in SUITE_TASKS] or list(SUITE_TASKS)
    rows = []
    for share in shares:
        student.module.load_state_dict(trained, strict=False)
        merge_start(student, start, share)
        scores = run_suite(lambda texts: encode_texts(student, texts, 64), tasks, data)
        rows.append((share, scores))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.2, 0.3, 0.5])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=Path,
                        help="the saved student the runs started from (default: the one RUN's recipe loads, else "
                             "RUN/baseline)")
    args = parser.parse_args()
    starts = {}
    for run in args.runs:
        for needed in (run / "recipe.yaml", run / "student"):
            if not needed.exists():
                raise SystemExit(f"{run}: {needed} is missing; see this script's docstring for what a RUN holds")
        starts[run] = args.start or start_of(run)
        if not starts[run].exists():
            raise SystemExit(f"{run}: no start to mix in: {starts[run]} is missing; name one with --start")
    torch.set_num_threads(args.threads)
    print("| run | merge_start | STS avg (6) | SST-2 | TREC | average (8) |")
    print("|---|---:|---:|---:|---:|---:|")
    for run, begin in starts.items():
        for share, s in sweep(run, begin, args.shares, args.data):
            sts = sum(s[t] for t in STS if t in s) / max(1, sum(t in s for t in STS))
            print(f"| {run} | {share:g} | {sts:.2f} | {s.get('sst2', float('nan')):.2f} | "
                  f"{s.get('trec', float('nan')):.2f} | {sum(s.values()) / len(s):.2f} |", flush=True)


if __name__ == "__main__":
    main()

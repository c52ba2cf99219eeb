"""How well ``distill plan`` predicts a trained student's speed-up.

For each finished run: the planner's candidate of the run's student shape (derived from the
teacher with one calibration batch, untrained) and the run's trained student are each timed
against the teacher, in turns, in this one process; rounds alternate between the two, and the
medians over the rounds are printed as a markdown table:

    python bench/plan_check.py --run runs/demo-minilm-sts --run runs/smollm2-wikitext-s0 --rounds 3

Run it on a quiet machine: the figures are ratios measured side by side, but a machine whose
load changes within a round still moves them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from distill.config import EvalSpec, load_recipe
from distill.evaluate import time_models
from distill.models.load import load_model, load_teacher
from distill.plan import Candidate, time_candidate
from distill.tasks import build_task


def check(run: Path, rounds: int, repeats: int, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    recipe = load_recipe(run / "recipe.yaml")
    if recipe.student.derive is None:
        raise SystemExit(f"{run}: the student is not derived from the teacher; nothing to plan")
    teacher = load_teacher(recipe)
    task = build_task(recipe.task, recipe.data)
    trained = load_model(recipe.student, recipe.student_kind, str(run / "student"))
    derive = recipe.student.derive.model_dump(exclude_none=True, exclude={"calibration_batches", "sif", "vocab"})
    candidate = Candidate(derive, "static-embedding" if recipe.student_kind == "static-embedding" else None)
    spec = EvalSpec(latency_repeats=repeats, throughput_repeats=max(3, repeats // 3), warmup=2,
                    batch_size=recipe.evaluate.batch_size)
    calibration = [task.train.batch(range(min(8, len(task.train))))["inputs"]]
    texts = task.train_texts() if hasattr(task, "train_texts") else None
    predicted_b1, predicted_b, measured_b1, measured_b = [], [], [], []
    for _ in range(rounds):
        row, _teacher = time_candidate(teacher, task, candidate, spec, calibration, texts)
        predicted_b1.append(row["speedup_b1"])
        predicted_b.append(row["speedup"])
        timed = time_models({"teacher": teacher, "student": trained}, task, spec)
        measured_b1.append(timed["teacher"]["latency_ms"] / timed["student"]["latency_ms"])
        measured_b.append(timed["student"]["throughput"] / timed["teacher"]["throughput"])
    med = statistics.median
    return {"run": run.name, "shape": candidate.label, "batch": spec.batch_size,
            "predicted_b1": med(predicted_b1), "measured_b1": med(measured_b1),
            "predicted_b": med(predicted_b), "measured_b": med(measured_b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 passes per model and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [check(run, args.rounds, args.repeats, args.threads) for run in args.run]
    print("| run | student | predicted speed-up b1 | measured b1 | predicted speed-up (batch) | measured (batch) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['shape']} | {r['predicted_b1']:.2f}x | {r['measured_b1']:.2f}x | "
              f"{r['predicted_b']:.2f}x (b{r['batch']}) | {r['measured_b']:.2f}x |")


if __name__ == "__main__":
    main()

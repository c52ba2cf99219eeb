"""Two stages against one: the demo's STS-B stage alone, and after label-free general distillation.

Runs ``recipes/minilm-two-stage.yaml`` (general distillation on the Brown corpus, then the demo's
STS-B stage from its student) and ``recipes/demo-minilm-sts.yaml`` (the STS-B stage alone, from
the derived student) unless their run folders hold finished runs, then prints one table of the
evaluation suite for the teacher, each run's student and its baseline:

- one stage, no teacher: the derived student trained on STS-B's gold scores alone;
- one stage, distilled: the demo (gold scores + the teacher's similarities);
- two stages, no teacher in stage 2: the general student trained on the gold scores alone;
- two stages, distilled: the general student, then the demo's stage.

    python bench/two_stage.py [--demo runs/demo-minilm-sts] [--write docs/results.md]

The demo's run folder must have suite scores (``distill eval runs/demo-minilm-sts --suite
sts12 sts13 sts14 sts15 sts16 stsb sst2 trec`` adds them to a finished run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _markdown import write_section

import distill
from distill.config import load_recipe

TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sst2", "trec")
STS = TASKS[:6]


def suite_of(folder: Path) -> dict[str, dict[str, float]]:
    summary = json.loads((folder / "eval.json").read_text())
    if "suite" not in summary:
        raise SystemExit(f"{folder}: no suite scores; run distill eval {folder} --suite {' '.join(TASKS)}")
    return summary["suite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("runs/demo-minilm-sts"))
    parser.add_argument("--write", type=Path, help="update this markdown file between the two-stage markers")
    args = parser.parse_args()
    staged = load_recipe("recipes/minilm-two-stage.yaml")
    if not (staged.run_dir() / "report.md").is_file():
        distill.run(staged)
    if not (args.demo / "eval.json").is_file():
        distill.run(load_recipe("recipes/demo-minilm-sts.yaml", [f"output_dir={args.demo}"]))
    one, two = suite_of(args.demo), suite_of(staged.run_dir() / "sts")
    teacher = one["teacher"]
    rows = [("teacher all-MiniLM-L6-v2", teacher),
            ("one stage (STS-B gold), no teacher", one["baseline"]),
            ("one stage (STS-B gold), distilled: the demo", one["student"]),
            ("two stages: general distillation, then STS-B gold without the teacher", two["baseline"]),
            ("two stages: general distillation, then the demo's stage", two["student"])]
    lines = ["| student (demo shape: 2 layers, width 256) | " + " | ".join(TASKS) + " | STS avg (6) | average (8) |",
             "|---|" + "---|" * (len(TASKS) + 2)]
    for name, scores in rows:
        sts = sum(scores[t] for t in STS) / len(STS)
        every = sum(scores[t] for t in TASKS) / len(TASKS)
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.2f}" for t in TASKS) + f" | {sts:.2f} | {every:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "two-stage", text)


if __name__ == "__main__":
    main()

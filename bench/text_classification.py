"""Text classification: a fine-tuned classifier distilled into the demo-shaped student, over seeds.

For ``--task trec`` (TREC question types) or ``sst2`` (SST-2 sentence polarity): runs
``recipes/<task>-teacher.yaml`` (all-MiniLM-L6-v2 + a fresh head fine-tuned on the labels) if
``runs/<task>-teacher`` has no finished run, then ``recipes/<task>.yaml`` once per seed
(``runs/<task>-s<seed>``, reused when finished; each run trains the distilled student and the
same student on cross-entropy alone, with the same data order), and prints test accuracy per
seed, the mean ± std, and on how many seeds distillation wins.

    python bench/text_classification.py [--task trec] [--seeds 0 1 2] [--threads 1] [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _markdown import write_section

import distill
from distill.config import load_recipe


def run(path: str, overrides: list[str]) -> Path:
    recipe = load_recipe(path, overrides)
    if not (recipe.run_dir() / "eval.json").is_file():
        distill.run(recipe)
    return recipe.run_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["trec", "sst2"], default="trec")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--write", type=Path, help="update this markdown file between the <task>-kd markers")
    args = parser.parse_args()
    threads = f"train.threads={args.threads}"
    run(f"recipes/{args.task}-teacher.yaml", [threads])
    models = [json.loads((run(f"recipes/{args.task}.yaml", [threads, f"seed={s}", f"output_dir=runs/{args.task}-s{s}"])
                          / "eval.json").read_text())["models"] for s in args.seeds]
    rows = []
    for role in ("teacher", "baseline", "student"):
        values = [m[role]["accuracy"] for m in models]
        rows.append((role, values))
    wins = sum(m["student"]["accuracy"] > m["baseline"]["accuracy"] for m in models)
    head = "| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std | gain vs baseline | wins |"
    lines = [head, "|---|" + "---|" * (len(args.seeds) + 3)]
    base = statistics.mean(rows[1][1])
    names = {"teacher": "teacher (fine-tuned all-MiniLM-L6-v2)", "baseline": "student, cross-entropy alone",
             "student": "student, KD + cross-entropy"}
    for role, values in rows:
        mean, std = statistics.mean(values), statistics.pstdev(values)
        gain = f"{mean - base:+.2f}" if role == "student" else ""
        won = f"{wins}/{len(models)}" if role == "student" else ""
        lines.append(f"| {names[role]} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {mean:.2f} ± {std:.2f} | {gain} | {won} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, f"{args.task}-kd", text)


if __name__ == "__main__":
    main()

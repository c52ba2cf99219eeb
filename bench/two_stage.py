"""What the teacher adds to the demo, on tasks no stage trains on, over seeds.

Runs ``recipes/demo-minilm-sts.yaml`` once per seed (folders ``runs/demo-minilm-sts-sSEED``):
a label-free general stage on half of the Brown corpus, then STS-B's gold scores plus the
teacher. Each run's baseline is the same derived student through the same stages without the
teacher (untrained, then STS-B's gold scores alone). Beside them, one seed each (a finished run
folder is reused, else the recipe is run):

- ``recipes/sts-minilm.yaml``: the STS-B stage alone, the teacher only on top of the gold scores;
- ``recipes/minilm-two-stage.yaml``: a longer general stage (all of Brown, 3 epochs), then the same
  STS-B stage.

Prints one table of the evaluation suite (teacher, students, baselines; mean +- std over the
seeds), and the demo's gain over its baseline per seed.

    python bench/two_stage.py [--seeds 0 1 2] [--threads 2] [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _markdown import write_section

import distill
from distill.config import load_recipe

TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sst2", "trec")
STS = TASKS[:6]
SUITE = [f"evaluate.suite=[{', '.join(TASKS)}]", "evaluate.suite_data=../shared/data"]


def suite_of(folder: Path) -> dict[str, dict[str, float]]:
    """The suite scores of a finished run (a staged run's last stage)."""
    recipe = load_recipe(folder / "recipe.yaml")
    last = recipe.stage_recipes()[-1].run_dir() if recipe.stages else folder
    summary = json.loads((last / "eval.json").read_text())
    if "suite" not in summary:
        raise SystemExit(f"{folder}: no suite scores; run distill eval {folder} --suite {' '.join(TASKS)}")
    return summary["suite"]


def finished(recipe: str, folder: Path, threads: int, extra: list[str] | None = None) -> Path:
    """``folder``, after running ``recipe`` into it unless it holds a finished run."""
    if not (folder / "report.md").is_file():
        # A stage that gives its own train section needs the thread count too.
        stages = [f"stages.{i}.train.threads={threads}" for i, stage in enumerate(load_recipe(recipe).stages)
                  if "train" in stage.changes()]
        distill.run(recipe, [f"output_dir={folder}", f"train.threads={threads}", *stages, *(extra or [])])
    return folder


def averages(scores: dict[str, float]) -> tuple[float, float]:
    return (statistics.mean(scores[t] for t in STS), statistics.mean(scores[t] for t in TASKS))


def row(name: str, runs: list[dict[str, float]]) -> str:
    """A table row: each task's mean (+- std over ``runs`` when there are several)."""
    cells = []
    for values in ([r[t] for r in runs] for t in TASKS):
        cells.append(f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(runs) > 1 else ""))
    for i in range(2):
        values = [averages(r)[i] for r in runs]
        cells.append(f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(runs) > 1 else ""))
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    parser.add_argument("--write", type=Path, help="update this markdown file between the two-stage markers")
    args = parser.parse_args()
    demo = {seed: suite_of(finished("recipes/demo-minilm-sts.yaml", Path(f"runs/demo-minilm-sts-s{seed}"),
                                    args.threads, [f"seed={seed}"])) for seed in args.seeds}
    one = suite_of(finished("recipes/sts-minilm.yaml", Path("runs/sts-minilm"), args.threads, SUITE))
    longer = suite_of(finished("recipes/minilm-two-stage.yaml", Path("runs/minilm-two-stage"), args.threads))
    n = len(args.seeds)
    lines = ["| student (demo shape: 2 layers, width 256) | " + " | ".join(TASKS) + " | STS avg (6) | average (8) |",
             "|---|" + "---|" * (len(TASKS) + 2),
             row("teacher all-MiniLM-L6-v2", [one["teacher"]]),
             row(f"no teacher: untrained, then STS-B gold (the demo's baseline; {n} seeds)",
                 [d["baseline"] for d in demo.values()]),
             row("the teacher on STS-B only: gold + the teacher's similarities (sts-minilm, seed 0)", [one["student"]]),
             row(f"**the demo**: general stage (half of Brown, 2 epochs), then the STS-B stage ({n} seeds)",
                 [d["student"] for d in demo.values()]),
             row("longer general stage (all of Brown, 3 epochs), then the STS-B stage (minilm-two-stage, seed 0)",
                 [longer["student"]])]
    gains = ["", "The demo's student minus its baseline, per seed (STS avg / average of 8 / TREC):"]
    for seed, d in demo.items():
        (s_sts, s_all), (b_sts, b_all) = averages(d["student"]), averages(d["baseline"])
        gains.append(f"- seed {seed}: {s_sts - b_sts:+.2f} / {s_all - b_all:+.2f} / "
                     f"{d['student']['trec'] - d['baseline']['trec']:+.2f}")
    text = "\n".join(lines + gains)
    print(text)
    if args.write:
        write_section(args.write, "two-stage", text)


if __name__ == "__main__":
    main()

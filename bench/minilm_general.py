"""Label-free distillation of all-MiniLM-L6-v2 on the Brown corpus, over seeds, scored on the suite.

Runs ``recipes/minilm-general.yaml`` once per seed (``runs/minilm-general-s<seed>``; a finished
run is reused, an interrupted one resumes), then prints one table: the teacher, the derived
student before training (the label-free baseline: no labels, so no student "trained without the
teacher" exists), the distilled student per seed and as mean ± std over seeds, on every task of
the evaluation suite, with the share of the teacher's score. Size and speed come from the runs'
own reports (teacher and student timed in turn in one process).

``--with-gold RUN`` adds the suite scores of a run of a gold-trained recipe (e.g. sts-minilm,
trained on STS-B's training pairs and scores) for comparison; its STS12-16 scores are not a fair
measure of generalisation, because STS-B is drawn from the same sources as STS12-16.

    python bench/minilm_general.py [--seeds 0 1 2] [--parallel 2] [--threads 1] [--with-gold runs/sts-minilm]
        [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _markdown import write_section

RECIPE = "recipes/minilm-general.yaml"
TASKS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sst2", "trec")
STS = TASKS[:6]


def run_seeds(seeds: list[int], parallel: int, threads: int) -> None:
    """Run (or resume) the recipe for every seed without an ``eval.json``, ``parallel`` at a time."""
    todo = [s for s in seeds if not (Path(f"runs/minilm-general-s{s}") / "eval.json").is_file()]
    while todo:
        batch, todo = todo[:parallel], todo[parallel:]
        procs = []
        for s in batch:
            command = [sys.executable, "-m", "distill.cli", "run", RECIPE, "--set", f"seed={s}",
                       "--set", f"output_dir=runs/minilm-general-s{s}", "--set", f"train.threads={threads}"]
            log = open(f"runs/minilm-general-s{s}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log))
        for seed, proc in zip(batch, procs, strict=True):
            if proc.wait():
                raise SystemExit(f"seed {seed} failed; see runs/minilm-general-s{seed}.log")


def _average(scores: dict[str, float], tasks: tuple[str, ...]) -> float:
    return statistics.mean(scores[t] for t in tasks)


def _cells(values: list[float], reference: float | None) -> str:
    mean = statistics.mean(values)
    text = f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
    return text + (f" ({100 * mean / reference:.1f}%)" if reference else "")


def table(seeds: list[int], gold: Path | None) -> str:
    """The markdown table of the runs' suite scores, sizes and speeds."""
    evals = {s: json.loads(Path(f"runs/minilm-general-s{s}/eval.json").read_text()) for s in seeds}
    first = evals[seeds[0]]
    teacher, baseline = first["suite"]["teacher"], first["suite"]["baseline"]
    # Each model's speed is relative to the teacher timed beside it, in the same run's evaluation.
    rows: list[tuple[Any, ...]] = [
        ("teacher all-MiniLM-L6-v2", {t: [teacher[t]] for t in TASKS}, first["models"]),
        ("derived student, before training", {t: [baseline[t]] for t in TASKS}, first["models"], "baseline"),
    ]
    rows += [(f"distilled on Brown, seed {s}", {t: [evals[s]["suite"]["student"][t]] for t in TASKS},
              evals[s]["models"], "student") for s in seeds]
    if len(seeds) > 1:
        rows.append((f"distilled on Brown, mean ± std of {len(seeds)} seeds",
                     {t: [evals[s]["suite"]["student"][t] for s in seeds] for t in TASKS}, None, ""))
    if gold is not None:
        g = json.loads((gold / "eval.json").read_text())
        mine = g["suite"]["student"]
        rows.append((f"gold-trained on STS-B ({gold.name}; STS12-16 overlap STS-B's sources)",
                     {t: [mine[t]] for t in TASKS if t in mine}, g["models"], "student"))
    head = ["model", *TASKS, "STS avg (6)", "size (MB)", "throughput b64 (x teacher)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, scores, models, *role in rows:
        cells = [_cells(scores[t], teacher[t] if name != rows[0][0] else None) if t in scores else "-" for t in TASKS]
        sts_avgs = [statistics.mean(scores[t][i] for t in STS) for i in range(len(scores[STS[0]]))] \
            if all(t in scores for t in STS) else []
        cells.append(_cells(sts_avgs, _average(teacher, STS) if name != rows[0][0] else None) if sts_avgs else "-")
        if models is not None:
            model = models[role[0] if role else "teacher"]
            speed = model["throughput"] / models["teacher"]["throughput"]
            cells += [f"{model['size_bytes'] / 1e6:.1f}", f"{speed:.2f}x"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--with-gold", type=Path, help="a finished run of a gold-trained recipe, scored on the suite")
    parser.add_argument("--write", type=Path, help="put the table into this markdown file (between markers)")
    args = parser.parse_args()
    run_seeds(args.seeds, args.parallel, args.threads)
    if args.with_gold is not None and "suite" not in json.loads((args.with_gold / "eval.json").read_text()):
        command = [sys.executable, "-m", "distill.cli", "eval", str(args.with_gold), "--suite", *TASKS]
        subprocess.run(command, check=True)
    text = table(args.seeds, args.with_gold)
    print(text)
    if args.write:
        write_section(args.write, "minilm-general", text)


if __name__ == "__main__":
    main()

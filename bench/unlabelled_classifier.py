"""A text classifier distilled on unlabelled texts beside its labelled ones (``data.mix``).

``--task sst2`` (the default) or ``--task trec``. The teacher is ``recipes/TASK-teacher.yaml``'s
fine-tuned all-MiniLM-L6-v2 (trained first if ``runs/TASK-teacher`` has no finished run); every
student is ``recipes/TASK.yaml``'s (the demo's shape, KD at T=4 weight 0.9 + cross-entropy 0.1,
5 epochs). Per seed, six students:

- ``few``: only the first ``--labels`` labelled training texts (``data.train_limit``), and its
  baseline: the same student on those labels alone;
- ``few + texts``: the same labels, plus the rest of the task's training texts *without their
  labels* (``data.mix``; the labelled ones are dropped from the mix), which the student learns
  from the teacher's outputs alone;
- ``all``: every labelled training text (the recipe as shipped), and its baseline;
- ``all + Brown``: the same, plus a seeded ``--brown`` share of the Brown corpus' sentences
  (general prose of 1961, neither reviews nor questions), unlabelled;
- ``all + other``: every label, plus the other task's training texts (TREC's questions for SST-2,
  SST-2's sentences for TREC), unlabelled: texts the teacher's task has little to say about;
- ``all + steps``: every label, no mix, as many epochs as give about the steps of ``all + Brown``
  (15 for SST-2 at 0.25), so that more training alone is not mistaken for what the unlabelled
  texts add.

The unlabelled training texts are written to ``runs/unlabelled/TASK-train-texts.txt`` (in the
task file's own encoding) from ``../shared/data/TASK/train.txt``. Prints test accuracy per seed
and mean ± std.

    python bench/unlabelled_classifier.py [--task sst2] [--seeds 0 1 2] [--labels 1000] [--brown 0.25]
        [--threads 1] [--variants few few+texts all all+brown all+other all+steps] [--control-seeds 0]
        [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _markdown import write_section

import distill
from distill.config import load_recipe
from distill.tasks import build_task

DATA = Path("../shared/data")
NAMES = {"few": "labels of {labels} {unit}",
         "few+texts": "labels of {labels} + the other training {unit} unlabelled",
         "all": "labels of all {total} {unit} (the recipe)", "all+brown": "all labels + {brown} of Brown unlabelled",
         "all+steps": "all labels, {epochs} epochs (the steps of + Brown)",
         "all+other": "all labels + {other}'s training texts unlabelled"}
UNITS = {"sst2": "sentences", "trec": "questions"}
OTHER = {"sst2": "trec", "trec": "sst2"}
MARKERS = {"sst2": "unlabelled-kd", "trec": "unlabelled-kd-trec"}


def run(path: str, overrides: list[str]) -> dict:
    recipe = load_recipe(path, overrides)
    if not (recipe.run_dir() / "eval.json").is_file():
        distill.run(recipe)
    return json.loads((recipe.run_dir() / "eval.json").read_text())["models"]


def training_texts(task: str) -> Path:
    """The task's training texts without their labels, one a line, as bytes of the file's encoding."""
    out = Path(f"runs/unlabelled/{task}-train-texts.txt")
    if not out.is_file():
        lines = (DATA / task / "train.txt").read_bytes().splitlines()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"".join(line.split(b" ", 1)[1] + b"\n" for line in lines if line.strip()))
    return out


def control_epochs(args: argparse.Namespace) -> int:
    """Epochs of every label alone that take about as many steps as 5 epochs of ``all + Brown``."""
    recipe = load_recipe(f"recipes/{args.task}.yaml", overrides("all+brown", 0, args))
    task = build_task(recipe.task, recipe.data)
    return round(recipe.train.epochs * len(task.train) / task.labelled_examples)


def overrides(variant: str, seed: int, args: argparse.Namespace, epochs: int = 0) -> list[str]:
    sets = [f"train.threads={args.threads}", f"seed={seed}"]
    if variant.startswith("few"):
        sets.append(f"data.train_limit={args.labels}")
    if variant == "few+texts":
        sets.append(f"data.mix=[{{path: {training_texts(args.task)}}}]")
    if variant == "all+brown":
        brown = DATA / "brown" / "brown-sentences.txt"
        sets.append(f"data.mix=[{{path: {brown}, weight: {args.brown}}}]")
    if variant == "all+steps":
        sets.append(f"train.epochs={epochs}")
    if variant == "all+other":
        other = OTHER[args.task]  # its texts are written in its own file's encoding, which its recipe names
        encoding = load_recipe(f"recipes/{other}.yaml", []).data.encoding
        sets.append(f"data.mix=[{{path: {training_texts(other)}, encoding: {encoding}}}]")
    if "+" in variant:
        sets.append("baseline=false")  # its baseline is the variant's without the mix: the same labels alone
    folder = {"few": f"few{args.labels}", "few+texts": f"few{args.labels}-texts", "all": "",
              "all+brown": f"brown{args.brown:g}", "all+steps": f"e{epochs}",
              "all+other": f"{OTHER[args.task]}texts"}[variant]
    folder = f"{args.task}-{folder}" if folder else args.task
    return [*sets, f"output_dir=runs/{folder}-s{seed}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(UNITS), default="sst2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=1000, help="labelled sentences of the 'few' students")
    parser.add_argument("--brown", type=float, default=0.25, help="share of Brown's sentences mixed in")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--variants", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--control-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the 'all+steps' control")
    parser.add_argument("--write", type=Path, help="update this markdown file between the unlabelled-kd markers")
    args = parser.parse_args()
    teacher = run(f"recipes/{args.task}-teacher.yaml", [f"train.threads={args.threads}"])["student"]["accuracy"]
    labelled = load_recipe(f"recipes/{args.task}.yaml", [])
    total = build_task(labelled.task, labelled.data).labelled_examples
    epochs = control_epochs(args) if "all+steps" in args.variants else 0
    names = {k: v.format(labels=args.labels, total=total, brown=f"{args.brown:g}", unit=UNITS[args.task],
                         epochs=epochs, other=OTHER[args.task].upper().replace("SST2", "SST-2"))
             for k, v in NAMES.items()}
    rows: list[tuple[str, dict[int, float]]] = [("teacher (fine-tuned all-MiniLM-L6-v2, all labels)",
                                                  dict.fromkeys(args.seeds, teacher))]
    for variant in args.variants:
        seeds = args.control_seeds if variant == "all+steps" else args.seeds
        models = {seed: run(f"recipes/{args.task}.yaml", overrides(variant, seed, args, epochs)) for seed in seeds}
        if "+" not in variant:
            baseline = {seed: m["baseline"]["accuracy"] for seed, m in models.items()}
            rows.append((f"student, {names[variant]}, cross-entropy alone", baseline))
        rows.append((f"student, {names[variant]}, KD", {seed: m["student"]["accuracy"] for seed, m in models.items()}))
    head = "| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |"
    lines = [head, "|---|" + "---|" * (len(args.seeds) + 1)]
    for name, values in rows:
        cells = [f"{values[s]:.2f}" if s in values else "" for s in args.seeds]
        spread = (f"{statistics.mean(values.values()):.2f} ± {statistics.pstdev(values.values()):.2f}"
                  if len(values) > 1 else "(one seed)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {spread} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, MARKERS[args.task], text)


if __name__ == "__main__":
    main()

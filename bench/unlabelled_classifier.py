"""A text classifier distilled on unlabelled texts beside its labelled ones (``data.mix``).

The teacher is ``recipes/sst2-teacher.yaml``'s fine-tuned all-MiniLM-L6-v2 (trained first if
``runs/sst2-teacher`` has no finished run); every student is ``recipes/sst2.yaml``'s (the demo's
shape, KD at T=4 weight 0.9 + cross-entropy 0.1, 5 epochs). Per seed, four students:

- ``few``: only the first ``--labels`` labelled training sentences (``data.train_limit``), and
  its baseline: the same student on those labels alone;
- ``few + texts``: the same labels, plus the rest of SST-2's training sentences *without their
  labels* (``data.mix``; the labelled ones are dropped from the mix), which the student learns
  from the teacher's outputs alone;
- ``all``: every labelled training sentence (the recipe as shipped), and its baseline;
- ``all + Brown``: the same, plus a seeded ``--brown`` share of the Brown corpus' sentences
  (general prose of 1961, not reviews), unlabelled;
- ``all + steps``: every label, no mix, 15 epochs: about as many steps as ``all + Brown`` at
  0.25, so that more training alone is not mistaken for what the unlabelled texts add.

The unlabelled SST-2 file is written to ``runs/unlabelled/sst2-train-texts.txt`` from
``../shared/data/sst2/train.txt``. Prints test accuracy per seed and mean ± std.

    python bench/unlabelled_classifier.py [--seeds 0 1 2] [--labels 1000] [--brown 0.25] [--threads 1]
        [--variants few few+texts all all+brown all+steps] [--control-seeds 0] [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _markdown import write_section

import distill
from distill.config import load_recipe

DATA = Path("../shared/data")
NAMES = {"few": "labels of {labels} sentences",
         "few+texts": "labels of {labels} + the other training sentences unlabelled",
         "all": "labels of all {total} sentences (the recipe)", "all+brown": "all labels + {brown} of Brown unlabelled",
         "all+steps": "all labels, 15 epochs (the steps of + Brown)"}


def run(path: str, overrides: list[str]) -> dict:
    recipe = load_recipe(path, overrides)
    if not (recipe.run_dir() / "eval.json").is_file():
        distill.run(recipe)
    return json.loads((recipe.run_dir() / "eval.json").read_text())["models"]


def sst2_texts() -> Path:
    """SST-2's training sentences without their labels, one a line."""
    out = Path("runs/unlabelled/sst2-train-texts.txt")
    if not out.is_file():
        lines = (DATA / "sst2" / "train.txt").read_text(encoding="utf-8").splitlines()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line.split(" ", 1)[1] + "\n" for line in lines if line.strip()))
    return out


def overrides(variant: str, seed: int, args: argparse.Namespace) -> list[str]:
    sets = [f"train.threads={args.threads}", f"seed={seed}"]
    if variant.startswith("few"):
        sets.append(f"data.train_limit={args.labels}")
    if variant == "few+texts":
        sets.append(f"data.mix=[{{path: {sst2_texts()}}}]")
    if variant == "all+brown":
        brown = DATA / "brown" / "brown-sentences.txt"
        sets.append(f"data.mix=[{{path: {brown}, weight: {args.brown}}}]")
    if variant == "all+steps":
        sets.append("train.epochs=15")
    if "+" in variant:
        sets.append("baseline=false")  # its baseline is the variant's without the mix: the same labels alone
    folder = {"few": f"sst2-few{args.labels}", "few+texts": f"sst2-few{args.labels}-texts", "all": "sst2",
              "all+brown": f"sst2-brown{args.brown:g}", "all+steps": "sst2-e15"}[variant]
    return [*sets, f"output_dir=runs/{folder}-s{seed}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=1000, help="labelled sentences of the 'few' students")
    parser.add_argument("--brown", type=float, default=0.25, help="share of Brown's sentences mixed in")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--variants", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--control-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the 'all+steps' control (15 epochs each)")
    parser.add_argument("--write", type=Path, help="update this markdown file between the unlabelled-kd markers")
    args = parser.parse_args()
    teacher = run("recipes/sst2-teacher.yaml", [f"train.threads={args.threads}"])["student"]["accuracy"]
    total = sum(1 for line in (DATA / "sst2" / "train.txt").read_text().splitlines() if line.strip())
    names = {k: v.format(labels=args.labels, total=total, brown=f"{args.brown:g}")
             for k, v in NAMES.items()}
    rows: list[tuple[str, dict[int, float]]] = [("teacher (fine-tuned all-MiniLM-L6-v2, all labels)",
                                                  dict.fromkeys(args.seeds, teacher))]
    for variant in args.variants:
        seeds = args.control_seeds if variant == "all+steps" else args.seeds
        models = {seed: run("recipes/sst2.yaml", overrides(variant, seed, args)) for seed in seeds}
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
        write_section(args.write, "unlabelled-kd", text)


if __name__ == "__main__":
    main()

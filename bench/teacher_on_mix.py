"""What a fine-tuned classifier teacher says about unlabelled texts, beside what it says on its task.

For each ``--task`` (default: sst2 and trec), loads the teacher ``runs/TASK-teacher/student``
(train it with ``distill run recipes/TASK-teacher.yaml``) and prints, on the task's own test texts
and on a seeded sample of the Brown corpus' sentences: the teacher's mean top-class probability,
its mean entropy as a share of the most a distribution over its classes can hold, and how its top
classes spread over the texts (the share of the most frequent top class, and the entropy of the
top classes' histogram as a share of its maximum). A teacher whose answers on the unlabelled texts
are as varied as on its task has something to teach there; one that gives most of them the same
class says little that the student can use.

    python bench/teacher_on_mix.py [--task sst2 trec] [--sample 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.config import load_recipe
from distill.tasks import build_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("sst2", "trec")


def probabilities(folder: Path, texts: list[str], batch: int = 64) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            out.append(model(**enc).logits.softmax(-1))
    return torch.cat(out)


def summary(probs: torch.Tensor) -> list[str]:
    classes = probs.shape[1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(classes)
    counts = torch.bincount(probs.argmax(-1), minlength=classes).double()
    shares = counts / counts.sum()
    spread = -(shares * shares.clamp_min(1e-12).log()).sum() / math.log(classes)
    return [f"{len(probs):,}", f"{probs.max(-1).values.mean():.3f}", f"{entropy.mean():.3f}",
            f"{shares.max():.3f}", f"{spread:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--sample", type=int, default=2000, help="Brown sentences drawn (seed 0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    brown = (DATA / "brown" / "brown-sentences.txt").read_text(encoding="utf-8").splitlines()
    brown = random.Random(0).sample([line for line in brown if line.strip()], args.sample)
    print("| teacher | texts | count | mean top-class probability | mean entropy (share of max) "
          "| most frequent top class (share) | spread of top classes (share of max) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task in args.task:
        recipe = load_recipe(f"recipes/{task}.yaml", [f"data.path={DATA / task}"])
        test = build_task(recipe.task, recipe.data).splits["test"].texts  # read as the recipe's runs read them
        folder = Path("runs") / f"{task}-teacher" / "student"
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder}: no teacher there; train it first: distill run recipes/{task}-teacher.yaml")
        for name, texts in ((f"{task} test", test), ("Brown sample", brown)):
            print(f"| {task} | {name} | " + " | ".join(summary(probabilities(folder, texts))) + " |")


if __name__ == "__main__":
    main()

"""How well static students agree with their teacher on text no run trains on, and what the
lengths of their token vectors (each token's weight in the mean) do on the evaluation suite.

    python bench/static_weights.py RUN [RUN ...] [--powers 1 0.75 0.625 0.5] [--words what who] [--threads 1]

For each run's static student: its agreement with the teacher on 3,000 sentences of WikiText-2's
test split and on 3,000 lines of Tiny Shakespeare (Spearman x 100 between the two models' cosines
over 30,000 pairs drawn with ``numpy.random.default_rng(0)``; no recipe trains on either). With
``--powers``, the same student again with every token vector's length raised to each power
(directions kept: a power below 1 flattens the tokens' weights), scored on the recipe's suite and
on both agreements. ``--words`` prints the length of each word's vector (of its first token) in
each student, and the median over the vocabulary. The teacher is the first run's.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from distill.config import load_recipe
from distill.models.load import load_model, load_teacher
from distill.suite import SUITE_TASKS, run_suite
from distill.tasks.base import spearman

STS = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb"]
PAIRS = 30_000


def corpora(data: Path, count: int = 3000) -> dict[str, list[str]]:
    """WikiText-2 test sentences (split at " . ", 6-59 words, headings skipped) and Tiny
    Shakespeare lines of 5 words or more, each shuffled with ``random.Random(0)``, ``count`` of each."""
    lines = (data / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()
    wiki = [part.strip() + " ." for line in lines if not line.strip().startswith("=")
            for part in line.split(" . ") if 5 < len(part.split()) < 60]
    plays = [line.strip() for line in (data / "tinyshakespeare" / "input.txt").read_text().splitlines()
             if len(line.split()) > 4]
    out = {}
    for name, texts in (("WikiText-2 test", wiki), ("Tiny Shakespeare", plays)):
        texts = list(dict.fromkeys(texts))
        random.Random(0).shuffle(texts)
        out[name] = texts[:count]
    return out


@torch.inference_mode()
def embed(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model({"text": texts[i : i + batch_size]})["embedding"].float()
                      for i in range(0, len(texts), batch_size)])


def agreement(student: torch.Tensor, teacher: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray]) -> float:
    i, j = pairs
    return 100.0 * spearman((student[i] * student[j]).sum(-1).numpy(), (teacher[i] * teacher[j]).sum(-1).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--powers", type=float, nargs="*", default=[])
    parser.add_argument("--words", nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.runs[0] / "recipe.yaml")
    data = Path(recipe.evaluate.suite_data)
    texts = corpora(data)
    teacher = load_teacher(recipe)
    targets = {name: embed(teacher, t, 64) for name, t in texts.items()}
    rng = np.random.default_rng(0)
    pairs = {name: (rng.integers(0, len(t), PAIRS), rng.integers(0, len(t), PAIRS)) for name, t in texts.items()}
    tasks = [t for t in SUITE_TASKS if t in recipe.evaluate.suite]
    head = ["student", "vector length"] + [f"agreement: {name}" for name in texts]
    if args.powers:
        head += ["STS avg (6)", *[t for t in tasks if t not in STS]]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for run in args.runs:
        run_recipe = load_recipe(run / "recipe.yaml")
        student = load_model(run_recipe.student, run_recipe.student_kind, str(run / "student"))
        table = student.module.embeddings.weight.data
        trained = table.clone()
        lengths = trained.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if args.words:
            ids = [student.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in args.words]
            shown = ", ".join(f"{word} {lengths[i, 0]:.2f}" for word, i in zip(args.words, ids, strict=True))
            print(f"{run}: vector lengths {shown}; median {lengths.median():.2f}")
        for power in args.powers or [1.0]:
            table.copy_(trained / lengths * lengths**power)
            cells = [str(run), "trained" if power == 1 else f"trained ^ {power:g}"]
            cells += [f"{agreement(embed(student, t), targets[name], pairs[name]):.2f}" for name, t in texts.items()]
            if args.powers:
                scores = run_suite(lambda batch, model=student: embed(model, batch).numpy(), tasks, data)
                cells += [f"{np.mean([scores[t] for t in STS]):.2f}", *[f"{scores[t]:.2f}" for t in tasks
                                                                        if t not in STS]]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

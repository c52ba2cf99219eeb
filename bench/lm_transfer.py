"""Language-model students scored on text that no run trained on.

Each run folder's student (and the first run's teacher, when it has one) is scored by perplexity
on the first ``--blocks`` blocks of each ``--text`` file, cut the way the run's recipe cuts its own
data (``data.block_chars`` characters a block, each block scored on its own, the teacher's
``max_length`` tokens at most). The first run named with ``--baseline`` is the reference of the
ratio column: a student trained on the text alone, so the column says what the teacher added on
text that neither student saw.

    python bench/lm_transfer.py --runs runs/smollm2-wikitext-s32-s0 runs/smollm2-wikitext-s32-s1 \\
        runs/smollm2-wikitext-s32-s2 --baseline runs/smollm2-wikitext-data-s0 \\
        --text ../shared/data/tinyshakespeare/input.txt ../shared/data/brown/brown-sentences.txt

Prints a markdown table, one row per model, one perplexity column per text.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from distill.config import load_recipe
from distill.models.load import load_model, load_teacher
from distill.tasks import build_task


def _task(recipe, text: Path, blocks: int):
    """The recipe's language-model task, reading ``text``: its first ``blocks`` blocks are the test split."""
    data = recipe.data.model_copy(update={"path": text, "test_path": text, "test_limit": blocks,
                                          "train_limit": 1, "eval_limit": 1})
    return build_task("lm", data)


def _scores(run: Path, texts: list[Path], blocks: int, role: str = "student") -> list[float]:
    recipe = load_recipe(run / "recipe.yaml")
    model = (load_teacher(recipe) if role == "teacher"
             else load_model(recipe.student, recipe.student_kind, str(run / "student")))
    model.module.to("cpu")
    return [_task(recipe, text, blocks).evaluate(model, "test", recipe.evaluate.batch_size) for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="distilled runs (their students)")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="runs of the same student without the teacher")
    parser.add_argument("--text", type=Path, nargs="+", required=True, help="text files no run trained on")
    parser.add_argument("--blocks", type=int, default=64, help="blocks scored from the start of each text")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: list[tuple[str, list[float]]] = []
    if load_recipe(args.runs[0] / "recipe.yaml").losses:
        rows.append((f"teacher ({args.runs[0].name})", _scores(args.runs[0], args.text, args.blocks, "teacher")))
    distilled = [_scores(run, args.text, args.blocks) for run in args.runs]
    base = [_scores(run, args.text, args.blocks) for run in args.baseline]
    rows += [(f"distilled: {run.name}", s) for run, s in zip(args.runs, distilled, strict=True)]
    rows += [(f"without the teacher: {run.name}", s) for run, s in zip(args.baseline, base, strict=True)]

    names = [f"{t.parent.name}/{t.name}" for t in args.text]
    print(f"| model | {' | '.join(f'{n}: perplexity' for n in names)} |")
    print("|---|" + "---:|" * len(names))
    for name, scores in rows:
        print(f"| {name} | {' | '.join(f'{s:.2f}' for s in scores)} |")
    for label, group in (("distilled", distilled), ("without the teacher", base)):
        if len(group) > 1:
            cells = [f"{statistics.mean(c):.2f} ± {statistics.stdev(c):.2f}" for c in zip(*group, strict=True)]
            print(f"| {label}, mean ± std | {' | '.join(cells)} |")
    if base:
        ratio = [statistics.mean(d) / statistics.mean(b)
                 for d, b in zip(zip(*distilled, strict=True), zip(*base, strict=True), strict=True)]
        print(f"| distilled / without the teacher (means) | {' | '.join(f'{r:.3f}x' for r in ratio)} |")
    print(f"\nFirst {args.blocks} blocks of each text, cut as the runs' recipe cuts its data; "
          f"{torch.get_num_threads()} torch threads.")


if __name__ == "__main__":
    main()

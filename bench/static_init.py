"""Quality of a static student before training: PCA of the teacher's token vectors, with and
without smooth-inverse-frequency weighting from the training sentences (STS-B test Spearman).

    python bench/static_init.py [--recipe recipes/sts-static.yaml]
"""

from __future__ import annotations

import argparse

from distill.config import load_recipe
from distill.models.load import load_teacher
from distill.models.static import derive_static
from distill.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/sts-static.yaml")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    task = build_task(recipe.task, recipe.data)
    teacher = load_teacher(recipe)
    dim = recipe.student.derive.hidden_size if recipe.student.derive else 256
    for sif in (None, 1e-3, 1e-4):
        student = derive_static(teacher, dim or 256, texts=task.train_texts(), sif=sif)
        label = "PCA only" if sif is None else f"PCA + SIF a={sif:g}"
        test, dev = task.evaluate(student, "test"), task.evaluate(student, "eval")
        print(f"{label:<18} test spearman {test:.2f}  dev {dev:.2f}")


if __name__ == "__main__":
    main()

"""How much of the teacher's probe accuracy survives the map a label-free student learns through.

A label-free student (``projector: pca``) is trained against the teacher's embeddings reduced to
their top principal directions on the training corpus. This prints the SST-2 and TREC probe
accuracy of the teacher's own embeddings, whole and reduced that way (centred, projected on the
top k directions of its embeddings of the corpus), so that a probe the student loses can be put
on the map or on the student.

With ``--students FOLDER...`` (saved students, e.g. ``runs/minilm-general-s0/student``) it also
prints, per band of those directions, how much of the teacher's coordinates on TREC's test
questions each student's embedding carries: the R^2 of a least-squares map from the student's
embedding to the band, fitted on TREC's training questions (so any rotation of the student's
axes counts as carried), and the TREC probe of the teacher's coordinates in that band alone. It
then prints the TREC probe of the teacher and of each student under probes stronger than the
suite's (1,000 iterations; C=100; standardised features), so that a loss the suite's probe alone
causes can be told from one in the embeddings.

    python bench/probe_pca.py [--corpus ../shared/data/brown/brown-sentences.txt] [--sample 20000]
        [--students runs/minilm-general-s0/student ...]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from distill.config import load_recipe
from distill.data import read_texts
from distill.models.load import load_model
from distill.suite import probe_accuracy, read_labelled_texts
from distill.tasks.embedding import encode_texts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROBES = {"sst2": "utf-8", "trec": "latin-1"}  # the suite's encodings of the two files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/minilm-general.yaml", help="the teacher is this recipe's")
    parser.add_argument("--corpus", type=Path, default=DATA / "brown" / "brown-sentences.txt")
    parser.add_argument("--sample", type=int, default=20000, help="corpus sentences the directions are fitted on")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with sst2/ and trec/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--students", type=Path, nargs="*", default=[], help="saved students to measure on TREC")
    parser.add_argument("--bands", type=int, nargs="+", default=[0, 32, 64, 128, 256],
                        help="edges of the bands of directions --students are measured on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    teacher = load_model(recipe.teacher, recipe.teacher.kind)
    corpus = read_texts(args.corpus, "text")
    random.Random(0).shuffle(corpus)
    fitted = encode_texts(teacher, corpus[: args.sample]).astype(np.float64)
    mean = fitted.mean(axis=0)
    directions = np.linalg.svd(fitted - mean, full_matrices=False)[2]
    print(f"teacher {recipe.teacher.source}; directions fitted on {min(args.sample, len(corpus))} sentences of "
          f"{args.corpus.name}")
    print("| probe | teacher, whole | " + " | ".join(f"top {k} directions" for k in args.dims) + " |")
    print("|---|---:|" + "---:|" * len(args.dims))
    for task, encoding in PROBES.items():
        train = read_labelled_texts(args.data / task / "train.txt", encoding)
        test = read_labelled_texts(args.data / task / "test.txt", encoding)
        x, y = encode_texts(teacher, train.texts), encode_texts(teacher, test.texts)
        cells = [probe_accuracy(x, train.labels, y, test.labels)]
        for k in args.dims:
            basis = directions[:k].T
            cells.append(probe_accuracy((x - mean) @ basis, train.labels, (y - mean) @ basis, test.labels))
        print(f"| {task} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        if task == "trec" and args.students:
            carried(teacher, recipe, args, (x - mean) @ directions[: args.bands[-1]].T,
                    (y - mean) @ directions[: args.bands[-1]].T, train, test)


def _r2(train_s: np.ndarray, train_t: np.ndarray, test_s: np.ndarray, test_t: np.ndarray) -> float:
    """Share of ``test_t``'s variance a least-squares map from ``*_s`` (fitted on train) explains."""
    design = np.hstack([train_s, np.ones((len(train_s), 1))])
    coef = np.linalg.lstsq(design, train_t, rcond=None)[0]
    residual = test_t - np.hstack([test_s, np.ones((len(test_s), 1))]) @ coef
    return float(1 - residual.var(axis=0).sum() / test_t.var(axis=0).sum())


def carried(teacher, recipe, args, train_t: np.ndarray, test_t: np.ndarray, train, test) -> None:
    """Per band of the teacher's directions: its TREC probe, and the share of it each student carries."""
    bands = list(zip(args.bands[:-1], args.bands[1:], strict=True))
    students = {}
    for folder in args.students:
        student = load_model(recipe.teacher, recipe.teacher.kind, source=str(folder))
        students[folder] = (encode_texts(student, train.texts), encode_texts(student, test.texts))
    stronger_probes({"teacher": (encode_texts(teacher, train.texts), encode_texts(teacher, test.texts)),
                     **{str(folder): pair for folder, pair in students.items()}}, train, test)
    print()
    print("| TREC, directions | probe on the teacher's coordinates | "
          + " | ".join(f"R^2 carried by {folder}" for folder in students) + " |")
    print("|---|---:|" + "---:|" * len(students))
    for a, b in bands:
        cells = [probe_accuracy(train_t[:, a:b], train.labels, test_t[:, a:b], test.labels)]
        cells += [100 * _r2(s_train, train_t[:, a:b], s_test, test_t[:, a:b]) for s_train, s_test in students.values()]
        print(f"| {a + 1}-{b} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def stronger_probes(models: dict[str, tuple[np.ndarray, np.ndarray]], train, test) -> None:
    """TREC probe accuracy of each model's (train, test) embeddings: the suite's probe and stronger ones."""
    print()
    print("| TREC probe | the suite's (C=1, 100 iterations) | 1,000 iterations | C=100 | standardised features |")
    print("|---|---:|---:|---:|---:|")
    for name, (x, y) in models.items():
        mean, spread = x.mean(axis=0), x.std(axis=0) + 1e-8
        cells = [probe_accuracy(x, train.labels, y, test.labels),
                 probe_accuracy(x, train.labels, y, test.labels, max_iter=1000),
                 probe_accuracy(x, train.labels, y, test.labels, c=100.0, max_iter=1000),
                 probe_accuracy((x - mean) / spread, train.labels, (y - mean) / spread, test.labels, max_iter=1000)]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()

"""How much of the teacher's probe accuracy survives the map a label-free student learns through.

A label-free student (``projector: pca``) is trained against the teacher's embeddings reduced to
their top principal directions on the training corpus. This prints the SST-2 and TREC probe
accuracy of the teacher's own embeddings, whole and reduced that way (centred, projected on the
top k directions of its embeddings of the corpus), so that a probe the student loses can be put
on the map or on the student.

    python bench/probe_pca.py [--corpus ../shared/data/brown/brown-sentences.txt] [--sample 20000]
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


if __name__ == "__main__":
    main()

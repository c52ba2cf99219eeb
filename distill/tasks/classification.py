"""Classification scored by accuracy: images (Fashion-MNIST's IDX files) and texts (labelled files)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import LABELLED_SUFFIXES, dataset_splits, labelled_file, read_idx_images, read_labelled
from distill.errors import DataError
from distill.tasks.base import Batch

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "ClassificationTask", "ImageSet", "TextClassificationTask", "TextSet"]

#: Fashion-MNIST pixel statistics, used to standardise inputs.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


class ImageSet:
    """Images and labels held in memory as tensors; batches are sliced, not collated."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.copy())

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x = (self.images[index].float().unsqueeze(1) / 255.0 - PIXEL_MEAN) / PIXEL_STD
        return {"index": index, "inputs": {"x": x}, "labels": self.labels[index]}


class _Accuracy:
    """What image and text classification share: cross-entropy on labels, scored by accuracy."""

    output = "logits"
    metric = "accuracy"
    num_classes: int
    splits: dict[str, Any]

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        logits = outputs["logits"]
        return F.cross_entropy(logits.float(), batch["labels"].to(logits.device))

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        logits = outputs.get("logits")
        if logits is None or logits.dim() != 2:
            raise DataError(f"task 'classification' needs (N, classes) logits from the {role}")
        if logits.shape[-1] != self.num_classes:
            raise DataError(
                f"the {role} predicts {logits.shape[-1]} classes but the data has {self.num_classes} "
                f"(labels 0..{self.num_classes - 1}): the label sets do not match"
            )

    @torch.inference_mode()
    def evaluate(self, model: Any, split: str, batch_size: int = 256) -> float:
        data = self.splits[split]
        was_training = model.module.training
        model.module.eval()
        correct = 0
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            pred = model(batch["inputs"])["logits"].argmax(-1).cpu()
            correct += int((pred == batch["labels"]).sum())
        model.module.train(was_training)
        return 100.0 * correct / len(data)

    def sample_inputs(self, n: int) -> dict[str, Any]:
        return self.splits["test"].batch(range(min(n, len(self.splits["test"]))))["inputs"]


class ClassificationTask(_Accuracy):
    """Image classification scored by accuracy; the validation split is held out of train.

    Args:
        spec: Where the IDX files are, how much to use and what share to hold out.
    """

    def __init__(self, spec: DataSpec) -> None:
        images, labels = read_idx_images(spec.path, "train")
        n_eval = max(1, int(len(labels) * spec.eval_fraction))
        train_images, train_labels = images[:-n_eval], labels[:-n_eval]
        if spec.train_limit:
            train_images, train_labels = train_images[: spec.train_limit], train_labels[: spec.train_limit]
        self.train = ImageSet(train_images, train_labels)
        self.num_classes = int(labels.max()) + 1
        test_images, test_labels = read_idx_images(spec.path, "test", spec.test_limit)
        if test_labels.max() >= self.num_classes:
            raise DataError(
                f"test labels go up to {int(test_labels.max())} but training labels only to {self.num_classes - 1}"
            )
        self.splits = {
            "eval": ImageSet(images[-n_eval:][: spec.eval_limit], labels[-n_eval:][: spec.eval_limit]),
            "test": ImageSet(test_images, test_labels),
        }

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.train.images.numpy().tobytes())
        digest.update(self.train.labels.numpy().tobytes())
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [1] * len(self.train)


class TextSet:
    """Texts and their class ids; a batch is ``{"text": [...]}`` with the labels."""

    def __init__(self, texts: list[str], labels: np.ndarray) -> None:
        self.texts = texts
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return {"index": index, "inputs": {"text": [self.texts[i] for i in index.tolist()]},
                "labels": self.labels[index]}


class TextClassificationTask(_Accuracy):
    """Text classification from labelled files, scored by accuracy.

    ``data.path`` is a file (the training set) or a folder holding ``train``, optionally ``dev``
    (or ``valid``/``validation``/``val``) and ``test`` files of the format. Without a test file
    (there or at ``data.test_path``) the test set is held out of the training file; without a
    dev file the validation set is. Held-out examples are drawn by a fixed seeded shuffle, so
    files sorted by class still split fairly.

    Labels are class ids when every label is an integer (0 .. n-1), else names, numbered in
    sorted order (:attr:`label_names`).

    Args:
        spec: Where the files are, their format and columns, how much to use and hold out.
    """

    def __init__(self, spec: DataSpec) -> None:
        fmt, columns = spec.format, (spec.text_column, spec.label_column, spec.encoding)
        sources = _sources(spec)
        path, split_name = sources["train"]  # type: ignore[misc]
        texts, raw = read_labelled(path, fmt, *columns, split=split_name)
        order = np.random.default_rng(0).permutation(len(texts))
        held: dict[str, tuple[list[str], list[str]]] = {}
        for split in ("test", "eval"):
            source = sources[split]
            if source is not None:
                held[split] = read_labelled(source[0], fmt, *columns, split=source[1])
                continue
            n = max(1, int(len(order) * spec.eval_fraction))
            order, taken = order[:-n], order[-n:]
            held[split] = ([texts[i] for i in taken], [raw[i] for i in taken])
        train_texts, train_raw = [texts[i] for i in order], [raw[i] for i in order]
        self.label_names, ids = _number_labels(train_raw, {split: labels for split, (_, labels) in held.items()})
        self.num_classes = len(self.label_names)
        limits = {"train": spec.train_limit, "eval": spec.eval_limit, "test": spec.test_limit}
        self.train = TextSet(train_texts[: limits["train"]], ids["train"][: limits["train"]])
        self.splits = {split: TextSet(held[split][0][: limits[split]], ids[split][: limits[split]])
                       for split in ("eval", "test")}

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(self.train.texts).encode())
        digest.update(self.train.labels.numpy().tobytes())
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [len(text) for text in self.train.texts]

    def train_texts(self) -> list[str]:
        """Every training text (for vocabulary pruning)."""
        return self.train.texts


def _sources(spec: DataSpec) -> dict[str, tuple[Path, str] | None]:
    """Where each split's examples are, as ``(path, split name)``: files of a folder (or the one
    file, and ``test_path``), or the splits of a Hugging Face dataset; ``None`` to hold it out."""
    fmt = spec.format
    if fmt == "hf-dataset":
        names = dataset_splits(spec.path)
        dev = next((n for n in ("validation", "dev", "valid") if n in names), None)
        return {"train": (spec.path, spec.split), "test": (spec.path, "test") if "test" in names else None,
                "eval": (spec.path, dev) if dev else None}
    folder = spec.path if spec.path.is_dir() else None
    train = labelled_file(folder, fmt, "train") if folder else spec.path
    if train is None:
        raise DataError(f"{spec.path}: no train file ({' or '.join('train' + s for s in LABELLED_SUFFIXES[fmt])})")
    test = spec.test_path or (labelled_file(folder, fmt, "test") if folder else None)
    dev = labelled_file(folder, fmt, "dev") if folder else None
    return {"train": (train, "train"), "test": (test, "train") if test else None,
            "eval": (dev, "train") if dev else None}


def _number_labels(train: list[str], held: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and ids: integer labels are ids already; names are numbered in sorted order."""
    every = set(train).union(*held.values())
    if all(label.lstrip("-").isdigit() for label in every):
        top = max(int(label) for label in every)
        if min(int(label) for label in every) < 0:
            raise DataError("class labels are negative integers; integer labels are class ids 0 .. n-1")
        names = [str(i) for i in range(top + 1)]
    else:
        names = sorted(set(train))
    index = {name: i for i, name in enumerate(names)}
    ids = {"train": np.array([index[x] for x in train])}
    for split, labels in held.items():
        unseen = sorted(set(labels) - set(index))
        if unseen:
            raise DataError(f"the {split} set has labels the training set never has: {unseen[:5]}")
        ids[split] = np.array([index[x] for x in labels])
    return names, ids

"""Classification scored by accuracy: images (Fashion-MNIST's IDX files, image folders) and texts (labelled files)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import (
    LABELLED_SUFFIXES,
    Text,
    dataset_class_names,
    dataset_splits,
    labelled_file,
    mix_sources,
    mix_texts,
    read_idx_images,
    read_labelled,
)
from distill.errors import DataError
from distill.images import image_folder_splits, read_image_folder, read_image_records
from distill.tasks.base import Batch, evaluating

log = logging.getLogger(__name__)

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "ClassificationTask", "ImageSet", "TextClassificationTask", "TextSet"]

#: Fashion-MNIST pixel statistics, used to standardise inputs.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


class ImageSet:
    """Images and labels held in memory as tensors; batches are sliced, not collated, and
    standardised per channel with ``mean`` and ``std`` (of pixels scaled to [0, 1]).

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)`` uint8 pixels.
        labels: ``(N,)`` class ids.
        mean: Per-channel mean (one value for all channels, or one per channel).
        std: Per-channel standard deviation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float] = (PIXEL_MEAN,),
                 std: Sequence[float] = (PIXEL_STD,)) -> None:
        self.images = torch.from_numpy(images.copy())
        if self.images.dim() == 3:
            self.images = self.images.unsqueeze(1)
        self.labels = torch.from_numpy(labels.copy())
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x = (self.images[index].float() / 255.0 - self.mean) / self.std
        return {"index": index, "inputs": {"x": x}, "labels": self.labels[index]}


class _Accuracy:
    """What image and text classification share: cross-entropy on labels, scored by accuracy."""

    output = "logits"
    metric = "accuracy"
    num_classes: int
    splits: dict[str, Any]

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        logits = outputs["logits"].float()
        labels = batch["labels"].to(logits.device)
        known = labels >= 0  # -1: a text of data.mix, which only the teacher's outputs teach
        if not bool(known.all()):
            return F.cross_entropy(logits[known], labels[known]) if bool(known.any()) else logits.sum() * 0.0
        return F.cross_entropy(logits, labels)

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
        correct = 0
        with evaluating(model):
            for start in range(0, len(data), batch_size):
                batch = data.batch(range(start, min(start + batch_size, len(data))))
                pred = model(batch["inputs"])["logits"].argmax(-1).cpu()
                correct += int((pred == batch["labels"]).sum())
        return 100.0 * correct / len(data)

    def sample_inputs(self, n: int) -> dict[str, Any]:
        return self.splits["test"].batch(range(min(n, len(self.splits["test"]))))["inputs"]


class ClassificationTask(_Accuracy):
    """Image classification scored by accuracy: Fashion-MNIST's IDX files (``fashion-mnist``)
    or folders of class folders (``image-folder``, see :mod:`distill.images`). Without a
    validation split, one is held out of train; pixels are standardised per channel with the
    training images' mean and standard deviation (Fashion-MNIST's published ones for IDX files).

    Args:
        spec: Where the images are, how much to use and what share to hold out.
    """

    def __init__(self, spec: DataSpec) -> None:
        if spec.format != "fashion-mnist":
            splits, names = _image_splits(spec)
            self.label_names = _dataset_names(spec, names)
            pixels = splits["train"][0].astype(np.float64) / 255.0
            mean = pixels.mean(axis=(0, 2, 3)).round(4).tolist()
            std = np.maximum(pixels.std(axis=(0, 2, 3)), 1e-3).round(4).tolist()
        else:
            splits = _idx_splits(spec)
            self.label_names = [str(i) for i in range(int(splits["train"][1].max()) + 1)]
            mean, std = [PIXEL_MEAN], [PIXEL_STD]
        self.num_classes = len(self.label_names)
        for split in ("eval", "test"):
            if splits[split][1].max() >= self.num_classes:
                raise DataError(f"{split} labels go up to {int(splits[split][1].max())} but training labels only to "
                                f"{self.num_classes - 1}")
        limits = {"train": spec.train_limit, "eval": spec.eval_limit, "test": spec.test_limit}
        sets = {split: ImageSet(images[: limits[split]], labels[: limits[split]], mean, std)
                for split, (images, labels) in splits.items()}
        self.train = sets.pop("train")
        self.splits = sets

    def preprocessing(self) -> dict[str, Any]:
        """What a model of this data expects, written beside its weights for the model card:
        channels, size, per-channel mean and std of pixels in [0, 1], and the class names."""
        return {"channels": int(self.train.images.shape[1]), "size": list(self.train.images.shape[2:]),
                "mean": self.train.mean.flatten().tolist(), "std": self.train.std.flatten().tolist(),
                "labels": self.label_names}

    def arch_defaults(self) -> dict[str, int]:
        """Architecture arguments the data decides (classes, channels, flattened input size)."""
        channels, height, width = self.train.images.shape[1:]
        return {"num_classes": self.num_classes, "in_channels": int(channels),
                "in_features": int(channels * height * width)}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.train.images.numpy().tobytes())
        digest.update(self.train.labels.numpy().tobytes())
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [1] * len(self.train)


def _idx_splits(spec: DataSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's train file (its tail held out for validation) and test file."""
    images, labels = read_idx_images(spec.path, "train")
    n_eval = max(1, int(len(labels) * spec.eval_fraction))
    return {"train": (images[:-n_eval], labels[:-n_eval]), "eval": (images[-n_eval:], labels[-n_eval:]),
            "test": read_idx_images(spec.path, "test", spec.test_limit)}


def _image_splits(spec: DataSpec) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Each split's images and class ids, and the class names (the training set's, sorted), from
    an image folder or a dataset's image column; a split it lacks is held out of train by a
    fixed seeded shuffle."""
    size = (spec.image_size, spec.image_size) if isinstance(spec.image_size, int) else spec.image_size
    sources = _image_sources(spec)
    train, size, channels = _read_images(sources["train"], spec, size, spec.channels)  # type: ignore[arg-type]
    names = sorted(set(train.labels))
    order = np.random.default_rng(0).permutation(len(train.labels))
    read: dict[str, tuple[np.ndarray, list[str]]] = {}
    for split in ("test", "eval"):
        source = sources[split]
        if source is not None:
            held = _read_images(source, spec, size, channels)[0]
            unseen = sorted(set(held.labels) - set(names))
            if unseen:
                raise DataError(f"the {split} set has classes the training set does not have: {unseen[:5]}")
            read[split] = (held.images, held.labels)
            continue
        n = max(1, int(len(order) * spec.eval_fraction))
        order, taken = order[:-n], order[-n:]
        read[split] = (train.images[taken], [train.labels[i] for i in taken])
    if not len(order):
        raise DataError(f"{sources['train']}: {len(train.labels)} image(s) are too few to hold out the test and "
                        "validation sets from; give more, or test/ and val/ folders")
    read["train"] = (train.images[order], [train.labels[i] for i in order])
    names, ids = _number_labels(read["train"][1], {split: read[split][1] for split in ("test", "eval")})
    return {split: (images, ids[split].astype(np.int64)) for split, (images, _) in read.items()}, names


def _image_sources(spec: DataSpec) -> dict[str, Any]:
    """Where each split's images are: a folder, or a dataset split's name (``None``: held out)."""
    if spec.format == "image-folder":
        return image_folder_splits(spec.path)
    names = dataset_splits(spec.path)
    dev = next((n for n in ("validation", "dev", "valid") if n in names), None)
    return {"train": spec.split, "test": "test" if "test" in names else None, "eval": dev}


def _read_images(source: Any, spec: DataSpec, size: tuple[int, int] | None, channels: int | None) -> Any:
    if spec.format == "image-folder":
        return read_image_folder(source, size, channels)
    return read_image_records(str(spec.path), source, spec.image_column or "image", spec.label_column, size, channels)


class TextSet:
    """Texts (or text pairs) and their class ids (or scores); a batch is ``{"text": [...]}`` with the labels,
    and ``"text_pair": [...]`` the second texts of pairs."""

    def __init__(self, texts: list[Text], labels: np.ndarray) -> None:
        self.texts = texts
        self.labels = torch.from_numpy(labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64))

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> TextSet:
        """The first ``n`` examples."""
        return TextSet(self.texts[:n], self.labels[:n].numpy())

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        chosen = [self.texts[i] for i in index.tolist()]
        if chosen and isinstance(chosen[0], tuple):
            inputs = {"text": [t[0] for t in chosen], "text_pair": [t[1] for t in chosen]}
        else:
            inputs = {"text": chosen}
        return {"index": index, "inputs": inputs, "labels": self.labels[index]}


class TextClassificationTask(_Accuracy):
    """Text classification from labelled files, scored by accuracy.

    ``data.path`` is a file (the training set) or a folder holding ``train``, optionally ``dev``
    (or ``valid``/``validation``/``val``) and ``test`` files of the format. Without a test file
    (there or at ``data.test_path``) the test set is held out of the training file; without a
    dev file the validation set is. Held-out examples are drawn by a fixed seeded shuffle, so
    files sorted by class still split fairly.

    Labels are class ids when every label is an integer (0 .. n-1), else names, numbered in
    sorted order (:attr:`label_names`).

    ``data.mix`` adds unlabelled texts to the training set (after the labelled ones, which keep
    ``data.train_limit``): the distilled student learns them from the teacher's outputs alone
    (the task loss skips them), and the no-teacher baseline, which has nothing to learn from
    them, trains on the labelled examples only. A mix text that is also a labelled training,
    validation or test text is dropped, so the teacher's answers on test texts never train the
    student.

    Args:
        spec: Where the files are, their format and columns, how much to use and hold out.
        seed: Seed of the mixing samples (a ``data.mix`` weight's fraction).
    """

    #: The label of a training text without one (a text of ``data.mix``).
    UNLABELLED: float = -1

    def __init__(self, spec: DataSpec, seed: int = 0) -> None:
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
        if not train_texts:
            raise DataError(f"{path}: {len(texts)} example(s) are too few to hold out the test and validation sets "
                            "from; give more, or separate test and dev files")
        self.label_names, ids = self.encode_labels(train_raw, {split: labels for split, (_, labels) in held.items()})
        self.label_names = _dataset_names(spec, self.label_names)
        self.num_classes = len(self.label_names)
        limits = {"train": spec.train_limit, "eval": spec.eval_limit, "test": spec.test_limit}
        self.splits = {split: TextSet(held[split][0][: limits[split]], ids[split][: limits[split]])
                       for split in ("eval", "test")}
        labelled, labels = train_texts[: limits["train"]], ids["train"][: limits["train"]]
        known = {*labelled, *self.splits["eval"].texts, *self.splits["test"].texts}
        mixed = mix_texts(mix_sources(spec), seed)
        extra = [t for t in mixed if t not in known]
        if mixed:
            log.info("data.mix: %d unlabelled texts beside %d labelled ones (%d dropped: texts of the labelled "
                     "training, validation or test sets)", len(extra), len(labelled), len(mixed) - len(extra))
        #: The training set: the labelled examples, then data.mix's texts, labelled as unknown.
        self.train = TextSet(labelled + extra, np.concatenate([labels, np.full(len(extra), self.UNLABELLED,
                                                                                  labels.dtype)]))
        #: How many of the training examples (the first) have labels.
        self.labelled_examples = len(labelled)

    @torch.inference_mode()
    def mix_certainty(self, model: Any, limit: int = 500, batch_size: int = 64) -> dict[str, float] | None:
        """``model``'s mean top-class probability on (up to ``limit`` of) the test texts and on a seeded
        sample of as many of ``data.mix``'s texts; ``None`` without a mix. A teacher far less sure of
        the mix than of its task's texts has little to teach through it (docs/results.md: a
        question-type teacher on general prose)."""
        mixed, test = len(self.train) - self.labelled_examples, self.splits["test"]
        if not mixed or not len(test):
            return None
        picked = np.sort(np.random.default_rng(0).choice(mixed, min(mixed, limit), replace=False))
        return {"test": _mean_top(model, test, list(range(min(len(test), limit))), batch_size),
                "mix": _mean_top(model, self.train, (self.labelled_examples + picked).tolist(), batch_size)}

    def encode_labels(self, train: list[str], held: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
        """The class names and each split's class ids, from the labels as written."""
        return _number_labels(train, held)

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(_joined(text) for text in self.train.texts).encode())
        digest.update(self.train.labels.numpy().tobytes())
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [len(_joined(text)) for text in self.train.texts]

    def train_texts(self) -> list[str]:
        """Every training text, both of a pair (for vocabulary pruning and calibration)."""
        return [t for text in self.train.texts for t in ((text,) if isinstance(text, str) else text)]


def _mean_top(model: Any, data: TextSet, indices: list[int], batch_size: int) -> float:
    """The mean of ``model``'s top-class probability over ``data``'s examples at ``indices``."""
    total = 0.0
    with evaluating(model):
        for start in range(0, len(indices), batch_size):
            logits = model(data.batch(indices[start:start + batch_size])["inputs"])["logits"].float()
            total += float(logits.softmax(-1).amax(-1).sum())
    return total / len(indices)


def _joined(text: Text) -> str:
    return text if isinstance(text, str) else "\t".join(text)


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


def _dataset_names(spec: DataSpec, names: list[str]) -> list[str]:
    """The class names of a Hugging Face dataset whose label column is a ``ClassLabel``, in its
    id order, for labels that are its ids (``names`` is then ``0 .. n-1``); else ``names``."""
    if spec.format != "hf-dataset" or names != [str(i) for i in range(len(names))]:
        return names
    named = dataset_class_names(spec.path, spec.split, spec.label_column)
    return named if named is not None and len(named) >= len(names) else names


def _number_labels(train: list[str], held: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and ids: integer labels 0 .. n-1 are ids already; other integers (-1/1, sparse
    codes) are names in numeric order, any other names in sorted order."""
    every = set(train).union(*held.values())
    if len(set(train)) < 2:
        raise DataError(f"the training set has {len(set(train))} class ({sorted(set(train))}); a classifier needs "
                        "two or more")
    numbers = all(label.lstrip("-").isdigit() for label in every)
    if numbers:  # "01" and "1" are the same class
        train, held = [str(int(x)) for x in train], {k: [str(int(x)) for x in v] for k, v in held.items()}
        every = set(train).union(*held.values())
    if numbers and min(int(x) for x in every) >= 0 and max(int(x) for x in every) < 2 * len(every):
        names = [str(i) for i in range(max(int(x) for x in every) + 1)]  # ids, a few perhaps absent from a split
    elif numbers:
        names = sorted(set(train), key=int)
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

"""Image classification (Fashion-MNIST's IDX files), scored by accuracy."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import read_idx_images
from distill.errors import DataError
from distill.tasks.base import Batch

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "ClassificationTask", "ImageSet"]

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


class ClassificationTask:
    """Image classification scored by accuracy; the validation split is held out of train.

    Args:
        spec: Where the IDX files are, how much to use and what share to hold out.
    """

    output = "logits"
    metric = "accuracy"

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

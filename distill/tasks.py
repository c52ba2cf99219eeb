"""Tasks: what data a recipe trains on, what the task's own loss is, and how quality is scored.

The engine only sees the :class:`Task` protocol, so a new kind of model (causal LMs, later)
is a new task class, not a change to the loop.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import SentencePairs, read_idx_images, read_records, read_stsb, read_text
from distill.errors import DataError
from distill.losses.chunked import chunked_cross_entropy

__all__ = ["Batch", "ClassificationTask", "LanguageModelingTask", "STSTask", "Task", "build_task", "spearman"]

#: A batch: ``index`` (positions in the training set, for the cache), ``inputs`` for the
#: adapters, ``labels`` for the task loss (or ``None``).
Batch = dict[str, Any]


class Task(Protocol):
    """What the engine and the evaluator need from a task."""

    output: str
    """Named model output that distillation compares and evaluation scores."""
    metric: str
    """Name of the quality metric (higher is better)."""
    train: Any
    """Training set: ``len()`` and ``batch(indices) -> Batch``."""

    def fingerprint(self) -> str:
        """Hash of the training inputs, for the teacher cache."""
        ...

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        """The task's own loss on labels (used alone by the baseline)."""
        ...

    def evaluate(self, model: Any, split: str, batch_size: int = 64) -> float:
        """Quality of ``model`` (an adapter) on ``eval`` or ``test``, as a percentage."""
        ...

    def sample_inputs(self, n: int) -> dict[str, Any]:
        """``n`` real test inputs, for timing."""
        ...

    def lengths(self) -> Sequence[int]:
        """A size per training example; the cache batches similar sizes together."""
        ...

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        """Raise a clear error when a model's outputs do not fit the task (wrong label set)."""
        ...


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        sorted_v = v[order]
        r = np.empty(len(v), dtype=np.float64)
        start = 0
        while start < len(v):
            end = start
            while end + 1 < len(v) and sorted_v[end + 1] == sorted_v[start]:
                end += 1
            r[order[start : end + 1]] = (start + end) / 2.0
            start = end + 1
        return r

    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    return float(np.corrcoef(rx, ry)[0, 1])


class PairSet:
    """Sentence pairs as a training set: a batch is ``[a1, b1, a2, b2, ...]``."""

    def __init__(self, pairs: SentencePairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: Sequence[int]) -> Batch:
        texts = []
        for i in indices:
            texts += [self.pairs.first[i], self.pairs.second[i]]
        return {
            "index": torch.as_tensor(list(indices), dtype=torch.long),
            "inputs": {"text": texts},
            "labels": torch.from_numpy(self.pairs.scores[list(indices)]),
        }


def cosent_loss(first: Tensor, second: Tensor, scores: Tensor, scale: float = 20.0) -> Tensor:
    """CoSENT (Su, 2022): every pair scored higher must have a higher cosine than every lower one.

    Shapes: ``(N, D)`` embeddings of both sides and ``(N,)`` gold scores; returns a scalar.
    """
    cos = F.cosine_similarity(first, second, dim=-1) * scale
    diff = cos[None, :] - cos[:, None]  # diff[i, j] = cos_j - cos_i
    wrong_order = scores[:, None] > scores[None, :]  # pair i should beat pair j
    diff = diff.masked_fill(~wrong_order, float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros(1, device=cos.device), diff.reshape(-1)]), 0)


class STSTask:
    """Sentence embeddings scored by Spearman correlation of cosine similarity with gold scores.

    Args:
        spec: Where the STS Benchmark files are and how much of them to use.
    """

    output = "embedding"
    metric = "spearman"

    def __init__(self, spec: DataSpec) -> None:
        self.train = PairSet(read_stsb(spec.path, "train", spec.train_limit))
        self.splits = {
            "eval": read_stsb(spec.path, "dev", spec.eval_limit),
            "test": read_stsb(spec.path, "test", spec.test_limit),
        }

    def fingerprint(self) -> str:
        return self.train.pairs.fingerprint()

    def lengths(self) -> list[int]:
        p = self.train.pairs
        return [max(len(a), len(b)) for a, b in zip(p.first, p.second, strict=True)]

    def train_texts(self) -> list[str]:
        """Every training sentence (for vocabulary pruning)."""
        return self.train.pairs.first + self.train.pairs.second

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        emb = outputs["embedding"]
        return cosent_loss(emb[0::2], emb[1::2], batch["labels"].to(emb.device))

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        if "embedding" not in outputs or outputs["embedding"].dim() != 2:
            raise DataError(f"task 'sts' needs (N, D) sentence embeddings from the {role}")

    @torch.inference_mode()
    def evaluate(self, model: Any, split: str, batch_size: int = 64) -> float:
        pairs = self.splits[split]
        unique = sorted(set(pairs.first) | set(pairs.second), key=len)
        vectors: dict[str, Tensor] = {}
        was_training = model.module.training
        model.module.eval()
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            emb = F.normalize(model({"text": chunk})["embedding"].float(), dim=-1).cpu()
            vectors.update(zip(chunk, emb, strict=True))
        model.module.train(was_training)
        a = torch.stack([vectors[s] for s in pairs.first])
        b = torch.stack([vectors[s] for s in pairs.second])
        cosine = (a * b).sum(-1).numpy()
        return 100.0 * spearman(cosine, pairs.scores)

    def sample_inputs(self, n: int) -> dict[str, Any]:
        test = self.splits["test"]
        texts = (test.first + test.second)[:n]
        return {"text": texts}


#: Fashion-MNIST pixel statistics, used to standardise inputs.
_MEAN, _STD = 0.2860, 0.3530


class ImageSet:
    """Images and labels held in memory as tensors; batches are sliced, not collated."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.copy())

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x = (self.images[index].float().unsqueeze(1) / 255.0 - _MEAN) / _STD
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


class TextBlocks:
    """Blocks of a text corpus as a data set: a batch is ``{"text": [...]}``, no labels (the
    targets are the texts' own next tokens)."""

    def __init__(self, blocks: list[str]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, indices: Sequence[int]) -> Batch:
        return {"index": torch.as_tensor(list(indices), dtype=torch.long),
                "inputs": {"text": [self.blocks[i] for i in indices]}, "labels": None}

    def items(self) -> list[Any]:
        return self.blocks


class Records:
    """Language-modelling records of one kind (``text``, ``prompt``/``completion`` or
    ``messages``): a batch holds one list per field, which the causal-LM adapter tokenises
    (and masks, so that only completion tokens count)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.fields = tuple(records[0]) if records else ("text",)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = [self.records[i] for i in indices]
        return {"index": torch.as_tensor(list(indices), dtype=torch.long),
                "inputs": {f: [r[f] for r in rows] for f in self.fields}, "labels": None}

    def items(self) -> list[Any]:
        return self.records


def _blocks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text) - size // 4, size)]  # no stub of a last block


def _split_tail(items: list[Any], fraction: float, where: Path) -> tuple[list[Any], list[Any]]:
    cut = int(len(items) * (1 - fraction))
    if cut == 0 or cut == len(items):
        raise DataError(f"{where}: {len(items)} records are too few to hold out a share of {fraction}")
    return items[:cut], items[cut:]


class LanguageModelingTask:
    """Causal language modelling, scored by perplexity (lower is better).

    Plain text (``format: text``) is split at ``1 - eval_fraction`` of its length: the head is
    cut into training blocks of ``block_chars`` characters, the tail is the held-out text.
    Records (``jsonl``, ``parquet``, ``hf-dataset``) keep their last ``eval_fraction`` for
    validation. The held-out part is also the test split, unless ``data.test_path`` names a
    separate test file. With prompt/completion or chat records, only the completion's tokens
    enter the loss and the perplexity.

    Args:
        spec: Where the data is, the block size and the held-out share.
    """

    output = "hidden"
    metric = "perplexity"
    higher_is_better = False
    throughput_unit = "tokens"

    def __init__(self, spec: DataSpec) -> None:
        self.block_chars = spec.block_chars
        if spec.format == "text":
            text = read_text(spec.path)
            cut = int(len(text) * (1 - spec.eval_fraction))
            train, held = _blocks(text[:cut], spec.block_chars), _blocks(text[cut:], spec.block_chars)
            if not train or not held:
                raise DataError(f"{spec.path}: {len(text)} characters are too few for blocks of {spec.block_chars}")
            test = _blocks(read_text(spec.test_path), spec.block_chars) if spec.test_path else held
            make: Any = TextBlocks
        else:
            train, held = _split_tail(read_records(spec.path, spec.format, spec.split), spec.eval_fraction, spec.path)
            test = read_records(spec.test_path, spec.format) if spec.test_path else held
            make = Records
        if not test:
            raise DataError(f"{spec.test_path}: no test examples")
        self.train = make(train[: spec.train_limit])
        self.splits = {"eval": make(held[: spec.eval_limit]), "test": make(test[: spec.test_limit])}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(str(self.block_chars).encode())
        for item in self.train.items():
            digest.update((item if isinstance(item, str) else json.dumps(item, sort_keys=True)).encode())
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [len(item) if isinstance(item, str) else len(json.dumps(item)) for item in self.train.items()]

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        """Next-token cross-entropy over the real tokens, computed in chunks of tokens."""
        hidden = outputs["hidden"]
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), outputs["head"], outputs["targets"],
                                     outputs["token_mask"], bias=outputs.get("head_bias"))

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        missing = {"hidden", "head", "targets", "token_mask"} - set(outputs)
        if missing:
            raise DataError(f"task 'lm' needs a causal language model as the {role} (kind: hf-causal-lm); "
                            f"its outputs lack {sorted(missing)}")

    @torch.inference_mode()
    def evaluate(self, model: Any, split: str, batch_size: int = 16) -> float:
        """Perplexity: exp of the mean next-token negative log-likelihood over every real token."""
        data = self.splits[split]
        was_training = model.module.training
        model.module.eval()
        nll, tokens = 0.0, 0
        for start in range(0, len(data), batch_size):
            out = model(data.batch(range(start, min(start + batch_size, len(data))))["inputs"])
            count = int(out["token_mask"].sum())
            nll += float(self.task_loss(out, {})) * count
            tokens += count
        model.module.train(was_training)
        return math.exp(nll / max(tokens, 1))

    @staticmethod
    def count_units(model: Any, inputs: dict[str, Any]) -> int:
        """Tokens the model reads for ``inputs`` (what throughput is counted in)."""
        return int(model.encode(inputs)["attention_mask"].sum())

    def sample_inputs(self, n: int) -> dict[str, Any]:
        test = self.splits["test"]
        return test.batch(range(min(n, len(test))))["inputs"]


def build_task(task: str, spec: DataSpec) -> STSTask | ClassificationTask | LanguageModelingTask:
    """The task object a recipe's ``task`` and ``data`` describe."""
    if task == "sts":
        return STSTask(spec)
    if task == "lm":
        return LanguageModelingTask(spec)
    return ClassificationTask(spec)

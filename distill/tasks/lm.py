"""Causal language modelling on text or records, scored by perplexity."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.config import DataSpec
from distill.data import read_records, read_text
from distill.errors import DataError
from distill.losses.chunked import chunked_cross_entropy
from distill.tasks.base import Batch, TextBlocks, evaluating

__all__ = ["LanguageModelingTask", "Records", "TextBlocks"]


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
        nll, tokens = 0.0, 0
        with evaluating(model):
            for start in range(0, len(data), batch_size):
                out = model(data.batch(range(start, min(start + batch_size, len(data))))["inputs"])
                count = int(out["token_mask"].sum())
                nll += float(self.task_loss(out, {})) * count
                tokens += count
        return math.exp(nll / max(tokens, 1))

    @staticmethod
    def count_units(model: Any, inputs: dict[str, Any]) -> int:
        """Tokens the model reads for ``inputs`` (what throughput is counted in)."""
        return int(model.encode(inputs)["attention_mask"].sum())

    def sample_inputs(self, n: int) -> dict[str, Any]:
        test = self.splits["test"]
        return test.batch(range(min(n, len(test))))["inputs"]

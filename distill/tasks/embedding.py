"""Label-free sentence-embedding distillation: unlabelled text in, the teacher's embedding space out.

The student learns from the teacher's outputs alone; there are no labels and no task loss. The
validation and test metric is the student's *agreement* with the teacher on held-out texts:
Spearman x 100 between the two models' cosine similarities over every pair of those texts, so
the teacher scores 100 and a student scores how closely it ranks pairs as the teacher does,
whatever its width. Quality on real tasks comes from the evaluation suite
(:mod:`distill.suite`), which no training data touches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import mix_sources, mix_texts, read_texts, unique
from distill.errors import DataError, RecipeError
from distill.tasks.base import Batch, TextBlocks, evaluating, spearman

__all__ = ["EmbeddingTask", "encode_texts"]


@torch.inference_mode()
def encode_texts(model: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``(len(texts), D)`` L2-normalised embeddings of an embedding adapter, in the texts' order.

    Texts are batched by length (little padding) and each distinct text is encoded once.
    """
    distinct = sorted(set(texts), key=len)
    rows: dict[str, np.ndarray] = {}
    with evaluating(model):
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            emb = F.normalize(model({"text": chunk})["embedding"].float(), dim=-1).cpu().numpy()
            rows.update(zip(chunk, emb, strict=True))
    return np.stack([rows[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)


def _pair_cosines(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of every unordered pair of rows (the upper triangle)."""
    sims = vectors @ vectors.T
    return sims[np.triu_indices(len(vectors), k=1)]


class EmbeddingTask:
    """Sentence embeddings learnt from unlabelled text; scored by agreement with the teacher.

    The corpus (``data.path``, plus ``data.mix``) is read as unlabelled texts, repeats removed,
    and its last ``eval_fraction`` held out: the first half of that tail is the validation split,
    the second half the test split (or ``data.test_path``'s texts). Before evaluating, the runner
    hands the task the teacher (:meth:`use_teacher`), whose similarities are the reference.

    Args:
        spec: Where the texts are, how to mix them and how much to hold out.
        seed: Seed of the mixing samples.
    """

    output = "embedding"
    metric = "agreement"

    def __init__(self, spec: DataSpec, seed: int = 0) -> None:
        main = unique(read_texts(spec.path, spec.format, spec.text_column, spec.split, spec.encoding))
        cut = int(len(main) * (1 - spec.eval_fraction))
        if cut < 1 or len(main) - cut < 4:
            raise DataError(f"{spec.path}: {len(main)} distinct texts are too few to hold out a share of "
                            f"{spec.eval_fraction}")
        held = main[cut:]
        train = mix_texts([(main[:cut], spec.weight), *mix_sources(spec)], seed)
        test = (unique(read_texts(spec.test_path, spec.format, spec.text_column, encoding=spec.encoding))
                if spec.test_path else held[len(held) // 2 :])
        self.train = TextBlocks(train[: spec.train_limit])
        self.splits = {"eval": held[: len(held) // 2][: spec.eval_limit], "test": test[: spec.test_limit]}
        self._reference: dict[str, np.ndarray] = {}

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text in self.train.blocks:
            digest.update(text.encode() + b"\n")
        return digest.hexdigest()

    def lengths(self) -> list[int]:
        return [len(t) for t in self.train.blocks]

    def train_texts(self) -> list[str]:
        """Every training text (for vocabulary pruning and static students)."""
        return self.train.blocks

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        raise RecipeError("task 'embedding' has no labels and so no task loss; set task_loss_weight: 0 and "
                          "give distillation losses")

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        if "embedding" not in outputs or outputs["embedding"].dim() != 2:
            raise DataError(f"task 'embedding' needs (N, D) sentence embeddings from the {role}")

    def use_teacher(self, teacher: Callable[[dict[str, Any]], dict[str, Tensor]] | Any) -> None:
        """Keep the teacher's pair similarities on the held-out splits: the reference of :meth:`evaluate`."""
        for split, texts in self.splits.items():
            self._reference[split] = _pair_cosines(encode_texts(teacher, texts))

    def evaluate(self, model: Any, split: str, batch_size: int = 64) -> float:
        if split not in self._reference:
            raise RecipeError("task 'embedding': evaluate needs the teacher's reference first (use_teacher)")
        mine = _pair_cosines(encode_texts(model, self.splits[split], batch_size))
        return 100.0 * spearman(mine, self._reference[split])

    def sample_inputs(self, n: int) -> dict[str, Any]:
        return {"text": self.splits["test"][:n]}

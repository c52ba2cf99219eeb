"""Sentence embeddings trained and scored on STS Benchmark's gold similarity scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DataSpec
from distill.data import SentencePairs, read_stsb
from distill.errors import DataError
from distill.tasks.base import Batch, evaluating, spearman

__all__ = ["PairSet", "STSTask", "cosent_loss"]


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
        with evaluating(model):
            for start in range(0, len(unique), batch_size):
                chunk = unique[start : start + batch_size]
                emb = F.normalize(model({"text": chunk})["embedding"].float(), dim=-1).cpu()
                vectors.update(zip(chunk, emb, strict=True))
        a = torch.stack([vectors[s] for s in pairs.first])
        b = torch.stack([vectors[s] for s in pairs.second])
        cosine = (a * b).sum(-1).numpy()
        return 100.0 * spearman(cosine, pairs.scores)

    def sample_inputs(self, n: int) -> dict[str, Any]:
        test = self.splits["test"]
        texts = (test.first + test.second)[:n]
        return {"text": texts}

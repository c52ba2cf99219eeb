"""What the Hugging Face text adapters share: tokenisation, saving, and sentence pooling.

The encoder adapters of :mod:`distill.models.adapters` and the causal-LM adapter of
:mod:`distill.models.causal_lm` build on :class:`HFTextAdapter`; :func:`pool` is the one
implementation of sentence pooling, which the embedding adapter (training, evaluation) and the
ONNX export both call, so an exported model computes what the trained one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.gguf import plain_model

__all__ = ["HFTextAdapter", "device_of", "pool", "unwrap"]


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (the CPU for a module without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a distributed wrapper (which keeps it as ``.module``)."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str, normalize: bool) -> Tensor:
    """Token states to one sentence embedding per row.

    Args:
        hidden: ``(N, T, H)`` the encoder's last hidden states.
        attention_mask: ``(N, T)`` 1 for real tokens, 0 for padding.
        pooling: ``cls``, the first token's state; ``mean`` (any other value), the mean over
            real tokens.
        normalize: L2-normalise the pooled vector.

    Returns:
        ``(N, H)`` sentence embeddings.
    """
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


class HFTextAdapter:
    """Tokenisation and saving shared by the adapters of text models from ``transformers``.

    Args:
        module: The ``transformers`` model.
        tokenizer: Its tokenizer.
        max_length: Truncation length in tokens.
    """

    def __init__(self, module: nn.Module, tokenizer: Any, max_length: int) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, texts: list[str], offsets: bool = False, pairs: list[str] | None = None) -> dict[str, Tensor]:
        """Pad to the longest text of the batch, truncate at ``max_length``; with ``offsets``, also
        each token's ``offset_mapping`` (its first and past-last character; fast tokenizers). With
        ``pairs``, each text and its pair are one input, joined as the tokenizer joins pairs (the
        longer one is truncated first)."""
        second = {"text_pair": list(pairs)} if pairs is not None else {}
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_offsets_mapping=offsets, **second)
        device = device_of(self.module)
        return {k: v.to(device) for k, v in enc.items()}

    def save_hf(self, folder: Path) -> None:
        """Write a Hugging Face folder: config, safetensors weights and tokenizer."""
        folder.mkdir(parents=True, exist_ok=True)
        plain_model(unwrap(self.module)).save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))

"""A student's weights around training: parameters frozen by name, the copy of its start, and the
mix of that start back into the trained weights (``train.freeze``, ``train.merge_start``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.errors import RecipeError
from distill.models.adapters import Adapter

__all__ = ["freeze", "merge_start", "start_weights"]


def freeze(module: nn.Module, prefixes: list[str]) -> None:
    """Keep the parameters whose names start with one of ``prefixes`` as they are; a prefix that
    matches none is a recipe error."""
    params = dict(module.named_parameters())
    for prefix in prefixes:
        hits = [param for name, param in params.items() if name.startswith(prefix)]
        if not hits:
            raise RecipeError(f"train.freeze: no student parameter starts with '{prefix}' (e.g. {list(params)[:3]})")
        for param in hits:
            param.requires_grad_(False)


def start_weights(student: Adapter) -> dict[str, Tensor]:
    """A CPU copy of the student's floating-point weights and buffers, as they are now."""
    return {k: v.detach().to("cpu", copy=True) for k, v in student.module.state_dict().items()
            if v.is_floating_point()}


def merge_start(student: Adapter, start: dict[str, Tensor], share: float) -> None:
    """Mix ``share`` of ``start`` (from :func:`start_weights`) into the student's weights, in place."""
    with torch.no_grad():
        for name, value in student.module.state_dict().items():
            if name in start:
                value.mul_(1 - share).add_(start[name].to(value.device, value.dtype), alpha=share)

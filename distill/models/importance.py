"""Calibration importance: how strongly a teacher uses each hidden channel, attention head and
feed-forward neuron, to decide which ones a narrower student keeps.

The score of each is its mean activation magnitude on calibration batches (the importance
scores of Minitron, Muralidharan et al. 2024). Where the activations are read depends on the
architecture: a *placement* function names, for each module of the model, what its input or
output measures (a :class:`Tap`), and :class:`Importance` hooks and accumulates them. The
encoder derivation (:mod:`distill.models.derive`) and the causal-LM one
(:mod:`distill.models.derive_lm`) each pass their own placement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.errors import ModelError

__all__ = ["Importance", "Placement", "Tap", "top"]


@dataclass(frozen=True)
class Tap:
    """What one module's activations measure."""

    kind: Literal["hidden", "heads", "neurons"]
    """Hidden channels (a norm's output), the attention heads' outputs side by side, or the
    feed-forward neurons."""
    layer: int | None = None
    """The layer the heads or neurons belong to."""
    read: Literal["input", "output"] = "output"
    """Whether the module's input or its output holds them."""


Placement = Callable[[str, nn.Module], Tap | None]
"""``(module name, module) -> Tap`` for the modules to hook, ``None`` for the others."""


class Importance:
    """Accumulates mean |activation| per hidden channel, head and FFN neuron via forward hooks.

    Args:
        model: The teacher's model; hooks go where ``placement`` says.
        head_size: Channels per attention head.
        placement: Which modules to read, and what each one measures.
    """

    def __init__(self, model: nn.Module, head_size: int, placement: Placement) -> None:
        self.head_size = head_size
        self.hidden: Tensor | None = None
        self.heads: dict[int, Tensor] = {}
        self.neurons: dict[int, Tensor] = {}
        self.handles: list[Any] = []
        for name, module in model.named_modules():
            tap = placement(name, module)
            if tap is not None:
                self.handles.append(self._hook(module, tap))

    def _hook(self, module: nn.Module, tap: Tap) -> Any:
        if tap.kind == "hidden":
            record: Callable[[Tensor], None] = self._on_hidden
        elif tap.layer is None:
            raise ValueError(f"a '{tap.kind}' tap needs the index of its layer")
        else:
            record = partial(self._on_heads if tap.kind == "heads" else self._on_neurons, tap.layer)
        if tap.read == "input":
            return module.register_forward_pre_hook(lambda m, args: record(args[0]))
        return module.register_forward_hook(lambda m, args, out: record(out))

    @staticmethod
    def _magnitude(x: Tensor) -> Tensor:
        return x.detach().abs().float().reshape(-1, x.shape[-1]).mean(0)

    def _on_hidden(self, out: Tensor) -> None:
        mag = self._magnitude(out)
        self.hidden = mag if self.hidden is None else self.hidden + mag

    def _on_heads(self, layer: int, context: Tensor) -> None:
        per_head = self._magnitude(context).reshape(-1, self.head_size).sum(-1)
        self.heads[layer] = self.heads.get(layer, 0) + per_head

    def _on_neurons(self, layer: int, activations: Tensor) -> None:
        self.neurons[layer] = self.neurons.get(layer, 0) + self._magnitude(activations)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()

    def collect(self, forward: Callable[[Any], Any], batches: Iterable[Any]) -> None:
        """Run ``forward`` on every batch, accumulating, then remove the hooks.

        Raises:
            ModelError: No activation was seen (no batches).
        """
        try:
            for batch in batches:
                forward(batch)
        finally:
            self.close()
        if self.hidden is None:
            raise ModelError("student.derive: calibration produced no activations (no training batches?)")


def top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return torch.topk(scores, k).indices.sort().values

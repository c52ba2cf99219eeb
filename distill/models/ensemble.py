"""Several teachers as one (``teacher.members``): their outputs joined into one teacher's.

Sentence embeddings are joined side by side, each member's L2-normalised and scaled by the
square root of its weight, so the joint vector has unit length and the cosine of two of them is
the weighted mean of the members' cosines: the similarity structure a student learns is the
members' weighted consensus. Class logits are averaged with the weights. Outputs that only some
members have, or whose shapes differ between members (token-level states, whose tokens differ
with each tokenizer), are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ModelError

__all__ = ["EnsembleAdapter"]


class EnsembleAdapter:
    """Teacher adapters run on the same raw inputs, their outputs joined (see the module's docstring).

    Args:
        members: The members' adapters, each reading the inputs with its own tokenizer.
        weights: Each member's weight (scaled here to sum to 1); default equal.
    """

    def __init__(self, members: list[Any], weights: list[float] | None = None) -> None:
        if len(members) < 2:
            raise ModelError("a teacher of members needs two or more")
        raw = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float32)
        if len(raw) != len(members) or bool((raw <= 0).any()):
            raise ModelError(f"teacher members: one positive weight per member, got {weights}")
        self.members = members
        self.weights = (raw / raw.sum()).tolist()
        self.module = nn.ModuleList([m.module for m in members])
        shared = set.intersection(*(set(m.outputs) for m in members))
        self.outputs = tuple(name for name in ("embedding", "logits") if name in shared)

    @property
    def primary(self) -> Any:
        """The first member: the model a derived student is cut from."""
        return self.members[0]

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        outs = [member(inputs) for member in self.members]
        joined: dict[str, Tensor] = {}
        if "embedding" in self.outputs:
            joined["embedding"] = torch.cat(
                [F.normalize(o["embedding"].float(), dim=-1) * w**0.5 for o, w in zip(outs, self.weights, strict=True)],
                dim=-1)
        if "logits" in self.outputs:
            shapes = {tuple(o["logits"].shape) for o in outs}
            if len(shapes) > 1:
                raise ModelError(f"teacher members give logits of different shapes {sorted(shapes)}: the members "
                                 "must share the task's classes")
            joined["logits"] = sum(o["logits"].float() * w for o, w in zip(outs, self.weights, strict=True))
        return joined

    def save(self, folder: Path) -> None:
        """Each member in a folder of its own (``member-0``, ``member-1``, ...)."""
        for i, member in enumerate(self.members):
            path = Path(folder) / f"member-{i}"
            path.mkdir(parents=True, exist_ok=True)
            member.save(path)

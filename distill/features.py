"""Intermediate outputs of any model, taken by module name through forward hooks.

Feature-based losses compare what a student and a teacher compute *inside*: the output of a
convolution stage, a transformer block's hidden states, the queries/keys/values of its
self-attention. Nothing in the model is edited: :class:`TappedAdapter` registers forward hooks
on the named submodules and adds their outputs to the adapter's named outputs, under keys
that the loss terms read (``layer:features.3``, ``qkv:encoder.layer.2``).

Layers are named in a recipe by module path (``features.3``), by block index (``2`` is the third
transformer block, whatever the architecture calls its block list) or by a mapping rule that
pairs student blocks with teacher blocks (``uniform``, ``last``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import ModelError
from distill.registry import suggest

__all__ = [
    "TappedAdapter",
    "block_paths",
    "inspect_model",
    "map_layers",
    "qkv_paths",
    "resolve_layer",
]

#: Where common architectures keep their list of repeated blocks.
_BLOCK_LISTS = ("encoder.layer", "model.layers", "layers", "transformer.h", "transformer.layer",
                "model.decoder.layers", "gpt_neox.layers", "blocks")
#: Names of the query, key and value projections of a self-attention, by architecture family.
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


def _first_tensor(output: Any) -> Tensor:
    """A module's output as one tensor: the first tensor of a tuple or a model-output object."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise ModelError(f"module output of type {type(output).__name__} holds no tensor")


def _inner(module: nn.Module) -> nn.Module:
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def block_paths(module: nn.Module) -> list[str]:
    """Module paths of the model's repeated blocks (transformer layers), in order.

    Known block lists are tried first; otherwise the longest ``nn.ModuleList`` is taken.
    """
    module = _inner(module)
    named = dict(module.named_modules())
    for prefix in (p for base in ("", "base_model.", "bert.", "roberta.") for p in (base + b for b in _BLOCK_LISTS)):
        found = named.get(prefix)
        if isinstance(found, nn.ModuleList) and len(found):
            return [f"{prefix}.{i}" for i in range(len(found))]
    lists = [(name, m) for name, m in named.items() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(longest))]


def resolve_layer(module: nn.Module, layer: str | int) -> str:
    """Module path of ``layer``: a path is checked, an integer indexes the block list (negative from the end)."""
    module = _inner(module)
    if isinstance(layer, int):
        blocks = block_paths(module)
        if not blocks:
            raise ModelError(f"layer {layer}: this model has no list of blocks to index; name the module by path "
                             "(distill inspect lists them)")
        if not -len(blocks) <= layer < len(blocks):
            raise ModelError(f"layer {layer}: the model has {len(blocks)} blocks ({blocks[0]} .. {blocks[-1]})")
        return blocks[layer]
    names = [name for name, _ in module.named_modules() if name]
    if layer not in names:
        raise ModelError(f"layer '{layer}': no such module;{suggest(layer, names)} "
                         f"'distill inspect' lists the {len(names)} module names")
    return layer


def qkv_paths(module: nn.Module, block: str) -> tuple[str, str, str]:
    """Paths of the query, key and value projections inside the transformer block ``block``."""
    module = _inner(module)
    names = [name for name, m in module.named_modules() if name.startswith(block + ".") and isinstance(m, nn.Linear)]
    for q, k, v in _QKV_NAMES:
        found = [next((n for n in names if n.rsplit(".", 1)[-1] == part), None) for part in (q, k, v)]
        if all(found):
            return found[0], found[1], found[2]  # type: ignore[return-value]
    raise ModelError(f"block '{block}' has no separate query/key/value projections (looked for "
                     f"{', '.join('/'.join(n) for n in _QKV_NAMES)}); attention relations need them")


def map_layers(student: Sequence[str | int], teacher: Sequence[str | int] | None, rule: str,
               teacher_blocks: int) -> list[tuple[str | int, str | int]]:
    """Pair student layers with teacher layers.

    Args:
        student: Student layers (paths or block indices).
        teacher: Teacher layers to choose from; ``None`` means all teacher blocks.
        rule: ``pairs`` pairs the two lists in order (same length); ``uniform`` spreads the
            student layers evenly over the teacher's (student layer ``i`` of ``n`` takes teacher
            layer ``ceil((i + 1) * m / n) - 1`` of ``m``, as in PKD and TinyBERT); ``last`` takes
            the teacher's last ``n``.
        teacher_blocks: Number of teacher blocks (used when ``teacher`` is ``None``).
    """
    pool: list[str | int] = list(teacher) if teacher is not None else list(range(teacher_blocks))
    n, m = len(student), len(pool)
    if rule == "pairs":
        if n != m:
            raise ModelError(f"layers: 'pairs' needs as many teacher layers as student layers, got {m} and {n}")
        chosen = pool
    elif n > m:
        raise ModelError(f"layers: {n} student layers cannot be mapped onto {m} teacher layers")
    elif rule == "uniform":
        chosen = [pool[-(-(i + 1) * m // n) - 1] for i in range(n)]
    elif rule == "last":
        chosen = pool[m - n:]
    else:
        raise ModelError(f"layers.map: unknown rule '{rule}'; allowed: pairs, uniform, last")
    return list(zip(student, chosen, strict=True))


class TappedAdapter:
    """An adapter whose outputs also hold the outputs of chosen submodules.

    ``taps`` maps an output key to a module path (``{"layer:features.3": "features.3"}``) or,
    for attention relations, to the three paths of a block's query/key/value projections,
    stacked into one ``(3, N, T, D)`` tensor. Hooks stay registered for the adapter's life;
    everything else (``module``, ``save``, tokenisation) is the wrapped adapter's.

    Args:
        adapter: The adapter to extend.
        taps: Output key to module path, or to a (query, key, value) tuple of paths.
    """

    def __init__(self, adapter: Any, taps: dict[str, str | tuple[str, str, str]]) -> None:
        self.adapter = adapter
        self.taps = dict(taps)
        self._store: dict[str, Tensor] = {}
        named = dict(_inner(adapter.module).named_modules())
        self._handles = []
        paths = {p for target in self.taps.values() for p in ((target,) if isinstance(target, str) else target)}
        for path in sorted(paths):
            self._handles.append(named[path].register_forward_hook(self._hook(path)))

    def _hook(self, path: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._store[path] = _first_tensor(output)

        return hook

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.adapter.module = value

    def __getattr__(self, name: str) -> Any:
        if name == "adapter":  # not set yet (during unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.adapter, name)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        self._store.clear()
        out = dict(self.adapter(inputs))
        for key, paths in self.taps.items():
            if isinstance(paths, str):
                out[key] = self._store[paths]
            else:
                out[key] = torch.stack([self._store[p] for p in paths])
        self._store.clear()
        return out

    def save(self, folder: Path) -> None:
        """Save the wrapped model; the hooks are not part of it."""
        self.adapter.save(folder)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def inspect_model(module: nn.Module, run: Any) -> list[dict[str, Any]]:
    """Every named submodule with its type, parameter count and output shape on one forward pass.

    Args:
        module: The model.
        run: Callable that runs the model once (on a sample batch).

    Returns:
        One row per module, in definition order: ``name``, ``type``, ``params`` (its own and its
        children's), ``shape`` (of the first output tensor, ``None`` if it did not run),
        ``block`` (its index in the block list, if it is a block).
    """
    module = _inner(module)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _a: Any, output: Any, name: str = name) -> None:
            try:
                shapes.setdefault(name, tuple(_first_tensor(output).shape))
            except ModelError:
                pass

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    blocks = {path: i for i, path in enumerate(block_paths(module))}
    return [
        {"name": name, "type": type(sub).__name__, "params": sum(p.numel() for p in sub.parameters()),
         "shape": shapes.get(name), "block": blocks.get(name)}
        for name, sub in module.named_modules() if name
    ]

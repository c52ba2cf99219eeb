"""``distill inspect``: the layer names of a model, with output shapes, that feature losses can name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distill.config import ModelSpec, load_recipe
from distill.errors import DistillError, ModelError
from distill.features import inspect_model
from distill.models.load import load_model, load_teacher
from distill.models.student import build_student
from distill.tasks import build_task

__all__ = ["format_rows", "inspect_adapter", "inspect_command"]

_SAMPLE_TEXTS = ["A student learns to imitate its teacher.", "Distillation makes small models good."]


def inspect_adapter(adapter: Any, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of :func:`distill.features.inspect_model` for an adapter run on ``inputs``."""
    return inspect_model(adapter.module, lambda: adapter(inputs))


def format_rows(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table: module name, type, parameters, output shape, block index."""
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [title, f"{'module':<{width}}  {'type':<24} {'params':>11}  {'block':>5}  output shape"]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) if r["shape"] is not None else "-"
        block = "" if r["block"] is None else str(r["block"])
        lines.append(f"{r['name']:<{width}}  {r['type'][:24]:<24} {r['params']:>11,}  {block:>5}  {shape}")
    blocks = sum(r["block"] is not None for r in rows)
    lines.append(f"{len(rows)} modules; {blocks} blocks (layers: [i] in a recipe picks block i)" if blocks
                 else f"{len(rows)} modules; name layers by their path")
    return "\n".join(lines)


def _from_recipe(path: Path, role: str | None) -> list[tuple[str, Any, dict[str, Any]]]:
    recipe = load_recipe(path)
    task = build_task(recipe.task, recipe.data)
    sample = task.train.batch(range(min(2, len(task.train))))["inputs"]
    teacher = load_teacher(recipe)
    models = [("teacher", teacher)]
    if role != "teacher":
        models.append(("student", build_student(recipe, teacher, task)))
    return [(name, model, sample) for name, model in models if role in (None, name)]


def _from_source(source: str, kind: str | None, arch: str | None, input_shape: str
                 ) -> list[tuple[str, Any, dict[str, Any]]]:
    kind = kind or "torch"
    spec = ModelSpec(kind=kind, source=source if source != "-" else None, arch=arch)  # type: ignore[arg-type]
    model = load_model(spec, kind)
    if kind == "torch":
        try:
            shape = [int(d) for d in input_shape.split(",")]
        except ValueError:
            shape = []
        if len(shape) != 3 or min(shape) < 1:
            raise DistillError(f"--input-shape: expected C,H,W, three positive integers, got '{input_shape}'")
        inputs: dict[str, Any] = {"x": torch.zeros(2, *shape)}
    else:
        inputs = {"text": _SAMPLE_TEXTS}
    return [(source, model, inputs)]


def inspect_command(model: str, *, kind: str | None = None, arch: str | None = None, role: str | None = None,
                    input_shape: str = "1,28,28", as_json: bool = False) -> str:
    """What ``distill inspect`` prints for a recipe file or a model source."""
    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DistillError(f"recipe file not found: {path}")
        targets = _from_recipe(path, role)
    else:
        targets = _from_source(model, kind, arch, input_shape)
    tables = {}
    for name, adapter, inputs in targets:
        try:
            tables[name] = inspect_adapter(adapter, inputs)
        except (RuntimeError, ValueError, IndexError) as exc:
            reason = " ".join(str(exc).split())
            shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            raise ModelError(f"{name} cannot run on inputs {shapes or 'of text'}: {reason}; give the input shape it "
                             "takes (--input-shape C,H,W) or the arch_args it was built with") from None
    if as_json:
        return json.dumps(tables, indent=1)
    return "\n\n".join(format_rows(f"== {name}", rows) for name, rows in tables.items())

"""Distil with plain ``nn.Module``s and data loaders, without writing a recipe."""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import LossSpec, TrainSpec
from distill.engine import make_accelerator, train
from distill.errors import RunFolderError
from distill.pairing import build_loss_terms, prepare_pair
from distill.tasks import Batch

__all__ = ["Distiller"]


class ModuleAdapter:
    """Wraps a module so that a batch's inputs become ``{output: tensor}``: ``module(x)`` for
    ``(x, y)`` batches, ``module(**inputs)`` for dict batches (a ``transformers`` model's
    ``input_ids``, ``attention_mask``, ...), whose output's ``logits`` (or attribute named
    ``output``) is taken."""

    def __init__(self, module: nn.Module, output: str = "logits") -> None:
        self.module = module
        self.output = output

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        device = next(self.module.parameters()).device
        if set(inputs) == {"x"}:
            out = self.module(inputs["x"].to(device))
        else:
            out = self.module(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()})
        if not isinstance(out, Tensor):  # a ModelOutput (or a tuple: its first item)
            found = getattr(out, self.output, None)
            out = found if isinstance(found, Tensor) else out[0]
        return {self.output: out}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))


#: Keys of a dict batch that are not model inputs.
_NOT_INPUTS = ("y", "labels", "label", "index")


def _to_batch(item: Any) -> Batch:
    if isinstance(item, dict) and "x" in item:
        return {"index": item.get("index"), "inputs": {"x": item["x"]}, "labels": item.get("y")}
    if isinstance(item, dict):  # a transformers-style batch: input_ids, attention_mask, ..., labels
        labels = next((item[k] for k in ("labels", "label", "y") if item.get(k) is not None), None)
        inputs = {k: v for k, v in item.items() if k not in _NOT_INPUTS}
        return {"index": item.get("index"), "inputs": inputs, "labels": labels}
    x, y = item[0], (item[1] if len(item) > 1 else None)
    return {"index": None, "inputs": {"x": x}, "labels": y}


class _LoaderBatches:
    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return (_to_batch(item) for item in itertools.islice(self.loader, skip, None))


class _LoaderTask:
    def __init__(self, output: str, eval_loader: Iterable[Any] | None) -> None:
        self.output = output
        self.metric = "accuracy" if output == "logits" else "cosine"
        self.eval_loader = eval_loader

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        out = outputs[self.output]
        labels = batch["labels"].to(out.device)
        if self.output == "logits":
            return F.cross_entropy(out.float(), labels)
        return F.mse_loss(out.float(), labels.float())

    @torch.inference_mode()
    def evaluate(self, model: ModuleAdapter, split: str) -> float | None:
        if self.eval_loader is None or self.output != "logits":
            return None
        was_training = model.module.training
        model.module.eval()
        correct = total = 0
        for item in self.eval_loader:
            batch = _to_batch(item)
            pred = model(batch["inputs"])["logits"].argmax(-1).cpu()
            correct += int((pred == batch["labels"]).sum())
            total += len(pred)
        model.module.train(was_training)
        return 100.0 * correct / max(1, total)


class Distiller:
    """Train ``student`` to imitate ``teacher`` on batches from a data loader.

    Batches are ``(x, y)`` tuples, ``{"x": ..., "y": ...}`` dicts, or the dicts a
    ``transformers`` collator makes (``input_ids``, ``attention_mask``, ..., ``labels``), which
    are passed to the models as keyword arguments (their output's ``logits`` is used). ``y`` /
    ``labels`` may be absent when ``task_loss_weight`` is 0. The teacher runs online on every
    batch, and not at all when there are no distillation losses. A ``transformers`` student
    can be derived from the teacher with :func:`distill.derive`.

    Args:
        teacher: The frozen model to imitate.
        student: The model to train.
        losses: Loss names or :class:`LossSpec` dicts, for example ``[{"name": "kd",
            "params": {"temperature": 4}}]``.
        task_loss_weight: Weight of cross-entropy on ``y`` (0 for pure distillation).
        train: Loop settings (:class:`TrainSpec` or a dict of its fields).
        output: Name of what the models return (``logits`` or ``embedding``).
        folder: Where checkpoints and metrics go; by default a new folder under ``runs/``.
        resume: Continue from the checkpoints ``folder`` holds (a fit never picks up an earlier
            fit's weights unless asked).
        seed: Seed for dropout and any randomness of the loop.

    Example:
        >>> Distiller(teacher, student, losses=["kd"]).fit(train_loader, eval_loader)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        losses: list[str | dict[str, Any] | LossSpec] = ("kd",),  # type: ignore[assignment]
        task_loss_weight: float = 0.0,
        train: TrainSpec | dict[str, Any] | None = None,
        output: str = "logits",
        folder: str | Path | None = None,
        seed: int = 0,
        resume: bool = False,
    ) -> None:
        self.teacher = ModuleAdapter(teacher.eval().requires_grad_(False), output)
        self.student = ModuleAdapter(student, output)
        specs = [s if isinstance(s, LossSpec) else LossSpec(**({"name": s} if isinstance(s, str) else s))
                 for s in losses]
        build_loss_terms(specs, output)  # parameter errors now, not at fit()
        self.specs = specs
        self.task_loss_weight = task_loss_weight
        self.spec = train if isinstance(train, TrainSpec) else TrainSpec(**(train or {}))
        self.output = output
        if folder is None:
            Path("runs").mkdir(exist_ok=True)
            folder = tempfile.mkdtemp(prefix=time.strftime("distiller-%Y%m%d-%H%M%S-"), dir="runs")
        self.folder = Path(folder)
        self.resume = resume
        self.seed = seed

    def fit(self, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None = None) -> dict[str, Any]:
        """Train; returns ``{"steps", "eval"}``. The trained student is ``self.student.module``."""
        held = self.folder / "checkpoints"
        if not self.resume and held.is_dir() and any(held.glob("step-*")):
            raise RunFolderError(f"{self.folder} holds checkpoints of an earlier fit; pass resume=True to continue "
                                 "it, or give another folder")
        accelerator = make_accelerator(self.spec)
        self.teacher.module.to(accelerator.device)
        task = _LoaderTask(self.output, eval_loader)
        sample = _to_batch(next(iter(train_loader)))
        dataset = getattr(train_loader, "dataset", None)
        size = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        pair = prepare_pair(self.specs, self.output, self.student, self.teacher, sample, _NoCheck(), size)
        try:
            return train(
                student=pair.student, task=task, batches=_LoaderBatches(train_loader), terms=pair.terms,
                projectors=pair.projectors, teacher=pair.teacher, cache=None, task_weight=self.task_loss_weight,
                spec=self.spec, seed=self.seed, folder=self.folder, accelerator=accelerator, desc="distil",
            )
        finally:
            pair.release()


class _NoCheck:
    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        return None

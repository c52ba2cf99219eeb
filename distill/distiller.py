"""Distil with plain ``nn.Module``s and data loaders, without writing a recipe."""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checkpoint import save_model_atomic
from distill.config import LossSpec, TrainSpec, parse_recipe, parse_section
from distill.engine import make_accelerator, train
from distill.errors import DataError, ModelError, RecipeError, RunFolderError
from distill.models.adapters import HFClassifierAdapter, HFEmbeddingAdapter, TorchClassifierAdapter
from distill.models.causal_lm import HFCausalLMAdapter
from distill.pairing import build_loss_terms, fit_teacher_maps, prepare_pair, teacher_map_outputs, teacher_rows
from distill.runner import RunResult, evaluate_run, report_run
from distill.tasks import Batch
from distill.tasks.base import evaluating

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

    def check_labels(self, batch: Batch) -> None:
        """Labels the task loss can use, on a sample batch: named before the loop starts."""
        labels = batch["labels"]
        if labels is None:
            raise DataError("task_loss_weight is above 0 but the batches carry no labels (give (x, y) batches or a "
                            "'labels' key), or set task_loss_weight=0 for distillation alone")
        if self.output == "logits" and (labels.is_floating_point() or labels.dim() != 1):
            raise DataError(f"the labels are {labels.dtype} of shape {tuple(labels.shape)}; cross-entropy needs class "
                            "ids: integers of shape (N,)")

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        out = outputs[self.output]
        if self.output == "logits":
            labels = batch["labels"]
            if labels is None:
                raise DataError("a batch carries no labels, and task_loss_weight is above 0")
            bad = labels[(labels < 0) | (labels >= out.shape[-1])]
            if len(bad):
                raise DataError(f"label {int(bad[0])} is not a class of the student's {out.shape[-1]} outputs "
                                f"(0 .. {out.shape[-1] - 1})")
        labels = batch["labels"].to(out.device)
        if self.output == "logits":
            return F.cross_entropy(out.float(), labels)
        return F.mse_loss(out.float(), labels.float())

    @torch.inference_mode()
    def evaluate(self, model: ModuleAdapter, split: str) -> float | None:
        if self.eval_loader is None or self.output != "logits":
            return None
        correct = total = 0
        with evaluating(model):
            for item in self.eval_loader:
                batch = _to_batch(item)
                pred = model(batch["inputs"])["logits"].argmax(-1).cpu()
                correct += int((pred == batch["labels"]).sum())
                total += len(pred)
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
        for role, module in (("teacher", teacher), ("student", student)):
            if not isinstance(module, nn.Module):
                raise ModelError(f"the {role} is a {type(module).__name__}, not a torch.nn.Module")
        self.teacher = ModuleAdapter(teacher.eval().requires_grad_(False), output)
        self.student = ModuleAdapter(student, output)
        if isinstance(losses, str):
            losses = [losses]
        specs = [parse_section(LossSpec, {"name": s} if isinstance(s, str) else s, ("losses", i))
                 for i, s in enumerate(losses)]
        build_loss_terms(specs, output)  # parameter errors now, not at fit()
        if not specs and not task_loss_weight > 0:
            raise RecipeError("losses is empty and task_loss_weight is 0: there is nothing to train on; give a "
                              "distillation loss or a task_loss_weight above 0")
        self.specs = specs
        self.task_loss_weight = task_loss_weight
        self.spec = parse_section(TrainSpec, train or {}, ("train",))
        self.output = output
        if folder is None:
            Path("runs").mkdir(exist_ok=True)
            folder = tempfile.mkdtemp(prefix=time.strftime("distiller-%Y%m%d-%H%M%S-"), dir="runs")
        self.folder = Path(folder)
        self.resume = resume
        self.seed = seed
        self.result: dict[str, Any] | None = None
        """What the last :meth:`fit` returned (``None`` before one)."""

    def fit(self, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None = None) -> dict[str, Any]:
        """Train; returns ``{"steps", "eval"}``. The trained student is ``self.student.module``."""
        held = self.train_folder / "checkpoints"
        if not self.resume and held.is_dir() and any(held.glob("step-*")):
            raise RunFolderError(f"{self.folder} holds checkpoints of an earlier fit; pass resume=True to continue "
                                 "it, or give another folder")
        accelerator = make_accelerator(self.spec)
        self.teacher.module.to(accelerator.device)
        task = _LoaderTask(self.output, eval_loader)
        first = next(iter(train_loader), None)
        if first is None:
            raise DataError("the training loader yields no batches")
        sample = _to_batch(first)
        if self.task_loss_weight:
            task.check_labels(sample)
        dataset = getattr(train_loader, "dataset", None)
        size = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        pair = prepare_pair(self.specs, self.output, self.student, self.teacher, sample, _NoCheck(), size)
        keys = teacher_map_outputs(pair.terms, pair.projectors)
        if keys:  # projector: pca / whiten, fitted on the teacher's outputs on the first batches
            rows = teacher_rows(pair.teacher, (_to_batch(item)["inputs"] for item in train_loader), keys.values())
            fit_teacher_maps(pair.projectors, {ij: rows[k] for ij, k in keys.items()})
        try:
            self.result = train(
                student=pair.student, task=task, batches=_LoaderBatches(train_loader), terms=pair.terms,
                projectors=pair.projectors, teacher=pair.teacher, cache=None, task_weight=self.task_loss_weight,
                spec=self.spec, seed=self.seed, folder=self.train_folder, accelerator=accelerator, desc="distil",
            )
        finally:
            pair.release()
        return self.result

    @property
    def train_folder(self) -> Path:
        """Where a fit keeps its checkpoints and ``metrics.jsonl``: ``folder/train/student``, as
        in a recipe's run folder."""
        return self.folder / "train" / "student"

    def save_run(self, task: str, data: dict[str, Any], *, tokenizer: Any = None,
                 teacher: dict[str, Any] | None = None, student: dict[str, Any] | None = None,
                 evaluate: bool = True) -> RunResult:
        """Make :attr:`folder` a run folder, as a recipe's run leaves it, so that ``distill eval``,
        ``report``, ``export`` and ``push`` take it; by default evaluate it and write its report.

        The loaders of :meth:`fit` cannot be written down, so ``task`` and ``data`` (a recipe's
        ``task`` and ``data`` section) say what the models are scored on. The student is saved
        in ``folder/student``; a teacher with no folder on disk is saved in ``folder/teacher``.

        Args:
            task: The recipe task: ``classification``, ``regression``, ``sts``, ``embedding`` or ``lm``.
            data: The recipe's ``data`` section, for example ``{"format": "labelled-text",
                "path": "data/trec", "encoding": "latin-1"}``.
            tokenizer: The tokenizer of ``transformers`` models (both models share it).
            teacher: Recipe ``teacher`` fields to set or override (``max_length``, ``pooling``;
                ``kind``, ``arch``, ``arch_args`` and ``source`` for a plain PyTorch teacher).
            student: The same for the student (``kind``, ``arch`` and ``arch_args`` for a plain
                PyTorch student).
            evaluate: Measure the models and write the report now (``distill eval`` / ``report``
                do it later otherwise).

        Raises:
            RunFolderError: No finished fit, or the folder already holds a recipe's run.
            RecipeError: A model whose kind cannot be told, or a bad ``task``/``data``.
        """
        if self.result is None:
            raise RunFolderError("save_run() comes after fit(): there is no trained student yet")
        folder = self.folder
        if (folder / "recipe.yaml").is_file():
            raise RunFolderError(f"{folder} already holds a run (recipe.yaml); fit into another folder")
        teacher_spec = _model_spec(self.teacher.module, "teacher", teacher or {}, self.output)
        student_spec = {**_model_spec(self.student.module, "student", student or {}, self.output),
                        "source": str((folder / "student").resolve())}
        copy_teacher = "source" not in teacher_spec
        if copy_teacher:
            teacher_spec["source"] = str((folder / "teacher").resolve())
        recipe = parse_recipe({
            "name": folder.name, "task": task, "data": data, "teacher": teacher_spec, "student": student_spec,
            "losses": [s.model_dump(exclude_defaults=True) for s in self.specs],
            "task_loss_weight": self.task_loss_weight, "seed": self.seed, "baseline": False,
            "train": self.spec.model_dump(exclude_defaults=True), "output_dir": str(folder.resolve()),
        })
        if copy_teacher:  # after the recipe is known to be valid: nothing is written for a bad one
            save_model_atomic(_adapter(self.teacher.module, teacher_spec, tokenizer), folder / "teacher")
        save_model_atomic(_adapter(self.student.module, student_spec, tokenizer), folder / "student")
        info = {"role": "student", "recipe": recipe.name, **self.result}
        (folder / "student" / "distill.json").write_text(json.dumps(info) + "\n")
        (folder / "run.json").write_text(json.dumps({"name": recipe.name, "identity": recipe.identity()}) + "\n")
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        if not evaluate:
            return RunResult(folder, folder / "report.md", {})
        models = evaluate_run(folder, recipe)
        return RunResult(folder, report_run(folder), models)


def _model_spec(module: nn.Module, role: str, given: dict[str, Any], output: str) -> dict[str, Any]:
    """A recipe's ``teacher``/``student`` section for ``module``: its kind told from its
    ``transformers`` class, the teacher's source its folder on disk when it has one."""
    spec = dict(given)
    name = type(module).__name__
    config = getattr(module, "config", None)
    if "kind" not in spec:
        if name.endswith("ForSequenceClassification"):
            spec["kind"] = "hf-classifier"
        elif name.endswith("ForCausalLM"):
            spec["kind"] = "hf-causal-lm"
        elif config is not None and output == "embedding":
            spec["kind"] = "hf-embedding"
        else:
            raise RecipeError(f"save_run: the {role} ({name}) is neither a transformers sequence classifier, "
                              f"causal LM nor encoder; pass {role}={{'kind': 'torch', 'arch': NAME, "
                              "'arch_args': {...}}} (an architecture of 'distill models')")
    origin = getattr(config, "_name_or_path", "") if config is not None else ""
    if role == "teacher" and "source" not in spec and origin and _holds_weights_of(Path(origin), module):
        spec["source"] = str(Path(origin).resolve())
    return spec


def _holds_weights_of(folder: Path, module: nn.Module) -> bool:
    """Whether ``folder``'s safetensors hold every tensor of ``module``, equal: a model whose head
    was added, or whose weights changed, after it was loaded from there is not what it holds."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return False
    from safetensors import safe_open

    state = module.state_dict()
    found: set[int] = set()  # storages checked (tied weights are saved once)
    for file in files:
        with safe_open(str(file), framework="pt") as saved:
            for name in saved.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if name in state:
                    if not torch.equal(saved.get_tensor(name), state[name].detach().cpu()):
                        return False
                    found.add(state[name].data_ptr())
    return all(tensor.data_ptr() in found for tensor in state.values())


def _adapter(module: nn.Module, spec: dict[str, Any], tokenizer: Any) -> Any:
    """``module`` in the adapter that saves it as a recipe's run does."""
    kind = spec["kind"]
    if kind == "torch":
        if "arch" not in spec:
            raise RecipeError("save_run: a plain PyTorch model needs its 'arch' (and 'arch_args') to be reloaded")
        return TorchClassifierAdapter(module, spec["arch"], spec.get("arch_args", {}))
    if tokenizer is None:
        raise RecipeError(f"save_run: {kind} models are saved with their tokenizer; pass tokenizer=")
    max_length = spec.get("max_length", 128)
    if kind == "hf-causal-lm":
        return HFCausalLMAdapter(module, tokenizer, max_length)
    if kind == "hf-embedding":
        return HFEmbeddingAdapter(module, tokenizer, spec.get("pooling", "mean"), spec.get("normalize", True),
                                  max_length)
    return HFClassifierAdapter(module, tokenizer, max_length)


class _NoCheck:
    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        return None

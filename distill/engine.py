"""The training loop, on Hugging Face Accelerate: one code path for CPU, GPU and many processes.

One step: the student runs on a batch, the teacher's outputs come from the cache (or from the
teacher, online), each loss term compares a pair of named outputs, and the weighted parts are
summed. The step returns every part, and every part is logged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.cache import TeacherCache
from distill.config import TrainSpec
from distill.errors import RecipeError
from distill.models.adapters import Adapter
from distill.tasks import Batch

__all__ = [
    "LossTerm",
    "MetricsLog",
    "ShuffledBatches",
    "TrainState",
    "distill_step",
    "loss_extras",
    "projector_key",
    "make_accelerator",
    "total_steps",
    "train",
]

Teacher = Callable[[dict[str, Any]], dict[str, Tensor]]


@dataclass
class LossTerm:
    """One weighted loss between student outputs and teacher outputs.

    ``pairs`` lists the (student output, teacher output) names it compares; with several
    pairs (one per mapped layer) the term is their mean. ``start_step`` and ``ramp_steps``
    schedule the weight.
    """

    name: str
    weight: float
    on: str
    loss: nn.Module
    pairs: list[tuple[str, str]] = field(default_factory=list)
    start_step: int = 0
    ramp_steps: int = 0
    layers: Any = None
    projector: str | None = None
    """``always`` / ``never`` from the recipe; ``None`` leaves it to the loss's own ``projector``."""

    def __post_init__(self) -> None:
        if not self.pairs and self.layers is None:
            self.pairs = [(self.on, self.on)]

    def factor(self, step: int) -> float:
        """Share of ``weight`` that applies at optimizer step ``step`` (0-based)."""
        if step < self.start_step:
            return 0.0
        if self.ramp_steps:
            return min(1.0, (step - self.start_step + 1) / self.ramp_steps)
        return 1.0

    @property
    def label(self) -> str:
        """Name of this term's part in the logs."""
        return f"{self.name}_loss"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, epoch, and batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class MetricsLog:
    """Append-only JSON lines; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (what the resumed run will not repeat)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def make_accelerator(spec: TrainSpec) -> Accelerator:
    """An Accelerator for the recipe's device, precision and gradient accumulation."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cpu = spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available())
    return Accelerator(
        cpu=cpu,
        mixed_precision=spec.mixed_precision if not cpu else "no",
        gradient_accumulation_steps=spec.grad_accum,
        step_scheduler_with_optimizer=False,
    )


def projector_key(term_index: int, pair_index: int) -> str:
    """Key of the projector of one (term, layer pair) in the projector ``ModuleDict``."""
    return f"{term_index}_{pair_index}"


def loss_extras(loss: nn.Module, student_out: dict[str, Tensor], index: Tensor | None,
                teacher_out: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Keyword arguments a loss declares it wants: the token mask, the batch's example indices,
    the output heads."""
    extra: dict[str, Any] = {}
    if getattr(loss, "uses_head", False):
        if "head" not in student_out or not teacher_out or "head" not in teacher_out:
            raise ValueError(f"loss '{type(loss).__name__}' needs both models' output heads: "
                             "use it with causal language models (kind: hf-causal-lm)")
        extra["student_head"] = student_out["head"]
        extra["teacher_head"] = teacher_out["head"].to(student_out["head"].device)
        for role, out in (("student", student_out), ("teacher", teacher_out)):
            if "head_bias" in out:
                extra[f"{role}_head_bias"] = out["head_bias"]
    if getattr(loss, "uses_mask", False) and "token_mask" in student_out:
        extra["mask"] = student_out["token_mask"]
    if getattr(loss, "uses_index", False):
        extra["index"] = index
    return extra


def distill_step(
    student: Adapter,
    batch: Batch,
    teacher_out: dict[str, Tensor] | None,
    terms: list[LossTerm],
    projectors: nn.Module,
    task_loss: Callable[[dict[str, Tensor], Batch], Tensor] | None,
    task_weight: float,
    labels_for_losses: bool,
    step: int = 0,
) -> dict[str, Tensor]:
    """Compute every loss part of one batch at optimizer step ``step``; ``loss`` is their weighted sum."""
    out = student(batch["inputs"])
    parts: dict[str, Tensor] = {}
    labels = batch.get("labels") if labels_for_losses else None
    for i, term in enumerate(terms):
        assert teacher_out is not None
        factor = term.factor(step)
        values = []
        for j, (s_key, t_key) in enumerate(term.pairs):
            s = out[s_key]
            key = projector_key(i, j)
            if key in projectors:
                s = projectors[key](s)
            t = teacher_out[t_key].to(s.device, s.dtype)
            extra = loss_extras(term.loss, out, batch.get("index"), teacher_out)
            values.append(term.loss(s, t, None if labels is None else labels.to(s.device), **extra))
        value = torch.stack(values).mean() if len(values) > 1 else values[0]
        label = term.label if term.label not in parts else f"{term.name}{i}_loss"
        parts[label] = term.weight * factor * value
    if task_loss is not None and task_weight > 0:
        parts["task_loss"] = task_weight * task_loss(out, batch)
    parts["loss"] = sum(parts.values())  # type: ignore[assignment]
    return parts


class ShuffledBatches:
    """Batches of a dataset in a seeded order per epoch; each process takes every ``world``-th example.

    With ``lengths``, examples are grouped by length inside windows of 50 batches and the
    batches are then shuffled: far less padding for text, the same randomness between windows.

    Args:
        dataset: Has ``len()`` and ``batch(indices) -> Batch``.
        batch_size: Examples per batch and process.
        seed: With the epoch number, fixes the order (so a resumed run sees the same batches).
        rank: This process's index.
        world: Number of processes.
        lengths: Optional size of each example, for grouping by length.
    """

    WINDOW = 50

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None) -> None:
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.lengths = torch.as_tensor(list(lengths)) if lengths is not None else None

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.dataset) / self.world) / self.batch_size)

    def _order(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=gen)[self.rank :: self.world]
        if self.lengths is None:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        window = self.WINDOW * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in shuffle]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch``, without the first ``skip``."""
        for indices in self._order(epoch)[skip:]:
            yield self.dataset.batch(indices)


def total_steps(batches_per_epoch: int, spec: TrainSpec) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` passes of ``batches_per_epoch``."""
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * batches_per_epoch / spec.grad_accum))


def _lr_lambda(spec: TrainSpec, steps: int) -> Callable[[int], float]:
    warmup = int(spec.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(accelerator: Accelerator, folder: Path, state: TrainState, keep: int) -> None:
    """Write a checkpoint to a temporary folder and rename it: a kill never leaves half of one."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    final = folder / f"step-{state.step:08d}"
    tmp = folder / f".tmp-step-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp), safe_serialization=True)
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, folder: Path, metrics: MetricsLog) -> TrainState:
    for stale in folder.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = _checkpoints(folder)
    if not found:
        return TrainState()
    latest = found[-1]
    accelerator.load_state(str(latest))
    state = TrainState(**json.loads((latest / "trainer_state.json").read_text()))
    metrics.truncate_after(state.step)
    accelerator.print(f"resuming from {latest} (step {state.step})")
    return state


def _kill_point() -> int | None:
    """Test hook: ``DISTILL_KILL_AT_STEP=N`` sends this process SIGKILL after step N."""
    value = os.environ.get("DISTILL_KILL_AT_STEP")
    return int(value) if value else None


def train(
    *,
    student: Adapter,
    task: Any,
    batches: Any,
    terms: list[LossTerm],
    projectors: nn.ModuleDict,
    teacher: Teacher | None,
    cache: TeacherCache | None,
    task_weight: float,
    spec: TrainSpec,
    seed: int,
    folder: Path,
    accelerator: Accelerator,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``student`` in ``folder`` (checkpoints, metrics.jsonl), resuming if it holds a checkpoint.

    Args:
        student: The model to train.
        task: Supplies ``task_loss``, ``evaluate`` and ``metric``/``output``.
        batches: Has ``len()`` (batches per epoch) and ``epoch(epoch, skip) -> Iterator[Batch]``.
        terms: Distillation loss terms (empty for a run without teacher).
        projectors: Trained with the student where widths differ; never saved with it.
        teacher: Called for teacher outputs when there is no cache.
        cache: Teacher outputs by example index.
        task_weight: Weight of the task loss.
        spec: Loop settings.
        seed: Seed of initialisation-independent randomness (dropout, data order).
        folder: Where checkpoints and metrics go.
        accelerator: The Accelerate engine.
        desc: Progress-bar label.

    Returns:
        ``{"steps", "eval": [...]}`` with the validation metric after each evaluation.
    """
    folder.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    steps = total_steps(len(batches), spec)
    _freeze(student.module, spec.freeze)
    params = [p for p in student.module.parameters() if p.requires_grad] + list(projectors.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec, steps))
    student.module, projectors, optimizer = accelerator.prepare(student.module, projectors, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    metrics = MetricsLog(folder / "metrics.jsonl", accelerator.is_main_process)
    ckpt_dir = folder / "checkpoints"
    state = _resume(accelerator, ckpt_dir, metrics)
    kill_at = _kill_point()
    labels_for_losses = task.output == "logits"
    student.module.train()
    bar = tqdm(total=steps, initial=state.step, desc=desc, unit="step", disable=not accelerator.is_local_main_process)
    running: dict[str, float] = {}
    while state.step < steps:
        for batch in batches.epoch(state.epoch, state.batch):
            with accelerator.accumulate(student.module, projectors):
                teacher_out = _teacher_outputs(batch, teacher, cache, bool(terms))
                with accelerator.autocast():
                    parts = distill_step(student, batch, teacher_out, terms, projectors, task.task_loss,
                                         task_weight, labels_for_losses, state.step)
                accelerator.backward(parts["loss"])
                if accelerator.sync_gradients and spec.max_grad_norm:
                    accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batch += 1
            for key, value in parts.items():
                running[key] = running.get(key, 0.0) + float(value.detach()) / spec.grad_accum
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            record = {"step": state.step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0], **running}
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{running['loss']:.4f}")
            running = {}
            if state.step % spec.eval_every == 0 or state.step == steps:
                score = task.evaluate(student, "eval")
                metrics.write({"step": state.step, "split": "eval", task.metric: score})
                bar.write(f"{desc} step {state.step}: eval {task.metric} {score:.2f}")
            if state.step % spec.checkpoint_every == 0 or state.step == steps:
                _save_checkpoint(accelerator, ckpt_dir, state, spec.keep_checkpoints)
            if kill_at is not None and state.step == kill_at:
                os.kill(os.getpid(), 9)
            if state.step >= steps:
                break
        else:
            state.epoch += 1
            state.batch = 0
    bar.close()
    student.module = accelerator.unwrap_model(student.module)
    evals = [r for r in metrics.read() if r.get("split") == "eval"]
    return {"steps": steps, "eval": evals}


def _freeze(module: nn.Module, prefixes: list[str]) -> None:
    params = dict(module.named_parameters())
    for prefix in prefixes:
        hits = [param for name, param in params.items() if name.startswith(prefix)]
        if not hits:
            raise RecipeError(f"train.freeze: no student parameter starts with '{prefix}' (e.g. {list(params)[:3]})")
        for param in hits:
            param.requires_grad_(False)


def _teacher_outputs(batch: Batch, teacher: Teacher | None, cache: TeacherCache | None, needed: bool
                     ) -> dict[str, Tensor] | None:
    if not needed:
        return None
    if cache is not None:
        return cache.lookup(batch["index"])
    assert teacher is not None
    # no_grad, not inference_mode: the outputs are targets in an autograd graph.
    with torch.no_grad():
        return dict(teacher(batch["inputs"]))

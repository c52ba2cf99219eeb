"""The training loop, on Hugging Face Accelerate: one code path for CPU, GPU and many processes.

One step: the student runs on a batch, the teacher's outputs come from the cache (or from the
teacher, online), each loss term compares a pair of named outputs, and the weighted parts are
summed. The step returns every part, and every part is logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object, set_seed
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from distill.cache import TeacherCache
from distill.config import OnPolicySpec, TrainSpec
from distill.errors import RecipeError, RunFolderError
from distill.logit_cache import TokenLogitCache
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
    "on_policy_turn",
    "per_process_batch",
    "total_steps",
    "use_cpu",
    "train",
]

Teacher = Callable[[dict[str, Any]], dict[str, Tensor]]
log = logging.getLogger(__name__)


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


def use_cpu(spec: TrainSpec) -> bool:
    """Whether ``train.device`` puts the run on the CPU; a device the recipe names must exist."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: 'cuda', but PyTorch sees no CUDA device here (use 'auto' or 'cpu')")
    if spec.device == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("train.device: 'mps', but PyTorch sees no Apple GPU here (use 'auto' or 'cpu')")
    return spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available())


#: Launch modes whose model wrapping the loop's checkpoints and step module do not support.
_UNSUPPORTED = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM}


def make_accelerator(spec: TrainSpec) -> Accelerator:
    """An Accelerator for the recipe's device, precision and gradient accumulation.

    Started by ``torchrun`` or ``accelerate launch``, it joins the other processes (``gloo`` on
    CPU, ``nccl`` on GPU) and the student is trained with DistributedDataParallel.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cpu = use_cpu(spec)
    if cpu and spec.mixed_precision != "no":
        log.info("train.mixed_precision: %s applies on a GPU; this run is on the CPU, in float32",
                 spec.mixed_precision)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=spec.mixed_precision if not cpu else "no",
        gradient_accumulation_steps=spec.grad_accum,
        step_scheduler_with_optimizer=False,
        # A student may hold parameters its outputs never use (a pooler under mean pooling).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.distributed_type in _UNSUPPORTED:
        raise RecipeError(f"this launch asks for {accelerator.distributed_type.value}; distill trains the student "
                          "with DistributedDataParallel: launch with torchrun, or accelerate launch without "
                          "FSDP or DeepSpeed (a teacher too large for one device: train.shard_teacher: true)")
    return accelerator


def per_process_batch(batch_size: int, processes: int) -> int:
    """Examples each process takes of a global batch of ``batch_size``.

    Raises:
        RecipeError: The global batch does not split evenly among the processes.
    """
    if batch_size % processes:
        low = batch_size - batch_size % processes
        near = sorted({max(processes, low), low + processes})
        raise RecipeError(f"train.batch_size: {batch_size} is the global batch, summed over the processes, and does "
                          f"not split evenly among {processes} processes; use a multiple of {processes} "
                          f"({' or '.join(map(str, near))})")
    return batch_size // processes


def projector_key(term_index: int, pair_index: int) -> str:
    """Key of the projector of one (term, layer pair) in the projector ``ModuleDict``."""
    return f"{term_index}_{pair_index}"


def loss_extras(loss: nn.Module, student_out: dict[str, Tensor], index: Tensor | None,
                teacher_out: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Keyword arguments a loss declares it wants: the token mask, the batch's example indices,
    the output heads."""
    extra: dict[str, Any] = {}
    if getattr(loss, "uses_head", False) and teacher_out and "topk_logp" in teacher_out:
        # A logit cache stands in for the teacher: its log-probabilities replace head and states.
        extra["student_head"] = student_out["head"]
        if "head_bias" in student_out:
            extra["student_head_bias"] = student_out["head_bias"]
        if "topk_ids" in teacher_out:
            extra["teacher_ids"] = teacher_out["topk_ids"].to(student_out["head"].device)
    elif getattr(loss, "uses_head", False):
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
            t = teacher_out["topk_logp" if "topk_logp" in teacher_out else t_key].to(s.device, s.dtype)
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
    """Global batches of a dataset in a seeded order per epoch; each process takes its share of each.

    The order and the global batches do not depend on the number of processes: process ``rank``
    of ``world`` takes the ``rank``-th of ``world`` near-equal consecutive slices of every global
    batch, so the processes together see exactly the batches one process would. Each batch holds
    ``share``, this slice's size over the mean slice size: weighting the slice's mean loss by it
    makes the average over processes the global batch's mean, even for a short last batch. (A
    process left with no example there runs one example at weight 0, to stay in step.)

    With ``lengths``, examples are grouped by length inside windows of 50 batches and the
    batches are then shuffled: far less padding for text, the same randomness between windows.

    Args:
        dataset: Has ``len()`` and ``batch(indices) -> Batch``.
        batch_size: Examples per global batch, summed over the processes.
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
        return math.ceil(len(self.dataset) / self.batch_size)

    def _order(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=gen)
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

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This process's slice of a global batch and its loss weight."""
        size, extra = divmod(len(indices), self.world)
        start = self.rank * size + min(self.rank, extra)
        mine = indices[start : start + size + (self.rank < extra)]
        if not mine:
            return indices[:1], 0.0
        return mine, len(mine) * self.world / len(indices)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """This process's part of the global batches of ``epoch``, without the first ``skip``."""
        for indices in self._order(epoch)[skip:]:
            mine, weight = self.share(indices)
            batch = self.dataset.batch(mine)
            batch["share"] = weight
            yield batch


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


def on_policy_turn(seed: int, epoch: int, batch: int, fraction: float) -> bool:
    """Whether batch ``batch`` of ``epoch`` is replaced by the student's own continuations.

    Drawn from the seed and the batch's place alone, so every process agrees and a resumed run
    makes the same choices as an uninterrupted one.
    """
    if fraction <= 0 or fraction >= 1:
        return fraction >= 1
    return random.Random(f"on-policy/{seed}/{epoch}/{batch}").random() < fraction


def _student_written(student: Adapter, batch: Batch, spec: OnPolicySpec) -> Batch:
    """The batch with its prompts continued by the student (an on-policy batch)."""
    write = getattr(student, "continue_prompts", None)
    if write is None:
        raise RecipeError(f"on_policy: the student ({type(student).__name__}) cannot write continuations; "
                          "on-policy batches need a causal language model (kind: hf-causal-lm)")
    inputs = write(batch["inputs"], max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                   top_p=spec.top_p, prompt_tokens=spec.prompt_tokens)
    return {**batch, "inputs": inputs, "on_policy": True}


class _Step(nn.Module):
    """A distillation step as one module: the student and everything trained with it
    (projectors, learned loss heads), whose ``forward`` returns the step's loss parts.

    With several processes this module is what DistributedDataParallel wraps: one forward per
    step through the wrapper, so the gradients of every trained parameter, not only the
    student's, are averaged across processes. The teacher is not part of it.
    """

    def __init__(self, student: Adapter, projectors: nn.ModuleDict, terms: list[LossTerm],
                 task_loss: Callable[[dict[str, Tensor], Batch], Tensor] | None, task_weight: float,
                 labels_for_losses: bool) -> None:
        super().__init__()
        self.student = student.module
        self.projectors = projectors
        self._adapter, self._terms = student, terms
        self._task_loss, self._task_weight, self._labels = task_loss, task_weight, labels_for_losses

    def forward(self, batch: Batch, teacher_out: dict[str, Tensor] | None, step: int) -> dict[str, Tensor]:
        # The task loss on text the student wrote itself would teach it its own samples: an
        # on-policy batch is scored by the teacher alone (as in GKD).
        task_weight = 0.0 if batch.get("on_policy") else self._task_weight
        return distill_step(self._adapter, batch, teacher_out, self._terms, self.projectors, self._task_loss,
                            task_weight, self._labels, step)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_checkpoint(accelerator: Accelerator, folder: Path, state: TrainState, keep: int, step: _Step,
                     optimizer: Any, scheduler: Any) -> None:
    """Write a checkpoint to a temporary folder and rename it: a kill never leaves half of one.

    The main process writes it alone, in a form that does not depend on the number of
    processes: the unwrapped student and projectors (``safetensors``), the optimizer and
    scheduler states (the same on every process), and each process's random state, so that
    a run resumes with as many processes as it had, or with another number.
    """
    rng = gather_object([_rng_state()])  # every process's, in rank order
    if accelerator.is_main_process:
        final = folder / f"step-{state.step:08d}"
        tmp = folder / f".tmp-step-{state.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(step.student, str(tmp / "student.safetensors"))
        save_model(step.projectors, str(tmp / "projectors.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler, "rng": rng}, tmp / "state.pt")
        info = {**asdict(state), "processes": accelerator.num_processes}
        (tmp / "trainer_state.json").write_text(json.dumps(info) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, folder: Path, metrics: MetricsLog, step: _Step, optimizer: Any,
            scheduler: Any) -> TrainState:
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    found = _checkpoints(folder)
    if not found:
        return TrainState()
    latest = found[-1]
    if not (latest / "student.safetensors").is_file():
        raise RunFolderError(f"{latest} is a checkpoint in an older format that this version cannot resume; "
                             f"delete {folder.parent} to train this phase again")
    load_model(step.student, str(latest / "student.safetensors"))
    load_model(step.projectors, str(latest / "projectors.safetensors"))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location="cpu"))
    saved = torch.load(latest / "state.pt", map_location="cpu")
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if accelerator.process_index < len(saved["rng"]):
        _set_rng_state(saved["rng"][accelerator.process_index])
    info = json.loads((latest / "trainer_state.json").read_text())
    state = TrainState(step=info["step"], epoch=info["epoch"], batch=info["batch"])
    metrics.truncate_after(state.step)
    before = info.get("processes", 1)
    accelerator.print(f"resuming from {latest} (step {state.step}"
                      + (f"; written by {before} processes, now {accelerator.num_processes})"
                         if before != accelerator.num_processes else ")"))
    return state


def _mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    keys = list(values)  # the same parts in the same order on every process
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, "mean").tolist(), strict=True))


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
    cache: TeacherCache | TokenLogitCache | None,
    task_weight: float,
    spec: TrainSpec,
    seed: int,
    folder: Path,
    accelerator: Accelerator,
    desc: str = "train",
    on_policy: OnPolicySpec | None = None,
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
        on_policy: Replace this share of the batches by the student's own continuations of their
            prompts, scored by the teacher online (``cache`` must then be ``None``).

    With several processes each takes its share of every global batch; the student and the
    projectors are wrapped together for DistributedDataParallel (the teacher never is), the
    logged loss parts are averaged over the processes, and the main process alone evaluates,
    writes ``metrics.jsonl`` and checkpoints.

    Returns:
        ``{"steps", "eval": [...], "steps_run", "seconds", "first_step_seconds"}``: the validation
        metric after each evaluation; the steps this call ran, their wall time (evaluations and
        checkpoints left out) and that of the first of them (which includes any warm-up). With
        ``on_policy``, also ``on_policy_batches``: how many of this call's batches the student wrote.
    """
    if on_policy is not None and cache is not None:
        raise RecipeError("on_policy: the teacher must score text the student writes during training, so it runs "
                          "online; set cache.top_k: null")
    main = accelerator.is_main_process
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(seed, device_specific=True)  # dropout differs between processes; process 0 draws as a single one would
    steps = total_steps(len(batches), spec)
    _freeze(student.module, spec.freeze)
    if spec.compile:
        student.module.compile()  # in place: same module, same state-dict names
    params = [p for p in student.module.parameters() if p.requires_grad] + list(projectors.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec, steps))
    step_module = _Step(student, projectors, terms, task.task_loss, task_weight, task.output == "logits")
    model, optimizer = accelerator.prepare(step_module, optimizer)
    metrics = MetricsLog(folder / "metrics.jsonl", main)
    ckpt_dir = folder / "checkpoints"
    state = _resume(accelerator, ckpt_dir, metrics, step_module, optimizer, scheduler)
    kill_at = _kill_point()
    model.train()
    bar = tqdm(total=steps, initial=state.step, desc=desc, unit="step", disable=not main)
    running: dict[str, float] = {}
    started, first_step = time.perf_counter(), state.step
    first_seconds, aside = 0.0, 0.0  # the first step's time; time spent evaluating and checkpointing
    written, written_in_step = 0, 0
    while state.step < steps:
        for batch in batches.epoch(state.epoch, state.batch):
            share = float(batch.get("share", 1.0))
            if (on_policy is not None and state.step >= on_policy.start * steps
                    and on_policy_turn(seed, state.epoch, state.batch, on_policy.fraction)):
                batch = _student_written(student, batch, on_policy)
                written_in_step += 1
            with accelerator.accumulate(model):
                teacher_out = _teacher_outputs(batch, teacher, cache, bool(terms))
                with accelerator.autocast():
                    parts = model(batch, teacher_out, state.step)
                accelerator.backward(parts["loss"] * share if share != 1.0 else parts["loss"])
                if accelerator.sync_gradients and spec.max_grad_norm:
                    accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batch += 1
            for key, value in parts.items():
                running[key] = running.get(key, 0.0) + float(value.detach()) * share / spec.grad_accum
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            if state.step == first_step + 1:
                first_seconds = time.perf_counter() - started
            if accelerator.num_processes > 1:
                running = _mean_over_processes(accelerator, running)
            record = {"step": state.step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0], **running}
            if on_policy is not None:
                record["on_policy"] = written_in_step / spec.grad_accum
                written, written_in_step = written + written_in_step, 0
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{running['loss']:.4f}")
            running = {}
            paused = time.perf_counter()
            if main and (state.step % spec.eval_every == 0 or state.step == steps):
                # The others go on to the next step and wait for this process there.
                score = task.evaluate(student, "eval")
                metrics.write({"step": state.step, "split": "eval", task.metric: score})
                bar.write(f"{desc} step {state.step}: eval {task.metric} {score:.2f}")
            if state.step % spec.checkpoint_every == 0 or state.step == steps:
                _save_checkpoint(accelerator, ckpt_dir, state, spec.keep_checkpoints, step_module, optimizer,
                                 scheduler)
            aside += time.perf_counter() - paused
            if kill_at is not None and state.step == kill_at:
                os.kill(os.getpid(), 9)
            if state.step >= steps:
                break
        else:
            state.epoch += 1
            state.batch = 0
    bar.close()
    seconds = time.perf_counter() - started - aside
    evals = [r for r in metrics.read() if r.get("split") == "eval"]
    result = {"steps": steps, "eval": evals, "steps_run": state.step - first_step, "seconds": round(seconds, 3),
              "first_step_seconds": round(first_seconds, 3)}
    if on_policy is not None:
        result["on_policy_batches"] = written
    return result


def _freeze(module: nn.Module, prefixes: list[str]) -> None:
    params = dict(module.named_parameters())
    for prefix in prefixes:
        hits = [param for name, param in params.items() if name.startswith(prefix)]
        if not hits:
            raise RecipeError(f"train.freeze: no student parameter starts with '{prefix}' (e.g. {list(params)[:3]})")
        for param in hits:
            param.requires_grad_(False)


def _teacher_outputs(batch: Batch, teacher: Teacher | None, cache: TeacherCache | TokenLogitCache | None,
                     needed: bool
                     ) -> dict[str, Tensor] | None:
    if not needed:
        return None
    if cache is not None:
        return cache.lookup(batch["index"])
    assert teacher is not None
    # no_grad, not inference_mode: the outputs are targets in an autograd graph.
    with torch.no_grad():
        out = dict(teacher(batch["inputs"]))
    # A sharded teacher's weights (its output head) come back as shards: gathered, in the same
    # order on every process.
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in out.items()}

"""The training loop, on Hugging Face Accelerate: one code path for CPU, GPU and many processes.

One step: the student runs on a batch, the teacher's outputs come from the cache (or from the
teacher, online), each loss term compares a pair of named outputs (:mod:`distill.step`), and the
weighted parts are summed. The step returns every part, and every part is logged. Checkpoints
and the metrics log are :mod:`distill.checkpoint`'s; the data order is :mod:`distill.batches`'.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import Tensor, nn

from distill.batches import lr_lambda, total_steps
from distill.checkpoint import BEST, BestStudent, MetricsLog, TrainState, resume, save_checkpoint
from distill.config import OnPolicySpec, TrainSpec
from distill.errors import RecipeError, TrainingError
from distill.launch import use_cpu
from distill.models.adapters import Adapter
from distill.models.weights import freeze, merge_start, start_weights
from distill.progress import progress
from distill.step import TOKENS, LossTerm, StepModule, Teacher, TeacherStore, teacher_outputs
from distill.tasks import Batch, Task
from distill.tasks.base import higher_is_better
from distill.tracking import Trackers

__all__ = ["make_accelerator", "on_policy_turn", "student_written", "train"]

log = logging.getLogger(__name__)


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


def on_policy_turn(seed: int, epoch: int, batch: int, fraction: float) -> bool:
    """Whether batch ``batch`` of ``epoch`` is replaced by the student's own continuations.

    Drawn from the seed and the batch's place alone, so every process agrees and a resumed run
    makes the same choices as an uninterrupted one.
    """
    if fraction <= 0 or fraction >= 1:
        return fraction >= 1
    return random.Random(f"on-policy/{seed}/{epoch}/{batch}").random() < fraction


def student_written(student: Adapter, batch: Batch, spec: OnPolicySpec) -> Batch:
    """The batch with its prompts continued by the student (an on-policy batch)."""
    write = getattr(student, "continue_prompts", None)
    if write is None:
        raise RecipeError(f"on_policy: the student ({type(student).__name__}) cannot write continuations; "
                          "on-policy batches need a causal language model (kind: hf-causal-lm)")
    inputs = write(batch["inputs"], max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                   top_p=spec.top_p, prompt_tokens=spec.prompt_tokens)
    return {**batch, "inputs": inputs, "on_policy": True}


def _mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    keys = list(values)  # the same parts in the same order on every process
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, "mean").tolist(), strict=True))


def _examples(batch: Batch) -> int:
    """Examples in this process's batch."""
    for value in (batch.get("index"), batch.get("labels")):
        if value is not None:
            return len(value)
    inputs = batch["inputs"]
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return len(first)


def _kill_point() -> int | None:
    """Test hook: ``DISTILL_KILL_AT_STEP=N`` sends this process SIGKILL after step N."""
    value = os.environ.get("DISTILL_KILL_AT_STEP")
    return int(value) if value else None


@dataclass
class _Loop:
    """One call of :func:`train`: the trained objects and the loop's counters."""

    accelerator: Accelerator
    spec: TrainSpec
    task: Task
    model: Any
    """The step module as Accelerate prepared it (the DDP wrapper with several processes)."""
    step_module: StepModule
    optimizer: Any
    scheduler: Any
    params: list[nn.Parameter]
    metrics: MetricsLog
    ckpt_dir: Path
    state: TrainState
    steps: int
    desc: str
    trackers: Trackers
    bar: Any = None
    start: dict[str, Tensor] | None = None
    """The student's weights before training (``train.merge_start``), resumed checkpoints aside."""
    running: dict[str, float] = field(default_factory=dict)
    units: float = 0.0
    """Examples (or tokens, for token-level losses) this process trained on since the last record."""
    unit: str = "examples"
    clock: float = field(default_factory=time.perf_counter)
    """When the last record was written (throughput is measured from there, evaluations left out)."""
    grad_norm: float | None = None
    nonfinite: bool = False
    """This optimizer step met a non-finite loss or gradient (``on_nonfinite: skip``); its record
    says so, and the flag is cleared when the record is written."""
    tokens: float | None = None
    """Tokens of the optimizer step so far, this process (``None`` when the loss is not token-level)."""
    combined: bool = False
    """The step's parts are already combined over the processes (token-level losses)."""
    written: int = 0
    written_in_step: int = 0
    aside: float = 0.0
    """Seconds spent evaluating and checkpointing (left out of the training time)."""
    best: BestStudent | None = None
    """The best student so far, with ``train.keep_best`` or ``train.patience``."""
    stopped: bool = False
    """``train.patience`` ran out."""

    def backward(self, batch: Batch, teacher_out: Any) -> None:
        """Forward, backward and (at the end of an accumulation) the optimizer step of one batch.

        Token-level losses (a causal LM's) count every token of the optimizer step alike: each
        batch's mean is weighed by its token count here, and the step's gradient is divided by
        the step's tokens over every batch and process (:meth:`per_token`), so a batch of 10
        completion tokens weighs a hundredth of one of 1,000, as in one large batch.
        """
        share = float(batch.get("share", 1.0))
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                parts = self.model(batch, teacher_out, self.state.step)
            self.check_finite(parts)
            count = parts.pop(TOKENS, None)
            if count is None:
                weight = share / self.spec.grad_accum
                self.units += _examples(batch)
                accelerator.backward(parts["loss"] * share if share != 1.0 else parts["loss"])
            else:
                weight = float(count)
                self.tokens = (self.tokens or 0.0) + weight
                self.units, self.unit = self.units + weight, "tokens"
                accelerator.backward(parts["loss"] * (weight * self.spec.grad_accum))  # a sum over the tokens
            for key, value in parts.items():
                self.running[key] = self.running.get(key, 0.0) + float(value.detach()) * weight
            if accelerator.sync_gradients:
                self.per_token()
                self.clip()
                self.skip_if_nonfinite()
            if not self.nonfinite:
                self.optimizer.step()
            self.optimizer.zero_grad()
        self.state.batch += 1

    def skip_if_nonfinite(self) -> None:
        """With ``on_nonfinite: skip``, agree across processes on skipping this step, count it and
        mark its record; stop once more than ``max_skipped`` steps were skipped."""
        if self.spec.on_nonfinite != "skip":
            return
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(self.nonfinite)], device=self.accelerator.device)
            self.nonfinite = bool(self.accelerator.reduce(flag, "max").item())
        if not self.nonfinite:
            return
        self.state.skipped += 1
        if self.state.skipped > self.spec.max_skipped:
            raise TrainingError(f"step {self.state.step + 1}: {self.state.skipped} steps skipped for a non-finite "
                                f"loss or gradient, more than train.max_skipped ({self.spec.max_skipped}); training "
                                "stopped (lower train.lr or the loss weights, or check the data). The last checkpoint "
                                "is kept")

    def clip(self) -> None:
        """Measure the gradient norm (logged) and clip to ``max_grad_norm``; stop on a non-finite norm."""
        # An infinite limit scales every gradient by exactly 1: the norm, with no clipping.
        norm = self.accelerator.clip_grad_norm_(self.params, self.spec.max_grad_norm or math.inf)
        self.grad_norm = None if norm is None else float(norm)
        if self.grad_norm is not None and not math.isfinite(self.grad_norm):
            if self.spec.on_nonfinite == "skip":
                self.nonfinite = True
                return
            raise TrainingError(f"step {self.state.step + 1}: the gradient norm is {self.grad_norm}; "
                                "training stopped before the optimizer step (lower train.lr or the "
                                "loss weights). The last checkpoint is kept; nothing was saved after it")

    def check_finite(self, parts: dict[str, Tensor]) -> None:
        """Stop, naming the step and the loss terms, when the loss is not finite (before its backward)."""
        if bool(torch.isfinite(parts["loss"].detach()).all()):
            return
        if self.spec.on_nonfinite == "skip":  # the backward still runs, so that processes stay in step
            self.nonfinite = True
            return
        bad = [f"{k} = {float(v.detach())}" for k, v in parts.items()
               if k not in ("loss", TOKENS) and not bool(torch.isfinite(v.detach()).all())]
        raise TrainingError(f"step {self.state.step + 1}: the loss is not finite ({', '.join(bad) or 'loss'}); "
                            "training stopped before the update (lower train.lr or the loss weights, or check the "
                            "data). The last checkpoint is kept; nothing was saved after it")

    def per_token(self) -> None:
        """For token-level losses, turn the step's summed gradients and loss parts into means over
        all of the step's tokens, in every process."""
        if self.tokens is None:
            return
        total = torch.tensor([self.tokens], dtype=torch.float64, device=self.accelerator.device)
        processes = self.accelerator.num_processes
        if processes > 1:
            total = self.accelerator.reduce(total, "sum")
        tokens = max(float(total), 1.0)
        for param in self.params:  # DistributedDataParallel averaged the processes' sums
            if param.grad is not None:
                param.grad.mul_(processes / tokens)
        if processes > 1:  # the step's parts: summed over processes here, so not averaged in log_step
            self.running = {k: v * processes for k, v in _mean_over_processes(self.accelerator, self.running).items()}
        self.running = {k: v / tokens for k, v in self.running.items()}
        self.tokens, self.combined = None, True
    def log_step(self, on_policy: bool) -> None:
        """Count the optimizer step and write its record (loss parts averaged over processes)."""
        self.scheduler.step()
        self.state.step += 1
        if self.accelerator.num_processes > 1 and not self.combined:
            self.running = _mean_over_processes(self.accelerator, self.running)
        self.combined = False
        record = {"step": self.state.step, "epoch": self.state.epoch, "lr": self.scheduler.get_last_lr()[0],
                  **self.running}
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        if self.nonfinite:
            record["skipped"], self.nonfinite = True, False
        if on_policy:
            record["on_policy"] = self.written_in_step / self.spec.grad_accum
            self.written, self.written_in_step = self.written + self.written_in_step, 0
        record.update(self.timing())
        self.metrics.write(record)
        self.trackers.log(record, "train")
        self.bar.set_postfix(loss=f"{self.running['loss']:.4f}", refresh=False)
        self.bar.update(1)
        self.running = {}

    def timing(self) -> dict[str, float]:
        """Wall-clock time and throughput since the last record: the two fields of a record that
        differ between two runs of the same recipe (:data:`~distill.checkpoint.TIMING`)."""
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        rate = self.units * self.accelerator.num_processes / max(seconds, 1e-9)
        self.units = 0.0
        return {"time": round(time.time(), 3), f"{self.unit}_per_s": round(rate, 1)}

    def out_of_patience(self) -> bool:
        """``train.patience``: whether the last ``patience`` evaluations all fell short of the best
        (asked after each evaluation and on resuming; every process gets the main one's answer)."""
        patience, step, accelerator = self.spec.patience, self.state.step, self.accelerator
        if self.stopped or patience is None or self.best is None or step == 0 or step % self.spec.eval_every \
                or step >= self.steps:
            return self.stopped
        behind = self.best.behind(self.metrics.read()) if accelerator.is_main_process else 0
        if accelerator.num_processes > 1:
            behind = int(accelerator.reduce(torch.tensor([behind], device=accelerator.device), "max").item())
        if behind >= patience:
            self.bar.write(f"{self.desc} step {step}: no better validation {self.task.metric} in {behind} "
                           "evaluations; training stops (train.patience)")
        self.stopped = behind >= patience
        return self.stopped

    def evaluate_and_save(self, student: Adapter) -> None:
        """Evaluate (main process) and checkpoint when the schedule says so."""
        paused = time.perf_counter()
        step, spec = self.state.step, self.spec
        if self.accelerator.is_main_process and (step % spec.eval_every == 0 or step == self.steps):
            # The others go on to the next step and wait for this process there.
            score = self.task.evaluate(student, "eval")
            if score is not None:  # None: nothing to evaluate on (an API run without an eval loader)
                record = {"step": step, "split": "eval", self.task.metric: score}
                self.metrics.write(record)
                self.trackers.log(record, "eval")
                self.bar.write(f"{self.desc} step {step}: eval {self.task.metric} {score:.2f}")
                if self.best is not None:
                    self.best.offer(step, score, student.module)
        if step % spec.checkpoint_every == 0 or step == self.steps:
            save_checkpoint(self.accelerator, self.ckpt_dir, self.state, spec.checkpoints_while_training(),
                            self.step_module, self.optimizer, self.scheduler)
        aside = time.perf_counter() - paused
        self.aside += aside
        self.clock += aside  # evaluations and checkpoints do not count against throughput


def _start(student: Adapter, task: Task, batches: Any, terms: list[LossTerm], projectors: nn.ModuleDict,
           task_weight: float, spec: TrainSpec, seed: int, folder: Path, accelerator: Accelerator, desc: str) -> _Loop:
    """Seed, freeze, build the optimizer and schedule, prepare them, and resume from a checkpoint."""
    start = start_weights(student) if spec.merge_start else None  # before a checkpoint is resumed
    main = accelerator.is_main_process
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(seed, device_specific=True)  # dropout differs between processes; process 0 draws as a single one would
    steps = total_steps(len(batches), spec)
    freeze(student.module, spec.freeze)
    if spec.compile:
        student.module.compile()  # in place: same module, same state-dict names
    params = [p for p in student.module.parameters() if p.requires_grad] + list(projectors.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, steps))
    step_module = StepModule(student, projectors, terms, task.task_loss, task_weight, task.output == "logits")
    model, optimizer = accelerator.prepare(step_module, optimizer)
    metrics = MetricsLog(folder / "metrics.jsonl", main)
    ckpt_dir = folder / "checkpoints"
    state = resume(accelerator, ckpt_dir, metrics, step_module, optimizer, scheduler)
    config = {"role": desc, "seed": seed, "task_weight": task_weight, "steps": steps,
              **{f"loss.{i}.{term.name}": term.weight for i, term in enumerate(terms)},
              **spec.model_dump(exclude={"log_with", "project"})}
    trackers = Trackers(accelerator, spec, folder, config)
    loop = _Loop(accelerator, spec, task, model, step_module, optimizer, scheduler, params, metrics, ckpt_dir, state,
                 steps, desc, trackers)
    loop.bar = progress(total=steps, initial=state.step, desc=desc, unit="step", show=main)
    loop.start = start
    if spec.keep_best or spec.patience:
        loop.best = BestStudent(folder / BEST, task.metric, higher_is_better(task), main)
        loop.best.resume(state.step)
    return loop


def train(
    *,
    student: Adapter,
    task: Task,
    batches: Any,
    terms: list[LossTerm],
    projectors: nn.ModuleDict,
    teacher: Teacher | None,
    cache: TeacherStore | None,
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
        ``on_policy``, also ``on_policy_batches``: how many of this call's batches the student wrote;
        after an early stop (``train.patience``), ``stopped_at``: the last step trained.
    """
    if on_policy is not None and cache is not None:
        raise RecipeError("on_policy: the teacher must score text the student writes during training, so it runs "
                          "online; set cache.top_k: null")
    loop = _start(student, task, batches, terms, projectors, task_weight, spec, seed, folder, accelerator, desc)
    loop.model.train()
    started, first_step = time.perf_counter(), loop.state.step
    try:
        first_seconds = _run(loop, batches, student, teacher, cache, bool(terms), seed, on_policy)
    finally:
        loop.trackers.finish()
    _finish(loop, student)
    return _result(loop, started, first_step, first_seconds, on_policy is not None)


def _finish(loop: _Loop, student: Adapter) -> None:
    """After the last step: ``train.keep_best``'s student restored, then ``train.merge_start``'s mix."""
    loop.bar.close()
    if loop.best is not None:
        _keep_best(loop, student)
    _merge_start(loop, student)


def _keep_best(loop: _Loop, student: Adapter) -> None:
    """Every process loads the best student the main process kept, unless it is the last step's."""
    loop.accelerator.wait_for_everyone()
    info = loop.best.info()
    if info is None:
        log.warning("train.keep_best: no validation score was measured; the last step's student is kept")
    elif info["step"] != loop.state.step:
        loop.best.restore(student.module)
        record = {"step": loop.state.step, "split": "eval", loop.task.metric: info["score"], "kept_best": info["step"]}
        loop.metrics.write(record)
        loop.bar.write(f"{loop.desc}: kept the student of step {info['step']} (eval {loop.task.metric} "
                       f"{info['score']:.2f}), the best validation score (train.keep_best)")


def _merge_start(loop: _Loop, student: Adapter) -> None:
    """``train.merge_start``: mix the start into the trained weights, then validate the result."""
    share = loop.spec.merge_start
    if loop.start is None:
        return
    merge_start(student, loop.start, share)
    if loop.accelerator.is_main_process:
        score = loop.task.evaluate(student, "eval")
        if score is not None:
            record = {"step": loop.state.step, "split": "eval", loop.task.metric: score, "merged_start": share}
            loop.metrics.write(record)
            loop.bar.write(f"{loop.desc}: {share:g} of the start mixed back in: eval {loop.task.metric} {score:.2f}")


def _run(loop: _Loop, batches: Any, student: Adapter, teacher: Teacher | None, cache: TeacherStore | None,
         needs_teacher: bool, seed: int, on_policy: OnPolicySpec | None) -> float:
    """The epochs and steps of :func:`train`; returns the wall time of the first step."""
    state, kill_at, accelerator = loop.state, _kill_point(), loop.accelerator
    started, first_step, first_seconds = time.perf_counter(), state.step, 0.0
    while state.step < loop.steps and not loop.out_of_patience():
        for batch in batches.epoch(state.epoch, state.batch):
            if (on_policy is not None and state.step >= on_policy.start * loop.steps
                    and on_policy_turn(seed, state.epoch, state.batch, on_policy.fraction)):
                batch = student_written(student, batch, on_policy)
                loop.written_in_step += 1
            loop.backward(batch, teacher_outputs(batch, teacher, cache, needs_teacher))
            if not accelerator.sync_gradients:
                continue
            loop.log_step(on_policy is not None)
            if state.step == first_step + 1:
                first_seconds = time.perf_counter() - started
            loop.evaluate_and_save(student)
            if kill_at is not None and state.step == kill_at:
                os.kill(os.getpid(), 9)
            if state.step >= loop.steps or loop.out_of_patience():
                break
        else:
            state.epoch += 1
            state.batch = 0
    return first_seconds


def _result(loop: _Loop, started: float, first_step: int, first_seconds: float, on_policy: bool) -> dict[str, Any]:
    seconds = time.perf_counter() - started - loop.aside
    evals = [r for r in loop.metrics.read() if r.get("split") == "eval"]
    result = {"steps": loop.steps, "eval": evals, "steps_run": loop.state.step - first_step,
              "seconds": round(seconds, 3), "first_step_seconds": round(first_seconds, 3)}
    if on_policy:
        result["on_policy_batches"] = loop.written
    if loop.state.step < loop.steps:  # train.patience ended it
        result["stopped_at"] = loop.state.step
    return result

"""Checkpoints and the metrics log: written atomically, resumed exactly.

A checkpoint is a folder ``step-NNNNNNNN`` written under a temporary name and renamed, so a kill
never leaves half of one. It does not depend on the number of processes that wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from distill.cache_rows import file_sha256
from distill.errors import TrainingError
from distill.step import StepModule

__all__ = ["AFTER_TRAINING", "BEST", "MANIFEST", "TIMING", "BestStudent", "MetricsLog", "TrainState", "checkpoints",
           "resume", "save_checkpoint", "save_model_atomic", "without_timing"]

log = logging.getLogger(__name__)
#: The file of a checkpoint that lists its other files with their SHA-256.
MANIFEST = "manifest.json"
#: Keys that mark the records written after the last step (the scores of the student kept by
#: ``train.keep_best`` and of ``train.merge_start``'s mix): a resumed run writes them again.
AFTER_TRAINING = frozenset({"kept_best", "merged_start"})


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, epoch, and batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    skipped: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient (``train.on_nonfinite: skip``)."""


#: Fields of a metrics record that differ between two runs of the same recipe: the wall-clock
#: time it was written at and the throughput since the record before.
TIMING = ("time", "examples_per_s", "tokens_per_s")


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its :data:`TIMING` fields: what two runs of one recipe agree on exactly."""
    return {k: v for k, v in record.items() if k not in TIMING}


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
        """Keep only records up to ``step`` (what the resumed run will not repeat), those written
        after the last step aside."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) for r in self.read() if r["step"] <= step and not AFTER_TRAINING.intersection(r)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def read(self) -> list[dict[str, Any]]:
        """The records; a line torn by a kill or a full disk (not valid JSON) is left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records


def checkpoints(folder: Path) -> list[Path]:
    """The finished checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


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


def save_checkpoint(accelerator: Accelerator, folder: Path, state: TrainState, keep: int, step: StepModule,
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
        try:
            tmp.mkdir(parents=True)
            save_model(step.student, str(tmp / "student.safetensors"))
            save_model(step.projectors, str(tmp / "projectors.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler, "rng": rng}, tmp / "state.pt")
            info = {**asdict(state), "processes": accelerator.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(info) + "\n")
            # Written last: a checkpoint without it, or whose files do not match it, is not resumed from.
            digests = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps(digests, indent=1) + "\n")
        # A full disk: safetensors and torch.save report it as their own errors, not as OSError.
        except (OSError, RuntimeError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = " ".join(str(exc).split())  # one line
            raise TrainingError(f"step {state.step}: cannot write the checkpoint {final} ({reason}); is the disk "
                                "full? The checkpoints before it are kept: free some space and run the same command "
                                "again to resume") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (missing manifest, a file missing or changed), or ``None``."""
    try:
        digests = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for name, digest in digests.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def _load(checkpoint: Path, accelerator: Accelerator, step: StepModule, optimizer: Any, scheduler: Any
          ) -> TrainState:
    """Restore the weights, optimizer, schedule and random states saved in ``checkpoint``."""
    load_model(step.student, str(checkpoint / "student.safetensors"))
    load_model(step.projectors, str(checkpoint / "projectors.safetensors"))
    # weights_only: a run folder's files are data, never code to run.
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if accelerator.process_index < len(saved["rng"]):
        _set_rng_state(saved["rng"][accelerator.process_index])
    info = json.loads((checkpoint / "trainer_state.json").read_text())
    return TrainState(step=info["step"], epoch=info["epoch"], batch=info["batch"], skipped=info.get("skipped", 0))


def resume(accelerator: Accelerator, folder: Path, metrics: MetricsLog, step: StepModule, optimizer: Any,
           scheduler: Any) -> TrainState:
    """Resume from the newest intact checkpoint in ``folder``, skipping (and naming) damaged ones.

    A checkpoint is intact when its manifest lists every file with a matching SHA-256. The
    metrics log is cut back to the step resumed from; with no intact checkpoint the phase starts
    over, with an empty log.
    """
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    for checkpoint in reversed(checkpoints(folder)):
        problem = _damage(checkpoint)
        if problem is None:
            try:
                state = _load(checkpoint, accelerator, step, optimizer, scheduler)
            except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the one before
                problem = f"cannot be loaded ({type(exc).__name__}: {exc})"
        if problem is not None:
            log.warning("checkpoint %s skipped: %s", checkpoint, problem)
            accelerator.print(f"checkpoint {checkpoint} skipped: {problem}")
            continue
        metrics.truncate_after(state.step)
        before = json.loads((checkpoint / "trainer_state.json").read_text()).get("processes", 1)
        accelerator.print(f"resuming from {checkpoint} (step {state.step}"
                          + (f"; written by {before} processes, now {accelerator.num_processes})"
                             if before != accelerator.num_processes else ")"))
        return state
    metrics.truncate_after(0)
    return TrainState()


def _write_folder_atomic(target: Path, write: Callable[[Path], None], errors: tuple[type[BaseException], ...],
                         failure: str) -> None:
    """``write`` a folder beside ``target``, then rename it over ``target``. On ``errors`` the
    partial folder is removed and a ``TrainingError`` says ``failure`` (its ``{reason}`` filled)."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except errors as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(failure.replace("{reason}", " ".join(str(exc).split()))) from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def copy_model_atomic(source: Path, target: Path) -> None:
    """Copy the saved model folder ``source`` to ``target`` as one step (written beside it, then
    renamed over it); files are hard-linked where the file system allows, else copied."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    _write_folder_atomic(target, lambda tmp: shutil.copytree(source, tmp, copy_function=link_or_copy), (OSError,),
                         f"cannot copy the model {source} to {target} ({{reason}}); is the disk full? Free some "
                         "space and run the same command again")


def save_model_atomic(model: Any, target: Path) -> None:
    """``model.save`` into ``target`` as one step: written beside it, then renamed over it. A
    write that fails (a full disk) leaves no ``target`` and no partial folder, and says so in
    one line."""
    # A full disk: safetensors and torch.save report it as their own errors, not as OSError.
    _write_folder_atomic(target, model.save, (OSError, RuntimeError, SafetensorError),
                         f"cannot save the model to {target} ({{reason}}); is the disk full? Training is kept: free "
                         "some space and run the same command again to save it")


#: The folder beside a role's checkpoints that holds its best student so far (``train.keep_best``).
BEST = "best"


class BestStudent:
    """The student of the best validation score so far (``train.keep_best``), kept on disk:
    ``best/student.safetensors`` and ``best/best.json`` (its step and score), written as one
    folder whenever an evaluation beats it, so a kill leaves the previous best whole.

    Args:
        folder: The ``best`` folder.
        metric: The validation metric's name.
        higher_is_better: ``False`` for perplexity.
        main: Whether this process writes (the main one evaluates; every process restores).
    """

    def __init__(self, folder: Path, metric: str, higher_is_better: bool, main: bool) -> None:
        self.folder, self.metric, self.main = folder, metric, main
        self.sign = 1.0 if higher_is_better else -1.0

    def info(self) -> dict[str, Any] | None:
        """``{"step", "score", "metric"}`` of the best student on disk, or ``None``."""
        try:
            info = json.loads((self.folder / "best.json").read_text())
        except (OSError, ValueError):
            return None
        return info if (self.folder / "student.safetensors").is_file() else None

    def resume(self, step: int) -> None:
        """Training starts at ``step``: from scratch (0), a best left by an earlier attempt is
        forgotten. Resumed, it is kept, even one from after ``step``: it is a student of this run
        with its measured score, and the steps replayed to it reach it again (a tie keeps it)."""
        if self.main and step == 0:
            shutil.rmtree(self.folder, ignore_errors=True)

    def offer(self, step: int, score: float, module: torch.nn.Module) -> bool:
        """Keep ``module`` as the best when ``score`` beats the best so far (ties keep the earlier)."""
        best = self.info()
        if not self.main or (best is not None and self.sign * score <= self.sign * best["score"]):
            return False

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            save_model(module, str(tmp / "student.safetensors"))
            info = {"step": step, "score": score, "metric": self.metric}
            (tmp / "best.json").write_text(json.dumps(info) + "\n")

        _write_folder_atomic(self.folder, write, (OSError, RuntimeError, SafetensorError),
                             f"step {step}: cannot write the best student to {self.folder} ({{reason}}); is the disk "
                             "full? The checkpoints are kept: free some space and run the same command again")
        return True

    def behind(self, records: list[dict[str, Any]]) -> int:
        """How many evaluations in the metrics ``records`` came after the best one (0 with no best)."""
        best = self.info()
        return 0 if best is None else sum(1 for r in records if r.get("split") == "eval" and r["step"] > best["step"]
                                          and self.metric in r and not AFTER_TRAINING.intersection(r))

    def restore(self, module: torch.nn.Module) -> dict[str, Any] | None:
        """Load the best student's weights into ``module``; its ``info``, or ``None`` when there is none."""
        info = self.info()
        if info is not None:
            load_model(module, str(self.folder / "student.safetensors"))
        return info

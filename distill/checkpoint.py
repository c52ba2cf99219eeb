"""Checkpoints and the metrics log: written atomically, resumed exactly.

A checkpoint is a folder ``step-NNNNNNNN`` written under a temporary name and renamed, so a kill
never leaves half of one. It does not depend on the number of processes that wrote it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_model, save_model

from distill.errors import RunFolderError
from distill.step import StepModule

__all__ = ["MetricsLog", "TrainState", "checkpoints", "resume", "save_checkpoint"]


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
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, folder: Path, metrics: MetricsLog, step: StepModule, optimizer: Any,
            scheduler: Any) -> TrainState:
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    found = checkpoints(folder)
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

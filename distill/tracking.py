"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...), through Accelerate's own
integrations: ``train.log_with`` names them, and every record the loop writes to
``metrics.jsonl`` goes to them too, under ``train/...`` and ``eval/...``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers

from distill.config import TrainSpec
from distill.errors import RecipeError

__all__ = ["TRACKERS", "Trackers"]

#: Tracker names ``train.log_with`` accepts, and the package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def _scalar(value: Any) -> bool | str | float | int | None:
    return value if value is None or isinstance(value, (bool, str, float, int)) else str(value)


class Trackers:
    """The trackers of one training call (a role of a run: student, baseline or a stage's).

    Args:
        accelerator: The run's Accelerate engine; only its main process logs.
        spec: ``log_with`` (tracker names) and ``project``.
        folder: The role's folder; local trackers (TensorBoard) write under ``folder/tracking``.
        config: Hyperparameters stored with the run (values that are not scalars become strings).
    """

    def __init__(self, accelerator: Accelerator, spec: TrainSpec, folder: Path, config: dict[str, Any]) -> None:
        self.accelerator = accelerator
        self.enabled = bool(spec.log_with)
        if not self.enabled:
            return
        available = {str(t) for t in get_available_trackers()}
        missing = [name for name in spec.log_with if name not in available]
        if missing:
            packages = " ".join(TRACKERS[name] for name in missing)
            raise RecipeError(f"train.log_with: {', '.join(missing)} is not installed here: pip install {packages}")
        accelerator.project_configuration.set_directories(str(folder / "tracking"))
        accelerator.log_with = list(spec.log_with)
        accelerator.trackers = []
        accelerator.init_trackers(spec.project or folder.name, {k: _scalar(v) for k, v in config.items()})

    def log(self, record: dict[str, Any], prefix: str) -> None:
        """Send a ``metrics.jsonl`` record's numbers, at its step."""
        if self.enabled:
            values = {f"{prefix}/{k}": v for k, v in record.items()
                      if k not in ("step", "split") and isinstance(v, (int, float))}
            self.accelerator.log(values, step=record["step"])

    def finish(self) -> None:
        """Flush and close the trackers (the process group stays up for the next training call)."""
        if self.enabled:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []

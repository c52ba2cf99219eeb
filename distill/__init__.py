"""distill: train a smaller, faster student to imitate a teacher, and prove the result."""

from distill.config import LossSpec, Recipe, TrainSpec, load_recipe
from distill.distiller import Distiller
from distill.errors import DataError, DistillError, ModelError, RecipeError, RunFolderError, TrainingError
from distill.losses import LOSSES
from distill.models.student import derive
from distill.runner import RunResult, run

__all__ = [
    "LOSSES",
    "DataError",
    "DistillError",
    "Distiller",
    "LossSpec",
    "ModelError",
    "Recipe",
    "RecipeError",
    "RunFolderError",
    "RunResult",
    "TrainSpec",
    "TrainingError",
    "derive",
    "load_recipe",
    "run",
]

__version__ = "0.1.0"

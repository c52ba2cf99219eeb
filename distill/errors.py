"""Errors that distill reports to the user as a message, never as a bare traceback."""

from __future__ import annotations

__all__ = ["CacheError", "DataError", "DistillError", "ModelError", "RecipeError", "RunFolderError", "TrainingError"]


class DistillError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class RecipeError(DistillError):
    """A recipe is malformed or names something that does not exist."""


class DataError(DistillError):
    """A data file is missing, unreadable or does not hold what the recipe says."""


class ModelError(DistillError):
    """A model cannot be loaded, or teacher and student outputs cannot be compared."""


class RunFolderError(DistillError):
    """A run folder holds something other than this recipe's run."""


class CacheError(DistillError):
    """A teacher-output cache cannot be written or read."""


class TrainingError(DistillError):
    """Training cannot go on: a loss or gradient that is not finite, or a checkpoint that cannot be written."""

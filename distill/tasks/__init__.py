"""Tasks: what data a recipe trains on, what the task's own loss is, and how quality is scored.

The engine only sees the :class:`Task` protocol, so a new kind of task is a new class here, not
a change to the loop.
"""

from __future__ import annotations

from distill.config import DataSpec
from distill.tasks.base import Batch, Task, spearman
from distill.tasks.classification import ClassificationTask, ImageSet, TextClassificationTask
from distill.tasks.embedding import EmbeddingTask
from distill.tasks.lm import LanguageModelingTask
from distill.tasks.regression import TextRegressionTask
from distill.tasks.sts import STSTask

__all__ = ["Batch", "ClassificationTask", "EmbeddingTask", "ImageSet", "LanguageModelingTask", "STSTask", "Task",
           "TextClassificationTask", "TextRegressionTask", "build_task", "spearman"]


def build_task(task: str, spec: DataSpec
               ) -> STSTask | EmbeddingTask | ClassificationTask | TextClassificationTask | LanguageModelingTask:
    """The task object a recipe's ``task`` and ``data`` describe."""
    if task == "sts":
        return STSTask(spec)
    if task == "embedding":
        return EmbeddingTask(spec)
    if task == "lm":
        return LanguageModelingTask(spec)
    if task == "regression":
        return TextRegressionTask(spec)
    if spec.format not in ("fashion-mnist", "image-folder") and spec.image_column is None:
        return TextClassificationTask(spec)
    return ClassificationTask(spec)

"""The evaluation suite's task names, and tasks of the user's own: as a recipe gives them
(``evaluate.suite``), their files read, and the key their scores are stored under.
:mod:`distill.specs` validates them; :mod:`distill.suite` selects and scores them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.data import read_labelled
from distill.errors import DataError

__all__ = ["SUITE_FORMATS", "SUITE_TASKS", "SuiteTaskSpec", "Task", "read_probe", "read_scored_pairs", "task_key",
           "task_name"]

#: Every built-in task, in the order tables list them: the SentEval STS years, STS-B test, the probes.
SUITE_TASKS: tuple[str, ...] = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sst2", "trec")

#: A suite task file's format, by its name's ending.
SUITE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "labelled-text"}


class SuiteTaskSpec(BaseModel):
    """An evaluation-suite task of the user's own, read from files: sentence pairs with a
    relatedness score (``kind: sts``, scored as the STS tasks are) or labelled texts
    (``kind: probe``, a logistic-regression probe on frozen embeddings, as SST-2 and TREC)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: str = Field(min_length=1)
    """The task's column in the suite's tables."""
    kind: Literal["sts", "probe"]
    """``sts``: Spearman x 100 of the pairs' cosine against their scores; ``probe``: accuracy x
    100 of a probe fitted on ``path`` and tested on ``test``."""
    path: Path
    """``sts``: the scored pairs; ``probe``: the probe's training examples."""
    test: Path | None = None
    """``probe``: its test examples (required)."""
    format: Literal["csv", "tsv", "jsonl", "parquet", "labelled-text"] | None = None
    """The files' format; ``null``: from the name's ending (.csv, .tsv, .jsonl, .parquet, .txt:
    ``LABEL text`` lines, probes only)."""
    text_column: str | list[str] | None = None
    """The text field(s): ``sts`` default ``[sentence1, sentence2]``, ``probe`` default ``text``."""
    label_column: str | None = None
    """The score (``sts``, default ``score``) or class label (``probe``, default ``label``) field."""
    encoding: str = "utf-8"
    """The text encoding of csv, tsv and txt files."""

    @model_validator(mode="after")
    def _complete(self) -> SuiteTaskSpec:
        if self.name in SUITE_TASKS:
            raise ValueError(f"name: '{self.name}' is a built-in suite task; give the task of your own another name")
        if self.kind == "probe" and self.test is None:
            raise ValueError(f"task '{self.name}': a probe needs 'test', the file of its test examples")
        if self.format is None and self.path.suffix not in SUITE_FORMATS:
            raise ValueError(f"task '{self.name}': cannot tell the format of {self.path} from its name; set format "
                             f"(one of {', '.join(sorted(set(SUITE_FORMATS.values())))})")
        columns = self.columns()
        if self.kind == "sts" and (len(columns) != 2 or self.file_format() == "labelled-text"):
            raise ValueError(f"task '{self.name}': sts pairs need two text columns in a csv, tsv, jsonl or parquet "
                             f"file (got {columns} in {self.file_format()})")
        if self.kind == "probe" and len(columns) != 1:
            raise ValueError(f"task '{self.name}': a probe reads one text column, got {columns}")
        return self

    def file_format(self) -> str:
        """The format: as set, or from the file's name."""
        return self.format or SUITE_FORMATS[self.path.suffix]

    def columns(self) -> list[str]:
        """The text column(s), defaults filled in."""
        if self.text_column is None:
            return ["sentence1", "sentence2"] if self.kind == "sts" else ["text"]
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)

    def label(self) -> str:
        """The score or label column, default filled in."""
        return self.label_column or ("score" if self.kind == "sts" else "label")


#: A task of the suite: a built-in task's name, or a task of the user's own.
Task = str | SuiteTaskSpec


def task_name(task: Task) -> str:
    """The task's column in the suite's tables."""
    return task if isinstance(task, str) else task.name


def task_key(task: Task) -> str:
    """What a stored score of ``task`` is kept under: its name, and for a task of the user's
    own its settings and its files' sizes and times, so that an edited file is scored again."""
    if isinstance(task, str):
        return task
    files = [Path(p) for p in (task.path, task.test) if p is not None]
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    digest = hashlib.sha256(json.dumps([task.model_dump(mode="json"), stamp]).encode()).hexdigest()[:16]
    return f"{task.name}@{digest}"


def _hint(task: SuiteTaskSpec) -> str:
    return f"set text_column and label_column in suite task '{task.name}'"


def read_scored_pairs(task: SuiteTaskSpec) -> tuple[list[str], list[str], np.ndarray]:
    """A ``kind: sts`` task's pairs and scores, as :func:`read_senteval_year` returns them."""
    texts, scores = read_labelled(task.path, task.file_format(), task.columns(), task.label(), task.encoding,
                                  hint=_hint(task))
    gold = []
    for number, score in enumerate(scores, 1):
        try:
            gold.append(float(score))
        except ValueError:
            raise DataError(f"{task.path}: pair {number}: the score ('{task.label()}') is not a number: {score!r}"
                            ) from None
    return [pair[0] for pair in texts], [pair[1] for pair in texts], np.asarray(gold, dtype=np.float64)


def read_probe(task: SuiteTaskSpec) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """A ``kind: probe`` task's training and test examples, ``(texts, labels)`` each, the labels
    numbered in the order of the training labels' sorted names (a test label the training file
    lacks is numbered -1, which no probe predicts)."""
    read = {split: read_labelled(path, task.file_format(), task.columns()[0], task.label(), task.encoding,
                                 hint=_hint(task)) for split, path in (("train", task.path), ("test", task.test))}
    names = sorted(set(read["train"][1]))
    if len(names) < 2:
        raise DataError(f"{task.path}: the probe's training examples hold {len(names)} label ({names}); it needs two "
                        "or more")
    ids = {name: i for i, name in enumerate(names)}
    train, test = ((list(texts), np.asarray([ids.get(label, -1) for label in labels], dtype=np.int64))
                   for texts, labels in (read["train"], read["test"]))
    return train, test

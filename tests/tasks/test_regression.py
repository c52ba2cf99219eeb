"""Scores from text pairs (a cross-encoder on STS Benchmark): reading numbers, the loss and
metric, losses that cannot compare one output refused, a run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distill
from distill.config import DataSpec, parse_recipe
from distill.errors import DataError, RecipeError
from distill.tasks import TextRegressionTask, build_task, spearman


def write_sts_scores(folder, data_dir, n_train=256, n_test=64):
    """STS Benchmark as a regression TSV: two sentences and their 0-5 similarity."""
    from distill.data import read_stsb

    folder.mkdir(parents=True, exist_ok=True)
    for split, name, n in (("train", "train.tsv", n_train), ("test", "test.tsv", n_test)):
        pairs = read_stsb(data_dir / "stsbenchmark", split, limit=n)
        rows = [f"{a}\t{b}\t{s:g}\n" for a, b, s in zip(pairs.first, pairs.second, pairs.scores.tolist(), strict=True)]
        (folder / name).write_text("sentence1\tsentence2\tscore\n" + "".join(rows))
    return folder


def _spec(folder, **fields):
    return DataSpec(format="tsv", path=folder, text_column=["sentence1", "sentence2"], label_column="score", **fields)


class _Scores:
    """A model whose score is the given column of its inputs' labels: a perfect or a reversed predictor."""

    def __init__(self, data, sign):
        self.module = torch.nn.Linear(1, 1)
        self.lookup = {(a, b): float(s) for (a, b), s in zip(data.texts, data.labels.tolist(), strict=True)}
        self.sign = sign

    def __call__(self, inputs):
        scores = [self.sign * self.lookup[pair] for pair in zip(inputs["text"], inputs["text_pair"], strict=True)]
        return {"logits": torch.tensor(scores).unsqueeze(1)}


def test_scores_are_read_as_numbers_and_scored_by_spearman(tmp_path, data_dir):
    folder = write_sts_scores(tmp_path / "sts", data_dir)
    task = build_task("regression", _spec(folder))
    assert isinstance(task, TextRegressionTask) and task.label_names == ["score"] and task.num_classes == 1
    assert task.train.labels.dtype == torch.float32 and 0 <= float(task.train.labels.min()) <= 5
    test = task.splits["test"]
    assert task.evaluate(_Scores(test, 1.0), "test") == pytest.approx(100.0)
    assert task.evaluate(_Scores(test, -1.0), "test") == pytest.approx(-100.0)
    batch = task.train.batch(range(8))
    outputs = {"logits": batch["labels"].unsqueeze(1) + 1.0}
    assert float(task.task_loss(outputs, batch)) == pytest.approx(1.0)  # every prediction 1 off
    with pytest.raises(DataError, match=r"one output per example from the student \(\(N, 1\) logits"):
        task.check_outputs({"logits": torch.zeros(4, 2)}, "student")
    (folder / "test.tsv").write_text("sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(DataError, match="the test set has a score that is not a number: 'high'"):
        build_task("regression", _spec(folder))
    assert spearman(np.arange(5), np.arange(5)[::-1]) == pytest.approx(-1.0)


def test_a_cross_encoder_distils_its_scores(tmp_path, data_dir, tiny_bert):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = write_sts_scores(tmp_path / "sts", data_dir, n_train=512)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, num_labels=1)).save_pretrained(tmp_path / "t")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "t")
    recipe = {"name": "cross", "task": "regression", "output_dir": str(tmp_path / "teacher-run"),
              "teacher": {"kind": "hf-classifier", "source": str(tmp_path / "t"), "max_length": 64},
              "student": {"source": str(tmp_path / "t")},
              "data": {"format": "tsv", "path": str(folder), "text_column": ["sentence1", "sentence2"],
                       "label_column": "score"},
              "task_loss_weight": 1.0, "baseline": False,
              "train": {"epochs": 4, "batch_size": 32, "lr": 2e-3}, "cache": {"dir": str(tmp_path / "cache")},
              "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32}}
    teacher = distill.run(recipe).models["student"]  # the teacher, trained on the scores
    recipe.update(output_dir=str(tmp_path / "run"), losses=[{"name": "kd"}],
                  teacher={**recipe["teacher"], "source": str(tmp_path / "teacher-run" / "student")},
                  student={"derive": {"layers": [1]}})
    with pytest.raises(RecipeError, match="losses: kd compares class distributions.*compare the scores with mse"):
        parse_recipe(recipe)
    recipe["losses"] = [{"name": "mse", "on": "logits"}]
    result = distill.run(recipe)
    assert teacher["spearman"] > 15 and result.models["student"]["spearman"] > 15
    config = BertForSequenceClassification.from_pretrained(tmp_path / "run" / "student").config
    assert config.num_labels == 1
    assert "spearman" in (tmp_path / "run" / "report.md").read_text()

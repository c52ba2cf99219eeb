"""``train.on_nonfinite``: stop at a non-finite loss (the default), or skip that step, up to a cap."""

import json
import math

import pytest
import torch

import distill
from distill.models.zoo import MLP


def _loader(bad_batches=()):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    batches = [(x[i : i + 16].clone(), y[i : i + 16]) for i in range(0, 96, 16)]
    for i in bad_batches:
        batches[i][0][0, 0, 0, 0] = float("nan")  # one pixel of one image
    return batches


def _fit(folder, loader, **train):
    torch.manual_seed(0)
    teacher, student = MLP(hidden=8, depth=1), MLP(hidden=4, depth=1, dropout=0.0)
    result = distill.Distiller(teacher, student, losses=["kd"], task_loss_weight=0.5,
                               train={"epochs": 1, "checkpoint_every": 100, **train}, folder=folder).fit(loader)
    records = [json.loads(x) for x in (folder / "train/student/metrics.jsonl").read_text().splitlines()]
    return result, records, student


def test_skip_leaves_out_the_steps_with_a_non_finite_loss(tmp_path):
    result, records, student = _fit(tmp_path / "skip", _loader(bad_batches=(2, 4)), on_nonfinite="skip")
    assert result["steps_run"] == 6
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
    # The steps that were not skipped trained as they would have: the same first two steps as a clean run.
    _, clean, _ = _fit(tmp_path / "clean", _loader())
    assert [r["loss"] for r in records[:2]] == [r["loss"] for r in clean[:2]]


def test_the_default_stops_and_skip_stops_past_its_cap(tmp_path):
    with pytest.raises(distill.TrainingError, match="step 3: the loss is not finite"):
        _fit(tmp_path / "stop", _loader(bad_batches=(2,)))
    with pytest.raises(distill.TrainingError, match=r"step 5: 2 steps skipped .* more than train.max_skipped \(1\)"):
        _fit(tmp_path / "cap", _loader(bad_batches=(2, 4)), on_nonfinite="skip", max_skipped=1)

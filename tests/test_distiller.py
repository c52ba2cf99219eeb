"""The Python API: no shared default folder, no silent resume, no evaluation without an eval loader."""

from __future__ import annotations

import json

import pytest
import torch

import distill
from distill.models.zoo import MLP


def _loader(n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _fit(folder, **options):
    torch.manual_seed(0)
    return distill.Distiller(MLP(hidden=8, depth=1), MLP(hidden=4, depth=1), losses=["kd"], task_loss_weight=0.5,
                             train={"epochs": 1, "checkpoint_every": 2}, folder=folder, **options).fit(_loader())


def test_a_second_fit_in_the_same_folder_is_refused_unless_resumed(tmp_path, capsys):
    first = _fit(tmp_path / "fit")
    assert first["steps_run"] == 4
    with pytest.raises(distill.RunFolderError, match="earlier fit; pass resume=True"):
        _fit(tmp_path / "fit")
    again = _fit(tmp_path / "fit", resume=True)
    assert again["steps_run"] == 0  # finished: nothing left to run
    # No eval loader: no evaluation is logged, and no "eval accuracy nan" line is printed.
    records = [json.loads(x) for x in (tmp_path / "fit/metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("split") == "eval"]
    assert "nan" not in capsys.readouterr().out


def test_the_default_folder_is_new_for_every_distiller(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = (distill.Distiller(MLP(hidden=8, depth=1), MLP(hidden=4, depth=1)) for _ in range(2))
    assert a.folder.parent.name == "runs" and a.folder != b.folder

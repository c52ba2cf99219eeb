"""Faults around checkpoints and the metrics log: damage is detected, older checkpoints are used,
non-finite training stops with a message, and nothing is unpickled as code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import distill
from distill.checkpoint import MANIFEST, MetricsLog


@pytest.fixture
def recipe(tmp_path, data_dir):
    from distill.models.adapters import TorchClassifierAdapter
    from distill.models.zoo import ConvNet

    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(tmp_path / "teacher")
    return {
        "name": "faults", "task": "classification",
        "teacher": {"kind": "torch", "source": str(tmp_path / "teacher")},
        "student": {"arch": "mlp", "arch_args": {"hidden": 16, "depth": 1, "dropout": 0.0}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 256, "eval_limit": 32, "test_limit": 32},
        "losses": [{"name": "kd", "weight": 0.5}], "task_loss_weight": 0.5, "baseline": False,
        "train": {"max_steps": 9, "batch_size": 32, "eval_every": 100, "checkpoint_every": 3, "lr": 1e-2,
                  "keep_checkpoints": 3},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
        "output_dir": str(tmp_path / "run"),
    }


def _steps(run):
    return [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]


def _killed_at(recipe, tmp_path, step):
    """Run the recipe in a process killed (SIGKILL) right after optimizer step ``step``."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path)], capture_output=True, text=True,
                         env={**os.environ, "DISTILL_KILL_AT_STEP": str(step)}, timeout=600)
    assert out.returncode != 0


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(recipe, tmp_path, capsys):
    full = distill.run({**recipe, "output_dir": str(tmp_path / "full")})
    _killed_at(recipe, tmp_path, 7)  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    weights = run / "train/student/checkpoints/step-00000006/student.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16  # 16 bytes overwritten, as a failing disk might
    weights.write_bytes(bytes(data))
    resumed = distill.run(recipe)
    out = capsys.readouterr().out
    assert "step-00000006 skipped: student.safetensors does not match its checksum" in out
    assert "resuming from" in out and "step-00000003" in out
    assert [r["step"] for r in _steps(run) if "loss" in r] == list(range(1, 10))
    assert resumed.models["student"]["accuracy"] == full.models["student"]["accuracy"]


def test_every_checkpoint_has_a_manifest_written_last(recipe, tmp_path):
    distill.run(recipe)
    for checkpoint in (tmp_path / "run/train/student/checkpoints").glob("step-*"):
        listed = json.loads((checkpoint / MANIFEST).read_text())
        assert set(listed) == {p.name for p in checkpoint.iterdir()} - {MANIFEST}


def test_non_finite_loss_stops_with_the_step_and_term(recipe, tmp_path):
    bad = {**recipe, "losses": [{"name": "kd", "weight": 1e308}, {"name": "mse", "weight": 1e308, "on": "logits"}]}
    with pytest.raises(distill.TrainingError, match=r"step 1: the loss is not finite"):
        distill.run(bad)
    assert not (tmp_path / "run/student").exists()
    with pytest.raises(distill.RecipeError, match="train.lr"):
        distill.run({**recipe, "train": {**recipe["train"], "lr": float("inf")}})


def test_torn_metrics_lines_are_left_out(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 1.0})
    log.write({"step": 2, "loss": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "lo')  # a full disk or a kill mid-line
    assert [r["step"] for r in log.read()] == [1, 2]
    log.truncate_after(1)
    assert log.read() == [{"step": 1, "loss": 1.0}]


def test_checkpoint_state_is_loaded_without_running_code(recipe, tmp_path, capsys):
    _killed_at(recipe, tmp_path, 4)  # checkpoint at step 3
    checkpoint = tmp_path / "run/train/student/checkpoints/step-00000003"

    class Payload:
        def __reduce__(self):
            return (exec, ("open(" + repr(str(tmp_path / "pwned")) + ", 'w').write('x')",))

    torch.save({"scheduler": Payload()}, checkpoint / "state.pt")
    # The manifest is made to match, as a deliberate attacker would: the load itself must refuse it.
    from distill.cache_rows import file_sha256

    listed = json.loads((checkpoint / MANIFEST).read_text())
    listed["state.pt"] = file_sha256(checkpoint / "state.pt")
    (checkpoint / MANIFEST).write_text(json.dumps(listed))
    distill.run(recipe)
    assert not (tmp_path / "pwned").exists()
    assert "step-00000003 skipped: cannot be loaded" in capsys.readouterr().out
    assert [r["step"] for r in _steps(tmp_path / "run") if "loss" in r] == list(range(1, 10))

"""End to end on CPU with tiny models: files, report, resume after SIGKILL, clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import metrics_lines

import distill
from distill.errors import DataError, ModelError, RunFolderError
from distill.models.zoo import ConvNet


@pytest.fixture()
def tiny_teacher(tmp_path):

    from distill.models.adapters import TorchClassifierAdapter

    torch.manual_seed(0)
    folder = tmp_path / "teacher"
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(folder)
    return folder


def recipe(tmp_path, data_dir, teacher, **changes):
    base = {
        "name": "tiny",
        "task": "classification",
        "teacher": {"kind": "torch", "source": str(teacher)},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 320, "eval_limit": 64, "test_limit": 128},
        "losses": [{"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}}],
        "task_loss_weight": 0.5,
        "output_dir": str(tmp_path / "run"),
        "train": {"max_steps": 12, "batch_size": 32, "eval_every": 5, "checkpoint_every": 3, "lr": 1e-2},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 2, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
    }
    base.update(changes)
    return base


def test_end_to_end_writes_run_folder_and_report(tmp_path, data_dir, tiny_teacher):
    result = distill.run(recipe(tmp_path, data_dir, tiny_teacher))
    run = tmp_path / "run"
    for name in ("recipe.yaml", "run.json", "eval.json", "report.md", "report.html", "report.json",
                 "curves.png", "tradeoff.png", "student/model.safetensors", "baseline/model.safetensors",
                 "train/student/metrics.jsonl"):
        assert (run / name).exists(), name
    report = json.loads((run / "report.json").read_text())
    assert {r["model"] for r in report["table"]} == {"teacher", "student", "baseline"}
    assert result.models["student"]["parameters"] < result.models["teacher"]["parameters"]
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert {"kd_loss", "task_loss", "lr"} <= set(train_records[0])
    # The saved student loads without distill: plain safetensors into the architecture.
    from safetensors.torch import load_file

    ConvNet(width=2).load_state_dict(load_file(str(run / "student/model.safetensors")))
    assert "| student |" in (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    assert "<code>" in page and "`" not in page.split("<body>")[1].split("<img")[0]  # code spans, not backticks


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, data_dir, tiny_teacher):
    spec = recipe(tmp_path, data_dir, tiny_teacher, baseline=False)
    spec["train"]["grad_accum"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    killed = _cli(["run", str(path), "--set", f"output_dir={tmp_path / 'killed'}"], {"DISTILL_KILL_AT_STEP": "8"})
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed/student").exists()
    # A checkpoint torn by the kill is ignored on resume.
    (tmp_path / "killed/train/student/checkpoints/.tmp-step-00000009").mkdir()
    resumed = _cli(["run", str(path), "--set", f"output_dir={tmp_path / 'killed'}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    straight = _cli(["run", str(path), "--set", f"output_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr

    def metrics(name):
        return metrics_lines(tmp_path / name / "train/student")

    assert metrics("killed") == metrics("straight")
    a = json.loads((tmp_path / "killed/eval.json").read_text())["models"]["student"]
    b = json.loads((tmp_path / "straight/eval.json").read_text())["models"]["student"]
    assert a["accuracy"] == b["accuracy"]


def test_online_teacher_equals_cached_teacher(tmp_path, data_dir, tiny_teacher):
    cached = distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False))
    online = distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False, cache={"enabled": False},
                                output_dir=str(tmp_path / "online")))
    assert cached.models["student"]["accuracy"] == online.models["student"]["accuracy"]


def test_recipe_without_losses_trains_as_the_baseline_does(tmp_path, data_dir, tiny_teacher):
    # No distillation losses: the student learns from the task loss alone (how a teacher of one's
    # own is trained), exactly as the no-teacher baseline of the same recipe does.
    distill.run(recipe(tmp_path, data_dir, tiny_teacher, losses=[], task_loss_weight=1.0, cache={"enabled": False}))
    from safetensors.torch import load_file

    run = tmp_path / "run"
    student, baseline = (load_file(str(run / role / "model.safetensors")) for role in ("student", "baseline"))
    assert all(torch.equal(student[k], baseline[k]) for k in student)
    first = json.loads((run / "train/student/metrics.jsonl").read_text().splitlines()[0])
    assert "task_loss" in first and not any(k.endswith("_loss") and k != "task_loss" for k in first)


@pytest.mark.parametrize("keep, left", [("final", ["step-00000012"]), ("none", []),
                                        (2, ["step-00000009", "step-00000012"])])
def test_finished_runs_keep_the_checkpoints_asked_for(tmp_path, data_dir, tiny_teacher, keep, left):
    train = {"max_steps": 12, "batch_size": 32, "eval_every": 5, "checkpoint_every": 3, "lr": 1e-2,
             "keep_checkpoints": keep, "keep_best": True}
    distill.run(recipe(tmp_path, data_dir, tiny_teacher, train=train))
    for role in ("student", "baseline"):
        assert sorted(p.name for p in (tmp_path / "run/train" / role / "checkpoints").iterdir()) == left
        # train.keep_best's copy goes with the checkpoints only when none are kept.
        assert (tmp_path / "run/train" / role / "best/best.json").is_file() == (keep != "none")
    # Which checkpoints are kept changes nothing in the results: the finished run is reused.
    again = distill.run(recipe(tmp_path, data_dir, tiny_teacher, train={**train, "keep_checkpoints": 3}))
    assert again.models["student"]["accuracy"] >= 0


def test_run_folder_of_another_recipe_is_refused(tmp_path, data_dir, tiny_teacher):
    distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RunFolderError, match="holds a run of another recipe"):
        distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False, seed=5))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    # Another evaluate section alone is the same training: reused, and measured as it now says.
    weights = (tmp_path / "run/student/model.safetensors").read_bytes()
    metrics = (tmp_path / "run/train/student/metrics.jsonl").read_text()
    measured = {"latency_repeats": 3, "throughput_repeats": 1, "warmup": 0, "batch_size": 32}
    distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False, evaluate=measured))
    assert (tmp_path / "run/student/model.safetensors").read_bytes() == weights
    assert (tmp_path / "run/train/student/metrics.jsonl").read_text() == metrics
    assert "latency_repeats: 3" in (tmp_path / "run/recipe.yaml").read_text()


def test_label_set_mismatch(tmp_path, data_dir):
    from distill.models.adapters import TorchClassifierAdapter

    TorchClassifierAdapter(ConvNet(width=4, num_classes=7), "convnet", {"width": 4, "num_classes": 7}).save(
        tmp_path / "t7")
    with pytest.raises(DataError, match="teacher predicts 7 classes but the data has 10"):
        distill.run(recipe(tmp_path, data_dir, tmp_path / "t7"))


def test_missing_teacher_and_data(tmp_path, data_dir, tiny_teacher):
    with pytest.raises(ModelError, match="no such file"):
        distill.run(recipe(tmp_path, data_dir, tmp_path / "nope.safetensors"))
    bad = recipe(tmp_path, data_dir, tiny_teacher, output_dir=str(tmp_path / "r2"))
    bad["data"]["path"] = str(tmp_path / "missing")
    with pytest.raises(DataError, match="IDX file not found"):
        distill.run(bad)
    # The failed runs produced nothing: the corrected recipe (another identity) takes the folder over.
    fixed = recipe(tmp_path, data_dir, tiny_teacher, output_dir=str(tmp_path / "r2"), baseline=False)
    assert distill.run(fixed).models["student"]["accuracy"] >= 0


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: classification\ntrain: {epoch: 2}\n")
    out = _cli(["validate", str(path)])
    assert out.returncode == 2
    assert "did you mean 'epochs'" in out.stderr and "Traceback" not in out.stderr
    out = _cli(["run", str(tmp_path / "missing.yaml")])
    assert out.returncode == 2 and "recipe file not found" in out.stderr


def test_cli_help_shows_an_example():
    out = _cli(["--help"])
    assert out.returncode == 0 and "distill run recipes/" in out.stdout


def test_distiller_api_with_plain_modules(tmp_path, data_dir):
    from torch.utils.data import DataLoader, TensorDataset

    from distill.data import read_idx_images

    images, labels = read_idx_images(data_dir / "fashion-mnist", "test", limit=256)
    x = torch.from_numpy(images.copy()).float().unsqueeze(1) / 255
    loader = DataLoader(TensorDataset(x, torch.from_numpy(labels)), batch_size=32)
    teacher, student = ConvNet(width=4), ConvNet(width=2)
    before = [p.clone() for p in student.parameters()]
    result = distill.Distiller(teacher, student, losses=["kd"], task_loss_weight=0.5,
                               train={"epochs": 1, "eval_every": 4}, folder=tmp_path / "d").fit(loader, loader)
    assert result["steps"] == 8 and len(result["eval"]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert (tmp_path / "d/train/student/checkpoints").is_dir()


def test_eval_and_report_commands_on_a_finished_run(tmp_path, data_dir, tiny_teacher):
    from distill.cli import main

    distill.run(recipe(tmp_path, data_dir, tiny_teacher, baseline=False))
    (tmp_path / "run/report.md").unlink()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run/report.md").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_a_damaged_run_json_is_replaced_unless_the_folder_holds_results(tmp_path, data_dir, tiny_teacher):
    spec = recipe(tmp_path, data_dir, tiny_teacher, baseline=False)
    spec["train"]["max_steps"] = 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{garbage")
    distill.run(spec)  # nothing else there: the folder is this recipe's
    assert json.loads((run / "run.json").read_text())["name"] == "tiny"
    (run / "run.json").write_text("{garbage")
    with pytest.raises(RunFolderError, match=r"run.json is damaged"):
        distill.run({**spec, "seed": 1})  # results there, and no telling whose

"""``distill run --seeds`` (a recipe over several seeds, aggregated) and ``distill compare``."""

import json
import statistics

import pytest
import torch
import yaml

from distill.cli import main
from distill.models.adapters import TorchClassifierAdapter
from distill.models.zoo import ConvNet


@pytest.fixture()
def recipe_file(tmp_path, data_dir):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(teacher)
    recipe = {
        "name": "tiny", "task": "classification",
        "teacher": {"kind": "torch", "source": str(teacher)},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 256, "eval_limit": 64, "test_limit": 128},
        "losses": [{"name": "kd", "weight": 0.5}], "task_loss_weight": 0.5,
        "output_dir": str(tmp_path / "runs" / "tiny"),
        "train": {"max_steps": 6, "batch_size": 32, "eval_every": 6, "checkpoint_every": 6, "lr": 1e-2},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _accuracy(folder, role):
    return json.loads((folder / "eval.json").read_text())["models"][role]["accuracy"]


def test_seeds_run_in_their_own_folders_and_aggregate(tmp_path, recipe_file, capsys):
    assert main(["run", str(recipe_file), "--seeds", "0", "1", "2"]) == 0
    runs = tmp_path / "runs"
    folders = [runs / f"tiny-s{seed}" for seed in (0, 1, 2)]
    assert [yaml.safe_load((f / "recipe.yaml").read_text())["seed"] for f in folders] == [0, 1, 2]
    students = [_accuracy(f, "student") for f in folders]
    assert len(set(students)) > 1, "the seeds train differently"
    rows = json.loads((runs / "tiny-seeds/report.json").read_text())
    student = next(r for r in rows if r["model"] == "student")
    assert student["values"] == students and student["seeds"] == [0, 1, 2]
    assert student["mean"] == pytest.approx(statistics.mean(students))
    assert student["std"] == pytest.approx(statistics.stdev(students))
    report = (runs / "tiny-seeds/report.md").read_text()
    assert f"{student['mean']:.2f} +- {student['std']:.2f}" in report and "| tiny (3 seeds) | student | 1 |" in report
    assert (runs / "tiny-seeds/tradeoff.png").stat().st_size > 1000
    assert "report over the seeds" in capsys.readouterr().out

    # Again: every seed's run is reused, nothing retrained.
    before = [(f / "student/model.safetensors").stat().st_mtime_ns for f in folders]
    assert main(["run", str(recipe_file), "--seeds", "0", "1", "2"]) == 0
    assert [(f / "student/model.safetensors").stat().st_mtime_ns for f in folders] == before

    # compare: the seed group and a run of another recipe, in one table.
    other = tmp_path / "other"
    assert main(["run", str(recipe_file), "--set", f"output_dir={other}", "--set", "losses=[]",
                 "--set", "task_loss_weight=1.0", "--set", "baseline=false"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, folders), str(other), "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())
    assert [(r["run"], r["model"]) for r in rows] == [
        ("teacher of tiny", "teacher"), ("tiny (3 seeds)", "student"), ("tiny (3 seeds)", "baseline"),
        ("tiny", "student")]
    assert rows[-1]["values"] == [_accuracy(other, "student")]
    assert "| tiny | student | accuracy |" in capsys.readouterr().out

    # Two runs of one recipe with different settings are two rows each, told apart by folder.
    assert main(["compare", str(folders[0]), str(other), "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())
    assert [(r["run"], r["model"]) for r in rows] == [
        ("teacher of tiny", "teacher"), ("tiny [tiny-s0]", "student"), ("tiny [tiny-s0]", "baseline"),
        ("tiny [other]", "student")]
    assert [r["values"] for r in rows[1::2]] == [[students[0]], [_accuracy(other, "student")]]


def test_compare_refuses_what_it_cannot_read(tmp_path, recipe_file, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty)]) == 2
    assert "is not a distill run folder" in capsys.readouterr().err
    assert main(["run", str(recipe_file), "--seeds", "1", "1"]) == 2
    assert "distinct seeds" in capsys.readouterr().err


def test_compare_writes_only_where_it_owns_the_folder_and_counts_a_run_once(tmp_path, recipe_file, capsys):
    assert main(["run", str(recipe_file)]) == 0
    run = tmp_path / "runs" / "tiny"
    report = (run / "report.md").read_text()
    notes = tmp_path / "mydocs"
    notes.mkdir()
    (notes / "report.md").write_text("my notes\n")
    for out in (run, notes):  # a run's own folder, a folder of the user's files
        assert main(["compare", str(run), "--out", str(out)]) == 2
        assert "holds files that are not an earlier comparison; nothing was written" in capsys.readouterr().err
    assert (run / "report.md").read_text() == report and (notes / "report.md").read_text() == "my notes\n"
    out = tmp_path / "cmp"
    assert main(["compare", str(run), str(run / "."), "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())
    assert sorted((row["run"], row["model"]) for row in rows) == [("teacher of tiny", "teacher"), ("tiny", "baseline"),
                                                                    ("tiny", "student")]
    assert all(row["seeds"] == [0] for row in rows)  # not "2 seeds" of one run
    assert main(["compare", str(run), "--out", str(out)]) == 0  # its own earlier comparison is rewritten

"""``distill plan``: candidate students measured without training, a target, a recipe written."""

import pytest
import yaml

from distill.cli import main
from distill.config import load_recipe


@pytest.fixture()
def sts_recipe(tmp_path, data_dir, tiny_bert):
    path = tmp_path / "sts.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-sts", "task": "sts",
        "teacher": {"kind": "hf-embedding", "source": str(tiny_bert), "max_length": 32},
        "student": {"derive": {"layers": [0]}},
        "data": {"format": "stsb", "path": str(data_dir / "stsbenchmark"), "train_limit": 64, "test_limit": 32},
        "losses": [{"name": "cosine"}],
        "evaluate": {"batch_size": 16},
    }))
    return path


def test_the_plan_times_a_grid_and_writes_a_recipe_for_the_largest_student_in_the_target(tmp_path, sts_recipe,
                                                                                            capsys):
    out = tmp_path / "planned.yaml"
    assert main(["plan", str(sts_recipe), "--size-mb", "0.2", "--repeats", "3", "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ") and "layers" in line]
    # The 2-layer teacher (hidden 32, 4 heads): depths 1 and 2 x widths of 4, 3 and 2 heads, and a static student.
    assert len(rows) == 6
    assert any("| static, 32-d |" in line for line in printed.splitlines())  # as wide as the teacher, at most
    sizes = {r[1]: float(r[3]) for r in rows}
    meeting = {r[1] for r in rows if r[0] == "| *"}
    assert meeting == {label for label, size in sizes.items() if size <= 0.2} and meeting
    planned = yaml.safe_load(out.read_text())
    chosen = max(meeting, key=lambda label: float(next(r[2] for r in rows if r[1] == label)[:-1]))
    derive = planned["student"]["derive"]
    assert chosen == f"{len(derive['layers'])} layers {derive['layers']}, hidden {derive['hidden_size']}, " \
                     f"{derive['num_attention_heads']} heads"
    assert load_recipe(out).student.derive.hidden_size == derive["hidden_size"]  # a valid recipe


def test_a_teacher_without_layers_cannot_be_planned(tmp_path, data_dir, capsys):
    import torch

    from distill.models.adapters import TorchClassifierAdapter
    from distill.models.zoo import ConvNet

    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(tmp_path / "teacher")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cnn", "task": "classification", "teacher": {"kind": "torch", "source": str(tmp_path / "teacher")},
        "student": {"arch": "convnet"}, "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist")},
        "losses": [{"name": "kd"}]}))
    torch.manual_seed(0)
    assert main(["plan", str(path), "--speedup", "2"]) == 2
    assert "derives students from a Hugging Face transformer teacher" in capsys.readouterr().err

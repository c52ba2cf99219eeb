"""Hub-ready output: the model card's front matter and ``distill push`` (the upload calls checked;
this machine cannot reach the Hub)."""

import json
import re

import pytest
import torch
import yaml

import distill
from distill.card import front_matter
from distill.cli import main
from distill.config import parse_recipe
from distill.models.adapters import TorchClassifierAdapter
from distill.models.zoo import ConvNet


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("push")
    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(root / "teacher")
    distill.run({
        "name": "tiny", "task": "classification",
        "teacher": {"kind": "torch", "source": str(root / "teacher")},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 128, "eval_limit": 32, "test_limit": 64},
        "losses": [{"name": "kd"}], "output_dir": str(root / "run"),
        "train": {"max_steps": 3, "batch_size": 32, "eval_every": 3, "checkpoint_every": 3},
        "cache": {"dir": str(root / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
    })
    return root / "run"


def _header(card):
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_header_holds_what_the_hub_reads(finished_run):
    meta = _header(finished_run / "student/README.md")
    figures = json.loads((finished_run / "eval.json").read_text())["models"]
    assert meta["library_name"] == "pytorch" and meta["pipeline_tag"] == "image-classification"
    assert "distillation" in meta["tags"] and "base_model" not in meta  # a local teacher is no Hub id
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["name"]: m["value"] for m in metrics} == {
        f"{role} accuracy": round(figures[role]["accuracy"], 4) for role in ("teacher", "student", "baseline")}


def test_a_hub_teacher_is_the_base_model():
    recipe = parse_recipe({"name": "sts", "task": "sts",
                           "teacher": {"kind": "hf-embedding", "source": "sentence-transformers/all-MiniLM-L6-v2"},
                           "student": {"derive": {"layers": [0]}}, "data": {"format": "stsb", "path": "x"},
                           "losses": [{"name": "cosine"}]})
    summary = {"recipe": "sts", "metric": "spearman", "teacher": "sentence-transformers/all-MiniLM-L6-v2",
               "models": {"student": {"spearman": 79.712345}}}
    meta = yaml.safe_load(front_matter(summary, recipe).split("---\n")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["model-index"][0]["results"][0]["metrics"] == [
        {"type": "spearman", "name": "student spearman", "value": 79.7123}]


def test_push_creates_the_repository_and_uploads_the_student_with_its_card(finished_run, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        calls.append(("upload", repo_id, folder_path, files, kw))
        return type("Commit", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(finished_run), "--repo-id", "me/tiny-student", "--private"]) == 0
    assert calls[0] == ("create", "me/tiny-student", {"private": True, "exist_ok": True, "repo_type": "model"})
    _, repo, folder, files, kw = calls[1]
    assert repo == "me/tiny-student" and folder == str(finished_run / "student")
    assert {"README.md", "model.safetensors", "config.json"} <= set(files) and kw["repo_type"] == "model"
    assert "pushed: https://hub.local/me/tiny-student/commit/1" in capsys.readouterr().out


def test_a_refusal_of_the_hub_is_one_line(finished_run, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    def create_repo(self, repo_id, **kw):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.\nSecond line")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    assert main(["push", str(finished_run), "--repo-id", "me/tiny-student"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("distill: error: the Hub refused the upload to 'me/tiny-student': Token is required "
                           "(`token=True`), but no token found.")


def test_push_needs_a_finished_run(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "no trained student yet" in capsys.readouterr().err


def test_a_hub_out_of_reach_is_one_line(finished_run, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def create_repo(self, *args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")  # what httpx raises, offline

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    assert main(["push", str(finished_run), "--repo-id", "someone/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: could not reach the Hub to upload to 'someone/tiny' (ConnectionError")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("damage", "told"), [
    ("eval.json", r"eval.json is damaged \(not JSON: .*\); measure the run again with 'distill eval"),
    ("eval list", r"eval.json is damaged \(a JSON list, not the dict distill writes\)"),
    ("eval shape", r"eval.json is damaged \(it lacks the metric and models distill writes\)"),
    ("config.json", r"config.json is damaged \(not JSON"),
])
def test_damaged_files_of_a_run_are_named(finished_run, tmp_path, capsys, damage, told):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    target = {"eval.json": run / "eval.json", "eval list": run / "eval.json", "eval shape": run / "eval.json",
              "config.json": run / "student" / "config.json"}[damage]
    target.write_text({"eval list": "[1, 2]\n", "eval shape": '{"models": 3}\n'}.get(damage, "{garbage\n"))
    commands = [["report", str(run)], ["compare", str(run), "--out", str(tmp_path / "cmp")]]
    if damage == "config.json":
        commands = [["eval", str(run)], ["report", str(run)]]
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert re.search(told, err) and len(err.strip().splitlines()) == 1, err


def test_a_metrics_log_cut_short_is_read_up_to_the_cut(finished_run, tmp_path):
    import shutil

    from distill.records import read_json_lines

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    log = run / "train" / "student" / "metrics.jsonl"
    whole = read_json_lines(log)
    log.write_text(log.read_text() + '{"step": 4, "lo')  # a write cut by a kill or a full disk
    assert read_json_lines(log) == whole
    assert main(["report", str(run)]) == 0

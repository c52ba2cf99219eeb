"""Staged recipes: general distillation on unlabelled text, then a task-specific stage."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import metrics_lines, run_recipe_cli

import distill
from distill.config import parse_recipe
from distill.errors import RecipeError


def _staged(tmp_path, data_dir, tiny_bert):
    from distill.data import read_stsb

    pairs = read_stsb(data_dir / "stsbenchmark", "train", limit=150)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(pairs.first + pairs.second) + "\n")
    fast = {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32}
    return {
        "name": "tiny-staged", "task": "embedding", "seed": 0,
        "teacher": {"kind": "hf-embedding", "source": str(tiny_bert), "max_length": 32},
        "student": {"derive": {"layers": [0], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"format": "text", "path": str(corpus), "eval_fraction": 0.1},
        "losses": [{"name": "cosine", "projector": "pca"}, {"name": "mse", "projector": "pca"}],
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "eval_every": 4, "checkpoint_every": 2},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": fast,
        "stages": [
            {"name": "general"},
            {"name": "sts", "task": "sts",
             "data": {"format": "stsb", "path": str(data_dir / "stsbenchmark"),
                      "train_limit": 96, "eval_limit": 64, "test_limit": 64},
             "losses": [{"name": "cosine", "projector": "always"}], "task_loss_weight": 1.0,
             "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "eval_every": 4, "checkpoint_every": 2}},
        ],
        "output_dir": str(tmp_path / "run"),
    }


def test_stages_are_recipes_of_their_own_checked_up_front(tmp_path, data_dir, tiny_bert):
    spec = _staged(tmp_path, data_dir, tiny_bert)
    general, sts = parse_recipe(spec).stage_recipes()
    assert general.task == "embedding" and general.student.derive is not None
    # The later stage trains what the first one trained; nothing else of the recipe changes.
    assert sts.task == "sts" and sts.student.derive is None
    assert sts.student.source == str(tmp_path / "run" / "general" / "student")
    assert sts.teacher == general.teacher and sts.run_dir() == tmp_path / "run" / "sts"
    spec["stages"][1]["lossses"] = []
    with pytest.raises(RecipeError, match=r"stages.1: stage 'sts': lossses: unknown field.*did you mean 'losses'"):
        parse_recipe(spec)
    spec["stages"][1].pop("lossses")
    spec["stages"][1]["student"] = {"derive": {"layers": [0]}}
    with pytest.raises(RecipeError, match="cannot change between stages"):
        parse_recipe(spec)
    spec["stages"][1].pop("student")
    spec["stages"].append({"name": "general"})
    with pytest.raises(RecipeError, match="its own name"):
        parse_recipe(spec)


def test_a_staged_run_resumes_each_stage_after_sigkill_as_if_never_stopped(tmp_path, data_dir, tiny_bert):
    spec = _staged(tmp_path, data_dir, tiny_bert)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))

    def cli(out, env=None):
        return run_recipe_cli(path, out, env)

    kill = {"DISTILL_KILL_AT_STEP": "4"}
    first = cli(tmp_path / "killed", kill)  # killed in the general stage, after step 4
    assert first.returncode == -9, first.stderr
    assert not (tmp_path / "killed/general/student/distill.json").exists()
    second = cli(tmp_path / "killed", kill)  # the general stage resumes past step 4; killed in the second stage
    assert second.returncode == -9, second.stderr
    assert (tmp_path / "killed/general/student/distill.json").is_file()
    assert not (tmp_path / "killed/sts/student/distill.json").exists()
    third = cli(tmp_path / "killed")
    assert third.returncode == 0, third.stderr
    straight = cli(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    # The command ends with what the report concludes, then where it is.
    assert re.search(r"\nThe student .* Distillation adds [-+]\d+\.\d+ spearman .*\n\nreport: ", straight.stdout, re.S)
    for stage in ("general", "sts"):
        lines = {name: metrics_lines(tmp_path / name / stage / "train/student") for name in ("killed", "straight")}
        assert lines["killed"] == lines["straight"] and lines["killed"], stage
    report = (tmp_path / "killed" / "report.md").read_text()
    assert "## Stage 1: general" in report and "## Stage 2: sts" in report
    assert "### Evaluation suite" not in report and "](general/curves.png)" in report
    assert report.count("| student |") == 2 and report.count("| baseline |") == 2


def test_a_staged_run_in_process_and_its_report(tmp_path, data_dir, tiny_bert):
    result = distill.run(_staged(tmp_path, data_dir, tiny_bert))
    run = tmp_path / "run"
    assert result.report == run / "report.md" and set(result.models) == {"teacher", "student", "baseline"}
    first = json.loads((run / "general" / "eval.json").read_text())
    second = json.loads((run / "sts" / "eval.json").read_text())
    assert first["metric"] == "agreement" and second["metric"] == "spearman"
    # The run folder holds the run's models where a one-stage run keeps them: the last stage's.
    for role in ("student", "baseline"):
        weights = run / role / "model.safetensors"
        assert weights.read_bytes() == (run / "sts" / role / "model.safetensors").read_bytes()
    # A second run reuses both finished stages and trains nothing.
    again = distill.run(_staged(tmp_path, data_dir, tiny_bert))
    assert again.models["student"]["spearman"] == pytest.approx(result.models["student"]["spearman"])
    assert (run / "report.html").read_text().count("report.html") == 2
    # The staged report leads with the last stage's result, the models it names being the run folder's.
    sts_report = json.loads((run / "sts" / "report.json").read_text())
    gain = sts_report["table"][1]["spearman"] - sts_report["table"][2]["spearman"]
    result = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("**Result**"))
    assert "also in `student/` and `baseline/`" in result and f"adds {gain:+.2f} spearman" in result


def test_a_later_stage_baseline_continues_the_baseline_before_it_never_the_distilled_student(
        tmp_path, data_dir, tiny_bert):
    from safetensors.torch import load_file

    spec = _staged(tmp_path, data_dir, tiny_bert)
    general, sts = parse_recipe(spec).stage_recipes()
    assert general.baseline_from is None and sts.baseline_from == tmp_path / "run" / "general" / "baseline"
    # Stage 2 barely moves its models, so each ends where it started.
    spec["stages"][1]["train"]["lr"] = 1e-12
    distill.run(spec)
    run = tmp_path / "run"

    def weights(folder):
        return load_file(folder / "model.safetensors")

    before, distilled, after = (weights(run / "general" / "baseline"), weights(run / "general" / "student"),
                                weights(run / "sts" / "baseline"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert not all(torch.allclose(distilled[k], after[k], atol=1e-3) for k in distilled)
    assert all(torch.allclose(distilled[k], v, atol=1e-6) for k, v in weights(run / "sts" / "student").items())


def test_a_later_stage_baseline_needs_one_in_the_stage_before(tmp_path, data_dir, tiny_bert):
    spec = _staged(tmp_path, data_dir, tiny_bert)
    spec["stages"][0]["baseline"] = False
    with pytest.raises(RecipeError, match="stages.1: stage 'sts': its baseline continues the baseline of stage "
                                          "'general', which trains none"):
        parse_recipe(spec)
    spec["stages"][1]["baseline"] = False
    assert parse_recipe(spec).stage_recipes()[1].baseline_from is None


def test_the_commands_take_a_staged_run_folder_and_use_its_last_stage(tmp_path, data_dir, tiny_bert):
    from distill.cli import main

    distill.run(_staged(tmp_path, data_dir, tiny_bert))
    run = tmp_path / "run"
    before = json.loads((run / "sts" / "eval.json").read_text())["models"]["student"]["spearman"]
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "sts" / "eval.json").read_text())["models"]["student"]["spearman"] == pytest.approx(before)
    assert main(["report", str(run)]) == 0 and (run / "report.md").read_text().startswith("# Distillation report")
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    shipped = next((run / "sts" / "export" / "safetensors").rglob("*.safetensors"))
    from safetensors.torch import load_file

    exported, trained = load_file(shipped), load_file(run / "student" / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_a_later_stage_path_that_does_not_exist_stops_the_run_before_stage_one_trains(tmp_path, data_dir, tiny_bert):
    from distill.errors import DataError

    spec = _staged(tmp_path, data_dir, tiny_bert)
    spec["stages"][1]["data"]["path"] = str(tmp_path / "no-stsb")
    with pytest.raises(DataError, match=r"not found: stages.1 \(sts\) data.path .*no-stsb"):
        distill.run(spec)
    assert not (tmp_path / "run").exists()  # nothing trained, the folder not claimed


def test_distill_cache_builds_ahead_the_teacher_caches_a_staged_run_then_reads(tmp_path, data_dir, tiny_bert, caplog):
    from distill.cache import TeacherCache
    from distill.runner import build_caches
    from distill.tasks import build_task

    spec = _staged(tmp_path, data_dir, tiny_bert)
    (general, first), (sts, waiting) = build_caches(spec)
    assert (general, sts) == ("tiny-staged.general", "tiny-staged.sts")
    texts = len(build_task("embedding", parse_recipe(spec).data).train)  # one row per distinct training text
    assert isinstance(first, TeacherCache) and first.arrays["embedding"].shape[:2] == (texts, 1)
    assert "not trained yet" in waiting and not (tmp_path / "run" / "general").exists()  # nothing trained
    with caplog.at_level("INFO", logger="distill.cache"):
        distill.run(spec)
    assert f"using teacher cache {first.folder}" in caplog.text  # the run read the cache built ahead
    # Once the first stage has trained, the second stage's cache is the one its run built.
    (_, again), (_, second) = build_caches(spec)
    assert again.folder == first.folder and isinstance(second, TeacherCache)
    assert second.folder != first.folder and second.arrays["embedding"].shape[:2] == (96, 2)
    no_cache = build_caches({**spec, "cache": {**spec["cache"], "enabled": False}})
    assert [why for _, why in no_cache] == ["cache.enabled is false"] * 2
    (_, too_big), _ = build_caches({**spec, "cache": {**spec["cache"], "max_gb": 1e-9}})
    assert re.fullmatch(r"the teacher outputs \['embedding'\] would take 0\.\d+ MB \(cache.max_gb 1e-09\)", too_big)

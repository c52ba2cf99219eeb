"""Experiment trackers through Accelerate (``train.log_with``) and the metrics log's extra fields."""

import json

import pytest
from conftest import tiny_lm_recipe

import distill

pytest.importorskip("tensorboard")


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {folder}"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return scalars


def test_tensorboard_gets_every_logged_value(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=True,
                            train={"log_with": ["tensorboard"], "project": "tiny"})
    result = distill.run(recipe)
    for role in ("student", "baseline"):
        folder = result.folder / "train" / role
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if r.get("split") == "eval"]
        assert [r["step"] for r in steps] == list(range(1, 7)) and [r["step"] for r in evals] == [3, 6]
        assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["time"] > 1.7e9 for r in steps)
        scalars = _tensorboard_scalars(folder / "tracking")
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", *(("token_kd_loss",) if role == "student" else ())):
            assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in steps}, rel=1e-6), key
        assert scalars["eval/perplexity"] == pytest.approx({r["step"]: r["perplexity"] for r in evals}, rel=1e-6)


def test_a_tracker_that_is_not_installed_is_named_with_its_package(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False, train={"log_with": ["aim"]})
    with pytest.raises(distill.RecipeError, match=r"train.log_with: aim is not installed here: pip install aim"):
        distill.run(recipe)


def test_an_unknown_tracker_is_refused_with_the_names_there_are(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, train={"log_with": ["tensorbord"]})
    with pytest.raises(distill.RecipeError, match="tensorboard"):
        distill.run(recipe)

"""Causal LMs: the adapter, the language-modelling task and token-level distillation end to end,
on tiny GPT-2 models built here with a byte-level BPE tokenizer trained on Tiny Shakespeare."""

import json
import math

import pytest
import torch
from conftest import tiny_lm_recipe

import distill
from distill.config import DataSpec, parse_recipe
from distill.errors import RecipeError
from distill.models.load import load_hf
from distill.tasks import LanguageModelingTask

transformers = pytest.importorskip("transformers")


def test_adapter_and_task_loss_match_the_models_own_loss(gpt_pair, data_dir):
    teacher, _ = gpt_pair
    model = load_hf("hf-causal-lm", str(teacher), max_length=64)
    model.module.eval()
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak."]
    out = model({"text": texts})
    batch, tokens = out["targets"].shape
    assert out["hidden"].shape == (batch, tokens, 32) and out["head"].shape == (300, 32)
    assert out["token_mask"][1].sum() < out["token_mask"][0].sum()  # the short text is padded
    task = LanguageModelingTask(DataSpec(format="text", path=data_dir / "tinyshakespeare", train_limit=8,
                                         test_limit=4, block_chars=256))
    ours = task.task_loss(out, {})
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        theirs = model.module(**enc, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Perplexity is exp of that mean over every held-out token: an untrained model is near the vocabulary size.
    ppl = task.evaluate(model, "test")
    assert 100 < ppl < 1000


def test_text_task_holds_out_the_tail(data_dir):
    task = LanguageModelingTask(DataSpec(format="text", path=data_dir / "tinyshakespeare", block_chars=1000))
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    assert task.train.blocks[0] == text[:1000] and task.splits["test"].blocks[0] == text[cut : cut + 1000]
    assert sum(map(len, task.train.blocks)) <= cut


def lm_recipe(tmp_path, data_dir, teacher_dir, student_dir, **changes):
    return tiny_lm_recipe(tmp_path, data_dir, teacher_dir, student_dir, **changes)


def test_token_level_distillation_end_to_end(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    result = distill.run(lm_recipe(tmp_path, data_dir, teacher, student))
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and {"token_kd_loss", "task_loss"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    models = result.models
    assert all(math.isfinite(models[r]["perplexity"]) for r in ("teacher", "student", "baseline"))
    # The saved student is a plain transformers causal LM.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(run / "student")
    assert sum(p.numel() for p in reloaded.parameters()) == models["student"]["parameters"]
    report = json.loads((run / "report.json").read_text())
    assert report["higher_is_better"] is False
    student_row = next(r for r in report["table"] if r["model"] == "student")
    expected = 100 * models["teacher"]["perplexity"] / models["student"]["perplexity"]
    assert student_row["retention_pct"] == pytest.approx(expected)
    assert "lower is better" in (run / "report.md").read_text()


def test_lm_recipes_are_checked(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    with pytest.raises(RecipeError, match="task 'lm' needs one of"):
        parse_recipe(lm_recipe(tmp_path, data_dir, teacher, student, teacher={"kind": "hf-embedding",
                                                                              "source": "x"}))
    with pytest.raises(RecipeError, match="causal-LM student"):
        parse_recipe(lm_recipe(tmp_path, data_dir, teacher, student,
                               student={"source": None, "derive": {"layers": [0], "vocab": "data"}}))
    with pytest.raises(RecipeError, match="unknown divergence 'kl'"):
        distill.run(lm_recipe(tmp_path, data_dir, teacher, student,
                              losses=[{"name": "token_kd", "params": {"kind": "kl"}}]))

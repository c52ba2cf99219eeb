"""Every model card's snippets run in a fresh interpreter that cannot import distill."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import distill
from distill.models.zoo import ConvNet

#: Run first in the fresh interpreter: any `import distill` in a snippet then fails.
BLOCK = "import sys\nsys.modules['distill'] = None\n"
FAST = {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16}


def _snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def _run_without_distill(code: str, check: str) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK + code + "\n" + check], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok", done.stdout


def _image_run(tmp_path, data_dir):
    from distill.models.adapters import TorchClassifierAdapter

    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(tmp_path / "teacher")
    return {"name": "card-image", "task": "classification",
            "teacher": {"kind": "torch", "source": str(tmp_path / "teacher")},
            "student": {"arch": "convnet", "arch_args": {"width": 2}},
            "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"), "train_limit": 64,
                     "eval_limit": 16, "test_limit": 32},
            "losses": [{"name": "kd"}], "baseline": False, "train": {"max_steps": 2, "batch_size": 32}}


def _image_folder_run(tmp_path, data_dir):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "images", data_dir, {"train": 16, "test": 4})
    return {"name": "card-folder", "task": "classification",
            "teacher": {"kind": "torch", "arch": "convnet", "arch_args": {"width": 2, "num_classes": 3,
                                                                         "in_channels": 3}},
            "student": {"arch": "convnet", "arch_args": {"width": 2}},
            "data": {"format": "image-folder", "path": str(root)},
            "losses": [{"name": "kd"}], "baseline": False, "train": {"max_steps": 2, "batch_size": 16}}


def _text_classifier_run(tmp_path, data_dir, tiny_bert):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, num_labels=6)).save_pretrained(tmp_path / "t")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "t")
    return {"name": "card-text", "task": "classification",
            "teacher": {"kind": "hf-classifier", "source": str(tmp_path / "t"), "max_length": 32},
            "student": {"derive": {"layers": [0], "hidden_size": 16, "num_attention_heads": 2,
                                   "intermediate_size": 32}},
            "data": {"format": "labelled-text", "path": str(data_dir / "trec"), "encoding": "latin-1",
                     "train_limit": 64, "eval_limit": 16, "test_limit": 16},
            "losses": [{"name": "kd"}], "baseline": False, "train": {"max_steps": 2, "batch_size": 32}}


def _pair_classifier_run(tmp_path, data_dir, tiny_bert):
    from tasks.test_text_classification import write_sts_pairs

    recipe = _text_classifier_run(tmp_path, data_dir, tiny_bert)
    recipe["teacher"]["source"] = str(tmp_path / "t2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, num_labels=2)).save_pretrained(tmp_path / "t2")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "t2")
    folder = write_sts_pairs(tmp_path / "pairs", data_dir, n_train=64, n_test=16)
    return {**recipe, "name": "card-pairs",
            "data": {"format": "tsv", "path": str(folder), "text_column": ["sentence1", "sentence2"]}}


def _regression_run(tmp_path, data_dir, tiny_bert):
    from tasks.test_regression import write_sts_scores
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, num_labels=1)).save_pretrained(tmp_path / "t1")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "t1")
    folder = write_sts_scores(tmp_path / "scores", data_dir, n_train=64, n_test=16)
    recipe = _text_classifier_run(tmp_path, data_dir, tiny_bert)
    return {**recipe, "name": "card-regression", "task": "regression",
            "teacher": {**recipe["teacher"], "source": str(tmp_path / "t1")}, "losses": [{"name": "mse"}],
            "data": {"format": "tsv", "path": str(folder), "text_column": ["sentence1", "sentence2"],
                     "label_column": "score"}}


def _embedding_run(tmp_path, data_dir, tiny_bert):
    return {"name": "card-embedding", "task": "sts",
            "teacher": {"kind": "hf-embedding", "source": str(tiny_bert), "max_length": 32},
            "student": {"derive": {"layers": [0], "hidden_size": 16, "num_attention_heads": 2,
                                   "intermediate_size": 32}},
            "data": {"format": "stsb", "path": str(data_dir / "stsbenchmark"), "train_limit": 64, "eval_limit": 16,
                     "test_limit": 16},
            "losses": [{"name": "cosine", "projector": "always"}], "baseline": False,
            "train": {"max_steps": 2, "batch_size": 32}}


def _static_run(tmp_path, data_dir, tiny_bert):
    pytest.importorskip("model2vec")  # the static student's card loads it with Model2Vec's package
    return {**_embedding_run(tmp_path, data_dir, tiny_bert), "name": "card-static",
            "student": {"kind": "static-embedding", "derive": {"hidden_size": 16}}, "losses": [{"name": "cosine"}]}


def _language_model_run(tmp_path, data_dir, gpt_pair):
    from conftest import tiny_lm_recipe

    recipe = tiny_lm_recipe(tmp_path, data_dir, *gpt_pair, baseline=False, train={"max_steps": 2})
    return {**recipe, "name": "card-lm"}


#: What each kind's snippet must leave behind, checked after it runs.
CHECKS = {
    "card-image": "assert tuple(logits.shape) == (4, 10) and bool(torch.isfinite(logits).all()); print('ok')",
    "card-folder": ("assert tuple(logits.shape) == (4, 3) and label in ('bag', 'sneaker', 'trouser')\n"
                    "assert mean.flatten().tolist() != [0.286] and len(std.flatten()) == 3; print('ok')"),
    "card-text": "assert tuple(logits.shape) == (1, 6) and label in {str(i) for i in range(6)}; print('ok')",
    "card-pairs": ("assert tuple(logits.shape) == (1, 2) and label in ('different', 'similar')\n"
                   "assert (batch['token_type_ids'] == 1).any(); print('ok')"),
    "card-regression": "assert tuple(logits.shape) == (1, 1) and isinstance(score, float); print('ok')",
    "card-embedding": "assert tuple(embedding.shape) == (1, 16); print('ok')",
    "card-static": "assert tuple(embedding.shape) == (1, 16); print('ok')",
    "card-lm": "assert isinstance(text, str) and text; print('ok')",
}


@pytest.mark.parametrize("make", [_image_run, _image_folder_run, _text_classifier_run, _pair_classifier_run,
                                  _regression_run, _embedding_run, _static_run, _language_model_run])
def test_every_card_snippet_runs_without_distill(tmp_path, data_dir, tiny_bert, gpt_pair, make):
    if make in (_image_run, _image_folder_run):
        recipe = make(tmp_path, data_dir)
    else:
        recipe = make(tmp_path, data_dir, gpt_pair if make is _language_model_run else tiny_bert)
    recipe.update(output_dir=str(tmp_path / "run"), cache={"dir": str(tmp_path / "cache")}, evaluate=FAST)
    distill.run(recipe)
    card = (tmp_path / "run/student/README.md").read_text()
    (snippet,) = _snippets(card)  # no export yet: one snippet
    assert "distill" not in snippet.replace(str(tmp_path), "")
    _run_without_distill(snippet, CHECKS[recipe["name"]])


@pytest.mark.parametrize("make", [_image_run, _image_folder_run, _text_classifier_run, _pair_classifier_run])
def test_the_onnx_snippet_runs_with_onnxruntime_alone(tmp_path, data_dir, tiny_bert, make):
    pytest.importorskip("onnxruntime")
    from distill.exporting import export_run

    images = (_image_run, _image_folder_run)
    recipe = make(tmp_path, data_dir) if make in images else make(tmp_path, data_dir, tiny_bert)
    recipe.update(output_dir=str(tmp_path / "run"), cache={"dir": str(tmp_path / "cache")}, evaluate=FAST)
    distill.run(recipe)
    export_run(tmp_path / "run", "onnx", measure=False)
    _, onnx = _snippets((tmp_path / "run/student/README.md").read_text())
    assert "onnxruntime" in onnx and "distill" not in onnx.replace(str(tmp_path), "")
    shape = {_image_run: (4, 10), _image_folder_run: (4, 3), _pair_classifier_run: (1, 2)}.get(make, (1, 6))
    _run_without_distill(onnx, f"assert logits.shape == {shape}; print('ok')")

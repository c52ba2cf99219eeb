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
    records = [json.loads(x) for x in (tmp_path / "fit/train/student/metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("split") == "eval"]
    assert "nan" not in capsys.readouterr().out


def test_the_default_folder_is_new_for_every_distiller(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = (distill.Distiller(MLP(hidden=8, depth=1), MLP(hidden=4, depth=1)) for _ in range(2))
    assert a.folder.parent.name == "runs" and a.folder != b.folder


def test_a_fixed_teacher_map_is_fitted_on_the_loader(tmp_path):
    """``projector: pca`` in the Python API: the map is the teacher's principal components on the
    training batches, as in a recipe's run, not the unfitted identity."""
    from safetensors.torch import load_file

    from distill.pairing import TeacherMap

    torch.manual_seed(0)
    teacher = MLP(hidden=8, depth=1, num_classes=12, dropout=0.0)
    distill.Distiller(teacher, MLP(hidden=4, depth=1, num_classes=3), losses=[{"name": "mse", "projector": "pca"}],
                      train={"epochs": 1, "checkpoint_every": 4}, folder=tmp_path / "fit").fit(_loader())
    saved = load_file(str(tmp_path / "fit/train/student/checkpoints/step-00000004/projectors.safetensors"))
    expected = TeacherMap(12, 3)
    with torch.no_grad():
        expected.fit(torch.cat([teacher(x) for x, _ in _loader()]))
    # Principal axes are defined up to sign.
    overlap = (saved["teacher_0_0.components"].T @ expected.components).abs()
    torch.testing.assert_close(overlap, torch.eye(3), atol=1e-3, rtol=0)


def _trec(data_dir, tokenizer, n=256):
    from distill.data import read_labelled

    texts, raw = read_labelled(data_dir / "trec" / "train.txt", "labelled-text", encoding="latin-1")
    texts, raw = texts[:n], raw[:n]
    names = sorted(set(raw))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([names.index(label) for label in raw])
    return [{"input_ids": enc["input_ids"][i : i + 32], "attention_mask": enc["attention_mask"][i : i + 32],
             "labels": labels[i : i + 32]} for i in range(0, n, 32)], len(names), texts


def test_transformers_models_dict_batches_and_a_derived_student(tmp_path, data_dir, tiny_bert):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batches, classes, texts = _trec(data_dir, tokenizer)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=classes)
    student = distill.derive(teacher, tokenizer, layers=[1], hidden_size=16, num_attention_heads=2, texts=texts)
    assert type(student) is BertForSequenceClassification and student.config.num_hidden_layers == 1
    assert student.config.hidden_size == 16
    # Layer 1 of the teacher, kept whole, is the student's layer 0.
    whole = distill.derive(teacher, tokenizer, layers=[1])
    kept, source = whole.bert.encoder.layer[0], teacher.bert.encoder.layer[1]
    assert torch.equal(kept.output.dense.weight, source.output.dense.weight)

    def agreement():
        with torch.no_grad():
            same = [(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                     == student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1))
                    for b in batches]
        return float(torch.cat(same).float().mean())

    before = agreement()
    result = distill.Distiller(teacher, student, losses=[{"name": "kd", "params": {"temperature": 2.0}}],
                               train={"epochs": 6, "lr": 3e-3}, folder=tmp_path / "fit").fit(batches)
    records = [json.loads(x) for x in (tmp_path / "fit/train/student/metrics.jsonl").read_text().splitlines()]
    assert result["steps_run"] == 48 and records[-1]["kd_loss"] < records[0]["kd_loss"] / 2
    assert agreement() > max(before, 0.6)


def test_without_distillation_losses_the_teacher_never_runs(tmp_path, data_dir, tiny_bert):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batches, classes, _ = _trec(data_dir, tokenizer, n=64)
    student = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=classes)

    class Refuses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **inputs):
            raise AssertionError("the teacher ran")

    result = distill.Distiller(Refuses(), student, losses=[], task_loss_weight=1.0, train={"epochs": 1},
                               folder=tmp_path / "fit").fit(batches)
    assert result["steps_run"] == 2


def test_narrowing_without_calibration_texts_is_refused(tiny_bert):
    from transformers import AutoTokenizer, BertModel

    with pytest.raises(distill.RecipeError, match="pass texts="):
        distill.derive(BertModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert), hidden_size=16,
                       num_attention_heads=2)


def test_a_fit_saved_as_a_run_folder_is_taken_by_eval_report_and_export(tmp_path, data_dir, tiny_bert, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from distill.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batches, classes, texts = _trec(data_dir, tokenizer, n=128)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=classes)
    student = distill.derive(teacher, tokenizer, layers=[1])
    fitted = distill.Distiller(teacher, student, losses=["kd"], task_loss_weight=0.5, train={"epochs": 1},
                               folder=tmp_path / "api-trec")
    with pytest.raises(distill.RunFolderError, match="after fit"):
        fitted.save_run("classification", {"format": "labelled-text", "path": data_dir / "trec"})
    fitted.fit(batches)
    data = {"format": "labelled-text", "path": str(data_dir / "trec"), "encoding": "latin-1", "train_limit": 128,
            "test_limit": 64}
    result = fitted.save_run("classification", data, tokenizer=tokenizer, teacher={"max_length": 32},
                             student={"max_length": 32})
    run = tmp_path / "api-trec"
    assert result.report == run / "report.md" and result.report.is_file()
    assert set(result.models) == {"teacher", "student"}  # no baseline: the API trained none
    # The teacher's head was added after loading it from tiny_bert, so that folder is not this
    # teacher: it is saved in the run, and the recipe names the copy.
    recipe = distill.load_recipe(run / "recipe.yaml")
    assert recipe.teacher.source == str((run / "teacher").resolve())
    assert recipe.losses[0].name == "kd" and recipe.task_loss_weight == 0.5
    # The saved models are the fitted ones: same predictions on texts from the data.
    enc = tokenizer(texts[:16], padding=True, truncation=True, max_length=32, return_tensors="pt")
    for role, model in (("teacher", teacher), ("student", student)):
        model.eval()
        with torch.no_grad():
            reloaded = BertForSequenceClassification.from_pretrained(run / role)
            torch.testing.assert_close(reloaded(**enc).logits, model(**enc).logits)
    # The commands of a recipe's run take the folder; the report has the fit's curves.
    assert main(["eval", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert (run / "export" / "onnx" / "model.onnx").is_file() and (run / "curves.png").is_file()
    rows = json.loads((run / "export" / "export.json").read_text())["deployment"]["rows"]
    measured = json.loads((run / "eval.json").read_text())["models"]
    for row in rows:  # every load of the teacher is the fitted teacher
        assert row["accuracy"] == pytest.approx(measured[row["model"]]["accuracy"])
    with pytest.raises(distill.RunFolderError, match="already holds a run"):
        fitted.save_run("classification", data, tokenizer=tokenizer)
    # A teacher saved whole is named where it is, not copied.
    teacher.save_pretrained(tmp_path / "teacher")
    again = distill.Distiller(BertForSequenceClassification.from_pretrained(tmp_path / "teacher"), student,
                              losses=["kd"], train={"epochs": 1}, folder=tmp_path / "again")
    again.fit(batches[:1])
    again.save_run("classification", data, tokenizer=tokenizer, evaluate=False)
    named = distill.load_recipe(tmp_path / "again" / "recipe.yaml").teacher.source
    assert named == str((tmp_path / "teacher").resolve())
    assert not (tmp_path / "again" / "teacher").exists() and not (tmp_path / "again" / "eval.json").exists()


def test_save_run_names_what_it_needs_for_a_plain_module(tmp_path):
    fitted = distill.Distiller(MLP(hidden=8, depth=1), MLP(hidden=4, depth=1), losses=["kd"], task_loss_weight=0.5,
                               train={"epochs": 1}, folder=tmp_path / "plain")
    fitted.fit(_loader())
    data = {"format": "fashion-mnist", "path": "data/fashion-mnist"}
    with pytest.raises(distill.RecipeError, match="'kind': 'torch', 'arch'"):
        fitted.save_run("classification", data)
    with pytest.raises(distill.RecipeError, match="needs its 'arch'"):
        fitted.save_run("classification", data, teacher={"kind": "torch"}, student={"kind": "torch"})


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"losses": ["kdd"]}, distill.RecipeError, r"losses.0.name: unknown loss 'kdd'; did you mean 'kd'"),
    ({"losses": [{"name": "kd", "wieght": 1}]}, distill.RecipeError, r"losses.0.wieght: unknown field .* 'weight'"),
    ({"train": {"epoch": 2}}, distill.RecipeError, r"train.epoch: unknown field 'epoch'; did you mean 'epochs'"),
    ({"train": {"lr": -1}}, distill.RecipeError, r"train.lr: Input should be greater than 0"),
    ({"losses": [], "task_loss_weight": 0}, distill.RecipeError, "nothing to train on"),
    ({"teacher": "mlp"}, distill.ModelError, "the teacher is a str, not a torch.nn.Module"),
])
def test_settings_the_api_refuses_are_named_as_a_recipe_s_are(options, error, message):
    models = {"teacher": options.pop("teacher", MLP(hidden=8, depth=1)), "student": MLP(hidden=4, depth=1)}
    with pytest.raises(error, match=message):
        distill.Distiller(**models, **options)


def _bad(kind):
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    return {"empty": [], "float labels": [(x, y.float())], "label out of range": [(x, y + 10)],
            "no labels": [(x,)], "wrong input": [(torch.randn(8, 15), y)]}[kind]


@pytest.mark.parametrize(("kind", "error", "message"), [
    ("empty", distill.DataError, "the training loader yields no batches"),
    ("float labels", distill.DataError, r"labels are torch.float32 .* needs class ids"),
    ("label out of range", distill.DataError, r"label 1\d is not a class of the student's 10 outputs"),
    ("no labels", distill.DataError, "the batches carry no labels"),
    ("wrong input", distill.ModelError, r"the student cannot run on the data's first examples \{'x': \(8, 15\)\}"),
])
def test_batches_the_models_cannot_learn_from_are_named_before_training(tmp_path, kind, error, message):
    fitted = distill.Distiller(MLP(hidden=8, depth=1), MLP(hidden=4, depth=1), losses=["kd"], task_loss_weight=0.5,
                               folder=tmp_path / "fit")
    with pytest.raises(error, match=message):
        fitted.fit(_bad(kind))
    assert not list((tmp_path / "fit").rglob("step-*"))  # nothing trained, nothing saved


def test_run_and_derive_name_what_they_take():
    with pytest.raises(distill.RecipeError, match="a recipe is a Recipe, a dict or the path of a YAML file, not list"):
        distill.run([{"name": "x"}])
    with pytest.raises(distill.ModelError, match=r"derive: the teacher \(Sequential\) is not a transformers model"):
        distill.derive(torch.nn.Sequential(), None)

"""Text classification from the user's labelled files: readers, splits, label names, a run end to end."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import distill
from distill.config import DataSpec, parse_recipe
from distill.data import read_labelled
from distill.errors import DataError, RecipeError
from distill.runner import teacher_certainty
from distill.tasks import TextClassificationTask, build_task


def test_labelled_files_in_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("__label__pos a fine film\n\nneg  a dull one \n")
    assert read_labelled(tmp_path / "a.txt", "labelled-text") == (["a fine film", "a dull one"], ["pos", "neg"])
    (tmp_path / "a.csv").write_text('sentence,y\n"good, really",1\nbad,0\n')
    assert read_labelled(tmp_path / "a.csv", "csv", "sentence", "y") == (["good, really", "bad"], ["1", "0"])
    (tmp_path / "a.tsv").write_text("text\tlabel\nfine\tpos\n")
    assert read_labelled(tmp_path / "a.tsv", "tsv") == (["fine"], ["pos"])
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine", "label": 2}) + "\n")
    assert read_labelled(tmp_path / "a.jsonl", "jsonl") == (["fine"], ["2"])
    with pytest.raises(DataError, match=r"no column \['y'\] in the header \['text', 'label'\]"):
        read_labelled(tmp_path / "a.tsv", "tsv", label_column="y")
    with pytest.raises(DataError, match=r"line 1: no field \['labels'\] \(found \['label', 'text'\]\)"):
        read_labelled(tmp_path / "a.jsonl", "jsonl", label_column="labels")
    (tmp_path / "b.txt").write_text("pos good\nlonely\n")
    with pytest.raises(DataError, match=r"b.txt: example 2: expected 'LABEL text'"):
        read_labelled(tmp_path / "b.txt", "labelled-text")
    (tmp_path / "c.txt").write_bytes(b"pos good\nneg \xff bad\n")
    with pytest.raises(DataError, match=r"c.txt:2: not utf-8 text .*set data.encoding"):
        read_labelled(tmp_path / "c.txt", "labelled-text")


def test_a_folder_splits_and_names_its_labels(tmp_path):
    rows = [("sports", f"match report {i}") for i in range(30)] + [("arts", f"gallery review {i}") for i in range(30)]
    (tmp_path / "train.csv").write_text("label,text\n" + "".join(f"{y},{x}\n" for y, x in rows))  # sorted by class
    (tmp_path / "test.csv").write_text("label,text\narts,an opera\nsports,a goal\n")
    task = TextClassificationTask(DataSpec(format="csv", path=tmp_path, eval_fraction=0.2))
    assert task.label_names == ["arts", "sports"] and task.num_classes == 2
    assert len(task.splits["test"]) == 2 and task.splits["test"].labels.tolist() == [0, 1]
    # No dev file: the validation set is a seeded draw from train, both classes in it.
    assert len(task.splits["eval"]) == 12 and len(task.train) == 48
    assert set(task.splits["eval"].labels.tolist()) == {0, 1}
    assert not set(task.splits["eval"].texts) & set(task.train.texts)
    batch = task.train.batch([0, 1])
    assert len(batch["inputs"]["text"]) == 2 and batch["labels"].shape == (2,)
    (tmp_path / "test.csv").write_text("label,text\nscience,a comet\n")
    with pytest.raises(DataError, match=r"labels the training set never has: \['science'\]"):
        TextClassificationTask(DataSpec(format="csv", path=tmp_path))


def test_trec_reads_as_shipped(data_dir):
    task = build_task("classification", DataSpec(format="labelled-text", path=data_dir / "trec",
                                                         encoding="latin-1"))
    assert isinstance(task, TextClassificationTask) and task.num_classes == 6
    assert len(task.splits["test"]) == 500 and len(task.train) + len(task.splits["eval"]) == 5452


def test_text_classification_recipes_are_checked():
    base = {"name": "x", "task": "classification", "data": {"format": "labelled-text", "path": "trec"},
            "teacher": {"kind": "hf-classifier", "source": "t"}, "student": {"derive": {"layers": [0]}},
            "losses": [{"name": "kd"}]}
    assert parse_recipe(base).data.format == "labelled-text"
    with pytest.raises(RecipeError, match="teacher.kind: data.format 'labelled-text' is text, so the models are "
                                          "'hf-classifier', got 'torch'"):
        parse_recipe({**base, "teacher": {"kind": "torch", "arch": "convnet"}, "student": {"arch": "convnet"}})


def _classifier(folder, tiny_bert, labels):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_bert, num_labels=labels)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def test_a_text_classifier_distils_from_labelled_files(tmp_path, data_dir, tiny_bert):
    teacher = _classifier(tmp_path / "teacher", tiny_bert, 6)
    recipe = {
        "name": "tiny-trec", "task": "classification", "seed": 0,
        "teacher": {"kind": "hf-classifier", "source": str(teacher), "max_length": 32},
        "student": {"derive": {"layers": [1], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"format": "labelled-text", "path": str(data_dir / "trec"), "encoding": "latin-1",
                 "train_limit": 256, "eval_limit": 64,
                 "test_limit": 64},
        "losses": [{"name": "kd", "params": {"temperature": 2.0}}], "task_loss_weight": 1.0,
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "eval_every": 4, "checkpoint_every": 4},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32},
        "output_dir": str(tmp_path / "run"),
    }
    result = distill.run(recipe)
    assert set(result.models) == {"teacher", "student", "baseline"}
    for role in ("teacher", "student", "baseline"):
        assert 0 <= result.models[role]["accuracy"] <= 100
    assert result.models["student"]["parameters"] < result.models["teacher"]["parameters"]
    records = [json.loads(x) for x in (tmp_path / "run/train/student/metrics.jsonl").read_text().splitlines()]
    assert any("kd" in str(r) for r in records if "loss" in r)
    assert "| student |" in (tmp_path / "run/report.md").read_text()


def test_a_classifier_gets_a_head_of_the_data_s_classes_and_their_names(tmp_path, tiny_bert):
    from distill.models.load import load_hf

    encoder = load_hf("hf-classifier", str(tiny_bert), labels=["arts", "science", "sports"])  # no head saved
    assert encoder({"text": ["a goal", "a comet"]})["logits"].shape == (2, 3)
    assert encoder.module.config.id2label == {0: "arts", 1: "science", 2: "sports"}
    six = _classifier(tmp_path / "six", tiny_bert, 6)
    two = load_hf("hf-classifier", str(six), labels=["neg", "pos"])  # a saved head of another size is replaced
    assert two({"text": ["fine"]})["logits"].shape == (1, 2) and two.module.config.label2id == {"neg": 0, "pos": 1}


def test_a_model_trained_on_labels_alone_is_reported_without_a_teacher(tmp_path, data_dir, tiny_bert):
    placeholder = _classifier(tmp_path / "two", tiny_bert, 2)  # two classes, TREC has six: never run
    recipe = {
        "name": "tiny-trec-teacher", "task": "classification", "seed": 0,
        "teacher": {"kind": "hf-classifier", "source": str(placeholder)},
        "student": {"kind": "hf-classifier", "source": str(tiny_bert), "max_length": 32},
        "data": {"format": "labelled-text", "path": str(data_dir / "trec"), "encoding": "latin-1",
                 "train_limit": 128, "eval_limit": 32, "test_limit": 32},
        "task_loss_weight": 1.0, "baseline": False,
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "eval_every": 4, "checkpoint_every": 4},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32},
        "output_dir": str(tmp_path / "run"),
    }
    result = distill.run(recipe)
    assert set(result.models) == {"student"}
    report = (tmp_path / "run/report.md").read_text()
    assert "- teacher: none: trained on labels alone" in report and "- losses: 1 x task loss" in report
    assert "Trained on the labels alone" in report and "| teacher |" not in report and "keeps" not in report
    card = (tmp_path / "run/student/README.md").read_text()
    assert "trained with distill on labels alone" in card and "imitate" not in card
    saved = json.loads((tmp_path / "run/student/config.json").read_text())
    assert saved["id2label"] == {str(i): str(i) for i in range(6)}


def test_a_run_names_its_teacher_by_the_run_that_trained_it(tmp_path, monkeypatch):
    from distill.cli import main
    from distill.errors import ModelError
    from distill.models.sources import resolve_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"runs/trec-teacher/student holds no trained student yet; run that recipe"):
        resolve_source("run:trec-teacher")
    with pytest.raises(ModelError, match="takes a run name"):
        resolve_source("run:../elsewhere")
    student = tmp_path / "runs/trec-teacher/student"
    student.mkdir(parents=True)
    (student / "distill.json").write_text("{}")
    assert resolve_source("run:trec-teacher") == "runs/trec-teacher/student"
    recipe = {"name": "x", "task": "classification", "teacher": {"kind": "hf-classifier", "source": "run:other"},
              "student": {"derive": {"layers": [0]}}, "losses": [{"name": "kd"}],
              "data": {"format": "labelled-text", "path": str(tmp_path)}}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["validate", str(path)]) == 2  # the named run has not trained a student
    recipe["teacher"]["source"] = "run:trec-teacher"
    path.write_text(json.dumps(recipe))
    assert main(["validate", str(path)]) == 0


def test_a_hugging_face_dataset_with_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": [f"a fine film {i}" for i in range(20)] + [f"a dull film {i}" for i in range(20)],
            "y": ["pos"] * 20 + ["neg"] * 20}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "validation": datasets.Dataset.from_dict({"sentence": ["fine", "dull"],
                                                                             "y": ["pos", "neg"]}),
                                   "test": datasets.Dataset.from_dict({"sentence": ["dull"], "y": ["neg"]})})
    splits.save_to_disk(str(tmp_path / "ds"))
    task = TextClassificationTask(DataSpec(format="hf-dataset", path=tmp_path / "ds", text_column="sentence",
                                           label_column="y"))
    assert task.label_names == ["neg", "pos"] and len(task.train) == 40
    assert task.splits["eval"].texts == ["fine", "dull"] and task.splits["test"].labels.tolist() == [0]
    assert parse_recipe({"name": "x", "task": "classification", "data": {"format": "hf-dataset", "path": "ds"},
                         "teacher": {"kind": "hf-classifier", "source": "t"}, "student": {"derive": {"layers": [0]}},
                         "losses": [{"name": "kd"}]}).data.format == "hf-dataset"


def write_sts_pairs(folder, data_dir, n_train=256, n_test=64):
    """STS Benchmark pairs as a pair-classification TSV: ``similar`` (score >= 3) or ``different``."""
    from distill.data import read_stsb

    folder.mkdir(parents=True, exist_ok=True)
    for split, name, n in (("train", "train.tsv", n_train), ("test", "test.tsv", n_test)):
        pairs = read_stsb(data_dir / "stsbenchmark", split, limit=n)
        rows = [f"{a}\t{b}\t{'similar' if s >= 3 else 'different'}\n"
                for a, b, s in zip(pairs.first, pairs.second, pairs.scores.tolist(), strict=True)]
        (folder / name).write_text("sentence1\tsentence2\tlabel\n" + "".join(rows))
    return folder


def test_text_pairs_are_read_batched_and_tokenized_as_pairs(tmp_path, data_dir, tiny_bert):
    from distill.models.load import load_hf

    folder = write_sts_pairs(tmp_path / "pairs", data_dir)
    texts, labels = read_labelled(folder / "train.tsv", "tsv", ["sentence1", "sentence2"])
    assert isinstance(texts[0], tuple) and len(texts[0]) == 2 and set(labels) == {"similar", "different"}
    task = build_task("classification", DataSpec(format="tsv", path=folder, text_column=["sentence1", "sentence2"]))
    assert task.label_names == ["different", "similar"] and len(task.splits["test"]) == 64
    batch = task.train.batch(range(4))["inputs"]
    assert list(batch) == ["text", "text_pair"] and batch["text_pair"][0] == task.train.texts[0][1]
    assert len(task.train_texts()) == 2 * len(task.train)
    model = load_hf("hf-classifier", str(tiny_bert), max_length=64, labels=task.label_names)
    enc = model.tokenize(batch["text"], pairs=batch["text_pair"])
    sep = model.tokenizer.sep_token_id
    assert ((enc["input_ids"] == sep).sum(1) == 2).all()  # [CLS] first [SEP] second [SEP]
    assert (enc["token_type_ids"] == 1).any(1).all()  # the second text is segment 1
    assert model(batch)["logits"].shape == (4, 2)
    # One text column is the same as before; more than two, or pairs for another task, are refused.
    recipe = {"name": "x", "task": "classification", "teacher": {"kind": "hf-classifier", "source": str(tiny_bert)},
              "student": {"derive": {"layers": [0]}}, "losses": [{"name": "kd"}],
              "data": {"format": "tsv", "path": str(folder), "text_column": ["a", "b", "c"]}}
    with pytest.raises(RecipeError, match="data.text_column: one field name, or two for text pairs, got 3"):
        parse_recipe(recipe)
    with pytest.raises(DataError, match="labelled-text holds one text a line"):
        read_labelled(data_dir / "trec" / "test.txt", "labelled-text", ["a", "b"], encoding="latin-1")
    recipe = {**recipe, "task": "embedding", "teacher": {"kind": "hf-embedding", "source": str(tiny_bert)},
              "losses": [{"name": "cosine"}],
              "data": {"format": "jsonl", "path": str(folder), "text_column": ["a", "b"]}}
    with pytest.raises(RecipeError, match="text pairs are for tasks 'classification' and 'regression'"):
        parse_recipe(recipe)


def test_a_dataset_class_label_names_the_classes_in_its_own_id_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    # Ids in the dataset's order (not alphabetical), and a class no example has: a teacher trained
    # on this dataset has a head of three outputs in this order.
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["World", "Sports", "Business"])})
    rows = {"text": [f"match report {i}" for i in range(10)] + [f"election news {i}" for i in range(10)],
            "label": [1] * 10 + [0] * 10}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "test": datasets.Dataset.from_dict({"text": ["cup final"], "label": [1]}, features=features)}
                         ).save_to_disk(str(tmp_path / "ds"))
    task = TextClassificationTask(DataSpec(format="hf-dataset", path=tmp_path / "ds"))
    assert task.label_names == ["World", "Sports", "Business"] and task.num_classes == 3
    assert all((label == 1) == text.startswith("match") for text, label in zip(task.train.texts,
                                                                               task.train.labels.tolist(), strict=True))
    assert task.splits["test"].labels.tolist() == [1]
    # Integer labels without names stay ids.
    plain = {"text": rows["text"], "label": rows["label"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(plain)}).save_to_disk(str(tmp_path / "plain"))
    assert TextClassificationTask(DataSpec(format="hf-dataset", path=tmp_path / "plain")).label_names == ["0", "1"]


def test_unlabelled_texts_join_the_training_set_without_labels(tmp_path, data_dir):
    trec = data_dir / "trec"
    test_text = (trec / "test.txt").read_text(encoding="latin-1").splitlines()[0].split(" ", 1)[1]
    lines = ["What is the tallest tree ?", "Who wrote the letter ?", test_text, "What is the tallest tree ?"]
    (tmp_path / "questions.txt").write_text("\n".join(lines) + "\n")
    spec = DataSpec(format="labelled-text", path=trec, encoding="latin-1", train_limit=50,
                    mix=[{"path": tmp_path / "questions.txt", "encoding": "utf-8", "weight": 2}])
    task = TextClassificationTask(spec)
    # The labelled examples first (train_limit counts them alone), then the mix taken twice, its
    # repeat and the test question dropped: the teacher's answers on test texts never train the student.
    assert task.labelled_examples == 50 and len(task.train) == 54
    assert task.train.texts[50:] == ["What is the tallest tree ?", "Who wrote the letter ?"] * 2
    assert (task.train.labels[:50] >= 0).all() and task.train.labels[50:].tolist() == [-1] * 4
    head = task.train.head(50)
    assert head.texts == task.train.texts[:50] and head.labels.tolist() == task.train.labels[:50].tolist()
    # The task loss is the cross-entropy of the labelled rows alone; a batch of none gives 0.
    logits = torch.randn(6, task.num_classes, requires_grad=True)
    labels = torch.tensor([0, 3, -1, 1, -1, -1])
    loss = task.task_loss({"logits": logits}, {"labels": labels})
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[[0, 1, 3]], labels[[0, 1, 3]]))
    none = task.task_loss({"logits": logits}, {"labels": torch.full((6,), -1)})
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_unlabelled_scores_are_skipped_by_the_regression_loss(tmp_path):
    from distill.tasks import TextRegressionTask

    rows = "".join(f"{i % 5}.0\ttext {i}\n" for i in range(40))
    (tmp_path / "train.tsv").write_text("label\ttext\n" + rows)
    (tmp_path / "more.txt").write_text("an unscored text\ntext 3\n")
    more = [{"path": tmp_path / "more.txt"}]
    task = TextRegressionTask(DataSpec(format="tsv", path=tmp_path / "train.tsv", mix=more))
    assert task.train.texts[-1] == "an unscored text" and torch.isnan(task.train.labels[-1])
    assert "text 3" not in task.train.texts[task.labelled_examples :]
    predicted = torch.tensor([[1.0], [2.0], [5.0]])
    scores = torch.tensor([1.5, float("nan"), 4.0])
    loss = task.task_loss({"logits": predicted}, {"labels": scores})
    assert loss.item() == pytest.approx((0.5**2 + 1.0**2) / 2)


def test_dkd_takes_the_teacher_s_top_class_for_an_unlabelled_example():
    from distill.losses import LOSSES

    dkd = LOSSES.get("dkd")()
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([2, -1, 0, -1, 3])
    filled = torch.where(labels < 0, teacher.argmax(-1), labels)
    torch.testing.assert_close(dkd(student, teacher, labels), dkd(student, teacher, filled))


def test_a_recipe_adds_unlabelled_texts_only_where_a_task_reads_them():
    base = {"name": "x", "task": "classification", "teacher": {"kind": "hf-classifier", "source": "t"},
            "student": {"derive": {"layers": [0]}}, "losses": [{"name": "kd"}]}
    mix = [{"path": "more.txt"}]
    pairs = {"format": "csv", "path": "d", "text_column": ["premise", "hypothesis"], "mix": mix}
    with pytest.raises(RecipeError, match="data.mix: adds unlabelled single texts .* examples are text pairs"):
        parse_recipe({**base, "data": pairs})
    images = {**base, "data": {"format": "fashion-mnist", "path": "d", "mix": mix},
              "teacher": {"kind": "torch", "arch": "convnet"}, "student": {"arch": "convnet"}}
    with pytest.raises(RecipeError, match="examples are images"):
        parse_recipe(images)
    lm = {"name": "x", "task": "lm", "data": {"format": "text", "path": "d", "mix": mix},
          "teacher": {"kind": "hf-causal-lm", "source": "t"}, "student": {"source": "s"},
          "losses": [{"name": "token_kd"}]}
    with pytest.raises(RecipeError, match="task is 'lm'"):
        parse_recipe(lm)
    assert parse_recipe({**base, "data": {"format": "labelled-text", "path": "d", "mix": mix}}).data.mix[0].weight == 1


def test_a_classifier_learns_unlabelled_texts_from_its_teacher_and_the_baseline_skips_them(tmp_path, data_dir,
                                                                                           tiny_bert, monkeypatch):
    teacher = _classifier(tmp_path / "teacher", tiny_bert, 6)
    brown = (data_dir / "brown" / "brown-sentences.txt").read_text().splitlines()[:96]
    (tmp_path / "brown.txt").write_text("\n".join(brown) + "\n")
    recipe = {
        "name": "tiny-trec-mix", "task": "classification", "seed": 0,
        "teacher": {"kind": "hf-classifier", "source": str(teacher), "max_length": 32},
        "student": {"derive": {"layers": [1], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"format": "labelled-text", "path": str(data_dir / "trec"), "encoding": "latin-1",
                 "train_limit": 256, "eval_limit": 32, "test_limit": 32, "mix": [{"path": str(tmp_path / "brown.txt"),
                                                                                  "encoding": "utf-8"}]},
        "losses": [{"name": "kd", "params": {"temperature": 2.0}}], "task_loss_weight": 1.0,
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "eval_every": 100, "checkpoint_every": 100},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32},
        "output_dir": str(tmp_path / "run"),
    }
    measured = []  # whether the student existed yet, each time the teacher's certainty is measured
    monkeypatch.setattr(distill.runner, "teacher_certainty", lambda task, teacher: measured.append(
        (tmp_path / "run/student/distill.json").is_file()) or teacher_certainty(task, teacher))
    distill.run(recipe)
    assert measured == [False]  # before training, so a poor mix is named early; the report reuses it
    steps = {role: json.loads((tmp_path / "run" / role / "distill.json").read_text())["steps"]
             for role in ("student", "baseline")}
    assert steps == {"student": 11, "baseline": 8}  # (256 + 96) / 32 against 256 / 32
    report = (tmp_path / "run/report.md").read_text()
    assert f"+ `{tmp_path / 'brown.txt'}` (unlabelled: taught by the teacher alone; the teacher's mean" in report
    certainty = json.loads((tmp_path / "run/eval.json").read_text())["mix_certainty"]
    assert set(certainty) == {"test", "mix"} and all(1 / 6 <= v <= 1 for v in certainty.values())
    assert f"on them {certainty['mix']:.3f}, on the test texts {certainty['test']:.3f})" in report


class _SureOfQuestions:
    """A 6-class "teacher" adapter certain of a question's class and undecided on anything else."""

    module = torch.nn.Identity()  # what evaluating() switches to eval mode and back

    def __call__(self, inputs):
        return {"logits": torch.stack([torch.tensor([30.0, 0, 0, 0, 0, 0]) if text.endswith("?")
                                       else torch.zeros(6) for text in inputs["text"]])}


def test_the_teacher_s_certainty_on_the_mix_is_measured_against_the_test_texts(tmp_path, data_dir, caplog):
    brown = (data_dir / "brown" / "brown-sentences.txt").read_text().splitlines()
    (tmp_path / "brown.txt").write_text("\n".join(s for s in brown[:200] if not s.endswith("?")) + "\n")
    spec = DataSpec(format="labelled-text", path=data_dir / "trec", encoding="latin-1", train_limit=50,
                    mix=[{"path": tmp_path / "brown.txt", "encoding": "utf-8"}])
    task = TextClassificationTask(spec)
    teacher = _SureOfQuestions()
    certainty = task.mix_certainty(teacher, limit=64)
    # Every TREC test question ends in '?'; no mix sentence does: sure of the one, uniform on the other.
    assert certainty["test"] == pytest.approx(1.0) and certainty["mix"] == pytest.approx(1 / 6)
    assert TextClassificationTask(DataSpec(format="labelled-text", path=data_dir / "trec", encoding="latin-1",
                                           train_limit=50)).mix_certainty(teacher) is None
    # The run records it and warns: a teacher this much less sure of the mix has little to say about it.
    with caplog.at_level(logging.WARNING, logger="distill.runner"):
        found = teacher_certainty(task, teacher)  # all 500 test questions: a few end without a '?'
    assert found["test"] > 0.99 and found["mix"] == pytest.approx(1 / 6)
    assert ("far less sure of data.mix's texts than of the test texts (mean top-class probability 0.167 against "
            f"{found['test']:.3f})") in caplog.text

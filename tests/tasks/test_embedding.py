"""Label-free sentence-embedding distillation: corpora, the PCA teacher map, the run end to end."""

from __future__ import annotations

import csv
import gzip
import json
import shutil

import numpy as np
import pytest
import torch

import distill
from distill.config import DataSpec, MixSpec, parse_recipe
from distill.data import mix_texts, read_lines, read_texts, unique
from distill.errors import DataError, RecipeError
from distill.pairing import TeacherMap
from distill.tasks import EmbeddingTask


def test_text_corpus_skips_blank_lines_and_names_a_bad_byte(tmp_path):
    good = tmp_path / "a.txt"
    good.write_bytes(b"first line\n\n   \nsecond line  \r\n")
    assert read_lines(good) == ["first line", "second line"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(DataError, match=r"bad.txt:3: not utf-8 text"):
        read_lines(bad)
    with pytest.raises(DataError, match="every line is blank"):
        (tmp_path / "empty.txt").write_text("\n\n")
        read_lines(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not found"):
        read_lines(tmp_path / "missing.txt")


def test_gzip_folders_and_a_truncated_gzip(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("from b\n")
    with gzip.open(folder / "a.txt.gz", "wt") as handle:
        handle.write("from a\n" * 3)
    assert read_lines(folder) == ["from a"] * 3 + ["from b"]  # files in name order
    whole = gzip.compress(("x" * 50 + "\n").encode() * 2000)
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_lines(tmp_path / "cut.txt.gz")


def test_a_large_corpus_streams_line_by_line(tmp_path):
    path = tmp_path / "big.txt"
    with path.open("w") as handle:
        for i in range(150_000):
            handle.write(f"sentence number {i % 120_000}\n")
    texts = read_lines(path)
    assert len(texts) == 150_000 and len(unique(texts)) == 120_000


def test_record_formats_read_a_named_column(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"body": "  "}) + "\n"
                    + json.dumps({"body": "two"}) + "\n")
    assert read_texts(path, "jsonl", "body") == ["one", "two"]
    with pytest.raises(DataError, match="no field 'text'"):
        read_texts(path, "jsonl")


def test_mixing_weights_take_copies_and_seeded_samples():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    mixed = mix_texts([(a, 2.0), (b, 0.5)], seed=0)
    assert mixed[:20] == a + a and len(mixed) == 25 and set(mixed[20:]) < set(b)
    assert mixed == mix_texts([(a, 2.0), (b, 0.5)], seed=0)


def _corpus(tmp_path, data_dir, n=300):
    from distill.data import read_stsb  # any real English sentences will do for the tests' corpus

    pairs = read_stsb(data_dir / "stsbenchmark", "train", limit=n)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(pairs.first + pairs.second) + "\n")
    return path


def test_embedding_task_holds_out_text_and_scores_agreement(tmp_path, data_dir, tiny_bert):
    from distill.models.load import load_hf

    spec = DataSpec(format="text", path=_corpus(tmp_path, data_dir), eval_fraction=0.2,
                    mix=[MixSpec(path=_corpus(tmp_path / "..", data_dir, 20), weight=0.5)])
    task = EmbeddingTask(spec)
    held = set(task.splits["eval"]) | set(task.splits["test"])
    assert held and not held & set(task.train.blocks)
    teacher = load_hf("hf-embedding", str(tiny_bert))
    task.use_teacher(teacher)
    assert task.evaluate(teacher, "eval") == pytest.approx(100.0)
    other = load_hf("hf-embedding", str(tiny_bert))
    torch.manual_seed(0)
    for p in other.module.parameters():
        p.data.add_(torch.randn_like(p) * 0.5)
    assert task.evaluate(other, "eval") < 90


def test_corpus_encodings_for_the_main_text_and_each_mixed_in_one(tmp_path, data_dir):
    latin = tmp_path / "questions.txt"
    latin.write_bytes("Qui a écrit Candide ?\nOù est Genève ?\n".encode("latin-1"))
    main = _corpus(tmp_path, data_dir, 20)
    with pytest.raises(DataError, match=r"questions.txt:1: not utf-8 text.*data.mix entry: its own encoding"):
        EmbeddingTask(DataSpec(format="text", path=main, mix=[MixSpec(path=latin)]))
    task = EmbeddingTask(DataSpec(format="text", path=main, eval_fraction=0.2,
                                  mix=[MixSpec(path=latin, encoding="latin-1")]))
    assert {"Qui a écrit Candide ?", "Où est Genève ?"} <= set(task.train.blocks)
    # data.encoding is the main corpus's, and the default of every mixed-in one
    main_latin = tmp_path / "main-latin.txt"
    main_latin.write_bytes(main.read_text().encode("utf-8") + "Ça va ?\n".encode("latin-1"))
    task = EmbeddingTask(DataSpec(format="text", path=main_latin, encoding="latin-1", eval_fraction=0.2,
                                  mix=[MixSpec(path=latin)]))
    assert "Où est Genève ?" in task.train.blocks


def test_teacher_map_keeps_the_top_principal_components():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    rows = (torch.randn(2000, 8, generator=g) * torch.tensor([5.0, 3, 2, 0.1, 0.1, 0.1, 0.1, 0.1])) @ basis.T
    pca = TeacherMap(8, 3)
    kept = pca.fit(rows)
    assert kept > 0.98
    projected = pca(rows)
    # The map is orthonormal and spans the three strong directions.
    torch.testing.assert_close(pca.components.T @ pca.components, torch.eye(3), atol=1e-5, rtol=0)
    assert float((projected.norm(dim=1) / rows.norm(dim=1)).mean()) > 0.97


def test_whitened_teacher_map_weighs_every_direction_alike():
    """``projector: whiten``: the same axes as ``pca``; both sides are compared centred and scaled to
    the teacher's unit spread per axis, so an error along a weak direction counts as one along a strong one."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    spread = torch.tensor([5.0, 3, 2, 0.1, 0.1, 0.1, 0.1, 0.1])
    rows = (torch.randn(4000, 8, generator=g) * spread + 1.0) @ basis.T
    plain, white = TeacherMap(8, 3), TeacherMap(8, 3, whiten=True)
    assert plain.fit(rows) == pytest.approx(white.fit(rows))
    torch.testing.assert_close(white.components, plain.components)
    mapped = white(rows)
    torch.testing.assert_close(mapped.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(mapped.std(0), torch.ones(3), atol=1e-3, rtol=0)
    # The student's side goes through the same affine map: a difference along the third (weakest
    # kept) axis weighs 2.5x one of the same size along the first, where plain pca weighs them alike.
    target = plain(rows[:1])
    along = [target + 0.1 * torch.eye(3)[k] for k in (0, 2)]
    plain_errors = [float((plain.compare(a) - plain.compare(target)).norm()) for a in along]
    white_errors = [float((white.compare(a) - white.compare(target)).norm()) for a in along]
    assert plain_errors[0] == pytest.approx(plain_errors[1], rel=1e-4)
    assert white_errors[1] / white_errors[0] == pytest.approx(5.0 / 2.0, rel=0.05)
    # Plain maps keep their checkpoint keys; whitened ones add their centre and scale.
    assert set(plain.state_dict()) == {"components", "kept"}
    assert set(white.state_dict()) == {"components", "kept", "mean", "scale"}


def test_label_free_recipe_is_checked():
    recipe = {"name": "x", "task": "embedding",
              "teacher": {"kind": "hf-embedding", "source": "t"}, "student": {"derive": {"layers": [0]}},
              "data": {"format": "text", "path": "c.txt"}, "losses": [{"name": "cosine"}]}
    assert parse_recipe(recipe).task == "embedding"
    with pytest.raises(RecipeError, match="no labels"):
        parse_recipe({**recipe, "task_loss_weight": 1.0})
    with pytest.raises(RecipeError, match="reads"):
        parse_recipe({**recipe, "data": {"format": "stsb", "path": "x"}})


def _tiny_recipe(tmp_path, data_dir, tiny_bert, **fields):
    """A label-free recipe on the tiny teacher and a corpus of real sentences; ``fields`` replace sections."""
    recipe = {
        "name": "tiny-general", "task": "embedding", "seed": 0,
        "teacher": {"kind": "hf-embedding", "source": str(tiny_bert), "max_length": 32},
        "student": {"derive": {"layers": [0], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"format": "text", "path": str(_corpus(tmp_path, data_dir)), "eval_fraction": 0.1},
        "losses": [{"name": "cosine", "projector": "pca"}],
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "eval_every": 10, "checkpoint_every": 10},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32},
        "output_dir": str(tmp_path / "run"),
    }
    return {**recipe, **fields}


def test_label_free_run_end_to_end(tmp_path, data_dir, tiny_bert):
    from distill.cli import main
    from distill.suite import read_stsb_test

    # A task of the user's own: STS-B test's pairs as a CSV file, scored beside the built-in task.
    first, second, gold = read_stsb_test(data_dir / "stsbenchmark")
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("sentence1", "sentence2", "score"), *zip(first, second, gold, strict=True)])
    recipe = _tiny_recipe(
        tmp_path, data_dir, tiny_bert,
        losses=[{"name": "cosine", "projector": "pca"}, {"name": "mse", "projector": "pca", "weight": 1.0}],
        train={"epochs": 2, "batch_size": 32, "lr": 3e-3, "eval_every": 10, "checkpoint_every": 10},
        evaluate={"latency_repeats": 2, "throughput_repeats": 1, "warmup": 0, "batch_size": 32,
                  "suite": ["stsb", {"name": "pairs", "kind": "sts", "path": str(tmp_path / "pairs.csv")}],
                  "suite_data": str(data_dir)})
    result = distill.run(recipe)
    run = tmp_path / "run"
    assert json.loads((run / "baseline" / "distill.json").read_text())["untrained"] is True
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    models = result.models
    assert models["teacher"]["agreement"] == pytest.approx(100.0)
    assert 0 < models["student"]["agreement"] <= 100 and 0 < models["baseline"]["agreement"] <= 100
    summary = json.loads((run / "eval.json").read_text())
    assert set(summary["suite"]) == {"teacher", "student", "baseline"}
    for scores in summary["suite"].values():
        # The same pairs; the texts batched differently, so equal to float32 noise.
        assert list(scores) == ["stsb", "pairs"] and scores["pairs"] == pytest.approx(scores["stsb"], abs=0.05)
    report = (run / "report.md").read_text()
    assert "## Evaluation suite" in report and "before training" in report
    assert "| model | stsb | pairs | average |" in report
    # distill eval --suite: the recipe's own task by name, more from a YAML file.
    (tmp_path / "more.yaml").write_text(f"- {{name: again, kind: sts, path: {tmp_path / 'pairs.csv'}}}\n")
    assert main(["eval", str(run), "--suite", "pairs", str(tmp_path / "more.yaml")]) == 0
    again = json.loads((run / "eval.json").read_text())["suite"]["student"]
    student = summary["suite"]["student"]["pairs"]
    assert again == {"pairs": student, "again": student}
    # The PCA map is a fixed buffer in the checkpoint's projectors, not a trained weight.
    from safetensors.torch import load_file

    last = sorted((run / "train/student/checkpoints").glob("step-*"))[-1]
    saved = load_file(str(last / "projectors.safetensors"))
    assert {k.split(".")[-1] for k in saved} == {"components", "kept"}
    assert np.isfinite(saved["teacher_0_0.components"].numpy()).all()


def test_pca_map_beside_a_token_level_term(tmp_path, data_dir, tiny_bert):
    """A ``projector: pca`` term fits its map on the teacher's embeddings alone; a token-level term
    beside it (attention relations, sentences of uneven length) is not read for the fit."""
    relation = {"name": "attention_relation", "layers": {"student": [-1], "teacher": [-1]}, "params": {"heads": 2}}
    distill.run(_tiny_recipe(
        tmp_path, data_dir, tiny_bert, baseline=False, losses=[{"name": "cosine", "projector": "pca"}, relation],
        train={"max_steps": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 3, "checkpoint_every": 3}))
    records = [json.loads(x) for x in (tmp_path / "run/train/student/metrics.jsonl").read_text().splitlines()]
    parts = [r for r in records if "loss" in r]
    assert parts and all(np.isfinite(r["loss"]) for r in parts)


def test_student_derived_from_a_smaller_sibling_of_the_teacher(tmp_path, data_dir, tiny_bert):
    """``student.source`` with ``derive``: the student is cut from that model, not the teacher."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    sibling = tmp_path / "sibling"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len((tiny_bert / "vocab.txt").read_text().split()), hidden_size=24,
                         num_hidden_layers=3, num_attention_heads=3, intermediate_size=48,
                         max_position_embeddings=64)).save_pretrained(sibling)
    BertTokenizerFast.from_pretrained(tiny_bert).save_pretrained(sibling)
    recipe = _tiny_recipe(tmp_path, data_dir, tiny_bert, name="tiny-sibling", baseline=True, student={
        "source": str(sibling),
        "derive": {"layers": [0, 2], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}})
    distill.run(recipe)
    untrained = BertModel.from_pretrained(tmp_path / "run" / "baseline")
    assert (untrained.config.num_hidden_layers, untrained.config.hidden_size) == (2, 16)
    # Its word embeddings are 16 of the sibling's 24 channels (the teacher has 32).
    words = BertModel.from_pretrained(sibling).embeddings.word_embeddings.weight
    kept = untrained.embeddings.word_embeddings.weight
    assert all(any(torch.equal(kept[:, i], words[:, j]) for j in range(24)) for i in range(16))

    static = {**recipe, "student": {**recipe["student"], "kind": "static-embedding", "derive": {"hidden_size": 16}}}
    with pytest.raises(RecipeError, match="only an hf-embedding student is derived from a model other"):
        parse_recipe(static)


def test_merge_start_mixes_the_start_back_into_the_trained_weights(tmp_path, data_dir, tiny_bert):
    """``train.merge_start``: the saved student is (1 - s) trained + s start, the start being the
    derived student a label-free run saves as its baseline; the mix is validated and logged."""
    from safetensors.torch import load_file

    train = {"max_steps": 4, "batch_size": 16, "lr": 3e-3, "eval_every": 4, "checkpoint_every": 2}
    plain = _tiny_recipe(tmp_path, data_dir, tiny_bert, baseline=False, train=train,
                         output_dir=str(tmp_path / "plain"))
    distill.run(plain)
    mixed = _tiny_recipe(tmp_path, data_dir, tiny_bert, baseline=True, train={**train, "merge_start": 0.25},
                         output_dir=str(tmp_path / "mixed"))
    distill.run(mixed)
    trained = load_file(str(tmp_path / "plain/student/model.safetensors"))
    start = load_file(str(tmp_path / "mixed/baseline/model.safetensors"))
    merged = load_file(str(tmp_path / "mixed/student/model.safetensors"))
    assert set(merged) == set(trained) == set(start)
    moved = [k for k in merged if not torch.equal(trained[k], start[k])]
    assert moved  # training changed the weights, so the mix is not trivially either end
    for k in moved:
        torch.testing.assert_close(merged[k], 0.75 * trained[k] + 0.25 * start[k], rtol=1e-5, atol=1e-6)
    records = [json.loads(x) for x in (tmp_path / "mixed/train/student/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["merged_start"] == 0.25 and records[-1]["split"] == "eval"
    summary = json.loads((tmp_path / "mixed/eval.json").read_text())
    assert "0.25 of the student's start mixed back in" in summary["losses"]  # said in the report and model card
    # Killed after training and resumed: the final checkpoint holds the trained weights, mixed again once.
    (tmp_path / "mixed/student/distill.json").unlink()
    distill.run(mixed)
    again = load_file(str(tmp_path / "mixed/student/model.safetensors"))
    for k in moved:
        torch.testing.assert_close(again[k], merged[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(RecipeError, match="merge_start"):
        parse_recipe(_tiny_recipe(tmp_path, data_dir, tiny_bert, train={**train, "merge_start": 1.0}))


def test_keep_best_saves_the_student_of_the_best_validation_step(tmp_path, data_dir, tiny_bert):
    """``train.keep_best``: a learning rate far too high makes a static student's validation
    agreement peak at step 4 and fall; the saved student is the checkpoint of the best evaluation,
    not the last step's, the report says which step, and a resumed run saves the same student."""
    from safetensors.torch import load_file

    train = {"max_steps": 12, "batch_size": 16, "lr": 0.5, "warmup_ratio": 0.5, "schedule": "constant",
             "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 10, "keep_best": True}
    recipe = _tiny_recipe(tmp_path, data_dir, tiny_bert, baseline=False, train=train,
                          student={"kind": "static-embedding", "derive": {"hidden_size": 16}})
    distill.run(recipe)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if r.get("split") == "eval" and "kept_best" not in r]
    best = max(curve, key=lambda r: r["agreement"])
    assert best["step"] < 12 and curve[-1]["agreement"] < best["agreement"]
    assert records[-1] == {"step": 12, "split": "eval", "agreement": best["agreement"], "kept_best": best["step"]}

    def weights(path):  # the token table: "embeddings.weight" in training, "embeddings" (float16) once saved
        return load_file(str(path)).popitem()[1].half()

    at_best = weights(run / f"train/student/checkpoints/step-{best['step']:08d}/student.safetensors")
    assert not torch.equal(weights(run / "train/student/checkpoints/step-00000012/student.safetensors"), at_best)
    assert torch.equal(weights(run / "student/model.safetensors"), at_best)
    assert f"The saved student is step {best['step']}'s (train.keep_best)" in (run / "report.md").read_text()
    summary = json.loads((run / "eval.json").read_text())  # what the report's facts and the model card say
    assert f"the student of step {best['step']} kept, its best validation score" in summary["losses"]
    # Resumed from the last checkpoint, or from one before the peak (the steps to it are replayed),
    # the same student is saved.
    for resume_at in (12, best["step"] - 2):
        (run / "student/distill.json").unlink()
        for checkpoint in (run / "train/student/checkpoints").glob("step-*"):
            if int(checkpoint.name.split("-")[1]) > resume_at:
                shutil.rmtree(checkpoint)
        distill.run(recipe)
        torch.testing.assert_close(weights(run / "student/model.safetensors"), at_best, rtol=1e-5, atol=1e-6)


def test_patience_stops_training_after_evaluations_without_a_better_score(tmp_path, data_dir, tiny_bert):
    """``train.patience: 2``: the static student of the test above peaks at step 4, so training
    stops at step 8 of 12 with step 4's student saved; run again, it trains no further."""
    from safetensors.torch import load_file

    train = {"max_steps": 12, "batch_size": 16, "lr": 0.5, "warmup_ratio": 0.5, "schedule": "constant",
             "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 10, "patience": 2}
    recipe = _tiny_recipe(tmp_path, data_dir, tiny_bert, baseline=False, train=train,
                          student={"kind": "static-embedding", "derive": {"hidden_size": 16}})
    distill.run(recipe)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 8
    assert [r["step"] for r in records if r.get("split") == "eval"] == [2, 4, 6, 8, 8]
    assert records[-1]["kept_best"] == 4
    trained = json.loads((run / "student/distill.json").read_text())
    assert trained["stopped_at"] == 8 and trained["steps"] == 12
    saved = load_file(str(run / "student/model.safetensors")).popitem()[1]
    at_best = load_file(str(run / "train/student/checkpoints/step-00000004/student.safetensors")).popitem()[1]
    assert torch.equal(saved, at_best.half())
    summary = json.loads((run / "eval.json").read_text())
    assert "stopped at step 8 of 12" in summary["losses"]
    (run / "student/distill.json").unlink()
    distill.run(recipe)  # resumes at step 8's checkpoint, where patience had already run out
    again = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in again if "loss" in r) == 8
    assert torch.equal(load_file(str(run / "student/model.safetensors")).popitem()[1], saved)

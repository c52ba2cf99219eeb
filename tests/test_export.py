"""Export: ONNX and TorchScript round trips against PyTorch, int8 with its quality measured, the
export command on tiny runs (report rows, model card), and clear errors."""

import json
import shutil
import sys

import pytest
import torch
from torch import nn

import distill
from distill.cli import main
from distill.config import DataSpec
from distill.deploy import quantize_torch
from distill.errors import ModelError
from distill.export import (
    export_onnx,
    export_torchscript,
    graph_of,
    load_onnx,
    max_difference,
    quantize_onnx,
)
from distill.models.adapters import TorchClassifierAdapter
from distill.models.load import load_hf
from distill.models.zoo import ConvNet
from distill.tasks import STSTask

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sts(data_dir):
    return STSTask(DataSpec(format="stsb", path=data_dir / "stsbenchmark", train_limit=16, test_limit=64))


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return load_hf("hf-embedding", str(tiny_bert), max_length=32)


def test_onnx_embedding_is_the_whole_pooled_model_with_dynamic_axes(embedder, sts, tmp_path):
    record = export_onnx(embedder, tmp_path / "m.onnx", sts.sample_inputs(16))
    assert record["max_abs_diff"] < 1e-5 and record["bytes"] == (tmp_path / "m.onnx").stat().st_size
    model = onnx.load(str(tmp_path / "m.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]
    # Texts it never saw, in batches of other sizes and lengths: the ONNX output is the adapter's
    # pooled, normalised embedding.
    exported = load_onnx(tmp_path / "m.onnx", graph_of(embedder))
    for texts in (["A dog runs."], ["A man is playing a large guitar on the stage tonight.", "Hi.", "Two cats."]):
        ours = exported({"text": texts})["embedding"]
        with torch.no_grad():
            theirs = embedder({"text": texts})["embedding"]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(texts)))
    # An untrained model's cosines lie close together, so differences of 1e-7 may swap a few ranks.
    assert sts.evaluate(exported, "test") == pytest.approx(sts.evaluate(embedder, "test"), abs=0.5)


def test_int8_onnx_is_smaller_and_its_quality_is_measured(embedder, sts, tmp_path):
    export_onnx(embedder, tmp_path / "m.onnx", sts.sample_inputs(16))
    record = quantize_onnx(tmp_path / "m.onnx", tmp_path / "m8.onnx")
    # a 2-layer width-32 model keeps norms, biases and per-channel scales in float: not 4x smaller
    assert record["bytes"] < 0.75 * (tmp_path / "m.onnx").stat().st_size
    int8 = load_onnx(tmp_path / "m8.onnx", graph_of(embedder))
    graph = graph_of(embedder)
    diff = max_difference(int8, embedder, graph, [sts.sample_inputs(16)])
    assert 1e-5 < diff < 0.2  # quantized: close to the float model, not equal to it
    float_quality, int8_quality = sts.evaluate(embedder, "test"), sts.evaluate(int8, "test")
    assert int8_quality == pytest.approx(float_quality, abs=5.0)
    # PyTorch's own int8 model computes its linear layers in int8 and still gives embeddings.
    quantized = quantize_torch(embedder)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.module.modules())
    assert not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in embedder.module.modules())
    assert sts.evaluate(quantized, "test") == pytest.approx(float_quality, abs=5.0)


def test_torchscript_embedding_holds_for_other_shapes(embedder, sts, tmp_path):
    record = export_torchscript(embedder, tmp_path / "m.pt", sts.sample_inputs(16))
    assert record["max_abs_diff"] < 1e-5
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    enc = embedder.tokenize(["A much longer sentence than any traced example had, to be sure.", "Short."])
    with torch.no_grad():
        ours = loaded(*(enc[n] for n in graph_of(embedder).inputs))
        theirs = embedder({"text": ["A much longer sentence than any traced example had, to be sure.", "Short."]})
    torch.testing.assert_close(ours, theirs["embedding"], atol=1e-5, rtol=0)


class _Branchy(nn.Module):
    """Python control flow on a tensor value: a trace keeps only the branch its example took."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.mean() > 0:
            return self.head(x.flatten(1))
        return -self.head(x.flatten(1))


def test_an_export_that_does_not_hold_is_refused_and_removed(tmp_path):
    adapter = TorchClassifierAdapter(_Branchy(), "branchy", {})
    sample = {"x": torch.cat([torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2)])}
    with pytest.raises(ModelError, match="differ from PyTorch's by up to"):
        export_onnx(adapter, tmp_path / "b.onnx", sample)
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(ModelError, match="tracing fixed a shape or a branch"):
        export_torchscript(adapter, tmp_path / "b.pt", sample)
    assert not (tmp_path / "b.pt").exists()


def test_static_student_exports_to_onnx(tiny_bert, embedder, sts, tmp_path):
    from distill.models.static import derive_static

    static = derive_static(embedder, 16, texts=sts.train_texts())
    record = export_onnx(static, tmp_path / "s.onnx", sts.sample_inputs(16))
    assert record["max_abs_diff"] < 1e-5
    exported = load_onnx(tmp_path / "s.onnx", graph_of(static))
    assert sts.evaluate(exported, "test") == pytest.approx(sts.evaluate(static, "test"), abs=0.5)


def _with_tokenizer(model, tiny_bert, folder):
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).is_file():
            shutil.copy(tiny_bert / name, folder / name)
    return folder


def test_hf_classifier_exports_logits(tiny_bert, sts, tmp_path):
    config = transformers.BertConfig.from_pretrained(str(tiny_bert), num_labels=3)
    torch.manual_seed(0)
    folder = _with_tokenizer(transformers.BertForSequenceClassification(config), tiny_bert, tmp_path / "clf")
    classifier = load_hf("hf-classifier", str(folder), max_length=32)
    record = export_onnx(classifier, tmp_path / "c.onnx", sts.sample_inputs(16))
    assert record["max_abs_diff"] < 1e-5
    logits = load_onnx(tmp_path / "c.onnx", graph_of(classifier))({"text": ["A dog runs.", "Hi."]})["logits"]
    assert logits.shape == (2, 3)


def test_causal_lm_exports_logits_and_its_perplexity_matches(tiny_bert, data_dir, tmp_path):
    from distill.deploy import perplexity
    from distill.tasks import LanguageModelingTask

    vocab = len((tiny_bert / "vocab.txt").read_text().splitlines())
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=2, eos_token_id=3)
    folder = _with_tokenizer(transformers.GPT2LMHeadModel(config), tiny_bert, tmp_path / "gpt")
    lm = load_hf("hf-causal-lm", str(folder), max_length=48)
    task = LanguageModelingTask(DataSpec(format="text", path=data_dir / "tinyshakespeare", train_limit=4,
                                         test_limit=6, block_chars=120))
    record = export_onnx(lm, tmp_path / "lm.onnx", task.sample_inputs(6))
    assert record["max_abs_diff"] < 1e-4
    exported = load_onnx(tmp_path / "lm.onnx", graph_of(lm))
    logits = exported(task.sample_inputs(2))["logits"]
    assert logits.shape[0] == 2 and logits.shape[-1] == vocab
    assert perplexity(exported, task) == pytest.approx(task.evaluate(lm, "test"), rel=1e-4)
    assert export_torchscript(lm, tmp_path / "lm.pt", task.sample_inputs(6))["max_abs_diff"] < 1e-4


# --- the command, on tiny runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("convnet-run")
    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(root / "teacher")
    distill.run({
        "name": "tiny-export", "task": "classification",
        "teacher": {"kind": "torch", "source": str(root / "teacher")},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 128, "eval_limit": 32, "test_limit": 128},
        "losses": [{"name": "kd", "weight": 0.5}], "task_loss_weight": 0.5, "baseline": False,
        "output_dir": str(root / "run"), "cache": {"dir": str(root / "cache")},
        "train": {"max_steps": 4, "batch_size": 32, "eval_every": 4, "checkpoint_every": 4, "lr": 1e-2},
        "evaluate": {"latency_repeats": 3, "throughput_repeats": 1, "warmup": 1, "batch_size": 16},
    })
    return root / "run"


def test_export_command_writes_checked_onnx_int8_and_deployment_rows(convnet_run, capsys):
    assert main(["export", str(convnet_run), "--format", "onnx", "--int8"]) == 0
    out = capsys.readouterr().out
    assert "max |export - pytorch|" in out and "| student | onnxruntime | int8 |" in out
    folder = convnet_run / "export" / "onnx"
    assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
    exports = json.loads((convnet_run / "export" / "export.json").read_text())
    assert exports["exports"]["onnx"]["max_abs_diff"] < 1e-4
    rows = {(r["model"], r["runtime"], r["weights"]): r for r in exports["deployment"]["rows"]}
    assert set(rows) == {("teacher", "pytorch", "float32"), ("teacher", "onnxruntime", "float32"),
                         ("student", "pytorch", "float32"), ("student", "onnxruntime", "float32"),
                         ("student", "pytorch", "int8"), ("student", "onnxruntime", "int8")}
    evaluated = json.loads((convnet_run / "eval.json").read_text())["models"]
    assert rows["student", "pytorch", "float32"]["accuracy"] == evaluated["student"]["accuracy"]
    # Float ONNX classifies exactly as PyTorch; int8 is measured on its own.
    assert rows["student", "onnxruntime", "float32"]["accuracy"] == evaluated["student"]["accuracy"]
    assert 0 <= rows["student", "onnxruntime", "int8"]["accuracy"] <= 100
    assert rows["student", "onnxruntime", "int8"]["size_bytes"] == (folder / "model.int8.onnx").stat().st_size
    assert all(r["latency_ms"] > 0 for r in rows.values())
    report = (convnet_run / "report.md").read_text()
    assert "## Deployment" in report and "| student | onnxruntime | int8 |" in report
    assert "Deployment" in (convnet_run / "report.html").read_text()
    card = (convnet_run / "student" / "README.md").read_text()
    assert "## Deployment (CPU)" in card and "onnxruntime" in card and str(folder / "model.onnx") in card


def test_formats_a_kind_cannot_take_are_refused_by_name(convnet_run, capsys):
    assert main(["export", str(convnet_run), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "not a transformers model" in err and "exports to onnx, safetensors, torchscript" in err
    assert main(["export", str(convnet_run), "--format", "safetensors", "--int8"]) == 2
    assert "--int8" in capsys.readouterr().err
    assert main(["export", str(convnet_run.parent / "nowhere"), "--format", "onnx"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_missing_onnx_extra_names_it(convnet_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(convnet_run), "--format", "onnx"]) == 2
    assert "pip install 'distill[onnx]'" in capsys.readouterr().err


def test_safetensors_and_torchscript_exports(convnet_run, capsys):
    assert main(["export", str(convnet_run), "--format", "safetensors", "--out", str(convnet_run / "ship")]) == 0
    assert (convnet_run / "ship/model.safetensors").read_bytes() == (
        convnet_run / "student/model.safetensors").read_bytes()
    assert main(["export", str(convnet_run), "--format", "torchscript"]) == 0
    traced = torch.jit.load(str(convnet_run / "export/torchscript/model.pt"))
    assert traced(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    exports = json.loads((convnet_run / "export" / "export.json").read_text())["exports"]
    assert {"safetensors", "torchscript"} <= set(exports)


@pytest.fixture(scope="module")
def sts_run(tmp_path_factory, data_dir, tiny_bert):
    root = tmp_path_factory.mktemp("sts-run")
    distill.run({
        "name": "tiny-sts-export", "task": "sts",
        "teacher": {"kind": "hf-embedding", "source": str(tiny_bert), "max_length": 32},
        "student": {"derive": {"layers": [1], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                               "calibration_batches": 1}, "max_length": 32},
        "data": {"format": "stsb", "path": str(data_dir / "stsbenchmark"), "train_limit": 64, "eval_limit": 32,
                 "test_limit": 64},
        "losses": [{"name": "cosine"}], "task_loss_weight": 1.0,
        "output_dir": str(root / "run"), "cache": {"dir": str(root / "cache")},
        "train": {"max_steps": 4, "batch_size": 16, "eval_every": 4, "checkpoint_every": 4},
        "evaluate": {"latency_repeats": 3, "throughput_repeats": 1, "warmup": 1, "batch_size": 16},
    })
    return root / "run"


def _snippets(card):
    return [block.split("```")[0] for block in card.split("```python\n")[1:]]


def _student_embedding(run, text):
    student = load_hf("hf-embedding", str(run / "student"), max_length=32)
    with torch.no_grad():
        return student({"text": [text]})["embedding"]


def test_model_card_is_written_with_the_report_and_its_code_runs(sts_run):
    card = (sts_run / "student" / "README.md").read_text()
    summary = json.loads((sts_run / "eval.json").read_text())
    assert f"`{summary['teacher']}`" in card and "stsbenchmark" in card
    assert "1 x cosine, 1 x task loss" in card and "4 steps" in card
    assert "| teacher | " in card and "| student | " in card and "| baseline | " in card
    student, teacher = (summary["models"][role]["spearman"] for role in ("student", "teacher"))
    # An untrained tiny teacher may score below 0: a share of it would mean nothing.
    told = f"keeps {100 * student / teacher:.1f}% of the teacher's spearman" if teacher > 0 else \
        f"The student scores {student:.2f} spearman"
    assert told in card
    assert "distill export" in card  # not exported yet: how to get an ONNX model
    (snippet,) = _snippets(card)
    scope = {}
    exec(snippet, scope)  # the plain-transformers recipe gives the student's embedding
    torch.testing.assert_close(scope["embedding"], _student_embedding(sts_run, "A man is playing a guitar."),
                               atol=1e-5, rtol=0)


def test_sts_export_updates_card_report_and_hf_copy(sts_run, tmp_path):
    assert main(["export", str(sts_run), "--format", "onnx", "--int8"]) == 0
    exports = json.loads((sts_run / "export" / "export.json").read_text())
    rows = {(r["model"], r["runtime"], r["weights"]): r for r in exports["deployment"]["rows"]}
    assert len(rows) == 6 and all("spearman" in r for r in rows.values())
    # (an untrained student: its cosines lie close together and differences of 1e-7 swap a few ranks)
    assert rows["student", "onnxruntime", "float32"]["spearman"] == pytest.approx(
        rows["student", "pytorch", "float32"]["spearman"], abs=0.5)
    assert rows["student", "onnxruntime", "int8"]["size_bytes"] < rows["student", "onnxruntime", "float32"][
        "size_bytes"]
    card = (sts_run / "student" / "README.md").read_text()
    assert "## Deployment (CPU)" in card
    transformers_code, onnx_code = _snippets(card)
    scope = {}
    exec(onnx_code, scope)  # onnxruntime and the tokenizer alone give the student's embedding
    torch.testing.assert_close(torch.from_numpy(scope["embedding"]),
                               _student_embedding(sts_run, "A man is playing a guitar."), atol=1e-5, rtol=0)
    assert "| student | onnxruntime | int8 |" in (sts_run / "report.md").read_text()
    # hf: the transformers folder, loadable without distill, without distill's own record.
    assert main(["export", str(sts_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "distill.json").exists() and (tmp_path / "hf" / "README.md").is_file()
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf"))
    assert model.config.hidden_size == 16


def test_export_refuses_a_folder_of_the_users_files_and_a_broken_student(sts_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    assert main(["export", str(sts_run), "--format", "hf", "--out", str(mine)]) == 2
    assert "not an earlier distill export" in capsys.readouterr().err
    assert (mine / "README.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["README.md"]
    # Its own earlier export may be written again.
    again = tmp_path / "again"
    assert main(["export", str(sts_run), "--format", "hf", "--out", str(again)]) == 0
    assert main(["export", str(sts_run), "--format", "hf", "--out", str(again)]) == 0
    # A student folder whose tokenizer is gone is refused, not exported with a 5-token stand-in.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sts_run, broken)
    for name in ("tokenizer.json", "vocab.txt"):
        (broken / "student" / name).unlink(missing_ok=True)
    assert main(["export", str(broken), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer" in capsys.readouterr().err

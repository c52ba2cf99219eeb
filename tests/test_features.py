"""Forward hooks on named layers, layer mapping, projectors and ``distill inspect``."""

import json

import pytest
import torch
from torch import nn

import distill
from distill.cli import main
from distill.config import LayerSpec, LossSpec
from distill.errors import ModelError
from distill.features import TappedAdapter, block_paths, map_layers, qkv_paths, resolve_layer
from distill.models.adapters import TorchClassifierAdapter
from distill.models.load import load_hf
from distill.models.zoo import ConvNet
from distill.pairing import prepare_pair


class Nested(nn.Module):
    """Blocks inside a ModuleList inside a Sequential, returning tuples like transformer blocks."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(d, d), nn.Tanh())

        def forward(self, x):
            return (self.inner(x) + x, "extra")

    def __init__(self, d=6, n=3):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.body = nn.Sequential(nn.Identity(), nn.ModuleList([self.Block(d) for _ in range(n)]))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.body[1]:
            h = block(h)[0]
        return self.head(h)


class Plain:
    def __init__(self, module):
        self.module = module

    def __call__(self, inputs):
        return {"logits": self.module(inputs["x"])}

    def save(self, folder):
        raise AssertionError("not used")


def test_hooks_capture_nested_modules_without_changing_outputs():
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(5, 4)
    plain = model(x)
    assert block_paths(model) == ["body.1.0", "body.1.1", "body.1.2"]
    assert resolve_layer(model, -1) == "body.1.2"
    tapped = TappedAdapter(Plain(model), {"layer:b1": "body.1.1", "layer:deep": "body.1.2.inner.0"})
    out = tapped({"x": x})
    assert torch.equal(out["logits"], plain)
    # A block's tuple output is reduced to its first tensor; the deep module is a plain Linear.
    h = model.stem(x)
    h1 = model.body[1][0](h)[0]
    assert torch.allclose(out["layer:b1"], model.body[1][1](h1)[0])
    assert out["layer:deep"].shape == (5, 6)
    tapped.remove()
    assert not model.body[1][1]._forward_hooks


def test_resolve_layer_errors_name_the_choices():
    model = Nested()
    with pytest.raises(ModelError, match="did you mean 'body.1.2'"):
        resolve_layer(model, "body.1.3")
    with pytest.raises(ModelError, match="3 blocks"):
        resolve_layer(model, 5)
    with pytest.raises(ModelError, match="no list of blocks"):
        resolve_layer(ConvNet(4), 0)


def test_layer_mapping_rules():
    assert map_layers([0, 1], None, "uniform", 6) == [(0, 2), (1, 5)]
    assert map_layers([0, 1, 2], None, "uniform", 12) == [(0, 3), (1, 7), (2, 11)]
    assert map_layers([0, 1], None, "last", 6) == [(0, 4), (1, 5)]
    assert map_layers(["a", "b"], ["x", "y"], "pairs", 0) == [("a", "x"), ("b", "y")]
    assert map_layers([0, 1], [3, 5, 7, 9], "uniform", 12) == [(0, 5), (1, 9)]
    with pytest.raises(ModelError, match="as many"):
        map_layers([0, 1], [2], "pairs", 6)
    with pytest.raises(ModelError, match="cannot be mapped"):
        map_layers([0, 1, 2], None, "uniform", 2)


def test_hooks_on_hf_model_hidden_states_and_qkv(tiny_bert):
    adapter = load_hf("hf-embedding", str(tiny_bert))
    assert block_paths(adapter.module) == ["encoder.layer.0", "encoder.layer.1"]
    q, k, v = qkv_paths(adapter.module, "encoder.layer.1")
    assert q.endswith("attention.self.query") and v.endswith("attention.self.value")
    tapped = TappedAdapter(adapter, {"layer:encoder.layer.1": "encoder.layer.1", "qkv:encoder.layer.0": (q, k, v)})
    texts = ["a man is playing a guitar", "a woman slices an onion into thin pieces today"]
    out = tapped({"text": texts})
    enc = adapter.tokenize(texts)
    reference = adapter.module(**enc, output_hidden_states=True).hidden_states
    # The last block's output is the model's last hidden state.
    assert torch.allclose(out["layer:encoder.layer.1"], reference[2], atol=1e-6)
    assert out["qkv:encoder.layer.0"].shape == (3, 2, enc["input_ids"].shape[1], 32)
    assert torch.equal(out["token_mask"], enc["attention_mask"])


def _pair(student_width, teacher_width, specs):
    torch.manual_seed(0)
    teacher = TorchClassifierAdapter(ConvNet(teacher_width), "convnet", {"width": teacher_width})
    student = TorchClassifierAdapter(ConvNet(student_width), "convnet", {"width": student_width})
    sample = {"inputs": {"x": torch.randn(4, 1, 28, 28)}, "labels": torch.arange(4)}

    class Task:
        def check_outputs(self, out, role):
            pass

    return prepare_pair([LossSpec(**s) for s in specs], "logits", student, teacher, sample, Task())


def test_hint_gets_a_1x1_conv_projector_kept_out_of_the_saved_student(tmp_path):
    pair = _pair(2, 4, [{"name": "hint", "layers": {"student": ["features.12"], "teacher": ["features.12"]}},
                        {"name": "sp", "layers": {"student": ["features.15"]}}])
    assert pair.terms[0].pairs == [("layer:features.12", "layer:features.12")]
    (proj,) = pair.projectors.values()
    assert isinstance(proj, nn.Conv2d) and proj.in_channels == 4 and proj.out_channels == 8
    assert isinstance(pair.teacher, TappedAdapter)
    pair.student.save(tmp_path / "s")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "s/model.safetensors"))
    assert set(saved) == set(ConvNet(2).state_dict())  # no projector, no hook state
    pair.release()
    assert not any(m._forward_hooks for m in pair.teacher.adapter.module.modules())


def test_recipe_chooses_the_projector_per_term():
    pooled = {"student": ["features.15"]}  # 4 against 8 channels
    default = _pair(2, 4, [{"name": "sp", "layers": pooled}])
    assert len(default.projectors) == 0  # relation losses compare N x N matrices: none by default
    forced = _pair(2, 4, [{"name": "sp", "layers": pooled, "projector": "always"}])
    (proj,) = forced.projectors.values()
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (4, 8)
    # Without one, a loss that needs equal widths says so before training.
    with pytest.raises(ModelError, match="mse"):
        _pair(2, 4, [{"name": "mse", "layers": pooled, "projector": "never"}])


def test_pairing_reports_mismatched_resolutions():
    with pytest.raises(ModelError, match="matching resolution"):
        _pair(2, 4, [{"name": "mse", "layers": {"student": ["features.5"], "teacher": ["features.12"]}}])
    with pytest.raises(ModelError, match=r"losses.0 \(hint\) layers: layer 'features.99'"):
        _pair(2, 4, [{"name": "hint", "layers": {"student": ["features.99"], "teacher": ["features.12"]}}])


def test_attention_losses_need_layers_and_get_heads_from_configs(tiny_bert):
    from distill.errors import RecipeError

    with pytest.raises(RecipeError, match="name them with layers"):
        _pair(2, 4, [{"name": "attention_relation"}])
    teacher = load_hf("hf-embedding", str(tiny_bert))
    student = load_hf("hf-embedding", str(tiny_bert))

    class Task:
        def check_outputs(self, out, role):
            pass

    specs = [LossSpec(name="attention_relation", layers=LayerSpec(student=[-1], teacher=[-1])),
             LossSpec(name="attention_kl", layers=LayerSpec(student=[0, 1], map="uniform"))]
    pair = prepare_pair(specs, "embedding", student, teacher, {"inputs": {"text": ["a b", "c d e"]}}, Task())
    assert pair.terms[0].loss.heads == 4 and pair.terms[0].pairs == [("qkv:encoder.layer.1", "qkv:encoder.layer.1")]
    assert [p[1] for p in pair.terms[1].pairs] == ["qkv:encoder.layer.0", "qkv:encoder.layer.1"]
    pair.release()


def test_feature_recipe_end_to_end_cached_equals_online(tmp_path, data_dir):
    torch.manual_seed(0)
    TorchClassifierAdapter(ConvNet(width=4), "convnet", {"width": 4}).save(tmp_path / "teacher")
    spec = {
        "name": "tiny-features", "task": "classification",
        "teacher": {"kind": "torch", "source": str(tmp_path / "teacher")},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(data_dir / "fashion-mnist"),
                 "train_limit": 128, "eval_limit": 32, "test_limit": 64},
        "losses": [{"name": "kd", "weight": 0.5},
                   {"name": "hint", "weight": 1.0, "layers": {"student": ["features.12"], "teacher": ["features.12"]},
                    "ramp_steps": 4},
                   {"name": "attention_transfer", "weight": 100.0,
                    "layers": {"student": ["features.5", "features.12"], "teacher": ["features.5", "features.12"]}},
                   {"name": "rkd_distance", "weight": 1.0, "layers": {"student": ["features.15"]}, "start_step": 2},
                   {"name": "crd", "weight": 0.1, "layers": {"student": ["features.15"]}, "params": {"negatives": 16}}],
        "task_loss_weight": 0.5, "output_dir": str(tmp_path / "run"), "baseline": False,
        "train": {"max_steps": 6, "batch_size": 32, "eval_every": 6, "checkpoint_every": 6},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
    }
    distill.run(spec)

    def losses(run):
        lines = (tmp_path / run / "train/student/metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [r for r in records if "loss" in r]

    steps = losses("run")
    assert {"kd_loss", "hint_loss", "attention_transfer_loss", "rkd_distance_loss", "crd_loss"} <= set(steps[0])
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run/student/model.safetensors"))) == set(ConvNet(2).state_dict())
    assert steps[0]["rkd_distance_loss"] == 0.0 and steps[1]["rkd_distance_loss"] == 0.0
    assert steps[2]["rkd_distance_loss"] > 0
    # The teacher's layers were cached next to its logits...
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert {"logits.npy", "layer_features.12.npy", "layer_features.5.npy", "layer_features.15.npy"} <= {
        p.name for p in cache.iterdir()}
    # ...and training from them gives what the online teacher gives (a cache too large for
    # cache.max_gb is not written: the teacher runs online).
    tiny_cache = {"dir": str(tmp_path / "c2"), "max_gb": 1e-6}
    distill.run({**spec, "output_dir": str(tmp_path / "online"), "cache": tiny_cache})
    assert not (tmp_path / "c2").exists()
    online = losses("online")
    for a, b in zip(steps, online, strict=True):
        for key in ("kd_loss", "hint_loss", "attention_transfer_loss", "rkd_distance_loss", "crd_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_inspect_command_lists_layers(capsys):
    assert main(["inspect", "-", "--arch", "convnet"]) == 0
    out = capsys.readouterr().out
    assert "features.12" in out and "1x64x14x14" not in out and "2x64x14x14" in out
    assert main(["inspect", "-", "--arch", "convnet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["-"]
    assert {"name": "head.1", "type": "Linear", "params": 650, "shape": [2, 10], "block": None} in rows


def test_inspect_hf_model_marks_blocks(tiny_bert, capsys):
    assert main(["inspect", str(tiny_bert), "--kind", "hf-embedding"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.1.attention.self.query" in out
    assert "2 blocks" in out


def test_inspect_errors_are_clear(capsys):
    assert main(["inspect", "missing.yaml"]) == 2
    assert "recipe file not found" in capsys.readouterr().err

"""A teacher of several models (``teacher.members``): joint outputs, recipe checks, a run end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

import distill
from distill.config import parse_recipe
from distill.errors import ModelError, RecipeError
from distill.models.ensemble import EnsembleAdapter
from distill.models.load import load_model
from distill.specs import ModelSpec


def _sibling(tmp_path, tiny_bert, seed=1, width=24):
    """Another small BERT on the tiny teacher's vocabulary, of another width."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / f"sibling-{seed}"
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len((tiny_bert / "vocab.txt").read_text().split()), hidden_size=width,
                         num_hidden_layers=1, num_attention_heads=3, intermediate_size=48,
                         max_position_embeddings=64)).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def test_joint_embedding_cosines_are_the_weighted_mean_of_the_members(tmp_path, tiny_bert):
    members = [{"source": str(tiny_bert)}, {"source": str(_sibling(tmp_path, tiny_bert))}]
    spec = ModelSpec(kind="hf-embedding", members=members, weights=[1, 3])
    teacher = load_model(spec, "hf-embedding")
    assert isinstance(teacher, EnsembleAdapter) and teacher.weights == [0.25, 0.75]
    texts = {"text": ["a man is playing a guitar", "a woman is slicing an onion", "the cat sat"]}
    with torch.no_grad():
        joint = teacher(texts)["embedding"]
        parts = [F.normalize(m(texts)["embedding"], dim=-1) for m in teacher.members]
    assert joint.shape == (3, 32 + 24) and set(teacher(texts)) == {"embedding"}  # token masks differ: left out
    torch.testing.assert_close(joint.norm(dim=-1), torch.ones(3))
    expected = 0.25 * parts[0] @ parts[0].T + 0.75 * parts[1] @ parts[1].T
    torch.testing.assert_close(joint @ joint.T, expected)
    teacher.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["member-0", "member-1"]


class _Logits:
    outputs = ("logits",)

    def __init__(self, value):
        self.value = value
        self.module = torch.nn.Linear(1, 1)

    def __call__(self, inputs):
        return {"logits": self.value}


def test_members_logits_are_averaged_with_their_weights_and_must_share_the_classes():
    a, b = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[3.0, 2.0, -1.0]])
    joint = EnsembleAdapter([_Logits(a), _Logits(b)], [1, 1])({})
    torch.testing.assert_close(joint["logits"], (a + b) / 2)
    with pytest.raises(ModelError, match="logits of different shapes"):
        EnsembleAdapter([_Logits(a), _Logits(torch.zeros(1, 4))])({})
    with pytest.raises(ModelError, match="one positive weight per member"):
        EnsembleAdapter([_Logits(a), _Logits(b)], [1, 0])


def _recipe(tmp_path, data_dir, tiny_bert, **teacher):
    lines = [s for s in (data_dir / "brown" / "brown-sentences.txt").read_text().splitlines()[:300] if s.strip()]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    return {
        "name": "tiny-members", "task": "embedding", "seed": 0,
        "teacher": {"kind": "hf-embedding", "max_length": 32, **teacher},
        "student": {"derive": {"layers": [0], "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"format": "text", "path": str(tmp_path / "corpus.txt"), "eval_fraction": 0.1},
        "losses": [{"name": "cosine", "projector": "pca"}],
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "eval_every": 10, "checkpoint_every": 10},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 32},
        "output_dir": str(tmp_path / "run"),
    }


def test_a_label_free_student_of_two_teachers_end_to_end(tmp_path, data_dir, tiny_bert):
    sibling = _sibling(tmp_path, tiny_bert)
    recipe = _recipe(tmp_path, data_dir, tiny_bert, members=[{"source": str(tiny_bert)}, {"source": str(sibling)}])
    result = distill.run(recipe)
    run = tmp_path / "run"
    # The student is cut from the first member (width 32 down to 16), and learns the joint 56-d space through PCA.
    from transformers import BertModel

    assert BertModel.from_pretrained(run / "student").config.hidden_size == 16
    assert result.models["teacher"]["agreement"] == pytest.approx(100.0)
    assert 0 < result.models["student"]["agreement"] <= 100
    summary = json.loads((run / "eval.json").read_text())
    assert summary["teacher"] == f"{tiny_bert} + {sibling}"
    # The teacher's rows are cached under an identity that includes every member's settings.
    again = _recipe(tmp_path, data_dir, tiny_bert, members=[{"source": str(tiny_bert)},
                                                            {"source": str(sibling), "max_length": 16}])
    distill.run({**again, "output_dir": str(tmp_path / "run2"), "baseline": False})
    assert len([p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]) == 2


def test_recipes_with_members_are_checked(tmp_path, data_dir, tiny_bert):
    base = _recipe(tmp_path, data_dir, tiny_bert, members=[{"source": "a"}, {"source": "b"}])
    assert len(parse_recipe(base).teacher.members) == 2
    # Members read texts as the teacher says unless they say otherwise.
    members = [{"source": "a"}, {"source": "b", "max_length": 16}]
    teacher = parse_recipe({**base, "teacher": {"kind": "hf-embedding", "max_length": 24, "pooling": "cls",
                                                "members": members}}).teacher
    assert [(m.max_length, m.pooling) for m in teacher.members] == [(24, "cls"), (16, "cls")]
    cases = {
        "give two or more members": {"members": [{"source": "a"}]},
        "no source or arch of the teacher's own": {"members": [{"source": "a"}, {"source": "b"}], "source": "c"},
        "one positive weight per member": {"members": [{"source": "a"}, {"source": "b"}], "weights": [1, -1]},
        "every member is of the teacher's kind": {"members": [{"source": "a"}, {"source": "b", "kind": "torch"}]},
    }
    for message, teacher in cases.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, "teacher": {"kind": "hf-embedding", **teacher}})
    with pytest.raises(RecipeError, match="taps the teacher's layers"):
        parse_recipe({**base, "losses": [{"name": "mse", "layers": {"student": [0], "teacher": [1]}}]})
    with pytest.raises(RecipeError, match="only the teacher can be several models"):
        parse_recipe({**base, "student": {"members": [{"source": "a"}, {"source": "b"}]}})


def test_plan_names_the_member_to_plan_with(tmp_path, data_dir, tiny_bert):
    import yaml

    from distill.plan import Target, plan

    path = tmp_path / "members.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, data_dir, tiny_bert,
                                           members=[{"source": str(tiny_bert)}, {"source": str(tiny_bert)}])))
    with pytest.raises(RecipeError, match="plan with it as the teacher"):
        plan(path, Target())

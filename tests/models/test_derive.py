import pytest
import torch
from transformers import AutoModel

from distill.config import DeriveSpec
from distill.errors import RecipeError
from distill.models.derive import count_parameters
from distill.models.load import load_hf
from distill.models.student import derive_student

TEXTS = ["a man is playing a guitar .", "a woman is slicing an onion .", "the cat sits on the mat"]


@pytest.fixture()
def teacher(tiny_bert):
    adapter = load_hf("hf-embedding", str(tiny_bert))
    adapter.module.eval()
    return adapter


def test_keeping_all_layers_and_width_reproduces_the_teacher(teacher):
    student = derive_student(teacher, DeriveSpec(), [{"text": TEXTS}])
    student.module.eval()
    torch.testing.assert_close(student({"text": TEXTS})["embedding"], teacher({"text": TEXTS})["embedding"])


def test_layer_subset_copies_chosen_layers(teacher):
    student = derive_student(teacher, DeriveSpec(layers=[1]), [])
    assert student.module.config.num_hidden_layers == 1
    t_state, s_state = teacher.module.state_dict(), student.module.state_dict()
    for name, value in s_state.items():
        torch.testing.assert_close(value, t_state[name.replace("layer.0.", "layer.1.")])


def test_narrower_student_slices_teacher_weights(teacher):
    spec = DeriveSpec(layers=[0], hidden_size=16, num_attention_heads=2, intermediate_size=24)
    student = derive_student(teacher, spec, [{"text": TEXTS}])
    config = student.module.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (16, 2, 24)
    assert count_parameters(student.module) < count_parameters(teacher.module) / 2
    out = student({"text": TEXTS})["embedding"]
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    # Every kept embedding column is one of the teacher's columns.
    t_emb = teacher.module.embeddings.word_embeddings.weight
    s_emb = student.module.embeddings.word_embeddings.weight
    for column in s_emb.T:
        assert any(torch.equal(column, c) for c in t_emb.T)


@pytest.mark.parametrize("spec, match", [
    (DeriveSpec(layers=[0, 7]), "indices in 0..1"),
    (DeriveSpec(layers=[0, 0]), "repeats"),
    (DeriveSpec(hidden_size=20), "head size"),
    (DeriveSpec(intermediate_size=999), "1..64"),
])
def test_bad_derive_specs(teacher, spec, match):
    with pytest.raises(RecipeError, match=match):
        derive_student(teacher, spec, [{"text": TEXTS}])


def test_hf_save_load_round_trip(teacher, tmp_path):
    student = derive_student(teacher, DeriveSpec(layers=[0], hidden_size=16, num_attention_heads=2), [{"text": TEXTS}])
    student.module.eval()
    student.save(tmp_path / "student")
    names = {p.name for p in (tmp_path / "student").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling"} <= names
    # Plain transformers, no distill: load and mean-pool by hand.
    from transformers import AutoTokenizer

    model = AutoModel.from_pretrained(tmp_path / "student").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(pooled, student({"text": TEXTS})["embedding"])


def test_sequence_classifier_adapter_and_derivation(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).save_pretrained(tmp_path / "clf")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "clf")
    teacher = load_hf("hf-classifier", str(tmp_path / "clf"))
    assert teacher({"text": TEXTS})["logits"].shape == (3, 3)
    student = derive_student(teacher, DeriveSpec(layers=[0], hidden_size=16, num_attention_heads=2), [{"text": TEXTS}])
    assert student({"text": TEXTS})["logits"].shape == (3, 3)
    student.save(tmp_path / "student")
    reloaded = load_hf("hf-classifier", str(tmp_path / "student"))
    student.module.eval()
    reloaded.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded({"text": TEXTS})["logits"], student({"text": TEXTS})["logits"])

"""Static token-embedding students and vocabulary pruning, on a tiny BERT saved by the tests."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distill.config import DeriveSpec
from distill.data import read_stsb
from distill.models.load import load_hf
from distill.models.static import derive_static, load_static, prune_vocabulary, vocabulary_of
from distill.models.student import derive_student


@pytest.fixture()
def texts(data_dir):
    pairs = read_stsb(data_dir / "stsbenchmark", "train", limit=200)
    return pairs.first + pairs.second


def test_pruned_tokenizer_maps_every_kept_token_and_splits_the_rest(tiny_bert, texts):
    teacher = load_hf("hf-embedding", str(tiny_bert))
    tok = teacher.tokenizer
    keep = vocabulary_of(tok, texts[:100])
    assert len(keep) < len(tok.get_vocab())
    assert set(tok.all_special_ids) <= set(keep)
    pruned = prune_vocabulary(tok, keep)
    assert len(pruned.get_vocab()) == len(keep)
    # On the texts it was pruned for, the new ids are the old ids renumbered.
    for text in texts[:100]:
        old = tok(text)["input_ids"]
        assert pruned(text)["input_ids"] == [keep.index(i) for i in old]
    # Specials keep their role; an unseen word becomes the unknown token or one-character pieces.
    assert pruned.convert_ids_to_tokens(pruned("x")["input_ids"])[0] == "[CLS]"
    assert pruned.cls_token_id == keep.index(tok.cls_token_id)


def test_static_student_starts_from_pca_of_teacher_token_embeddings(tiny_bert, texts, tmp_path):
    teacher = load_hf("hf-embedding", str(tiny_bert))
    student = derive_static(teacher, dim=8)
    table = student.module.embeddings.weight
    assert table.shape == (len(teacher.tokenizer.get_vocab()), 8)
    # PCA keeps the teacher's token geometry as far as 8 dimensions allow: nearest neighbours agree.
    ids = torch.arange(5, 50)
    with torch.no_grad():
        full = teacher.module(input_ids=torch.stack([torch.full_like(ids, 2), ids, torch.full_like(ids, 3)], 1)
                              ).last_hidden_state.mean(1)
    full = full - full.mean(0)
    cos_t = F.normalize(full, dim=-1) @ F.normalize(full, dim=-1).T
    cos_s = F.normalize(table[ids], dim=-1) @ F.normalize(table[ids], dim=-1).T
    assert torch.corrcoef(torch.stack([cos_t.flatten(), cos_s.flatten()]))[0, 1] > 0.5
    out = student({"text": texts[:4]})["embedding"]
    assert out.shape == (4, 8) and torch.allclose(out.norm(dim=-1), torch.ones(4))
    # Saved in Model2Vec's layout, the table in float16, and loaded back with the same outputs
    # up to float16 rounding.
    student.save(tmp_path / "s")
    stored = load_file(str(tmp_path / "s/model.safetensors"))
    assert set(stored) == {"embeddings"} and stored["embeddings"].dtype == torch.float16
    assert json.loads((tmp_path / "s/config.json").read_text())["model_type"] == "model2vec"
    again = load_static(str(tmp_path / "s"))
    assert again.module.embeddings.weight.dtype == torch.float32
    assert torch.allclose(again({"text": texts[:4]})["embedding"], out, atol=2e-3)


def test_static_student_with_pruned_vocabulary(tiny_bert, texts):
    teacher = load_hf("hf-embedding", str(tiny_bert))
    keep = vocabulary_of(teacher.tokenizer, texts)
    small = derive_static(teacher, dim=32, keep=keep)
    table = small.module.embeddings.weight.detach()
    assert table.shape == (len(keep), 32)
    # At full width PCA only rotates: the kept tokens' centred teacher vectors keep their geometry.
    ids = torch.tensor(keep)
    with torch.no_grad():
        full = teacher.module(input_ids=torch.stack([torch.full_like(ids, 2), ids, torch.full_like(ids, 3)], 1)
                              ).last_hidden_state.mean(1)
    full = full - full.mean(0)
    assert torch.allclose(table @ table.T, full @ full.T, atol=1e-3)
    # A sentence is the mean of its tokens' rows, looked up through the pruned tokenizer.
    text = texts[7]
    rows = [keep.index(i) for i in teacher.tokenizer(text, add_special_tokens=False)["input_ids"]]
    expected = F.normalize(table[rows].mean(0), dim=0)
    assert torch.allclose(small({"text": [text]})["embedding"][0], expected, atol=1e-6)


def test_derived_transformer_student_with_pruned_vocabulary(tiny_bert, texts, tmp_path):
    teacher = load_hf("hf-embedding", str(tiny_bert))
    keep = vocabulary_of(teacher.tokenizer, texts)
    student = derive_student(teacher, DeriveSpec(layers=[1]), [], keep)
    assert student.module.get_input_embeddings().weight.shape[0] == len(keep)
    assert student.module.config.vocab_size == len(keep)
    # Same token vectors as the one-layer student with the full vocabulary: identical outputs.
    unpruned = derive_student(teacher, DeriveSpec(layers=[1]), [])
    student.module.eval()
    unpruned.module.eval()
    assert torch.allclose(student({"text": texts[:6]})["embedding"], unpruned({"text": texts[:6]})["embedding"],
                          atol=1e-6)
    student.save(tmp_path / "s")
    reloaded = load_hf("hf-embedding", str(tmp_path / "s"))
    assert torch.allclose(reloaded({"text": texts[:6]})["embedding"], unpruned({"text": texts[:6]})["embedding"],
                          atol=1e-6)


def test_sif_weighting_shrinks_frequent_tokens(tiny_bert, texts):
    teacher = load_hf("hf-embedding", str(tiny_bert))
    plain = derive_static(teacher, dim=8, sif=None).module.embeddings.weight.detach()
    weighted = derive_static(teacher, dim=8, texts=texts, sif=1e-3).module.embeddings.weight.detach()
    ratio = weighted.norm(dim=1) / plain.norm(dim=1)
    counts = torch.zeros(len(ratio))
    for row in teacher.tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for t in row:
            counts[t] += 1
    p = counts / counts.sum()
    assert torch.allclose(ratio, 1e-3 / (1e-3 + p), atol=1e-5)
    assert ratio[counts.argmax()] < 0.1 and ratio[counts == 0].eq(1).all()


def test_a_derived_static_student_trains_against_the_teacher_on_its_own_axes(tiny_bert, texts):
    from distill.pairing import TeacherMap, fit_teacher_maps

    teacher = load_hf("hf-embedding", str(tiny_bert))
    student = derive_static(teacher, dim=8, texts=texts)
    with torch.no_grad():
        s_out = student({"text": texts[:64]})["embedding"]
        t_out = teacher({"text": texts[:64]})["embedding"]
    own, fitted = nn.ModuleDict({"teacher_0_0": TeacherMap(t_out.shape[1], 8)}), TeacherMap(t_out.shape[1], 8)
    fit_teacher_maps(own, {(0, 0): t_out}, student.teacher_basis)
    fitted.fit(t_out)
    assert torch.equal(own["teacher_0_0"].components, student.teacher_basis)
    assert 0 < float(own["teacher_0_0"].kept) <= float(fitted.kept) <= 1
    # The student's table is expressed on those axes, so it starts near its targets; the
    # corpus' own principal axes are a rotation it would first have to learn.
    def gap(t_map):
        return 1 - F.cosine_similarity(s_out, t_map(t_out)).mean()
    assert gap(own["teacher_0_0"]) < gap(fitted)

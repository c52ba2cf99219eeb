"""cross_vocab_kd: distillation between causal LMs whose tokenizers differ."""

from __future__ import annotations

import pytest
import torch

import distill
from distill.losses import CrossVocabKDLoss
from distill.losses.cross_vocab import PieceTable, pair_positions, sorted_l1
from tests.conftest import _gpt, tiny_lm_recipe

# Text "ab cd": the teacher reads [ab][ cd], the student [a][b][ c][d].
# Teacher vocabulary: 0 "ab", 1 " cd", 2 " ce", 3 "x"; student: 0 "a", 1 "b", 2 " c", 3 "d", 4 "e", 5 "x".
PIECES = [[0, 1], [2, 3], [2, 4], [5]]
S_ENDS, S_NEXT, S_MASK = torch.tensor([[1, 2, 4, 5]]), torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 1, 1, 0]])
T_ENDS, T_MASK = torch.tensor([[2, 5]]), torch.tensor([[1, 0]])


def test_student_positions_pair_with_the_teacher_token_they_stand_in() -> None:
    table = PieceTable(PIECES)
    s_index, t_index, prefixes = pair_positions(S_ENDS, S_MASK, S_NEXT, T_ENDS, T_MASK, table)
    # after "a" the teacher has no position (its first token has not ended); after "ab" both
    # have read the same text; after "ab c" the student has read the piece " c" of " cd"
    assert s_index.tolist() == [1, 2] and t_index.tolist() == [0, 0] and prefixes == [(), (2,)]
    # without the table only the positions where both tokenizations end together
    assert pair_positions(S_ENDS, S_MASK, S_NEXT, T_ENDS, T_MASK)[2] == [()]
    # a prefix no teacher token starts with is left out
    unknown = pair_positions(S_ENDS, S_MASK, torch.tensor([[1, 4, 3, 0]]), T_ENDS, T_MASK, table)
    assert unknown[2] == [()]
    # rows are offset by their width; several byte tokens ending at one character: the last counts
    two = pair_positions(torch.tensor([[1, 1, 2], [2, 3, -1]]), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long),
                         torch.tensor([[1, 2], [2, 3]]), torch.ones(2, 2))
    assert two[0].tolist() == [1, 2, 3, 4] and two[1].tolist() == [0, 1, 2, 3]


def test_teacher_probabilities_are_carried_along_the_students_pieces() -> None:
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    q = PieceTable(PIECES).carry(p, [(), (2,)], 6)
    # before " cd": " cd" and " ce" both begin with " c"; inside it: their second pieces
    assert torch.allclose(q, torch.tensor([[0.1, 0.0, 0.5, 0.0, 0.0, 0.4], [0.0, 0.0, 0.0, 0.4, 0.6, 0.0]]))


def test_sorted_l1_ignores_which_token_is_which_and_pads_the_shorter_vocabulary() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert sorted_l1(p, p[:, [2, 0, 1]]).item() == pytest.approx(0.0)
    q = torch.tensor([[0.5, 0.5]])
    # sorted: (0.7, 0.2, 0.1) against (0.5, 0.5, 0): 0.2 + 0.3 + 0.1
    assert sorted_l1(p, q).item() == pytest.approx(0.6)
    assert sorted_l1(q, p).item() == pytest.approx(0.6)


def test_loss_is_the_mean_kl_to_the_carried_distribution_plus_uld_where_both_ended() -> None:
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(1, 4, 4, generator=g, requires_grad=True)
    t_hidden = torch.randn(1, 2, 8, generator=g)
    s_head, t_head = torch.randn(6, 4, generator=g), torch.randn(4, 8, generator=g)
    extra = {"mask": S_MASK, "student_head": s_head, "teacher_head": t_head, "student_ends": S_ENDS,
             "student_next": S_NEXT, "teacher_ends": T_ENDS, "teacher_mask": T_MASK}
    loss = CrossVocabKDLoss(temperature=2.0, mapped_weight=0.5, uld_weight=1.0)
    loss.set_pieces(PIECES)
    value = loss(s_hidden, t_hidden, **extra)
    # By hand: student positions 1 and 2 both against teacher position 0.
    p = (t_hidden[0, 0] @ t_head.T / 2).softmax(-1)
    targets = torch.stack([torch.stack([p[0], p.new_zeros(()), p[1] + p[2], p.new_zeros(()), p.new_zeros(()), p[3]]),
                           torch.stack([p.new_zeros(())] * 3 + [p[1], p[2], p.new_zeros(())]) / (p[1] + p[2])])
    s_logp = (s_hidden[0, 1:3] @ s_head.T / 2).log_softmax(-1)
    kl = (targets * (targets.clamp_min(1e-30).log() - s_logp)).sum(-1)
    expected = (0.5 * kl.sum() + sorted_l1(s_logp[:1].exp(), p[None]).sum()) / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # Chunked (recomputed in the backward pass) equals one chunk, gradient included.
    (grad,) = torch.autograd.grad(value, s_hidden)
    (expected_grad,) = torch.autograd.grad(expected, s_hidden)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    chunked = CrossVocabKDLoss(temperature=2.0, mapped_weight=0.5, uld_weight=1.0, chunk_size=1)
    chunked.set_pieces(PIECES)
    value2 = chunked(s_hidden, t_hidden, **extra)
    assert value2.item() == pytest.approx(value.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(value2, s_hidden)[0], grad, atol=1e-6)


def test_identical_models_give_zero_and_no_pairs_give_zero_with_a_graph() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 8, generator=g, requires_grad=True)
    head = torch.randn(9, 8, generator=g)
    ends = torch.tensor([[1, 2, 4, 6]])
    loss = CrossVocabKDLoss(uld_weight=1.0)
    loss.set_pieces([[i] for i in range(9)])
    common = {"mask": torch.ones(1, 4), "teacher_mask": torch.ones(1, 4), "student_head": head,
              "teacher_head": head, "student_next": torch.zeros(1, 4, dtype=torch.long)}
    assert loss(hidden, hidden.detach(), student_ends=ends, teacher_ends=ends, **common).item() == pytest.approx(
        0.0, abs=1e-6)
    none = loss(hidden, hidden.detach(), student_ends=ends, teacher_ends=ends + 100, **common)
    assert none.item() == 0.0 and none.requires_grad


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="not both 0"):
        CrossVocabKDLoss(uld_weight=0.0, mapped_weight=0.0)
    with pytest.raises(ValueError, match="temperature"):
        CrossVocabKDLoss(temperature=0.0)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory: pytest.TempPathFactory, data_dir) -> tuple:  # noqa: ANN001
    """A GPT student whose BPE (260 tokens, trained on the end of the text) differs from the teacher's."""
    from tests.conftest import bpe_tokenizer

    tokenizer = bpe_tokenizer((data_dir / "tinyshakespeare" / "input.txt").read_text()[-150_000:], 260)
    return _gpt(tmp_path_factory.mktemp("other") / "student", tokenizer, 1, 16, 3)


def test_each_teacher_token_is_split_into_the_students_tokens_for_its_text(gpt_pair, other_student) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from distill.models.causal_lm import token_pieces

    s_tok, t_tok = AutoTokenizer.from_pretrained(other_student), AutoTokenizer.from_pretrained(gpt_pair[0])
    pieces = token_pieces(s_tok, t_tok)
    assert len(pieces) == len(t_tok) and pieces[t_tok.eos_token_id] == []  # a special token has no text
    for t_id, seq in enumerate(pieces):
        if seq:
            assert s_tok.decode(seq) == t_tok.decode([t_id])
    # all but the end-of-text token and the 128 non-ASCII byte pieces
    assert sum(1 for seq in pieces if seq) == len(t_tok) - 1 - 128
    assert any(len(seq) > 1 for seq in pieces)  # the student splits some teacher tokens


def test_a_student_with_another_tokenizer_trains_on_cross_vocab_kd(tmp_path, data_dir, gpt_pair, other_student) -> None:  # noqa: ANN001
    recipe = tiny_lm_recipe(tmp_path, data_dir, gpt_pair[0], other_student,
                            losses=[{"name": "cross_vocab_kd", "params": {"chunk_size": 50}}], baseline=False)
    done = distill.run(recipe)
    lines = [line for line in (done.folder / "train" / "student" / "metrics.jsonl").read_text().splitlines()
             if '"cross_vocab_kd_loss"' in line]
    assert len(lines) == 6
    assert done.models["student"]["perplexity"] > 1


def test_settings_cross_vocab_kd_cannot_serve_are_refused(tmp_path, data_dir, gpt_pair, other_student) -> None:  # noqa: ANN001
    from distill.config import parse_recipe

    base = tiny_lm_recipe(tmp_path, data_dir, gpt_pair[0], other_student, losses=[{"name": "cross_vocab_kd"}])
    with pytest.raises(distill.DistillError, match="on_policy: cross_vocab_kd pairs positions"):
        parse_recipe({**base, "on_policy": {"fraction": 0.5},
                      "losses": [{"name": "token_kd"}, {"name": "cross_vocab_kd"}]})
    with pytest.raises(distill.DistillError, match="cache.top_k: null"):
        parse_recipe({**base, "cache": {"enabled": True, "top_k": 8}})


def test_after_training_neither_model_reports_token_ends(tmp_path, data_dir, gpt_pair, other_student) -> None:  # noqa: ANN001
    from distill.models.load import load_hf
    from distill.pairing import prepare_pair
    from distill.tasks import build_task

    recipe = distill.config.parse_recipe(tiny_lm_recipe(tmp_path, data_dir, gpt_pair[0], other_student,
                                                        losses=[{"name": "cross_vocab_kd"}]))
    task = build_task(recipe.task, recipe.data)
    student, teacher = (load_hf("hf-causal-lm", str(p), max_length=64) for p in (other_student, gpt_pair[0]))
    pair = prepare_pair(recipe.losses, task.output, student, teacher, task.train.batch(range(4)), task)
    assert "token_ends" in pair.student(task.train.batch(range(2))["inputs"])
    pair.release()  # evaluation and timing then run the models as they are
    for model in (student, teacher):
        assert "token_ends" not in model(task.train.batch(range(2))["inputs"])

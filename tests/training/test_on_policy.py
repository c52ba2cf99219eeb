"""On-policy distillation (GKD): batches the student writes itself, scored by the teacher.

Tiny GPT-2 teacher and student (conftest ``gpt_pair``) sharing a BPE tokenizer.
"""

import json

import pytest
import torch

import distill
from distill.config import OnPolicySpec, parse_recipe
from distill.engine import on_policy_turn
from distill.errors import RecipeError
from distill.losses.tokens import TokenKDLoss
from distill.models.load import load_hf

transformers = pytest.importorskip("transformers")

from conftest import killed_then_resumed, tiny_lm_recipe  # noqa: E402


def _texts(data_dir, n=4, size=200):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    return [text[i * size:(i + 1) * size] for i in range(n)]


def test_continuations_follow_each_prompt_as_if_alone(gpt_pair, data_dir):
    _, student_dir = gpt_pair
    student = load_hf("hf-causal-lm", str(student_dir), max_length=64)
    student.module.train()
    texts = _texts(data_dir)
    torch.manual_seed(0)
    # A near-zero temperature samples the most likely token: each row of the left-padded batch
    # must continue exactly as its prompt does on its own, unpadded.
    out = student.continue_prompts({"text": texts}, max_new_tokens=6, temperature=1e-4)
    assert student.module.training, "the student's training mode is restored"
    ids = student.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    for row, prompt, completion in zip(ids, out["prompt_ids"], out["completion_ids"], strict=True):
        assert prompt == row[: len(row) // 2]
        assert 1 <= len(completion) <= 6
        model = student.module.eval()
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(completion),
                               pad_token_id=student.tokenizer.pad_token_id)
        assert alone[0, len(prompt):].tolist() == completion
    # What the losses read: the loss mask covers the student's tokens and nothing else.
    enc = student.encode(out)
    for i, (prompt, completion) in enumerate(zip(out["prompt_ids"], out["completion_ids"], strict=True)):
        n = len(prompt) + len(completion)
        assert enc["input_ids"][i, :n].tolist() == prompt + completion
        assert enc["loss_mask"][i].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
            enc["loss_mask"].shape[1] - n)


def test_continuations_of_prompt_records_and_room_left(gpt_pair):
    _, student_dir = gpt_pair
    student = load_hf("hf-causal-lm", str(student_dir), max_length=24)
    inputs = {"prompt": ["ROMEO:\nWhat light through yonder", "KING:"], "completion": ["window breaks", "Speak."]}
    out = student.continue_prompts(inputs, max_new_tokens=100, temperature=1.0, prompt_tokens=3)
    prompts = [student.tokenizer(p)["input_ids"] for p in inputs["prompt"]]
    assert out["prompt_ids"] == prompts  # the records' own prompts, not the first 3 tokens
    # No row outgrows the model's max_length.
    assert all(len(p) + len(c) <= 24 for p, c in zip(out["prompt_ids"], out["completion_ids"], strict=True))
    # An end-of-text token closes a completion: nothing follows it.
    eos = student.tokenizer.eos_token_id
    assert all(eos not in c[:-1] for c in out["completion_ids"])


def test_prompt_tokens_sets_the_prompt_of_plain_text(gpt_pair, data_dir):
    _, student_dir = gpt_pair
    student = load_hf("hf-causal-lm", str(student_dir), max_length=64)
    out = student.continue_prompts({"text": _texts(data_dir, 2)}, max_new_tokens=4, prompt_tokens=5)
    assert [len(p) for p in out["prompt_ids"]] == [5, 5]


def test_on_policy_loss_is_the_divergence_on_the_students_tokens_only(gpt_pair, data_dir):
    teacher_dir, student_dir = gpt_pair
    teacher = load_hf("hf-causal-lm", str(teacher_dir), max_length=64)
    student = load_hf("hf-causal-lm", str(student_dir), max_length=64)
    teacher.module.eval()
    student.module.eval()
    torch.manual_seed(1)
    batch = student.continue_prompts({"text": _texts(data_dir)}, max_new_tokens=8)
    s_out, t_out = student(batch), teacher(batch)
    loss = TokenKDLoss(kind="forward_kl", chunk_size=7)
    ours = loss(s_out["hidden"], t_out["hidden"], student_head=s_out["head"], teacher_head=t_out["head"],
                mask=s_out["token_mask"])
    # Reference: full logits from the models themselves, forward KL at each completion token.
    enc = student.encode(batch)
    s_logp = student.module(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.log_softmax(-1)
    t_logp = teacher.module(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[:, :-1]
    mask = enc["loss_mask"][:, 1:].bool()
    assert int(mask.sum()) == sum(len(c) for c in batch["completion_ids"])
    assert torch.allclose(ours, kl[mask].mean(), rtol=1e-5, atol=1e-7)


def test_on_policy_turns_are_reproducible_and_take_their_share():
    turns = [on_policy_turn(3, e, b, 0.3) for e in range(4) for b in range(500)]
    assert turns == [on_policy_turn(3, e, b, 0.3) for e in range(4) for b in range(500)]
    assert 0.27 < sum(turns) / len(turns) < 0.33
    assert turns != [on_policy_turn(4, e, b, 0.3) for e in range(4) for b in range(500)]
    assert not any(on_policy_turn(0, 0, b, 0.0) for b in range(100))
    assert all(on_policy_turn(0, 0, b, 1.0) for b in range(100))


def test_on_policy_run_end_to_end(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    spec = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False, seed=1,
                     on_policy={"fraction": 0.5, "max_new_tokens": 8})
    result = distill.run(spec)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "train/student/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    expected = [on_policy_turn(1, 0, b, 0.5) for b in range(6)]  # 64 examples, batch 8: one epoch
    assert [bool(r["on_policy"]) for r in steps] == expected and any(expected) and not all(expected)
    # The task loss is left out of batches the student wrote; the teacher's divergence is not.
    for r in steps:
        assert ("task_loss" in r) != bool(r["on_policy"]) and "token_kd_loss" in r
    done = json.loads((run / "student/distill.json").read_text())
    assert done["on_policy_batches"] == sum(expected)
    assert "on-policy: 0.5 of batches" in (run / "report.md").read_text()
    assert torch.isfinite(torch.tensor(result.models["student"]["perplexity"]))


def test_on_policy_batches_start_after_their_share_of_steps(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    spec = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False,
                     on_policy={"fraction": 1.0, "start": 0.5, "max_new_tokens": 4})
    distill.run(spec)
    records = [json.loads(x) for x in (tmp_path / "run/train/student/metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in records if "loss" in r] == [0, 0, 0, 1, 1, 1]


def test_on_policy_run_resumes_after_sigkill_as_if_never_stopped(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    spec = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False, seed=1,
                     on_policy={"fraction": 0.5, "max_new_tokens": 6})
    killed, straight, _ = killed_then_resumed(spec, tmp_path, step=4)
    # The student's samples after the resume are the ones it would have written: same losses.
    assert killed == straight


@pytest.mark.parametrize("change, message", [
    ({"losses": [], "task_loss_weight": 1.0}, "add a token_kd loss"),
    ({"cache": {"top_k": 8}}, "cache.top_k: null"),
])
def test_on_policy_recipes_are_checked(tmp_path, data_dir, gpt_pair, change, message):
    teacher, student = gpt_pair
    spec = tiny_lm_recipe(tmp_path, data_dir, teacher, student, on_policy={"fraction": 0.5})
    spec.update(change)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(spec)


def test_on_policy_defaults():
    spec = OnPolicySpec()
    assert (spec.fraction, spec.max_new_tokens, spec.temperature, spec.top_p, spec.start) == (0.5, 64, 1.0, 1.0, 0.0)

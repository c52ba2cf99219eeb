"""Language-model data: JSONL / Parquet / datasets records, completion-only masks, chat templates."""

import json

import pytest
import torch

import distill
from distill.config import DataSpec
from distill.data import read_records
from distill.errors import DataError
from distill.losses.chunked import chunked_cross_entropy
from distill.models.load import load_hf
from distill.tasks import LanguageModelingTask

pytest.importorskip("transformers")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher(gpt_pair):
    model = load_hf("hf-causal-lm", str(gpt_pair[0]), max_length=128)  # the models' 128 positions
    model.module.eval()
    return model


def test_prompt_tokens_are_masked_out(teacher):
    prompt, completion = "First Citizen:\nSpeak.", " Resolved, resolved."
    enc = teacher.encode({"prompt": [prompt, "All:"], "completion": [completion, " Speak!"]})
    tok = teacher.tokenizer
    n_prompt, n_completion = len(tok(prompt)["input_ids"]), len(tok(completion, add_special_tokens=False)["input_ids"])
    row = enc["loss_mask"][0]
    assert row[:n_prompt].sum() == 0 and row[n_prompt : n_prompt + n_completion + 1].all()  # + end-of-text
    assert int(row.sum()) == n_completion + 1
    assert enc["input_ids"][0, n_prompt + n_completion] == tok.eos_token_id
    n_short = len(tok(" Speak!", add_special_tokens=False)["input_ids"])
    assert enc["attention_mask"][1].sum() < enc["attention_mask"][0].sum() and enc["loss_mask"][1].sum() == n_short + 1
    out = teacher({"prompt": [prompt], "completion": [completion]})
    assert out["token_mask"].sum() == n_completion + 1  # the targets shifted by one: completion + end


def test_completion_only_loss_ignores_the_prompt(teacher):
    # Changing the prompt changes the context but never adds prompt tokens to the loss: the loss
    # is the mean over completion tokens only, equal to transformers' loss with prompt labels -100.
    prompt, completion = "KING RICHARD:\nWhat says", " my lord of York?"
    out = teacher({"prompt": [prompt], "completion": [completion]})
    task_loss = chunked_cross_entropy(out["hidden"].reshape(-1, out["hidden"].shape[-1]), out["head"],
                                      out["targets"], out["token_mask"])
    enc = teacher.encode({"prompt": [prompt], "completion": [completion]})
    labels = enc["input_ids"].masked_fill(enc["loss_mask"] == 0, -100)
    with torch.no_grad():
        theirs = teacher.module(input_ids=enc["input_ids"], labels=labels).loss
    torch.testing.assert_close(task_loss, theirs, rtol=1e-5, atol=1e-5)


def test_chat_records_learn_only_the_last_assistant_turn(teacher):
    messages = [{"role": "user", "content": "Who comes here?"}, {"role": "assistant", "content": "A friend."}]
    enc = teacher.encode({"messages": [messages]})
    tok = teacher.tokenizer
    text = tok.decode(enc["input_ids"][0][enc["loss_mask"][0].bool()])
    assert text == "A friend.<|im_end|>\n"
    prompt = tok.decode(enc["input_ids"][0][~enc["loss_mask"][0].bool()])
    assert prompt == "<|im_start|>user\nWho comes here?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_without_a_template_is_a_clear_error(gpt_pair, tmp_path):
    model = load_hf("hf-causal-lm", str(gpt_pair[0]), max_length=64)
    model.tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        model.encode({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]})


def test_records_readers_and_their_errors(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "extra": 1} for i in range(5)]
    assert read_records(_jsonl(tmp_path / "a.jsonl", rows), "jsonl")[0] == {"prompt": "q0", "completion": "a0"}
    folder = tmp_path / "many"
    folder.mkdir()
    _jsonl(folder / "1.jsonl", rows[:2])
    _jsonl(folder / "2.jsonl", rows[2:])
    assert [r["prompt"] for r in read_records(folder, "jsonl")] == [f"q{i}" for i in range(5)]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl", "jsonl")
    with pytest.raises(DataError, match="line 2: has fields text but earlier records have prompt/completion"):
        read_records(_jsonl(tmp_path / "mixed.jsonl", [rows[0], {"text": "x"}]), "jsonl")
    with pytest.raises(DataError, match="needs 'text', or 'prompt' and 'completion', or 'messages'"):
        read_records(_jsonl(tmp_path / "none.jsonl", [{"question": "x"}]), "jsonl")
    with pytest.raises(DataError, match="last message is from 'user'"):
        read_records(_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]), "jsonl")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert read_records(tmp_path / "a.parquet", "parquet") == read_records(tmp_path / "a.jsonl", "jsonl")


def test_hf_dataset_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"line {i}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds", "hf-dataset") == rows
    with pytest.raises(DataError, match="no split 'dev'"):
        read_records(tmp_path / "ds", "hf-dataset", split="dev")


def test_prompt_completion_recipe_trains_and_scores_completions(tmp_path, gpt_pair, data_dir):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    rows = [{"prompt": text[i : i + 60], "completion": text[i + 60 : i + 160]} for i in range(0, 19_000, 400)]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "test.jsonl", [{"text": text[i : i + 160]} for i in range(19_000, 19_800, 200)])
    teacher, student = gpt_pair
    task = LanguageModelingTask(DataSpec(format="jsonl", path=tmp_path / "train.jsonl",
                                         test_path=tmp_path / "test.jsonl"))
    assert len(task.train) == 43 and len(task.splits["eval"]) == 5 and len(task.splits["test"]) == 4
    assert task.splits["test"].fields == ("text",)
    result = distill.run({
        "name": "prompt-completion", "task": "lm", "seed": 0,
        "teacher": {"kind": "hf-causal-lm", "source": str(teacher), "max_length": 64},
        "student": {"source": str(student), "max_length": 64, "init": "random"},
        "data": {"format": "jsonl", "path": str(tmp_path / "train.jsonl"), "test_path": str(tmp_path / "test.jsonl")},
        "losses": [{"name": "token_kd", "params": {"kind": "forward_kl"}}],
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "checkpoint_every": 100},
        "evaluate": {"latency_repeats": 2, "throughput_repeats": 1, "warmup": 0, "batch_size": 4},
        "baseline": False, "output_dir": str(tmp_path / "run"),
    })
    ppl = result.models["student"]["perplexity"]
    assert 1 < ppl < 1000 and result.models["student"]["throughput_unit"] == "tokens"


def test_different_tokenizers_are_refused_for_token_losses_only(tmp_path, gpt_pair, data_dir):
    import tokenizers
    import transformers
    from conftest import _gpt

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([(data_dir / "tinyshakespeare" / "input.txt").read_text()[-100_000:]], trainer)
    other = _gpt(tmp_path / "other", transformers.PreTrainedTokenizerFast(tokenizer_object=bpe,
                                                                          eos_token="<|endoftext|>"), 1, 16, 0)
    recipe = {
        "name": "other-tokenizer", "task": "lm", "seed": 0,
        "teacher": {"kind": "hf-causal-lm", "source": str(gpt_pair[0]), "max_length": 64},
        "student": {"source": str(other), "max_length": 64},
        "data": {"format": "text", "path": str(data_dir / "tinyshakespeare"), "block_chars": 200,
                 "train_limit": 8, "eval_limit": 2, "test_limit": 2},
        "losses": [{"name": "token_kd"}],
        "train": {"max_steps": 1, "batch_size": 4},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 2},
        "baseline": False, "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(distill.DistillError, match="tokenizers differ.*sequence level"):
        distill.run(recipe)
    # Sequence level (training on text, no token loss) needs no shared vocabulary.
    done = distill.run({**recipe, "losses": [], "task_loss_weight": 1.0, "output_dir": str(tmp_path / "seq")})
    assert done.models["student"]["perplexity"] > 1

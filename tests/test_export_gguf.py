"""``distill export --format gguf``: a Llama-shaped student as a GGUF file that ``transformers``
reads back to the same next-token log-probabilities."""

import json

import pytest
import torch
from conftest import bpe_tokenizer, tiny_lm_recipe

import distill
from distill.cli import main

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, data_dir):
    import transformers

    root = tmp_path_factory.mktemp("gguf")
    tokenizer = bpe_tokenizer((data_dir / "tinyshakespeare/input.txt").read_text()[:50000], 320)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    recipe = tiny_lm_recipe(root, data_dir, root / "llama", root / "llama", name="tiny-llama", losses=[],
                            task_loss_weight=1.0, baseline=False, train={"max_steps": 4, "lr": 3e-3})
    distill.run(recipe)
    return root / "run"


@pytest.mark.parametrize("quant, tolerance", [("f16", 5e-3), ("q8_0", 0.1)])
def test_the_gguf_student_predicts_as_the_pytorch_one(llama_run, data_dir, quant, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = llama_run / "export" / f"gguf-{quant}"
    assert main(["export", str(llama_run), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
    path = out / f"model-{quant}.gguf"
    record = json.loads((llama_run / "export/export.json").read_text())["exports"]["gguf"]
    assert record["quant"] == quant and record["bytes"] == path.stat().st_size
    assert record["mean_kl"] < record["tolerance"] and record["top1_agreement"] > 0.9

    student = llama_run / "student"
    torch_model = AutoModelForCausalLM.from_pretrained(student).eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name).eval()
    original = AutoTokenizer.from_pretrained(student)
    read_back = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    text = (data_dir / "tinyshakespeare/input.txt").read_text()[60000:60400]
    ids = original(text, return_tensors="pt")["input_ids"]
    assert read_back(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        a, b = (torch.log_softmax(m(input_ids=ids).logits, -1) for m in (torch_model, gguf_model))
    assert float((a - b).abs().max()) < tolerance
    assert torch.equal(a.argmax(-1), b.argmax(-1)) or quant == "q8_0"
    weights = sum(v.numel() for v in torch_model.state_dict().values())  # the tied head written out too
    bytes_per_weight = path.stat().st_size / weights
    assert bytes_per_weight < (2.3 if quant == "f16" else 1.3)  # half precision; 8 bits + a scale per 32


def test_a_student_that_is_not_llama_shaped_is_refused(tmp_path, data_dir, gpt_pair, capsys):
    teacher, student = gpt_pair
    distill.run(tiny_lm_recipe(tmp_path, data_dir, teacher, student, losses=[], task_loss_weight=1.0,
                               baseline=False, train={"max_steps": 2}))
    assert main(["export", str(tmp_path / "run"), "--format", "gguf"]) == 2
    assert "GGUF export writes Llama-shaped students; this one is 'gpt2'" in capsys.readouterr().err

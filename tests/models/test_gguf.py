"""GGUF teachers: a tiny Llama written here as a GGUF file (as llama.cpp lays one out) is read,
derived from and saved as a plain transformers model."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer

from distill.config import DeriveSpec, ModelSpec
from distill.errors import ModelError
from distill.models.load import load_model
from distill.models.student import derive_student

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
          ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
          ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]


def _rope_order(weight, heads):
    """llama.cpp stores query/key rows in the order its rotary embedding reads them."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, data_dir):
    """``(path to a .gguf file, the Llama it holds, that model's tokenizer)``."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    tokenizer = bpe_tokenizer(text)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, head_dim=8, bos_token_id=0,
                                      eos_token_id=0, max_position_embeddings=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_block_count(3)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(48)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(300)
    bpe_model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = [t for t, _ in sorted(bpe_model["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe_model["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    state = model.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    for i in range(3):
        for ours, theirs in _NAMES:
            tensors[f"blk.{i}.{theirs}.weight"] = state[f"model.layers.{i}.{ours}.weight"]
        tensors[f"blk.{i}.attn_q.weight"] = _rope_order(tensors[f"blk.{i}.attn_q.weight"], 4)
        tensors[f"blk.{i}.attn_k.weight"] = _rope_order(tensors[f"blk.{i}.attn_k.weight"], 2)
    for name, tensor in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model, tokenizer


@torch.no_grad()
def test_gguf_teacher_loads_derives_and_saves_as_plain_transformers(tiny_gguf, tmp_path):
    path, original, tokenizer = tiny_gguf
    teacher = load_model(ModelSpec(kind="hf-causal-lm", source=str(path)), "hf-causal-lm")
    teacher.module.eval()
    assert teacher.tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(teacher.module(ids).logits, original(ids).logits)

    # The teacher itself saves (dequantised) and reloads without the GGUF file.
    teacher.save(tmp_path / "teacher")
    saved = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert "quantization_config" not in saved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    torch.testing.assert_close(reloaded(ids).logits, original(ids).logits)

    student = derive_student(teacher, DeriveSpec(layers=[0, 2], intermediate_size=24), [{"text": [TEXT]}])
    student.module.eval()
    student.save(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["intermediate_size"] == 24
    assert "quantization_config" not in saved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    torch.testing.assert_close(reloaded(ids).logits, student.module(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]


def test_missing_gguf_package_says_what_to_install(tiny_gguf, monkeypatch):
    path, _, _ = tiny_gguf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ModelError, match="needs the 'gguf' package: pip install gguf"):
        load_model(ModelSpec(kind="hf-causal-lm", source=str(path)), "hf-causal-lm")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(ModelSpec(kind="hf-causal-lm", source="models/SmolLM2-135M-Instruct.Q4_1.gguf"), "hf-causal-lm")

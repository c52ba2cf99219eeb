"""A Llama-shaped causal-LM student as one GGUF file (llama.cpp's format), through the ``gguf``
package's writer, and the check that ``transformers`` reads it back to the same predictions.

Tensor names come from ``gguf``'s own map for the architecture; the query and key projections
are stored in the interleaved rotary order llama.cpp expects (``transformers`` undoes it when it
reads the file). The tokenizer goes in as llama.cpp's byte-level BPE (``gpt2``): tokens, types
and merges. ``f16`` stores every matrix in half precision; ``q8_0`` quantises them to 8 bits in
blocks of 32 (rows whose length is not a multiple of 32 stay ``f16``). Vectors (norms) stay
``f32``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import ModelError

__all__ = ["GGUF_QUANTS", "export_gguf", "gguf_agreement"]

GGUF_QUANTS = ("q8_0", "f16")
_BLOCK = 32  # Q8_0 block length


def _require_gguf() -> Any:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("GGUF export needs the 'gguf' package: pip install gguf")
    import gguf

    return gguf


def _interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection, per head, from the rotate-half order (``transformers``) to
    llama.cpp's interleaved pairs."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_fields(folder: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens (padded to the embedding rows), token types and merges of a byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    spec = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{folder}: GGUF export writes byte-level BPE tokenizers; this one is "
                         f"{model.get('type', 'not a tokenizer.json')}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(3 if i in special else (5 if i not in by_id else 1))  # control, unused, normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id}


def _metadata(writer: Any, config: Any, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _tensor(gguf: Any, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type."""
    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and data.shape[-1] % _BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), kind), kind
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(student: Path, path: Path, quant: str = "q8_0") -> dict[str, Any]:
    """Write the saved causal-LM ``student`` folder as the GGUF file ``path``. Returns what to record.

    Raises:
        ModelError: Not a Llama-shaped model, a tokenizer that is not byte-level BPE, an unknown
            ``quant``, or no ``gguf`` package.
    """
    gguf = _require_gguf()
    if quant not in GGUF_QUANTS:
        raise ModelError(f"--quant {quant}: GGUF export writes {', '.join(GGUF_QUANTS)}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    config = model.config
    if config.model_type != "llama":
        raise ModelError(f"GGUF export writes Llama-shaped students; this one is '{config.model_type}'")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, config, student.parent.name)
    fields = _tokenizer_fields(student, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if fields[key] is not None:
            add(fields[key])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    # Written even when tied to the embedding, so that every reader finds the output head.
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    state.setdefault("lm_head.weight", model.get_output_embeddings().weight)
    for key, value in state.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"GGUF export: no GGUF name for the tensor '{key}'")
        data = value.detach().float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            data = _interleave(data, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            data = _interleave(data, config.num_key_value_heads)
        array, kind = _tensor(gguf, data, quant)
        writer.add_tensor(target, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": str(path), "quant": quant, "bytes": path.stat().st_size}


@torch.inference_mode()
def gguf_agreement(student: Path, path: Path, texts: list[str]) -> dict[str, float]:
    """How the GGUF file, as ``transformers`` reads it, predicts against the saved student on
    ``texts``: the mean KL divergence of its next-token distribution from the student's (nats
    per token), the share of positions where both pick the same top token, and the largest
    log-probability difference on the student's 10 likeliest tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student))
    reference = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    kl, same, gap, positions = 0.0, 0, 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
        a = torch.log_softmax(reference(input_ids=ids).logits.float(), -1)[0]
        b = torch.log_softmax(exported(input_ids=ids).logits.float(), -1)[0]
        kl += float((a.exp() * (a - b)).sum())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        top = a.topk(min(10, a.shape[-1]), -1).indices
        gap = max(gap, float((a.gather(-1, top) - b.gather(-1, top)).abs().max()))
        positions += a.shape[0]
    return {"mean_kl": kl / max(positions, 1), "top1_agreement": same / max(positions, 1),
            "max_abs_diff_top10": gap}

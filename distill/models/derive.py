"""Derive a smaller student from a Hugging Face encoder teacher: fewer layers, narrower width.

Depth: the student keeps chosen teacher layers, each initialised as a copy (DistilBERT,
Sanh et al. 2019). Width: hidden channels, attention heads and feed-forward neurons are ranked
by their activation magnitude on calibration batches and the strongest are kept, slicing the
teacher's weights (the importance scores of Minitron, Muralidharan et al. 2024; see
:mod:`distill.models.importance`). Causal LMs are derived the same way by
:mod:`distill.models.derive_lm`; :func:`distill.models.student.derive_student` picks which.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DeriveSpec
from distill.errors import ModelError, RecipeError
from distill.models.adapters import HFClassifierAdapter, HFEmbeddingAdapter
from distill.models.importance import Importance, Tap, top
from distill.models.static import prune_vocabulary

__all__ = ["BERT_LIKE", "bert_tap", "check_layers", "count_parameters", "derive_encoder"]

#: Encoders whose module names follow BERT's layout (``encoder.layer.N.attention.self.query``).
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def bert_tap(name: str, module: nn.Module) -> Tap | None:
    """Where a BERT-layout encoder's activations are read: the embedding and layer norms'
    outputs (hidden channels), the input of ``attention.output.dense`` (heads) and the output
    of ``intermediate`` (feed-forward neurons)."""
    match = _LAYER.search(name + ".")
    if isinstance(module, nn.LayerNorm) and ("embeddings" in name or match):
        return Tap("hidden")
    if match and name.endswith("attention.output.dense"):
        return Tap("heads", int(match.group(1)), read="input")
    if match and name.endswith("intermediate"):
        return Tap("neurons", int(match.group(1)))
    return None


def _axes(name: str) -> tuple[str, ...]:
    """Which axis of a BERT-layout weight is hidden (h), attention (a) or feed-forward (f)."""
    if re.search(r"attention\.self\.(query|key|value)\.weight$", name):
        return ("a", "h")
    if re.search(r"attention\.self\.(query|key|value)\.bias$", name):
        return ("a",)
    if name.endswith("attention.output.dense.weight"):
        return ("h", "a")
    if name.endswith("intermediate.dense.weight"):
        return ("f", "h")
    if name.endswith("intermediate.dense.bias"):
        return ("f",)
    if re.search(r"layer\.\d+\.output\.dense\.weight$", name):
        return ("h", "f")
    if re.search(r"(pooler\.dense|classifier\.dense|lm_head\.dense)\.weight$", name):
        return ("h", "h")
    if re.search(r"(_embeddings|classifier\.out_proj|classifier)\.weight$", name):
        return ("", "h")
    return ("h",)


def check_layers(spec: DeriveSpec, n_layers: int) -> list[int]:
    """The teacher layers the student keeps (all when ``spec.layers`` is ``None``), checked."""
    layers = list(spec.layers) if spec.layers is not None else list(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise RecipeError(f"student.derive.layers: {layers} must be indices in 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise RecipeError(f"student.derive.layers: {layers} repeats a layer")
    return layers


def _check_spec(spec: DeriveSpec, config: Any) -> tuple[list[int], int, int, int]:
    layers = check_layers(spec, config.num_hidden_layers)
    head_size = config.hidden_size // config.num_attention_heads
    hidden = spec.hidden_size or config.hidden_size
    heads = spec.num_attention_heads or (hidden // head_size if spec.hidden_size else config.num_attention_heads)
    ffn = spec.intermediate_size or config.intermediate_size
    if heads * head_size != hidden:
        raise RecipeError(
            f"student.derive: hidden_size {hidden} must equal num_attention_heads {heads} x the "
            f"teacher's head size {head_size}"
        )
    limits = (("hidden_size", hidden, config.hidden_size), ("num_attention_heads", heads, config.num_attention_heads),
              ("intermediate_size", ffn, config.intermediate_size))
    for field, value, teacher_value in limits:
        if not 0 < value <= teacher_value:
            raise RecipeError(f"student.derive.{field}: {value} must be in 1..{teacher_value} (the teacher's)")
    return layers, hidden, heads, ffn


@torch.no_grad()
def derive_encoder(
    teacher: HFEmbeddingAdapter | HFClassifierAdapter, spec: DeriveSpec, calibration: Iterable[dict[str, Any]],
    keep_tokens: list[int] | None = None,
) -> HFEmbeddingAdapter | HFClassifierAdapter:
    """Build an encoder student from the teacher by keeping layers, channels, heads, neurons and tokens.

    Args:
        teacher: The teacher adapter (its model is not modified).
        spec: What to keep.
        calibration: Input batches used to rank channels, heads and neurons (only read for
            width reduction).
        keep_tokens: Token ids to keep (vocabulary pruning, see
            :func:`distill.models.static.vocabulary_of`); ``None`` keeps all.

    Returns:
        An adapter of the same kind as the teacher, sharing its tokenizer and pooling.
    """
    model = teacher.module
    config: Any = model.config
    if config.model_type not in BERT_LIKE:
        raise ModelError(
            f"deriving a student is supported for {sorted(BERT_LIKE)} encoders, not '{config.model_type}'"
        )
    layers, hidden, heads, ffn = _check_spec(spec, config)
    head_size = config.hidden_size // config.num_attention_heads
    hidden_keep = torch.arange(config.hidden_size)
    head_keep: dict[int, Tensor] = {i: torch.arange(config.num_attention_heads) for i in layers}
    ffn_keep: dict[int, Tensor] = {i: torch.arange(config.intermediate_size) for i in layers}
    if (hidden, heads, ffn) != (config.hidden_size, config.num_attention_heads, config.intermediate_size):
        scores = Importance(model, head_size, bert_tap)
        scores.collect(teacher, calibration)
        hidden_keep = top(scores.hidden, hidden)
        head_keep = {i: top(scores.heads[i], heads) for i in layers}
        ffn_keep = {i: top(scores.neurons[i], ffn) for i in layers}
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = len(layers)
    new_config.hidden_size, new_config.num_attention_heads, new_config.intermediate_size = hidden, heads, ffn
    student_model = type(model)(new_config)
    student_model.load_state_dict(_sliced_state(model.state_dict(), student_model.state_dict(), layers, hidden_keep,
                                                head_keep, ffn_keep, head_size))
    tokenizer = teacher.tokenizer
    if keep_tokens is not None:
        tokenizer = _prune_embeddings(student_model, tokenizer, keep_tokens)
    student_model.to(next(model.parameters()).device)
    if isinstance(teacher, HFEmbeddingAdapter):
        return HFEmbeddingAdapter(student_model, tokenizer, teacher.pooling, teacher.normalize, teacher.max_length)
    return HFClassifierAdapter(student_model, tokenizer, teacher.max_length)


def _sliced_state(teacher_state: dict[str, Tensor], student_state: dict[str, Tensor], layers: list[int],
                  hidden: Tensor, head_keep: dict[int, Tensor], ffn_keep: dict[int, Tensor], head_size: int
                  ) -> dict[str, Tensor]:
    """Each student weight: its teacher weight (from the kept layer), sliced along its axes."""
    new_state = {}
    for name, tensor in student_state.items():
        source_name, idx = name, None
        match = _LAYER.search(name)
        if match:
            idx = layers[int(match.group(1))]
            source_name = _LAYER.sub(f"encoder.layer.{idx}.", name, count=1)
        source = teacher_state[source_name]
        if not source.is_floating_point() or source.shape == tensor.shape:
            new_state[name] = source.clone()
            continue
        index = {"h": hidden}
        if idx is not None:
            index["a"] = (head_keep[idx][:, None] * head_size + torch.arange(head_size)).reshape(-1)
            index["f"] = ffn_keep[idx]
        for axis, kind in enumerate(_axes(name)):
            if kind and source.shape[axis] != tensor.shape[axis]:
                source = source.index_select(axis, index[kind])
        if source.shape != tensor.shape:
            raise ModelError(f"student.derive: cannot map teacher weight {source_name} onto {name}")
        new_state[name] = source.clone()
    return new_state


def _prune_embeddings(model: nn.Module, tokenizer: Any, keep: list[int]) -> Any:
    """Keep only the rows of ``keep`` in the word-embedding table; return the matching tokenizer."""
    old = model.get_input_embeddings()
    new = nn.Embedding(len(keep), old.embedding_dim)
    new.weight.data.copy_(old.weight.data[torch.tensor(keep)])
    pad = model.config.pad_token_id
    if pad is not None and pad in keep:
        new.padding_idx = model.config.pad_token_id = keep.index(pad)
    model.set_input_embeddings(new)
    model.config.vocab_size = len(keep)
    return prune_vocabulary(tokenizer, keep)

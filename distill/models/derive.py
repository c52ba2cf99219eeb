"""Derive a smaller student from a Hugging Face encoder teacher: fewer layers, narrower width.

Depth: the student keeps chosen teacher layers, each initialised as a copy (DistilBERT,
Sanh et al. 2019). Width: hidden channels, attention heads and feed-forward neurons are ranked
by their activation magnitude on calibration batches and the strongest are kept, slicing the
teacher's weights (the importance scores of Minitron, Muralidharan et al. 2024). Causal LMs
are derived the same way by :mod:`distill.models.derive_lm`.
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
from distill.models.causal_lm import HFCausalLMAdapter

__all__ = ["Importance", "check_layers", "count_parameters", "derive_student"]

#: Encoders whose module names follow BERT's layout (``encoder.layer.N.attention.self.query``).
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _layers(model: nn.Module) -> nn.ModuleList:
    for name, sub in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(sub, nn.ModuleList):
            return sub
    raise ModelError(f"cannot find the encoder layers of {type(model).__name__}")


class Importance:
    """Accumulates mean |activation| per hidden channel, head and FFN neuron via forward hooks.

    ``_attach`` puts the hooks on a BERT-layout encoder; a subclass puts them elsewhere (the
    causal-LM layouts of :mod:`distill.models.derive_lm`), with the same accumulators.
    """

    def __init__(self, model: nn.Module, head_size: int) -> None:
        self.head_size = head_size
        self.hidden: Tensor | None = None
        self.heads: dict[int, Tensor] = {}
        self.neurons: dict[int, Tensor] = {}
        self.handles: list[Any] = []
        for name, module in model.named_modules():
            self._attach(name, module)

    def _attach(self, name: str, module: nn.Module) -> None:
        match = _LAYER.search(name + ".")
        if isinstance(module, nn.LayerNorm) and ("embeddings" in name or match):
            self.handles.append(module.register_forward_hook(self._on_norm))
        elif match and name.endswith("attention.output.dense"):
            idx = int(match.group(1))
            self.handles.append(module.register_forward_pre_hook(lambda m, a, i=idx: self._on_heads(i, a[0])))
        elif match and name.endswith("intermediate"):
            idx = int(match.group(1))
            self.handles.append(module.register_forward_hook(lambda m, a, o, i=idx: self._on_ffn(i, o)))

    @staticmethod
    def _magnitude(x: Tensor) -> Tensor:
        return x.detach().abs().float().reshape(-1, x.shape[-1]).mean(0)

    def _on_norm(self, module: nn.Module, args: Any, out: Tensor) -> None:
        mag = self._magnitude(out)
        self.hidden = mag if self.hidden is None else self.hidden + mag

    def _on_heads(self, idx: int, context: Tensor) -> None:
        per_head = self._magnitude(context).reshape(-1, self.head_size).sum(-1)
        self.heads[idx] = self.heads.get(idx, 0) + per_head

    def _on_ffn(self, idx: int, out: Tensor) -> None:
        self.neurons[idx] = self.neurons.get(idx, 0) + self._magnitude(out)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def collect(self, forward: Any, batches: Any) -> None:
        """Run ``forward`` on every batch, accumulating, then remove the hooks.

        Raises:
            ModelError: No activation was seen (no batches).
        """
        try:
            for batch in batches:
                forward(batch)
        finally:
            self.close()
        if self.hidden is None:
            raise ModelError("student.derive: calibration produced no activations (no training batches?)")


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return torch.topk(scores, k).indices.sort().values


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
def derive_student(
    teacher: HFEmbeddingAdapter | HFClassifierAdapter | HFCausalLMAdapter, spec: DeriveSpec,
    calibration: Iterable[dict[str, Any]], keep_tokens: list[int] | None = None,
) -> HFEmbeddingAdapter | HFClassifierAdapter | HFCausalLMAdapter:
    """Build a student from the teacher by keeping layers, channels, heads, neurons and tokens.

    Causal LMs go to :func:`distill.models.derive_lm.derive_causal_lm`.

    Args:
        teacher: The teacher adapter (its model is not modified).
        spec: What to keep.
        calibration: Input batches used to rank channels, heads and neurons (only needed for
            width reduction).
        keep_tokens: Token ids to keep (vocabulary pruning, see
            :func:`distill.models.static.vocabulary_of`); ``None`` keeps all.

    Returns:
        An adapter of the same kind as the teacher, sharing its tokenizer and pooling.
    """
    if isinstance(teacher, HFCausalLMAdapter):
        if keep_tokens is not None:
            raise RecipeError("student.derive.vocab: a causal-LM student keeps the teacher's vocabulary "
                              "(token-level losses compare whole next-token distributions)")
        # Imported here: the causal-LM module builds on this one's helpers.
        from distill.models.derive_lm import derive_causal_lm

        return derive_causal_lm(teacher, spec, calibration)
    model = teacher.module
    config = model.config
    if config.model_type not in BERT_LIKE:
        raise ModelError(
            f"deriving a student is supported for {sorted(BERT_LIKE)} encoders, not '{config.model_type}'"
        )
    layers, hidden, heads, ffn = _check_spec(spec, config)
    head_size = config.hidden_size // config.num_attention_heads
    narrower = (hidden, heads, ffn) != (config.hidden_size, config.num_attention_heads, config.intermediate_size)

    keep: dict[str, Any] = {"h": torch.arange(config.hidden_size)}
    head_keep: dict[int, Tensor] = {i: torch.arange(config.num_attention_heads) for i in layers}
    ffn_keep: dict[int, Tensor] = {i: torch.arange(config.intermediate_size) for i in layers}
    if narrower:
        scores = Importance(model, head_size)
        scores.collect(teacher, calibration)
        keep["h"] = _top(scores.hidden, hidden)
        head_keep = {i: _top(scores.heads[i], heads) for i in layers}
        ffn_keep = {i: _top(scores.neurons[i], ffn) for i in layers}

    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = len(layers)
    new_config.hidden_size, new_config.num_attention_heads, new_config.intermediate_size = hidden, heads, ffn
    student_model = type(model)(new_config)
    teacher_state = model.state_dict()
    new_state = {}
    for name, tensor in student_model.state_dict().items():
        source_name, idx = name, None
        match = _LAYER.search(name)
        if match:
            idx = layers[int(match.group(1))]
            source_name = _LAYER.sub(f"encoder.layer.{idx}.", name, count=1)
        source = teacher_state[source_name]
        if not source.is_floating_point() or source.shape == tensor.shape:
            new_state[name] = source.clone()
            continue
        index = {"h": keep["h"]}
        if idx is not None:
            index["a"] = (head_keep[idx][:, None] * head_size + torch.arange(head_size)).reshape(-1)
            index["f"] = ffn_keep[idx]
        for axis, kind in enumerate(_axes(name)):
            if kind and source.shape[axis] != tensor.shape[axis]:
                source = source.index_select(axis, index[kind])
        if source.shape != tensor.shape:
            raise ModelError(f"student.derive: cannot map teacher weight {source_name} onto {name}")
        new_state[name] = source.clone()
    student_model.load_state_dict(new_state)
    tokenizer = teacher.tokenizer
    if keep_tokens is not None:
        tokenizer = _prune_embeddings(student_model, tokenizer, keep_tokens)
    student_model.to(next(model.parameters()).device)
    if isinstance(teacher, HFEmbeddingAdapter):
        return HFEmbeddingAdapter(student_model, tokenizer, teacher.pooling, teacher.normalize, teacher.max_length)
    return HFClassifierAdapter(student_model, tokenizer, teacher.max_length)


def _prune_embeddings(model: nn.Module, tokenizer: Any, keep: list[int]) -> Any:
    """Keep only the rows of ``keep`` in the word-embedding table; return the matching tokenizer."""
    from distill.models.static import prune_vocabulary

    old = model.get_input_embeddings()
    new = nn.Embedding(len(keep), old.embedding_dim)
    new.weight.data.copy_(old.weight.data[torch.tensor(keep)])
    pad = model.config.pad_token_id
    if pad is not None and pad in keep:
        new.padding_idx = model.config.pad_token_id = keep.index(pad)
    model.set_input_embeddings(new)
    model.config.vocab_size = len(keep)
    return prune_vocabulary(tokenizer, keep)

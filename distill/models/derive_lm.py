"""Derive a smaller causal-LM student from its teacher: prune, then distil (Minitron).

Depth: the student keeps chosen teacher decoder layers, in order, each initialised from that
layer; the embeddings, the final norm and the output head are the teacher's. Width: hidden
channels, attention heads and feed-forward neurons are ranked by their mean activation
magnitude on calibration batches and the strongest are kept, slicing the teacher's weights
(Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation").
With grouped-query attention, heads go in whole groups: a key/value head with the query
heads that read it.

Supported: Llama-style decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``: SmolLM2 among
them) and GPT-2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DeriveSpec
from distill.errors import ModelError, RecipeError
from distill.models.causal_lm import HFCausalLMAdapter
from distill.models.derive import check_layers
from distill.models.gguf import plain_config
from distill.models.importance import Importance, Tap, top

__all__ = ["CAUSAL_LMS", "derive_causal_lm"]

#: Axis labels: ``h`` hidden channel, ``q`` query-head channel, ``kv`` key/value-head channel,
#: ``qkv`` GPT-2's fused query/key/value projection, ``f`` feed-forward neuron, ``""`` kept whole.
_Axes = tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    """Where a decoder family keeps its layers and which axis of each weight means what."""

    layer: re.Pattern[str]
    """Matches ``<layers>.<index>.`` in parameter and module names."""
    norms: re.Pattern[str]
    """Modules whose outputs are hidden-channel activations (the pre-attention, pre-MLP and final norms)."""
    heads_in: str
    """Module (suffix) whose input is the attention heads' outputs, side by side."""
    ffn_in: str
    """Module (suffix) whose input is the feed-forward neurons' activations."""
    axes: tuple[tuple[str, _Axes], ...]
    """``(regex, axes)`` per weight; a weight matching none is a hidden-channel vector (norms, biases)."""
    grouped: bool
    """Query heads share key/value heads (Llama's ``num_key_value_heads``); the attention width
    is independent of the hidden size."""

    def axes_of(self, name: str) -> _Axes:
        return next((axes for pattern, axes in self.axes if re.search(pattern, name)), ("h",))

    def tap(self, name: str, module: nn.Module) -> Tap | None:
        """Where calibration reads activations (a :data:`~distill.models.importance.Placement`):
        the norms' outputs, and the inputs of the modules that take the heads and the neurons."""
        match = self.layer.search(name + ".")
        if self.norms.search(name):
            return Tap("hidden")
        if match and name.endswith(self.heads_in):
            return Tap("heads", int(match.group(1)), read="input")
        if match and name.endswith(self.ffn_in):
            return Tap("neurons", int(match.group(1)), read="input")
        return None


_LLAMA = _Layout(
    layer=re.compile(r"(?:^|\.)layers\.(\d+)\."),
    norms=re.compile(r"(?:^|\.)(input_layernorm|post_attention_layernorm|norm)$"),
    heads_in="self_attn.o_proj",
    ffn_in="mlp.down_proj",
    axes=(
        (r"self_attn\.q_proj\.weight$", ("q", "h")),
        (r"self_attn\.q_proj\.bias$", ("q",)),
        (r"self_attn\.[kv]_proj\.weight$", ("kv", "h")),
        (r"self_attn\.[kv]_proj\.bias$", ("kv",)),
        (r"self_attn\.o_proj\.weight$", ("h", "q")),
        (r"self_attn\.[qk]_norm\.weight$", ("",)),  # per head dimension, shared by all heads
        (r"mlp\.(gate|up)_proj\.weight$", ("f", "h")),
        (r"mlp\.(gate|up)_proj\.bias$", ("f",)),
        (r"mlp\.down_proj\.weight$", ("h", "f")),
        (r"(embed_tokens|lm_head)\.weight$", ("", "h")),
    ),
    grouped=True,
)

_GPT2 = _Layout(
    layer=re.compile(r"(?:^|\.)h\.(\d+)\."),
    norms=re.compile(r"(?:^|\.)(ln_1|ln_2|ln_f)$"),
    heads_in="attn.c_proj",
    ffn_in="mlp.c_proj",
    # GPT-2's Conv1D weights are (in, out), the transpose of nn.Linear's.
    axes=(
        (r"attn\.c_attn\.weight$", ("h", "qkv")),
        (r"attn\.c_attn\.bias$", ("qkv",)),
        (r"attn\.c_proj\.weight$", ("q", "h")),
        (r"mlp\.c_fc\.weight$", ("h", "f")),
        (r"mlp\.c_fc\.bias$", ("f",)),
        (r"mlp\.c_proj\.weight$", ("f", "h")),
        (r"(wte|wpe|lm_head)\.weight$", ("", "h")),
    ),
    grouped=False,
)

#: Causal-LM families (``config.model_type``) that can be derived.
CAUSAL_LMS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gpt2": _GPT2}


@dataclass(frozen=True)
class _Shape:
    """The widths of a decoder."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _shape_of(config: Any) -> _Shape:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return _Shape(hidden, heads, kv_heads, head_dim, ffn)


def _student_shape(spec: DeriveSpec, t: _Shape, layout: _Layout) -> _Shape:
    """The student's widths from the spec, checked against the teacher's."""
    hidden = spec.hidden_size or t.hidden
    if spec.num_attention_heads:
        heads = spec.num_attention_heads
    else:  # GPT-2's attention is as wide as its hidden state; Llama's need not be
        heads = t.heads if layout.grouped or not spec.hidden_size else hidden // t.head_dim
    ffn = spec.intermediate_size or t.ffn
    limits = (("hidden_size", hidden, t.hidden), ("num_attention_heads", heads, t.heads),
              ("intermediate_size", ffn, t.ffn))
    for field, value, teacher_value in limits:
        if not 0 < value <= teacher_value:
            raise RecipeError(f"student.derive.{field}: {value} must be in 1..{teacher_value} (the teacher's)")
    if heads % t.group:
        raise RecipeError(
            f"student.derive.num_attention_heads: {heads} must be a multiple of {t.group}: the teacher's "
            f"{t.heads} query heads share {t.kv_heads} key/value heads, and heads are kept in whole groups"
        )
    if not layout.grouped and heads * t.head_dim != hidden:
        raise RecipeError(
            f"student.derive: hidden_size {hidden} must equal num_attention_heads {heads} x the teacher's head "
            f"size {t.head_dim} (GPT-2's attention is as wide as its hidden state)"
        )
    return _Shape(hidden, heads, heads // t.group, t.head_dim, ffn)


def _channels(heads: Tensor, head_dim: int) -> Tensor:
    """The channel indices of whole heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _keep(model: nn.Module, adapter: HFCausalLMAdapter, layout: _Layout, t: _Shape, s: _Shape,
          layers: list[int], calibration: Iterable[dict[str, Any]]) -> tuple[Tensor, dict[int, dict[str, Tensor]]]:
    """Kept hidden channels, and per kept layer the kept channels of each axis kind."""
    full = {"q": torch.arange(t.heads * t.head_dim), "kv": torch.arange(t.kv_heads * t.head_dim),
            "f": torch.arange(t.ffn)}
    if s == t:
        return torch.arange(t.hidden), {i: dict(full) for i in layers}
    scores = Importance(model, t.head_dim, layout.tap)
    scores.collect(adapter, calibration)
    per_layer = {}
    for i in layers:
        # A group is a key/value head and the query heads that read it; it is kept or dropped whole.
        groups = top(scores.heads[i].reshape(t.kv_heads, t.group).sum(-1), s.kv_heads)
        query_heads = (groups[:, None] * t.group + torch.arange(t.group)).reshape(-1)
        per_layer[i] = {"q": _channels(query_heads, t.head_dim), "kv": _channels(groups, t.head_dim),
                        "f": top(scores.neurons[i], s.ffn)}
    return top(scores.hidden, s.hidden), per_layer


def _student_config(config: Any, layers: list[int], t: _Shape, s: _Shape, layout: _Layout) -> Any:
    new = plain_config(config)
    new.num_hidden_layers = len(layers)
    if getattr(new, "layer_types", None) is not None:  # per-layer attention kinds (sliding window or not)
        new.layer_types = [config.layer_types[i] for i in layers]
    if s != t:
        new.hidden_size, new.num_attention_heads = s.hidden, s.heads
        if layout.grouped:
            new.num_key_value_heads, new.intermediate_size, new.head_dim = s.kv_heads, s.ffn, s.head_dim
        else:
            new.n_inner = s.ffn
    return new


@torch.no_grad()
def derive_causal_lm(teacher: HFCausalLMAdapter, spec: DeriveSpec, calibration: Iterable[dict[str, Any]]
                     ) -> HFCausalLMAdapter:
    """Build a causal-LM student from the teacher by keeping layers, channels, heads and neurons.

    Args:
        teacher: The teacher adapter (its model is not modified).
        spec: What to keep (``layers``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``).
        calibration: Input batches used to rank channels, heads and neurons (only read when the
            student is narrower than the teacher).

    Returns:
        An adapter around a plain ``transformers`` model of the teacher's class, sharing the
        teacher's tokenizer and ``max_length``.

    Raises:
        ModelError: The teacher's architecture is not one of :data:`CAUSAL_LMS`.
        RecipeError: The spec does not fit the teacher.
    """
    model = teacher.module
    config: Any = model.config
    layout = CAUSAL_LMS.get(config.model_type)
    if layout is None:
        raise ModelError(f"student.derive: deriving a causal-LM student is supported for {sorted(CAUSAL_LMS)}, "
                         f"not '{config.model_type}' ({type(model).__name__}); give student.source instead")
    layers = check_layers(spec, config.num_hidden_layers)
    t = _shape_of(config)
    s = _student_shape(spec, t, layout)
    hidden, per_layer = _keep(model, teacher, layout, t, s, layers, calibration)
    student = type(model)(_student_config(config, layers, t, s, layout))
    student.load_state_dict(_sliced_state(model.state_dict(), student.state_dict(), layout, layers, hidden,
                                          per_layer, t))
    student.to(next(model.parameters()).device)  # float32 whatever the teacher's dtype, as the encoders' students
    return HFCausalLMAdapter(student, teacher.tokenizer, teacher.max_length)


def _sliced_state(teacher_state: dict[str, Tensor], student_state: dict[str, Tensor], layout: _Layout,
                  layers: list[int], hidden: Tensor, per_layer: dict[int, dict[str, Tensor]], t: _Shape
                  ) -> dict[str, Tensor]:
    """Each student weight: its teacher weight (from the kept layer), sliced along its axes."""
    new_state = {}
    for name, target in student_state.items():
        source_name, index = name, {"h": hidden}
        match = layout.layer.search(name)
        if match:
            i = layers[int(match.group(1))]
            source_name = name[: match.start(1)] + str(i) + name[match.end(1) :]
            index.update(per_layer[i])
            index["qkv"] = torch.cat([index["q"] + k * t.hidden for k in range(3)])
        if source_name not in teacher_state:
            raise ModelError(f"student.derive: the student's {name} has no counterpart {source_name} in the teacher")
        source = teacher_state[source_name]
        if source.is_floating_point():
            for axis, kind in enumerate(layout.axes_of(name)):
                if kind:
                    source = source.index_select(axis, index[kind].to(source.device))
        if source.shape != target.shape:
            raise ModelError(f"student.derive: teacher weight {source_name} {tuple(source.shape)} does not map "
                             f"onto the student's {name} {tuple(target.shape)}")
        new_state[name] = source.clone()
    return new_state

"""Ship the student: export it, check the export against PyTorch, quantize it.

``distill export RUN --format onnx --int8`` (:func:`distill.exporting.export_run`) writes
``RUN/export/onnx/model.onnx`` and ``model.int8.onnx`` with the tokenizer beside them, running
the float model with onnxruntime on real test inputs and refusing it when its outputs differ
from PyTorch's by more than a tolerance. This module turns a loaded model into those files and
checks them; :mod:`distill.deploy` measures them, :mod:`distill.card` records them.

An exported model is the whole model a caller needs: an embedding model returns the pooled,
normalised sentence embedding (by :func:`distill.models.hf.pool`, as in training), a classifier
or a language model its logits.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ModelError
from distill.models.adapters import HFClassifierAdapter, HFEmbeddingAdapter, TorchClassifierAdapter
from distill.models.causal_lm import HFCausalLMAdapter
from distill.models.hf import pool, unwrap
from distill.models.static import StaticEmbeddingAdapter
from distill.report import deployment_table

__all__ = [
    "FORMATS",
    "KIND_FORMATS",
    "TOLERANCE",
    "ExportedAdapter",
    "Graph",
    "check_format",
    "copy_saved",
    "export_onnx",
    "export_torchscript",
    "export_traced",
    "format_export",
    "graph_of",
    "kind_of",
    "load_onnx",
    "max_difference",
    "quantize_onnx",
    "require_onnx",
    "sample_inputs",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "hf", "safetensors", "torchscript", "gguf")
"""Everything ``distill export --format`` knows."""

KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "hf-embedding": ("onnx", "hf", "safetensors", "torchscript"),
    "hf-classifier": ("onnx", "hf", "safetensors", "torchscript"),
    "hf-causal-lm": FORMATS,
    "torch": ("onnx", "safetensors", "torchscript"),
    "static-embedding": ("onnx", "safetensors", "torchscript"),
}
"""The formats each model kind exports to."""

_NOT_HF = {
    "torch": "a plain PyTorch classifier is not a transformers model",
    "static-embedding": "a static student is saved in Model2Vec's layout, not as a transformers model",
}

TOLERANCE = 1e-4
"""Largest absolute difference allowed between an export's outputs and PyTorch's."""

OPSET = 17
"""ONNX opset of the exported graphs; onnxruntime has run it since 1.14."""


def require_onnx() -> Any:
    """Import ``onnx`` and ``onnxruntime`` or explain which extra to install."""
    try:
        import onnx  # noqa: F401  (the exporter and the quantizer need it)
        import onnxruntime
    except ImportError:
        raise ModelError("ONNX export needs the 'onnx' extra: pip install 'distill[onnx]'") from None
    return onnxruntime


def kind_of(adapter: Any) -> str:
    """The recipe kind of a loaded model (``hf-embedding``, ``torch``, ...)."""
    for cls, kind in ((HFEmbeddingAdapter, "hf-embedding"), (HFClassifierAdapter, "hf-classifier"),
                      (HFCausalLMAdapter, "hf-causal-lm"), (TorchClassifierAdapter, "torch"),
                      (StaticEmbeddingAdapter, "static-embedding")):
        if isinstance(adapter, cls):
            return kind
    raise ModelError(f"cannot export a {type(adapter).__name__}; exportable kinds: {', '.join(KIND_FORMATS)}")


def check_format(kind: str, fmt: str, int8: bool = False) -> None:
    """Refuse a format the kind cannot take (or ``int8`` outside ONNX), naming the ones it can."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format '{fmt}'; known: {', '.join(FORMATS)}")
    allowed = KIND_FORMATS.get(kind)
    if allowed is None:
        raise ModelError(f"no export for model kind '{kind}'; exportable kinds: {', '.join(KIND_FORMATS)}")
    if fmt not in allowed:
        raise ModelError(f"format '{fmt}': {_NOT_HF.get(kind, 'not available')}; "
                         f"a '{kind}' model exports to {', '.join(allowed)}")
    if int8 and fmt != "onnx":
        raise ModelError(f"--int8: the int8 model is made by onnxruntime's quantizer, so it needs --format onnx, "
                         f"not '{fmt}'")


# --- the model as a function of tensors ---------------------------------------------------------


@dataclass
class Graph:
    """A model as a function of tensors, which is what ONNX and TorchScript capture.

    Attributes:
        module: Takes the tensors named ``inputs``, in that order, and returns one tensor.
        inputs: Names of the tensors ``encode`` makes that ``module`` reads.
        encode: Turns the adapter's raw inputs (``{"text": [...]}``, ``{"x": images}``) into tensors.
        output: What the adapter calls the returned tensor (``embedding``, ``logits``).
        input_axes: Axes that vary in every input (``{0: "batch", 1: "sequence"}``).
        output_axes: Axes that vary in the output.
    """

    module: nn.Module
    inputs: list[str]
    encode: Callable[[dict[str, Any]], dict[str, Tensor]]
    output: str
    input_axes: dict[int, str]
    output_axes: dict[int, str]


class _PooledEncoder(nn.Module):
    """Token tensors -> the pooled (and normalised) sentence embedding, as ``HFEmbeddingAdapter`` computes it."""

    def __init__(self, encoder: nn.Module, names: list[str], pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder, self.names, self.pooling, self.normalize = encoder, names, pooling, normalize

    def forward(self, *tensors: Tensor) -> Tensor:
        inputs = dict(zip(self.names, tensors, strict=True))
        hidden = self.encoder(**inputs).last_hidden_state
        return pool(hidden, inputs["attention_mask"], self.pooling, self.normalize)


class _Logits(nn.Module):
    """Token tensors -> the logits of a ``transformers`` classifier or causal LM."""

    def __init__(self, model: nn.Module, names: list[str], **options: Any) -> None:
        super().__init__()
        self.model, self.names, self.options = model, names, options

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True)), **self.options).logits


class _StaticMean(nn.Module):
    """Padded token ids -> mean of their vectors (normalised), as the static adapter's bag of tokens.

    ``nn.EmbeddingBag`` takes ragged ``(ids, offsets)``; a padded batch and a mask is what a
    tokenizer hands an ONNX runtime, and gives the same means.
    """

    def __init__(self, table: nn.EmbeddingBag, normalize: bool) -> None:
        super().__init__()
        self.table, self.normalize = table, normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        vectors = F.embedding(input_ids, self.table.weight)
        mask = attention_mask.unsqueeze(-1).to(vectors.dtype)
        mean = (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(mean, dim=-1) if self.normalize else mean


def graph_of(adapter: Any) -> Graph:
    """The tensors-in, tensor-out form of a loaded model, ready to trace."""
    kind = kind_of(adapter)
    text_axes = {0: "batch", 1: "sequence"}
    if kind == "torch":
        return Graph(unwrap(adapter.module), ["x"], lambda inputs: {"x": inputs["x"].float()}, "logits",
                     {0: "batch"}, {0: "batch"})
    if kind == "static-embedding":
        def encode_static(inputs: dict[str, Any]) -> dict[str, Tensor]:
            enc = adapter.tokenizer(list(inputs["text"]), add_special_tokens=False, padding=True, truncation=True,
                                    max_length=adapter.max_length, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        module = _StaticMean(unwrap(adapter.module).embeddings, adapter.normalize)
        return Graph(module, ["input_ids", "attention_mask"], encode_static, "embedding", text_axes, {0: "batch"})
    names = list(adapter.tokenize(["a"]))
    model = unwrap(adapter.module)
    if kind == "hf-embedding":
        return Graph(_PooledEncoder(model, names, adapter.pooling, adapter.normalize), names,
                     lambda inputs: adapter.tokenize(inputs["text"]), "embedding", text_axes, {0: "batch"})
    if kind == "hf-causal-lm":
        # The adapter gives the model ids and mask only (a tokenizer's token_type_ids would be
        # added as embeddings by some LMs); encode() also reads prompt/completion and chat records.
        names = ["input_ids", "attention_mask"]
        return Graph(_Logits(model, names, use_cache=False), names, adapter.encode if hasattr(adapter, "encode")
                     else lambda inputs: adapter.tokenize(inputs["text"]), "logits", text_axes, text_axes)
    return Graph(_Logits(model, names), names,
                 lambda inputs: adapter.tokenize(inputs["text"], pairs=inputs.get("text_pair")), "logits",
                 text_axes, {0: "batch"})


class ExportedAdapter:
    """An exported model called as the adapter it came from: raw inputs in, ``{output: tensor}`` out.

    Args:
        graph: The graph it was exported from (its ``encode`` prepares the tensors).
        run: Runs the exported model on the named tensors.
    """

    def __init__(self, graph: Graph, run: Callable[[dict[str, Tensor]], Tensor]) -> None:
        self.graph = graph
        self.run = run
        # Evaluation switches .module between train and eval mode; an exported model has no modes.
        self.module = nn.Module()

    def encode(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """The tensors the exported model reads for ``inputs``."""
        return self.graph.encode(inputs)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        return {self.graph.output: self.run(self.encode(inputs))}


def load_onnx(path: Path, graph: Graph, threads: int | None = None) -> ExportedAdapter:
    """An ONNX file run by onnxruntime on the CPU, with as many threads as PyTorch uses."""
    ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle onnxruntime threads otherwise spin for a while after each run, taking the CPU from
    # whatever runs next (the PyTorch model timed in turn with this one).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from None
    wanted = [i.name for i in session.get_inputs()]  # the exporter drops inputs the model ignores

    def run(tensors: dict[str, Tensor]) -> Tensor:
        return torch.from_numpy(session.run(None, {n: tensors[n].cpu().numpy() for n in wanted})[0])

    return ExportedAdapter(graph, run)


# --- export and check ----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tracing: it warns at every Python branch on a tensor value. Whether a capture holds
    for other inputs is decided by comparing its outputs with PyTorch's on other shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rows(inputs: dict[str, Any]) -> int:
    return len(next(iter(inputs.values())))


def _take(inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    return {k: v[rows] if isinstance(v, Tensor) else [v[i] for i in rows] for k, v in inputs.items()}


def _example(sample: dict[str, Any]) -> dict[str, Any]:
    """Two inputs to trace with: for texts the shortest and the longest, so the batch holds padding
    (a trace of an unpadded batch may keep a shortcut that skips the attention mask)."""
    n = _rows(sample)
    if "text" in sample:
        order = sorted(range(n), key=lambda i: len(sample["text"][i]))
        return _take(sample, [order[0], order[-1]])
    return _take(sample, [0, min(1, n - 1)])


def _check_batches(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole sample (padded), single inputs of other lengths, and the traced example."""
    n = _rows(sample)
    return [sample, _take(sample, [0]), _take(sample, [n - 1]), _example(sample)]


def _compared(exported: Any, adapter: Any, graph: Graph, inputs: dict[str, Any]
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The exported model's output, PyTorch's, and the mask of real tokens for token-level outputs.

    A causal LM's adapter hands over hidden states and the head rather than logits; its logits
    for positions ``0..T-2`` are computed from them here.
    """
    ours = exported(inputs)[graph.output].float().cpu()
    out = adapter(inputs)
    if isinstance(adapter, HFCausalLMAdapter):
        ref = out["hidden"] @ out["head"].T
        if "head_bias" in out:
            ref = ref + out["head_bias"]
        return ours[:, :-1], ref.float().cpu(), graph.encode(inputs)["attention_mask"][:, 1:].cpu()
    return ours, out[graph.output].float().cpu(), None


@torch.inference_mode()
def max_difference(exported: Any, adapter: Any, graph: Graph, batches: list[dict[str, Any]]) -> float:
    """Largest absolute difference between the exported model's outputs and PyTorch's.

    Token-level outputs are compared on real tokens only; a NaN or a shape mismatch counts as
    infinitely far.
    """
    adapter.module.eval()
    worst = 0.0
    for inputs in batches:
        ours, ref, mask = _compared(exported, adapter, graph, inputs)
        if ours.shape != ref.shape:
            return float("inf")
        diff = (ours - ref).abs()
        if mask is not None:
            diff = diff * mask.unsqueeze(-1)
        if not torch.isfinite(diff).all():
            return float("inf")
        worst = max(worst, float(diff.max()))
    return worst


def export_onnx(adapter: Any, path: Path, sample: dict[str, Any], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export a model to one ONNX file with dynamic batch (and sequence) axes, and check it.

    The check runs the file with onnxruntime on ``sample`` (the whole batch and single inputs
    of other lengths than the traced example) and compares with PyTorch.

    Uses the TorchScript-based exporter (``dynamo=False``), deprecated in torch 2.13 but there:
    it exports the demo student in about a second, where the ``torch.export`` path took 26 s for
    a 2-layer toy BERT on this machine and needs ``onnxscript`` besides; both matched PyTorch to
    1e-7 on that model, so the ``torch.export`` path is the way out when the old one goes.

    Args:
        adapter: The loaded model.
        path: Where to write the ``.onnx`` file.
        sample: Real raw inputs (``task.sample_inputs(16)``).
        tolerance: Largest absolute difference from PyTorch allowed.

    Raises:
        ModelError: When the export fails or differs from PyTorch by more than ``tolerance``
            (the file is then removed).
    """
    require_onnx()
    graph = graph_of(adapter)
    adapter.module.eval()
    example = graph.encode(_example(sample))
    axes = {name: graph.input_axes for name in graph.inputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(), torch.inference_mode():
            torch.onnx.export(graph.module, tuple(example[n] for n in graph.inputs), str(path), dynamo=False,
                              input_names=graph.inputs, output_names=[graph.output], opset_version=OPSET,
                              dynamic_axes={**axes, graph.output: graph.output_axes})
    except Exception as exc:  # the exporter fails in many ways (unsupported operators, Python control flow)
        raise ModelError(f"ONNX export of this {kind_of(adapter)} model failed: {exc}") from None
    diff = max_difference(load_onnx(path, graph), adapter, graph, _check_batches(sample))
    if not diff <= tolerance:
        path.unlink()
        raise ModelError(f"the ONNX model's outputs differ from PyTorch's by up to {diff:.3g} "
                         f"(tolerance {tolerance:g}); nothing was written. Raise --tolerance to accept it.")
    return {"file": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "tolerance": tolerance,
            "opset": OPSET}


def export_torchscript(adapter: Any, path: Path, sample: dict[str, Any], tolerance: float = TOLERANCE
                       ) -> dict[str, Any]:
    """Trace a model with ``torch.jit.trace``, save it, reload it and check it on other shapes.

    Raises:
        ModelError: When tracing fails, or the traced model does not hold for inputs shaped unlike
            the example it was traced with (tracing fixed a shape or a branch).
    """
    graph = graph_of(adapter)
    adapter.module.eval()
    example = graph.encode(_example(sample))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(graph.module, tuple(example[n] for n in graph.inputs), check_trace=False)
            traced.save(str(path))
            loaded = torch.jit.load(str(path))
    except Exception as exc:  # tracing fails in many ways (unsupported outputs, Python objects)
        raise ModelError(f"torch.jit.trace cannot capture this {kind_of(adapter)} model ({exc}); "
                         "use --format onnx") from None
    exported = ExportedAdapter(graph, lambda tensors: loaded(*(tensors[n] for n in graph.inputs)))
    with _quiet():
        diff = max_difference(exported, adapter, graph, _check_batches(sample))
    if not diff <= tolerance:
        path.unlink()
        raise ModelError(f"the traced model differs from PyTorch by up to {diff:.3g} (tolerance {tolerance:g}) on "
                         "inputs shaped unlike the traced example: tracing fixed a shape or a branch. "
                         "Use --format onnx.")
    return {"file": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "tolerance": tolerance}


def quantize_onnx(source: Path, target: Path) -> dict[str, Any]:
    """Int8 weights by onnxruntime's dynamic quantization (activations quantized on the fly).

    Matrix products and embedding tables are quantized, with one scale per output channel (on
    the demo student one scale per tensor costs 0.5 Spearman, one per channel 0.1, for the same
    size). Convolutions stay in float: onnxruntime 1.20 has no kernel for int8-weight
    ``ConvInteger``, and where one exists it was slower than the float convolution here.
    """
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # The quantizer logs advice to pre-process the model first; that pre-processing's shape
    # inference does not complete on these graphs, and quantizing without it works.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=[op for op in IntegerOpsRegistry if op != "Conv"])
    except Exception as exc:  # the quantizer raises plain exceptions for unsupported graphs
        raise ModelError(f"int8 quantization of {source} failed: {exc}") from None
    finally:
        logging.disable(logging.NOTSET)
    size = target.stat().st_size
    if size > 0.9 * source.stat().st_size:
        log.warning("the int8 model is hardly smaller (%.1f of %.1f MB): dynamic quantization covers matrix "
                    "products and embedding tables, not convolutions or Gemm", size / 1e6, source.stat().st_size / 1e6)
    return {"file": str(target), "bytes": size}


# --- a run's student -------------------------------------------------------------------------------


def sample_inputs(task: Any, kind: str) -> dict[str, Any]:
    """Real test inputs to trace and check with; fewer for a language model, whose check holds a
    batch of logits (tokens x vocabulary) in memory."""
    return task.sample_inputs(4 if kind == "hf-causal-lm" else 16)


def copy_saved(saved: Path, fmt: str, out: Path) -> dict[str, Any]:
    """``hf``: a copy of the saved student's folder; ``safetensors``: its weights file. Returns
    what to record of it."""
    if fmt == "hf":
        shutil.copytree(saved, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("distill.json"))
        return {}
    shutil.copy2(saved / "model.safetensors", out / "model.safetensors")
    return {"file": str(out / "model.safetensors")}


def export_traced(adapter: Any, fmt: str, out: Path, sample: dict[str, Any], int8: bool = False,
                  tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Write ``model.pt`` (``torchscript``) or ``model.onnx`` (``onnx``, and ``model.int8.onnx``
    with ``int8``) into ``out`` with the tokenizer beside it, each checked against PyTorch on
    ``sample``. Returns what to record of them."""
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if fmt == "torchscript":
        return export_torchscript(adapter, out / "model.pt", sample, tolerance)
    record = export_onnx(adapter, out / "model.onnx", sample, tolerance)
    if int8:
        int8_file = out / "model.int8.onnx"
        record["int8"] = quantize_onnx(out / "model.onnx", int8_file)
        record["int8"]["max_abs_diff"] = max_difference(load_onnx(int8_file, graph_of(adapter)), adapter,
                                                        graph_of(adapter), [sample])
    return record


def format_export(record: dict[str, Any]) -> str:
    """What ``distill export`` prints."""
    lines = [f"{record['format']}: {record.get('file', record['path'])}"]
    if "mean_kl" in record:
        lines.append(f"  against pytorch on test examples: mean KL {record['mean_kl']:.2e} nats/token (tolerance "
                     f"{record['tolerance']:g}), same top token {record['top1_agreement']:.1%}, max |log p diff| on "
                     f"the top 10 {record['max_abs_diff_top10']:.3f}; {record['bytes'] / 1e6:.1f} MB")
    if "max_abs_diff" in record:
        lines.append(f"  max |export - pytorch| {record['max_abs_diff']:.2e} on sample inputs "
                     f"(tolerance {record['tolerance']:g})")
    if "int8" in record:
        lines.append(f"int8: {record['int8']['file']} ({record['int8']['bytes'] / 1e6:.1f} MB, "
                     f"max |int8 - pytorch| {record['int8']['max_abs_diff']:.2e})")
    if "deployment" in record:
        head, body = deployment_table(record["deployment"])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)

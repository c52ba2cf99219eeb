"""Ship the student: export it, check the export against PyTorch, quantize it, measure it.

``distill export RUN --format onnx --int8`` writes ``RUN/export/onnx/model.onnx`` and
``model.int8.onnx`` with the tokenizer beside them, runs the float model with onnxruntime on
real test inputs and refuses it when its outputs differ from PyTorch's by more than a
tolerance. It then measures teacher, student and int8 student in PyTorch and in onnxruntime
(size, CPU latency at batch 1, throughput, quality on the test split), records everything in
``RUN/export/export.json`` and rewrites the report and the student's model card with it.

An exported model is the whole model a caller needs: an embedding model returns the pooled,
normalised sentence embedding, a classifier or a language model its logits.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import Recipe, load_recipe
from distill.errors import ModelError, RunFolderError
from distill.evaluate import folder_size, time_models
from distill.models.adapters import HFClassifierAdapter, HFEmbeddingAdapter, TorchClassifierAdapter, _unwrap
from distill.models.causal_lm import HFCausalLMAdapter
from distill.models.static import StaticEmbeddingAdapter
from distill.report import deployment_table, summarize
from distill.tasks import build_task

__all__ = [
    "FORMATS",
    "KIND_FORMATS",
    "TOLERANCE",
    "ExportedAdapter",
    "Graph",
    "check_format",
    "export_onnx",
    "export_run",
    "export_torchscript",
    "format_export",
    "graph_of",
    "kind_of",
    "load_onnx",
    "max_difference",
    "measure_deployment",
    "model_card",
    "quantize_onnx",
    "quantize_torch",
    "read_exports",
    "require_onnx",
    "write_model_card",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "hf", "safetensors", "torchscript")
"""Everything ``distill export --format`` knows."""

KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "hf-embedding": FORMATS,
    "hf-classifier": FORMATS,
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

_EXPORT_JSON = Path("export") / "export.json"


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
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


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
        return Graph(_unwrap(adapter.module), ["x"], lambda inputs: {"x": inputs["x"].float()}, "logits",
                     {0: "batch"}, {0: "batch"})
    if kind == "static-embedding":
        def encode_static(inputs: dict[str, Any]) -> dict[str, Tensor]:
            enc = adapter.tokenizer(list(inputs["text"]), add_special_tokens=False, padding=True, truncation=True,
                                    max_length=adapter.max_length, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        module = _StaticMean(_unwrap(adapter.module).embeddings, adapter.normalize)
        return Graph(module, ["input_ids", "attention_mask"], encode_static, "embedding", text_axes, {0: "batch"})
    names = list(adapter.tokenize(["a"]))
    model = _unwrap(adapter.module)
    if kind == "hf-embedding":
        return Graph(_PooledEncoder(model, names, adapter.pooling, adapter.normalize), names,
                     lambda inputs: adapter.tokenize(inputs["text"]), "embedding", text_axes, {0: "batch"})
    if kind == "hf-causal-lm":
        # The adapter gives the model ids and mask only (a tokenizer's token_type_ids would be
        # added as embeddings by some LMs); encode() also reads prompt/completion and chat records.
        names = ["input_ids", "attention_mask"]
        return Graph(_Logits(model, names, use_cache=False), names, adapter.encode if hasattr(adapter, "encode")
                     else lambda inputs: adapter.tokenize(inputs["text"]), "logits", text_axes, text_axes)
    return Graph(_Logits(model, names), names, lambda inputs: adapter.tokenize(inputs["text"]), "logits",
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


def quantize_torch(adapter: Any) -> Any | None:
    """A copy of the model whose linear layers compute in int8 (PyTorch dynamic quantization), or
    ``None`` when it has none. A language model's output head stays in float: the adapter hands it
    over as a weight matrix."""
    module = _unwrap(adapter.module)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    linear = {name for name, m in module.named_modules() if isinstance(m, nn.Linear) and m is not head}
    if not linear:
        return None
    quantized = copy.copy(adapter)
    with warnings.catch_warnings():
        # torch 2.13 announces that its quantized tensor types will go in a later release; they
        # still work, and this row is how a reader compares onnxruntime's int8 with PyTorch's.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        quantized.module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module).eval(), linear,
                                                                  dtype=torch.qint8)
    return quantized


# --- deployment figures ----------------------------------------------------------------------------


def _state_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(buffer.getvalue())


def _saved_bytes(adapter: Any) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(Path(tmp))
        return folder_size(Path(tmp))


@torch.inference_mode()
def _perplexity(model: ExportedAdapter, task: Any) -> float:
    """Held-out perplexity from an exported language model's logits (the task's own evaluation
    reads hidden states and the head, which an exported model does not give)."""
    data = task.splits["test"]
    nll, tokens = 0.0, 0
    for start in range(0, len(data), 16):
        inputs = data.batch(range(start, min(start + 16, len(data))))["inputs"]
        enc = model.encode(inputs)
        logits = model(inputs)["logits"][:, :-1].float()
        mask = enc.get("loss_mask", enc["attention_mask"])[:, 1:].cpu().float()
        losses = F.cross_entropy(logits.transpose(1, 2), enc["input_ids"][:, 1:].cpu(), reduction="none")
        nll += float((losses * mask).sum())
        tokens += int(mask.sum())
    return float(torch.exp(torch.tensor(nll / max(tokens, 1))))


def _quality(model: Any, task: Any) -> float:
    if isinstance(model, ExportedAdapter) and task.metric == "perplexity":
        return _perplexity(model, task)
    return float(task.evaluate(model, "test"))


def _machine() -> str:
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def measure_deployment(folder: Path, recipe: Recipe, task: Any, student: Any, onnx_file: Path,
                       int8_file: Path | None, tolerance: float = TOLERANCE, rounds: int = 1) -> dict[str, Any]:
    """Teacher, student and int8 student in PyTorch and onnxruntime: size, CPU latency, quality.

    The models are timed in turn, pass by pass, on real test inputs (tokenisation included), as
    the run's evaluation times them; with ``rounds`` above 1 that is repeated and the medians of
    the rounds are kept (``latency_ms_rounds`` lists each). The float PyTorch qualities are the
    evaluation's own (``eval.json``), measured the same way; every other quality is measured here
    on the test split.
    """
    from distill.runner import load_teacher  # the runner writes model cards with this module

    evaluated = {}
    if (folder / "eval.json").is_file():
        evaluated = json.loads((folder / "eval.json").read_text())["models"]
    teacher = load_teacher(recipe)
    teacher.module.to("cpu")
    metric = task.metric
    entries: dict[tuple[str, str, str], tuple[Any, int]] = {
        ("teacher", "pytorch", "float32"): (teacher, evaluated.get("teacher", {}).get("size_bytes")
                                            or _saved_bytes(teacher)),
        ("student", "pytorch", "float32"): (student, folder_size(folder / "student")),
        ("student", "onnxruntime", "float32"): (load_onnx(onnx_file, graph_of(student)), onnx_file.stat().st_size),
    }
    if int8_file is not None:
        quantized = quantize_torch(student)
        if quantized is not None:
            entries["student", "pytorch", "int8"] = (quantized, _state_bytes(quantized.module))
        entries["student", "onnxruntime", "int8"] = (load_onnx(int8_file, graph_of(student)),
                                                    int8_file.stat().st_size)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            teacher_file = Path(tmp) / "teacher.onnx"
            export_onnx(teacher, teacher_file, _sample(task, recipe.teacher.kind or "torch"), tolerance)
            entries["teacher", "onnxruntime", "float32"] = (load_onnx(teacher_file, graph_of(teacher)),
                                                            teacher_file.stat().st_size)
        except ModelError as exc:
            log.warning("the teacher is left out of the onnxruntime rows: %s", exc)
        order = sorted(entries, key=lambda k: (k[0] != "teacher", k[2] != "float32", k[1] != "pytorch"))
        rows = []
        for key in order:
            model, size = entries[key]
            known = evaluated.get(key[0], {}).get(metric) if key[1:] == ("pytorch", "float32") else None
            log.info("measuring %s quality", " ".join(key))
            quality = known if known is not None else _quality(model, task)
            rows.append({"model": key[0], "runtime": key[1], "weights": key[2], "size_bytes": size, metric: quality})
        models = {" ".join(k): entries[k][0] for k in order}
        timings = []
        for i in range(rounds):
            log.info("timing %d models in turn (round %d of %d)", len(order), i + 1, rounds)
            timings.append(time_models(models, task, recipe.evaluate))
    for row, key in zip(rows, order, strict=True):
        runs = [t[" ".join(key)] for t in timings]
        row.update(runs[0])
        for figure in ("latency_ms", "latency_ms_iqr", "throughput"):
            row[figure] = statistics.median(r[figure] for r in runs)
        row["latency_ms_rounds"] = [r["latency_ms"] for r in runs]
    import onnxruntime

    return {"metric": metric, "higher_is_better": getattr(task, "higher_is_better", True), "machine": _machine(),
            "onnxruntime": onnxruntime.__version__, "rows": rows}


# --- the run folder -------------------------------------------------------------------------------


def read_exports(folder: Path) -> dict[str, Any]:
    """What earlier exports of a run recorded (``export/export.json``), or ``{}``."""
    path = folder / _EXPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _sample(task: Any, kind: str) -> dict[str, Any]:
    """Real test inputs to trace and check with; fewer for a language model, whose check holds a
    batch of logits (tokens x vocabulary) in memory."""
    return task.sample_inputs(4 if kind == "hf-causal-lm" else 16)


def _save_tokenizer(adapter: Any, out: Path) -> None:
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def export_run(folder: Path, fmt: str, *, int8: bool = False, out: Path | None = None,
               tolerance: float = TOLERANCE, measure: bool = True, rounds: int = 1) -> dict[str, Any]:
    """Export a finished run's student and record it in ``folder/export/export.json``.

    ``onnx`` and ``torchscript`` exports are checked against PyTorch on real test inputs; an
    ONNX export is then measured against the teacher (unless ``measure`` is false), and the
    report and model card are rewritten with the figures.

    Args:
        folder: The run folder.
        fmt: ``onnx``, ``hf`` (a copy of the saved transformers folder), ``safetensors`` (the
            weights file) or ``torchscript``.
        int8: Also write an int8 ONNX model (onnxruntime dynamic quantization).
        out: Where to write; default ``folder/export/<fmt>``.
        tolerance: Largest absolute difference from PyTorch's outputs allowed.
        measure: Measure size, latency and quality of the ONNX models against the teacher.
        rounds: Timing rounds; the medians are reported (a machine shared with other jobs
            gives noisy timings).

    Returns:
        The record of this export (files, check, deployment figures).
    """
    from distill.runner import load_model, report_run  # the runner writes model cards with this module

    if not (folder / "recipe.yaml").is_file():
        raise RunFolderError(f"{folder} is not a run folder (no recipe.yaml)")
    recipe = load_recipe(folder / "recipe.yaml")
    kind = recipe.student_kind
    check_format(kind, fmt, int8)
    if fmt == "onnx":
        require_onnx()
    saved = folder / "student"
    if not (saved / "distill.json").is_file():
        raise RunFolderError(f"{folder}: no trained student yet; run the recipe first")
    out = Path(out) if out is not None else folder / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"format": fmt, "path": str(out)}
    deployment = None
    if fmt == "hf":
        shutil.copytree(saved, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("distill.json"))
    elif fmt == "safetensors":
        shutil.copy2(saved / "model.safetensors", out / "model.safetensors")
        record["file"] = str(out / "model.safetensors")
    else:
        task = build_task(recipe.task, recipe.data)
        student = load_model(recipe.student, kind, str(saved))
        student.module.to("cpu").eval()
        sample = _sample(task, kind)
        _save_tokenizer(student, out)
        if fmt == "torchscript":
            record.update(export_torchscript(student, out / "model.pt", sample, tolerance))
        else:
            record.update(export_onnx(student, out / "model.onnx", sample, tolerance))
            int8_file = None
            if int8:
                int8_file = out / "model.int8.onnx"
                record["int8"] = quantize_onnx(out / "model.onnx", int8_file)
                record["int8"]["max_abs_diff"] = max_difference(load_onnx(int8_file, graph_of(student)), student,
                                                                graph_of(student), [sample])
            if measure:
                deployment = measure_deployment(folder, recipe, task, student, out / "model.onnx", int8_file,
                                                tolerance, rounds)
                record["deployment"] = deployment
    exports = read_exports(folder)
    exports.setdefault("exports", {})[fmt] = {k: v for k, v in record.items() if k != "deployment"}
    if deployment is not None:
        exports["deployment"] = deployment
    (folder / _EXPORT_JSON).parent.mkdir(parents=True, exist_ok=True)
    (folder / _EXPORT_JSON).write_text(json.dumps(exports, indent=2) + "\n")
    if (folder / "eval.json").is_file():
        report_run(folder)  # the report and the model card gain the export
    return record


def format_export(record: dict[str, Any]) -> str:
    """What ``distill export`` prints."""
    lines = [f"{record['format']}: {record.get('file', record['path'])}"]
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


# --- model card -----------------------------------------------------------------------------------


def _usage(kind: str, recipe: Recipe, student: Path) -> str:
    """How to run the saved student without distill."""
    spec = recipe.student
    if kind == "hf-embedding":
        pool = ("hidden[:, 0]" if spec.pooling == "cls" else
                "(hidden * mask).sum(1) / mask.sum(1)")
        norm = "torch.nn.functional.normalize(pooled, dim=-1)" if spec.normalize else "pooled"
        return (f"import torch\nfrom transformers import AutoModel, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{student}\")\n"
                f"model = AutoModel.from_pretrained(\"{student}\").eval()\n"
                f"batch = tokenizer([\"A man is playing a guitar.\"], padding=True, truncation=True, "
                f"max_length={spec.max_length}, return_tensors=\"pt\")\n"
                f"with torch.no_grad():\n    hidden = model(**batch).last_hidden_state\n"
                f"mask = batch[\"attention_mask\"].unsqueeze(-1).float()\n"
                f"pooled = {pool}\nembedding = {norm}\n")
    if kind == "hf-classifier":
        return (f"import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{student}\")\n"
                f"model = AutoModelForSequenceClassification.from_pretrained(\"{student}\").eval()\n"
                f"batch = tokenizer([\"A fine film.\"], padding=True, truncation=True, max_length={spec.max_length}, "
                f"return_tensors=\"pt\")\nwith torch.no_grad():\n    logits = model(**batch).logits\n")
    if kind == "hf-causal-lm":
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{student}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{student}\").eval()\n"
                f"batch = tokenizer([\"Once upon a time\"], return_tensors=\"pt\")\n"
                f"text = tokenizer.decode(model.generate(**batch, max_new_tokens=20)[0])\n")
    if kind == "static-embedding":
        return (f"from model2vec import StaticModel\n\nmodel = StaticModel.from_pretrained(\"{student}\")\n"
                f"embedding = model.encode([\"A man is playing a guitar.\"])\n")
    arch = json.loads((student / "config.json").read_text()) if (student / "config.json").is_file() else {}
    return (f"from safetensors.torch import load_file\nfrom distill.models.zoo import ARCHITECTURES\n\n"
            f"model = ARCHITECTURES.get(\"{arch.get('arch')}\")(**{arch.get('arch_args', {})!r})\n"
            f"model.load_state_dict(load_file(\"{student / 'model.safetensors'}\"))\n"
            f"logits = model.eval()(images)  # (N, 1, 28, 28), standardised as in training\n")


def _onnx_usage(kind: str, recipe: Recipe, onnx: dict[str, Any]) -> str:
    """How to run the exported ONNX model with onnxruntime alone (and the tokenizer)."""
    path = Path(onnx["path"])
    if kind == "torch":
        return (f"import numpy as np\nimport onnxruntime as ort\n\n"
                f"session = ort.InferenceSession(\"{path / 'model.onnx'}\")\n"
                f"logits = session.run(None, {{\"x\": images.astype(np.float32)}})[0]  # (N, 1, 28, 28)\n")
    special = ", add_special_tokens=False" if kind == "static-embedding" else ""
    what = {"hf-embedding": "embedding", "static-embedding": "embedding"}.get(kind, "logits")
    return (f"import onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
            f"session = ort.InferenceSession(\"{path / 'model.onnx'}\")  # or model.int8.onnx\n"
            f"batch = tokenizer([\"A man is playing a guitar.\"], padding=True, truncation=True, "
            f"max_length={recipe.student.max_length}{special}, return_tensors=\"np\")\n"
            f"{what} = session.run(None, {{i.name: batch[i.name] for i in session.get_inputs()}})[0]"
            + ("  # pooled and normalised\n" if what == "embedding" else "\n"))


def model_card(summary: dict[str, Any], recipe: Recipe, student: Path, exports: dict[str, Any]) -> str:
    """The student's README.md: where it comes from, how good, small and fast it is, how to load it.

    Args:
        summary: The run's evaluation (``eval.json``).
        recipe: The run's recipe.
        student: The saved student folder (paths in the snippets point there).
        exports: What ``export/export.json`` holds (deployment figures, ONNX files), or ``{}``.
    """
    kind = recipe.student_kind
    metric = summary["metric"]
    higher = summary.get("higher_is_better", True)
    rows = {r["model"]: r for r in summarize(summary["models"], metric, higher)}
    s = rows["student"]
    lines = [
        f"# {summary['recipe']}: distilled student", "",
        f"A `{kind}` model trained with distill to imitate the teacher `{summary['teacher']}`. "
        f"Figures are on the test split of `{summary['data']}`; speeds on {summary['machine']}.", "",
        f"- **teacher**: `{summary['teacher']}` ({rows['teacher']['parameters'] / 1e6:.2f}M parameters)",
        f"- **student**: {summary['student']} ({s['parameters'] / 1e6:.2f}M parameters)",
        f"- **data**: `{summary['data']}` (task `{recipe.task}`)",
        f"- **method**: {summary['losses']}; {summary['steps']} steps",
    ]
    if "baseline" in rows:
        lines.append("- **baseline**: the same student trained on the task loss alone, for the same steps")
    lines += ["", "## Quality, size and speed", "",
              f"| model | {metric} | retained | parameters | size (MB) | smaller | latency b1 (ms) | speed-up b1 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['model']} | {r[metric]:.2f} | {r['retention_pct']:.1f}% | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['size_mb']:.1f} | {r['smaller_x']:.2f}x | {r['latency_ms']:.2f} | "
                     f"{r['speedup_latency_x']:.2f}x |")
    text = (f"The student keeps {s['retention_pct']:.1f}% of the teacher's {metric}, is {s['smaller_x']:.2f}x smaller "
            f"on disk and {s['speedup_latency_x']:.2f}x faster at batch 1 on CPU.")
    if "baseline" in rows:
        text += (f" Trained without the teacher, the same student keeps {rows['baseline']['retention_pct']:.1f}%.")
    lines += ["", text]
    if "deployment" in exports:
        dep = exports["deployment"]
        head, body = deployment_table(dep)
        lines += ["", "## Deployment (CPU)", "",
                  f"Batch-1 latency and quality of the exported models, measured on {dep['machine']} "
                  f"(onnxruntime {dep['onnxruntime']}).", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", "## Use it", "", "```python", _usage(kind, recipe, student).rstrip(), "```"]
    onnx = exports.get("exports", {}).get("onnx")
    if onnx is not None:
        lines += ["", "With onnxruntime (no PyTorch needed):", "", "```python",
                  _onnx_usage(kind, recipe, onnx).rstrip(), "```"]
    else:
        folder = student.parent
        lines += ["", f"For onnxruntime, export it first: `distill export {folder} --format onnx --int8`."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, summary: dict[str, Any]) -> Path | None:
    """Write ``student/README.md`` in a run folder from its evaluation and exports (``None`` when
    the run has no saved student)."""
    student = folder / "student"
    if not (student / "distill.json").is_file():
        return None
    recipe = load_recipe(folder / "recipe.yaml")
    card = student / "README.md"
    card.write_text(model_card(summary, recipe, student, read_exports(folder)))
    return card

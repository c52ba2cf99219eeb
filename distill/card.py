"""The student's model card (``student/README.md``) and the run's export records.

The card says where the student comes from, how good, small and fast it is against its teacher
and how to run it without distill (with onnxruntime too, once exported). It is written from the
run's evaluation (``eval.json``) and what ``distill export`` recorded (``export/export.json``),
each time the report is.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml

from distill.config import Recipe, load_recipe
from distill.models.zoo import ARCHITECTURES
from distill.records import read_json
from distill.report import count, deployment_table, megabytes, ratio, summarize
from distill.tasks.classification import PIXEL_MEAN, PIXEL_STD

__all__ = ["EXPORT_JSON", "front_matter", "model_card", "read_exports", "record_export", "write_model_card"]

EXPORT_JSON = Path("export") / "export.json"
"""Where a run folder records its exports, relative to the folder."""


def read_exports(folder: Path) -> dict[str, Any]:
    """What earlier exports of a run recorded (``export/export.json``), or ``{}``."""
    path = folder / EXPORT_JSON
    return read_json(path, "export the run again") if path.is_file() else {}


def record_export(folder: Path, fmt: str, record: dict[str, Any]) -> None:
    """Add an export to ``export/export.json``: its files and checks under ``exports``, and its
    deployment figures (when it has any) as the run's ``deployment``."""
    exports = read_exports(folder)
    exports.setdefault("exports", {})[fmt] = {k: v for k, v in record.items() if k != "deployment"}
    if "deployment" in record:
        exports["deployment"] = record["deployment"]
    (folder / EXPORT_JSON).parent.mkdir(parents=True, exist_ok=True)
    (folder / EXPORT_JSON).write_text(json.dumps(exports, indent=2) + "\n")


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
                f"batch = tokenizer({_example_texts(recipe)}, padding=True, truncation=True, "
                f"max_length={spec.max_length}, return_tensors=\"pt\")\n"
                f"with torch.no_grad():\n    logits = model(**batch).logits\n"
                + ("score = float(logits[0, 0])  # the predicted score\n" if recipe.task == "regression" else
                   "label = model.config.id2label[int(logits.argmax(-1)[0])]  # the class names are in config.json\n"))
    if kind == "hf-causal-lm":
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{student}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{student}\").eval()\n"
                f"batch = tokenizer([\"Once upon a time\"], return_tensors=\"pt\")\n"
                f"text = tokenizer.decode(model.generate(**batch, max_new_tokens=20)[0])\n")
    if kind == "static-embedding":
        return (f"from model2vec import StaticModel\n\nmodel = StaticModel.from_pretrained(\"{student}\")\n"
                f"embedding = model.encode([\"A man is playing a guitar.\"])\n")
    arch = read_json(student / "config.json") if (student / "config.json").is_file() else {}
    cls = ARCHITECTURES.get(arch.get("arch", "convnet"))
    shape, mean, std, labels = _pixels(arch)
    return (f"import torch\nfrom safetensors.torch import load_file\nfrom torch import Tensor, nn\n\n\n"
            f"{_architecture_source(cls)}\n\n"
            f"model = {cls.__name__}(**{arch.get('arch_args', {})!r})\n"
            f"model.load_state_dict(load_file(\"{student / 'model.safetensors'}\"))\n"
            f"images = torch.rand(4, {shape})  # your images: (N, {shape}), pixels scaled to [0, 1]\n"
            f"mean = torch.tensor({mean}).view(1, -1, 1, 1)  # per channel, of the training images\n"
            f"std = torch.tensor({std}).view(1, -1, 1, 1)\n"
            f"x = (images - mean) / std  # standardised as in training\n"
            f"with torch.no_grad():\n    logits = model.eval()(x)\n"
            f"labels = {labels!r}\nlabel = labels[int(logits[0].argmax())]\n")


def _example_texts(recipe: Recipe) -> str:
    """The texts a text classifier's snippet passes its tokenizer: one list, or two for pairs."""
    if isinstance(recipe.data.text_column, str):
        return "[\"A fine film.\"]"
    return "[\"A man is playing a guitar.\"], [\"A person plays music.\"]"  # the first texts, then their pairs


def _pixels(config: dict[str, Any]) -> tuple[str, list[float], list[float], list[str]]:
    """An image student's input shape ``C, H, W``, per-channel mean and std and class names, from
    what its ``config.json`` records (Fashion-MNIST's for students saved without them)."""
    pre = config.get("preprocessing") or {}
    channels, (height, width) = pre.get("channels", 1), pre.get("size", (28, 28))
    classes = config.get("arch_args", {}).get("num_classes", 10)
    return (f"{channels}, {height}, {width}", pre.get("mean", [PIXEL_MEAN]), pre.get("std", [PIXEL_STD]),
            pre.get("labels", [str(i) for i in range(classes)]))


def _architecture_source(cls: type) -> str:
    """The class's source and the module-level functions it calls: a card that runs without distill."""
    module = inspect.getmodule(cls)
    if module is None or not module.__name__.startswith("distill."):
        return f"from {cls.__module__} import {cls.__name__}"  # the user's own architecture
    source = inspect.getsource(cls)
    helpers = [inspect.getsource(f) for name, f in vars(module).items()
               if inspect.isfunction(f) and f.__module__ == module.__name__ and f"{name}(" in source]
    return "\n\n".join([*helpers, source]).strip()


def _onnx_usage(kind: str, recipe: Recipe, onnx: dict[str, Any], student: Path) -> str:
    """How to run the exported ONNX model with onnxruntime alone (and the tokenizer)."""
    path = Path(onnx["path"])
    if kind == "torch":
        config = read_json(student / "config.json") if (student / "config.json").is_file() else {}
        shape, mean, std, labels = _pixels(config)
        return (f"import numpy as np\nimport onnxruntime as ort\n\n"
                f"session = ort.InferenceSession(\"{path / 'model.onnx'}\")\n"
                f"images = np.random.rand(4, {shape})  # your images: (N, {shape}), pixels scaled to [0, 1]\n"
                f"mean = np.array({mean}).reshape(1, -1, 1, 1)  # per channel, of the training images\n"
                f"std = np.array({std}).reshape(1, -1, 1, 1)\n"
                f"x = ((images - mean) / std).astype(np.float32)  # standardised as in training\n"
                f"logits = session.run(None, {{\"x\": x}})[0]\n"
                f"labels = {labels!r}\nlabel = labels[int(logits[0].argmax())]\n")
    special = ", add_special_tokens=False" if kind == "static-embedding" else ""
    what = {"hf-embedding": "embedding", "static-embedding": "embedding"}.get(kind, "logits")
    texts = _example_texts(recipe) if kind == "hf-classifier" else "[\"A man is playing a guitar.\"]"
    return (f"import onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
            f"session = ort.InferenceSession(\"{path / 'model.onnx'}\")  # or model.int8.onnx\n"
            f"batch = tokenizer({texts}, padding=True, truncation=True, "
            f"max_length={recipe.student.max_length}{special}, return_tensors=\"np\")\n"
            f"{what} = session.run(None, {{i.name: batch[i.name] for i in session.get_inputs()}})[0]"
            + ("  # pooled and normalised\n" if what == "embedding" else "\n"))


#: The Hub's library and pipeline tags per kind of student (``None``: the task decides).
_LIBRARY = {"torch": "pytorch", "hf-classifier": "transformers", "hf-embedding": "sentence-transformers",
            "hf-causal-lm": "transformers", "static-embedding": "model2vec"}
_PIPELINE = {"classification": None, "regression": "text-classification", "sts": "sentence-similarity",
             "embedding": "sentence-similarity", "lm": "text-generation"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(source: str | None) -> str | None:
    """``source`` when it reads as a Hub id (``owner/name``) and is no local path, else ``None``."""
    if not source or not _HUB_ID.match(source) or Path(source).exists() or source.startswith(("runs/", "run:")):
        return None
    return source


def front_matter(summary: dict[str, Any], recipe: Recipe) -> str:
    """The card's YAML header, as the Hugging Face Hub reads it: library, pipeline, tags, the
    teacher as ``base_model`` (when it is a Hub id), the dataset (a Hub dataset), and a
    ``model-index`` with the test figures of the student, the teacher and the baseline."""
    kind = recipe.student_kind
    pipeline = _PIPELINE.get(recipe.task) or (
        "image-classification" if kind == "torch" else "text-classification")
    meta: dict[str, Any] = {"library_name": _LIBRARY.get(kind, "pytorch"), "pipeline_tag": pipeline,
                            "tags": ["distill", "distillation", "knowledge-distillation"]}
    teacher = _hub_id(str(summary["teacher"])) if summary.get("teacher") else None
    if teacher:
        meta["base_model"] = teacher  # the teacher; the Hub has no relation type for a distilled student
    dataset = recipe.data.path if recipe.data.format == "hf-dataset" else None
    if dataset is not None and _hub_id(str(dataset)):
        meta["datasets"] = [str(dataset)]
    metric = summary["metric"]
    results = [{"type": metric, "name": f"{role} {metric}", "value": round(float(figures[metric]), 4)}
               for role, figures in summary["models"].items() if metric in figures]
    meta["model-index"] = [{"name": summary["recipe"], "results": [{
        "task": {"type": pipeline},
        "dataset": {"name": str(recipe.data.path), "type": str(dataset or recipe.data.format)},
        "metrics": results}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def _verdict(rows: dict[str, dict[str, Any]], metric: str) -> str:
    """The card's one-paragraph summary of the student against its teacher and baseline."""
    if "teacher" not in rows:
        return ""
    s = rows["student"]
    kept = (f"keeps {s['retention_pct']:.1f}% of the teacher's {metric}" if s.get("retention_pct") is not None
            else f"scores {s[metric]:.2f} {metric}")
    text = (f"The student {kept}, is {s['smaller_x']:.2f}x smaller on disk and {s['speedup_latency_x']:.2f}x faster "
            "at batch 1 on CPU.")
    if "baseline" in rows:
        b = rows["baseline"]
        text += (f" Trained without the teacher, the same student keeps {b['retention_pct']:.1f}%." if
                 b.get("retention_pct") is not None else
                 f" Trained without the teacher, the same student scores {b[metric]:.2f}.")
    return text


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
    where = f"Figures are on the test split of `{summary['data']}`; speeds on {summary['machine']}."
    if "teacher" in rows:
        lines = [f"# {summary['recipe']}: distilled student", "",
                 f"A `{kind}` model trained with distill to imitate the teacher `{summary['teacher']}`. {where}", "",
                 f"- **teacher**: `{summary['teacher']}` ({count(rows['teacher']['parameters'])} parameters)"]
    else:
        lines = [f"# {summary['recipe']}", "", f"A `{kind}` model trained with distill on labels alone. {where}", ""]
    lines += [
        f"- **model**: {summary['student']} ({count(s['parameters'])} parameters)" if "teacher" not in rows else
        f"- **student**: {summary['student']} ({count(s['parameters'])} parameters)",
        f"- **data**: `{summary['data']}` (task `{recipe.task}`)",
        f"- **method**: {summary['losses']}; {summary['steps']} steps",
    ]
    if "baseline" in rows:
        lines.append("- **baseline**: the same student trained on the task loss alone, for the same steps")
    lines += ["", "## Quality, size and speed", "",
              f"| model | {metric} | retained | parameters | size (MB) | smaller | latency b1 (ms) | speed-up b1 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['model']} | {r[metric]:.2f} | {ratio(r['retention_pct'], '%', 1)} | "
                     f"{count(r['parameters'])} | {megabytes(r['size_mb'] * 1e6)} | {ratio(r['smaller_x'])} | "
                     f"{r['latency_ms']:.2f} | {ratio(r['speedup_latency_x'])} |")
    lines += ["", _verdict(rows, metric)]
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
                  _onnx_usage(kind, recipe, onnx, student).rstrip(), "```"]
    else:
        folder = student.parent
        lines += ["", f"For onnxruntime, export it first: `distill export {folder} --format onnx --int8`."]
    return front_matter(summary, recipe) + "\n".join(lines) + "\n"


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

"""``distill export``: a finished run's student checked, exported, measured and recorded.

The command's steps, in order: the student folder is checked (weights, config, a tokenizer that
covers the embedding table), the output folder claimed (never one holding the user's files),
the student exported (:mod:`distill.export`), an ONNX export measured against the teacher
(:mod:`distill.deploy`), the record written (:mod:`distill.card`) and the report rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.card import record_export
from distill.config import Recipe, load_recipe
from distill.deploy import measure_deployment
from distill.errors import RunFolderError
from distill.export import TOLERANCE, check_format, copy_saved, export_traced, require_onnx, sample_inputs
from distill.export_gguf import export_gguf, gguf_agreement
from distill.models.load import load_model
from distill.records import read_json
from distill.runner import final_folder, report_run
from distill.tasks import build_task

__all__ = ["EXPORT_MARK", "export_run"]


#: Largest mean KL divergence (nats per token) of a GGUF file's next-token distribution from the
#: PyTorch student's, per quantisation (measured on a SmolLM2 student: 1.5e-6 f16, 6.6e-4 q8_0).
GGUF_TOLERANCE = {"f16": 1e-4, "q8_0": 5e-3}


def export_run(folder: Path, fmt: str, *, int8: bool = False, out: Path | None = None,
               tolerance: float = TOLERANCE, measure: bool = True, rounds: int = 1, quant: str = "q8_0"
               ) -> dict[str, Any]:
    """``distill export``: export a finished run's student and record it in ``folder/export/export.json``.

    ``onnx`` and ``torchscript`` exports are checked against PyTorch on real test inputs; an
    ONNX export is then measured against the teacher (unless ``measure`` is false), and the
    report and model card are rewritten with the figures.

    Args:
        folder: The run folder.
        fmt: ``onnx``, ``hf`` (a copy of the saved transformers folder), ``safetensors`` (the
            weights file), ``torchscript`` or ``gguf`` (a Llama-shaped causal LM, for llama.cpp).
        int8: Also write an int8 ONNX model (onnxruntime dynamic quantization).
        out: Where to write; default ``folder/export/<fmt>``.
        tolerance: Largest absolute difference from PyTorch's outputs allowed.
        measure: Measure size, latency and quality of the ONNX models against the teacher.
        rounds: Timing rounds; the medians are reported (a machine shared with other jobs
            gives noisy timings).
        quant: GGUF: ``q8_0`` or ``f16``; the file is read back by ``transformers`` and its
            next-token distribution checked against PyTorch's (mean KL, :data:`GGUF_TOLERANCE`).

    Returns:
        The record of this export (files, check, deployment figures).
    """
    if not (folder / "recipe.yaml").is_file():
        raise RunFolderError(f"{folder} is not a run folder (no recipe.yaml)")
    folder = final_folder(folder)  # a staged run ships its last stage's student
    recipe = load_recipe(folder / "recipe.yaml")
    check_format(recipe.student_kind, fmt, int8)
    if fmt == "onnx":
        require_onnx()
    if not (folder / "student" / "distill.json").is_file():
        raise RunFolderError(f"{folder}: no trained student yet; run the recipe first")
    out = Path(out) if out is not None else folder / "export" / fmt
    _check_student_folder(folder / "student", recipe.student_kind)
    _claim_export_folder(out)
    record: dict[str, Any] = {"format": fmt, "path": str(out)}
    if fmt in ("hf", "safetensors"):
        record.update(copy_saved(folder / "student", fmt, out))
    elif fmt == "gguf":
        record.update(_export_gguf(folder, recipe, out, quant))
    else:
        record.update(_export_student(folder, recipe, fmt, out, int8, tolerance, measure, rounds))
    record_export(folder, fmt, record)
    if (folder / "eval.json").is_file():
        report_run(folder)  # the report and the model card gain the export
    return record


#: The file that marks a folder as one of distill's exports (so exporting there again may overwrite it).
EXPORT_MARK = ".distill-export"


def _claim_export_folder(out: Path) -> None:
    """Create ``out``, or reuse it if empty or an earlier export; refuse a folder with the user's files."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARK).is_file():
        raise RunFolderError(f"--out {out} holds files that are not an earlier distill export; nothing was written. "
                             "Give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_MARK).write_text("written by distill export; exporting here again overwrites this folder\n")


def _check_student_folder(saved: Path, kind: str) -> None:
    """Refuse to export a student folder without its weights or config, or whose tokenizer does not
    cover its embedding table (every word would become an unknown token)."""
    weights = sorted(saved.glob("*.safetensors"))
    if not weights or not (saved / "config.json").is_file():
        raise RunFolderError(f"{saved}: the student folder lacks its weights (*.safetensors) or config.json")
    if kind not in ("hf-embedding", "hf-classifier", "hf-causal-lm", "static-embedding"):
        return
    if not any((saved / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        raise RunFolderError(f"{saved}: the student folder has no tokenizer (tokenizer.json, vocab.txt); an export "
                             "without it would turn every word into an unknown token")
    rows = read_json(saved / "config.json", "run the recipe again to save the student").get("vocab_size")
    if isinstance(rows, int):
        from transformers import AutoTokenizer

        tokens = len(AutoTokenizer.from_pretrained(str(saved)))
        if tokens > rows:
            raise RunFolderError(f"{saved}: the tokenizer has {tokens:,} tokens but the embedding table {rows:,} "
                                 "rows; they do not belong together")


def _export_gguf(folder: Path, recipe: Recipe, out: Path, quant: str) -> dict[str, Any]:
    """The student as ``out/model-QUANT.gguf``, read back and checked on three test examples."""
    path = out / f"model-{quant}.gguf"
    record = export_gguf(folder / "student", path, quant)
    inputs = build_task(recipe.task, recipe.data).sample_inputs(3)
    fields = [v for v in inputs.values() if isinstance(v, list) and v and isinstance(v[0], str)]
    texts = ["".join(parts) for parts in zip(*fields, strict=True)] or ["The quick brown fox jumps over the lazy dog."]
    check = gguf_agreement(folder / "student", path, texts)
    record.update({**check, "tolerance": GGUF_TOLERANCE[quant]})
    if not check["mean_kl"] <= GGUF_TOLERANCE[quant]:
        path.unlink()
        raise RunFolderError(f"the GGUF file's next-token distribution is {check['mean_kl']:.3g} nats per token from "
                             f"PyTorch's (mean KL; tolerance {GGUF_TOLERANCE[quant]} for {quant}); it was removed")
    return record


def _export_student(folder: Path, recipe: Recipe, fmt: str, out: Path, int8: bool, tolerance: float,
                    measure: bool, rounds: int) -> dict[str, Any]:
    """The run's student traced to ``fmt`` in ``out`` and checked; an ONNX one measured too (``deployment``)."""
    task = build_task(recipe.task, recipe.data)
    student = load_model(recipe.student, recipe.student_kind, str(folder / "student"))
    student.module.to("cpu").eval()
    sample = sample_inputs(task, recipe.student_kind)
    record = export_traced(student, fmt, out, sample, int8, tolerance)
    if fmt == "onnx" and measure:
        int8_file = out / "model.int8.onnx" if int8 else None
        record["deployment"] = measure_deployment(folder, recipe, task, student, out / "model.onnx", int8_file,
                                                  tolerance, rounds)
    return record

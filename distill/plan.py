"""``distill plan``: choose the student by measurement, before any training.

From the recipe's teacher, a grid of students is derived (fewer layers, kept evenly spaced with
the first and the last; narrower widths; for sentence embeddings also a static student), each
one timed against the teacher on this machine, the two taking turns, on real inputs of the
recipe's data. Weights do not change speed, so the candidates are derived from one calibration
batch and never trained. The table marks the candidates that meet the target; the largest of
them (most parameters: the most capacity for the speed) is written out as a ready recipe.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.config import DeriveSpec, EvalSpec, load_recipe
from distill.errors import RecipeError
from distill.evaluate import folder_size, time_models
from distill.models.derive import count_parameters
from distill.models.load import load_teacher
from distill.models.student import derive_student
from distill.tasks import build_task

__all__ = ["Candidate", "Target", "candidate_grid", "plan", "plan_table", "planned_recipe", "time_candidate"]

#: Shares of the teacher's width and of its depth the grid tries.
WIDTHS = (1.0, 2 / 3, 1 / 2)
DEPTHS = (1 / 6, 1 / 3, 1 / 2, 2 / 3)


@dataclass(frozen=True)
class Target:
    """What the student must meet; unset fields are no constraint."""

    speedup: float | None = None
    """Throughput at the plan's batch size, as a multiple of the teacher's."""
    latency_ms: float | None = None
    """Batch-1 latency on this machine."""
    size_mb: float | None = None
    """Weights on disk."""

    def met(self, row: dict[str, Any]) -> bool:
        return ((self.speedup is None or row["speedup"] >= self.speedup)
                and (self.latency_ms is None or row["latency_ms"] <= self.latency_ms)
                and (self.size_mb is None or row["size_mb"] <= self.size_mb))


@dataclass(frozen=True)
class Candidate:
    """One student shape: the recipe's ``student.derive`` for it, and its kind."""

    derive: dict[str, Any]
    kind: str | None = None
    """``static-embedding`` for a static student; ``None``: the teacher's kind."""

    @property
    def label(self) -> str:
        if self.kind == "static-embedding":
            return f"static, {self.derive['hidden_size']}-d"
        d = self.derive
        return f"{len(d['layers'])} layers {d['layers']}, hidden {d['hidden_size']}, {d['num_attention_heads']} heads"


def _layers(depth: int, total: int) -> list[int]:
    if depth == 1:
        return [0]
    return sorted({round(i * (total - 1) / (depth - 1)) for i in range(depth)})


def candidate_grid(config: Any, embedding: bool) -> list[Candidate]:
    """Student shapes for a teacher with this ``transformers`` config: depths x widths, plus a
    static student for a sentence-embedding teacher. Widths keep the teacher's head size and,
    for grouped-query attention, whole key/value groups."""
    total, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    group = heads // (getattr(config, "num_key_value_heads", None) or heads)
    grouped = group > 1 or hidden != heads * head_dim or config.model_type == "llama"
    depths = sorted({max(1, round(total * share)) for share in DEPTHS} | {min(2, total)})
    shapes = []
    for share in WIDTHS:
        n_heads = max(group, round(heads * share / group) * group)
        width = (round(hidden * share / 32) * 32 or hidden) if grouped else n_heads * head_dim
        ffn = max(32, round(config.intermediate_size * width / hidden / 32) * 32)
        shapes.append((min(width, hidden), n_heads, min(ffn, config.intermediate_size)))
    grid = [Candidate({"layers": _layers(depth, total), "hidden_size": w, "num_attention_heads": h,
                       "intermediate_size": f}) for depth in depths for w, h, f in dict.fromkeys(shapes)]
    if embedding:
        grid.append(Candidate({"hidden_size": min(256, hidden)}, "static-embedding"))
    return grid


def _size(student: Any) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        student.save(Path(tmp))
        return folder_size(Path(tmp))


def time_candidate(teacher: Any, task: Any, candidate: Candidate, spec: EvalSpec, calibration: list[dict[str, Any]],
                   texts: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Derive one candidate (untrained) and time it against the teacher, in turns; returns its row
    and the teacher's timing of this round."""
    torch.manual_seed(0)
    student = derive_student(teacher, DeriveSpec(**candidate.derive, calibration_batches=1), calibration,
                             kind=candidate.kind, texts=texts)
    timed = time_models({"teacher": teacher, "student": student}, task, spec)
    s, t = timed["student"], timed["teacher"]
    row = {"candidate": candidate, "parameters": count_parameters(student.module), "size_mb": _size(student) / 1e6,
           "latency_ms": s["latency_ms"], "throughput": s["throughput"], "unit": s["throughput_unit"],
           "speedup_b1": t["latency_ms"] / s["latency_ms"], "speedup": s["throughput"] / t["throughput"]}
    return row, t


def plan(recipe_path: Path, target: Target, overrides: list[str] | None = None, batch_size: int | None = None,
         repeats: int = 10) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Derive and time every candidate of the recipe's teacher; returns the table's rows (one per
    candidate, ``meets`` set) and the teacher's figures."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.teacher.members:
        raise RecipeError("distill plan times students cut from one teacher, and a student of teacher.members is "
                          "cut from the first: plan with it as the teacher (--set teacher.members=[] --set "
                          "teacher.source=ITS_SOURCE)")
    teacher = load_teacher(recipe)
    config = getattr(teacher.module, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise RecipeError("distill plan derives students from a Hugging Face transformer teacher "
                          f"(kind hf-embedding, hf-classifier or hf-causal-lm), not '{recipe.teacher.kind}'")
    task = build_task(recipe.task, recipe.data)
    spec = EvalSpec(latency_repeats=repeats, throughput_repeats=max(3, repeats // 3), warmup=2,
                    batch_size=batch_size or recipe.evaluate.batch_size)
    calibration = [task.train.batch(range(min(8, len(task.train))))["inputs"]]
    texts = task.train_texts() if hasattr(task, "train_texts") else None
    rows, teacher_runs = [], []
    for candidate in candidate_grid(config, recipe.task in ("sts", "embedding")):
        row, timed_teacher = time_candidate(teacher, task, candidate, spec, calibration, texts)
        rows.append({**row, "meets": target.met(row)})
        teacher_runs.append(timed_teacher)
    teacher_row = {"parameters": count_parameters(teacher.module), "size_mb": _size(teacher) / 1e6,
                   "latency_ms": statistics.median(r["latency_ms"] for r in teacher_runs),
                   "throughput": statistics.median(r["throughput"] for r in teacher_runs),
                   "batch_size": spec.batch_size}
    return rows, teacher_row


def plan_table(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    """The markdown table ``distill plan`` prints; ``*`` marks the candidates meeting the target."""
    b = teacher["batch_size"]
    unit = rows[0]["unit"] if rows else "examples"
    lines = [f"| | student | parameters | size (MB) | latency b1 (ms) | speed-up b1 | {unit}/s b{b} | speed-up b{b} |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| | teacher | {teacher['parameters'] / 1e6:.2f}M | {teacher['size_mb']:.1f} | "
             f"{teacher['latency_ms']:.2f} | 1.00x | {teacher['throughput']:.0f} | 1.00x |"]
    for r in rows:
        lines.append(f"| {'*' if r['meets'] else ''} | {r['candidate'].label} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['size_mb']:.1f} | {r['latency_ms']:.2f} | {r['speedup_b1']:.2f}x | "
                     f"{r['throughput']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def planned_recipe(recipe_path: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The recipe with the chosen student: the candidate meeting the target with the most
    parameters (``None`` when none meets it)."""
    meeting = [r for r in rows if r["meets"]]
    if not meeting:
        return None
    chosen = max(meeting, key=lambda r: r["parameters"])["candidate"]
    recipe = yaml.safe_load(Path(recipe_path).read_text())
    student = {k: v for k, v in (recipe.get("student") or {}).items() if k in ("kind", "max_length", "pooling")}
    if chosen.kind is not None:
        student["kind"] = chosen.kind
    student["derive"] = dict(chosen.derive)
    recipe["student"] = student
    return recipe

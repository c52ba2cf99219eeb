"""Write the run's report: ``report.md``, ``report.html``, ``report.json`` and plots."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distill.checkpoint import AFTER_TRAINING  # noqa: E402
from distill.suite import summarize_suite  # noqa: E402

__all__ = ["ROLES", "count", "deployment_table", "headline", "megabytes", "overtraining_note", "ratio", "summarize",
           "write_report", "write_stages_report"]

ROLES = ("teacher", "student", "baseline")


def count(n: float) -> str:
    """A count people read at a glance: ``22.71M``, ``9.6k``, ``812``."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def ratio(value: float | None, unit: str = "x", digits: int = 2) -> str:
    """A ratio for a table, or ``-`` where there is none (no teacher to compare with)."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def megabytes(size_bytes: float) -> str:
    """A file size in MB, with the digits a small model needs (``38.4``, ``0.041``)."""
    mb = size_bytes / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.3g}"


def summarize(models: dict[str, dict[str, Any]], metric: str, higher_is_better: bool = True) -> list[dict[str, Any]]:
    """One row per model with ratios against the teacher (retention, speed-up, size).

    Retention is the student's quality as a share of the teacher's: ``student / teacher`` for a
    metric where higher is better, ``teacher / student`` where lower is (perplexity).
    """
    teacher = models.get("teacher")  # none in a run trained on labels alone: no ratios then
    rows = []
    for role in ROLES:
        if role not in models:
            continue
        m = models[role]
        t = teacher or {}
        rows.append({
            "model": role,
            metric: m[metric],
            "retention_pct": None if not t else (
                _share(m[metric], t[metric]) if higher_is_better else _share(t[metric], m[metric])),
            "parameters": m["parameters"],
            "size_mb": m["size_bytes"] / 1e6,
            "smaller_x": t["size_bytes"] / m["size_bytes"] if t else None,
            "latency_ms": m["latency_ms"],
            "speedup_latency_x": t["latency_ms"] / m["latency_ms"] if t else None,
            "throughput": m["throughput"],
            "speedup_throughput_x": m["throughput"] / t["throughput"] if t else None,
            "throughput_unit": m.get("throughput_unit", "examples"),
        })
    return rows



def _share(part: float, whole: float) -> float | None:
    """``part`` as a percentage of ``whole``; none where a share means nothing (a whole of 0 or less)."""
    return 100.0 * part / whole if whole > 0 else None


def _table(rows: list[dict[str, Any]], metric: str) -> tuple[list[str], list[list[str]]]:
    unit = rows[0].get("throughput_unit", "examples") if rows else "examples"
    head = ["model", metric, "retained", "params", "size (MB)", "smaller", "latency b1 (ms)",
            "speed-up b1", f"throughput b64 ({unit}/s)", "speed-up b64"]
    body = [[
        r["model"], f"{r[metric]:.2f}", ratio(r["retention_pct"], "%", 1), count(r["parameters"]),
        megabytes(r["size_mb"] * 1e6), ratio(r["smaller_x"]), f"{r['latency_ms']:.2f}",
        ratio(r["speedup_latency_x"]), f"{r['throughput']:.0f}", ratio(r["speedup_throughput_x"]),
    ] for r in rows]
    return head, body


def deployment_table(deployment: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the exported models' table (``export/export.json``'s ``deployment``).

    Retention is against the teacher in PyTorch at float32, as in the main table.
    """
    metric, higher = deployment["metric"], deployment.get("higher_is_better", True)
    rows = deployment["rows"]
    ref = next(r[metric] for r in rows if (r["model"], r["runtime"], r["weights"]) == ("teacher", "pytorch", "float32"))
    unit = rows[0].get("throughput_unit", "examples")
    head = ["model", "runtime", "weights", "size (MB)", "latency b1 (ms)", f"throughput b64 ({unit}/s)", metric,
            "retained"]
    body = [[
        r["model"], r["runtime"], r["weights"], megabytes(r["size_bytes"]), f"{r['latency_ms']:.2f}",
        f"{r['throughput']:.0f}", f"{r[metric]:.2f}",
        f"{100.0 * (r[metric] / ref if higher else ref / r[metric]):.1f}%",
    ] for r in rows]
    return head, body


def _plot_curves(histories: dict[str, list[dict[str, Any]]], metric: str, path: Path, task_weight: float = 1.0
                 ) -> None:
    """Like against like: the task loss of every model on one axis (the student's divided by its
    weight, ``task_weight``), the student's distillation terms on their own, the validation metric on a third."""
    fig, (ax_task, ax_kd, ax_eval) = plt.subplots(1, 3, figsize=(14, 3.5))
    for role, records in histories.items():
        train = [r for r in records if "loss" in r]
        evals = _curve(records, metric)
        task = [r for r in train if "task_loss" in r]
        if task:
            scale = task_weight if role == "student" and task_weight > 0 else 1.0
            ax_task.plot([r["step"] for r in task], [r["task_loss"] / scale for r in task], label=role, lw=0.8)
        terms = sorted({k for r in train for k in r if k.endswith("_loss") and k != "task_loss"})
        for term in terms:
            points = [r for r in train if term in r]
            ax_kd.plot([r["step"] for r in points], [r[term] for r in points], label=f"{role}: {term}", lw=0.8)
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o", label=role)
    ax_task.set(xlabel="step", ylabel="task loss", title="task loss (labels)", yscale="log")
    ax_kd.set(xlabel="step", ylabel="loss term", title="distillation terms", yscale="log")
    ax_eval.set(xlabel="step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (ax_task, ax_kd, ax_eval):
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "none in this run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.scatter(r["latency_ms"], r[metric], s=40 + 2 * r["size_mb"])
        ax.annotate(r["model"], (r["latency_ms"], r[metric]), textcoords="offset points", xytext=(6, 4))
    ax.set(xlabel="CPU latency at batch 1 (ms)", ylabel=f"test {metric}", title="quality vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(folder: Path, summary: dict[str, Any], histories: dict[str, list[dict[str, Any]]]) -> Path:
    """Write every report file into ``folder`` and return the path of ``report.md``.

    Args:
        folder: The run folder.
        summary: ``{"recipe", "metric", "models": {role: figures}, ...}`` from the evaluation.
        histories: Metrics records per trained model (``student``, ``baseline``).
    """
    metric = summary["metric"]
    higher = summary.get("higher_is_better", True)
    rows = summarize(summary["models"], metric, higher)
    report = {**summary, "table": rows}
    if note := overtraining_note(histories.get("student", []), metric, higher):
        report["overtraining"] = note
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_curves(histories, metric, folder / "curves.png", summary.get("task_loss_weight", 1.0))
    _plot_tradeoff(rows, metric, folder / "tradeoff.png")
    head, body = _table(rows, metric)
    md = [f"# Distillation report: {summary['recipe']}", "", _facts(summary), "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(line) + " |" for line in body]
    md += ["", _verdict(rows, metric, higher, summary.get("baseline_untrained", False)), ""]
    md += [note, ""] if note else []
    if summary.get("suite"):
        md += ["## Evaluation suite", "", _SUITE_NOTE, "", summarize_suite(summary["suite"])]
    if "deployment" in summary:  # written by `distill export`
        dep_head, dep_body = deployment_table(summary["deployment"])
        md += ["## Deployment (exported models, CPU)", "", "| " + " | ".join(dep_head) + " |",
               "|" + "---|" * len(dep_head)] + ["| " + " | ".join(line) + " |" for line in dep_body] + [""]
    md += ["![training curves](curves.png)", "",
           "![quality vs latency](tradeoff.png)", ""]
    (folder / "report.md").write_text("\n".join(md))
    (folder / "report.html").write_text(_html(report, head, body, rows, metric, folder))
    return folder / "report.md"


#: A student's validation score that ends more than this share below its best is reported as
#: over-trained (a run's evaluations are a few hundred held-out examples: smaller moves are noise).
OVERTRAINING_DROP = 0.01


def overtraining_note(records: list[dict[str, Any]], metric: str, higher_is_better: bool = True) -> str:
    """A sentence for the report when the student's validation ``metric`` peaked before training
    ended and then fell by more than :data:`OVERTRAINING_DROP` of its best, else ``""``.

    Args:
        records: The student's ``metrics.jsonl`` records; its evaluations are those with
            ``split: eval`` (the one after ``train.merge_start``'s mix is not part of the curve).
        metric: The validation metric's name.
        higher_is_better: Whether a larger value is better (``False`` for perplexity).
    """
    evals = _curve(records, metric)
    if len(evals) < 3:
        return ""
    sign = 1.0 if higher_is_better else -1.0
    best = max(evals, key=lambda r: sign * r[metric])
    last = evals[-1]
    if sign * (best[metric] - last[metric]) <= OVERTRAINING_DROP * abs(best[metric]):
        return ""
    peak = (f"The student's validation {metric} peaked at step {best['step']} ({best[metric]:.2f}) and ended at "
            f"{last[metric]:.2f}: it fits its training data at the cost of held-out examples.")
    if any(r.get("kept_best") == best["step"] for r in records):
        return f"{peak} The saved student is step {best['step']}'s (train.keep_best)."
    return (f"{peak} A schedule that ends near that step (fewer epochs), train.keep_best: true (the saved student "
            "is then the best step's) or more training data may do better.")


def _curve(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The validation evaluations during training: not the scores of ``train.keep_best``'s restored
    student or ``train.merge_start``'s mix, recorded after the last step."""
    return [r for r in records if r.get("split") == "eval" and metric in r and not AFTER_TRAINING.intersection(r)]


def _facts(summary: dict[str, Any]) -> str:
    teacher = f"`{summary['teacher']}`" if summary["teacher"] else "none: trained on labels alone"
    lines = [f"- teacher: {teacher}", f"- student: {summary['student']}",
             f"- data: `{summary['data']}`{_mixed(summary.get('mix', []), summary.get('mix_certainty'))}",
             f"- losses: {summary['losses']}",
             f"- training: {summary['steps']} steps; measured on {summary['machine']}"]
    return "\n".join(lines)


def _mixed(mix: list[dict[str, Any]], certainty: dict[str, float] | None = None) -> str:
    """The corpora of ``data.mix``, as the report's data line continues, with how sure the teacher
    is of their texts against the test texts (a classifier's mean top-class probability)."""
    sure = (f"; the teacher's mean top-class probability on them {certainty['mix']:.3f}, on the test texts "
            f"{certainty['test']:.3f}" if certainty else "")
    return "".join(f" + `{m['path']}`" + (f" x {m['weight']:g}" if m["weight"] != 1 else "") for m in mix) + (
        f" (unlabelled: taught by the teacher alone{sure})" if mix else "")


_SUITE_NOTE = ("Each task's test set: STS12-16 and STS-B test (Spearman x 100 of cosine), SST-2 and TREC (accuracy "
               "x 100 of a logistic-regression probe on the frozen embeddings), and any task of the recipe's own "
               "(evaluate.suite), scored the same way by its kind; in brackets, the share of the teacher's score. "
               "Unseen unless the run trains on the task: a run on STS-B's training pairs has seen STS-B, and "
               "STS12-16 come from the same sources.")


def _verdict(rows: list[dict[str, Any]], metric: str, higher_is_better: bool = True, untrained: bool = False) -> str:
    by = {r["model"]: r for r in rows}
    s = by["student"]
    if "teacher" not in by:
        return (f"Trained on the labels alone (no distillation losses, so no teacher ran): {metric} {s[metric]:.2f}, "
                f"{count(s['parameters'])} parameters, {megabytes(s['size_mb'] * 1e6)} MB, {s['latency_ms']:.2f} ms "
                "at batch 1. Use it as the teacher of a distillation run.")
    kept = (f"keeps {s['retention_pct']:.1f}% of the teacher's {metric}" if s["retention_pct"] is not None else
            f"scores {s[metric]:.2f} {metric} against the teacher's {by['teacher'][metric]:.2f}")
    text = (f"The student {kept}, is {s['smaller_x']:.2f}x smaller on disk and {s['speedup_latency_x']:.2f}x faster "
            f"at batch 1 ({s['speedup_throughput_x']:.2f}x at batch 64).")
    if "baseline" in by:
        gain = s[metric] - by["baseline"][metric]
        if untrained:
            text += (f" Distillation adds {gain:+.2f} {metric} over the same student before training (the baseline of "
                     "a label-free run: there are no labels to train it on without the teacher).")
        elif higher_is_better:
            text += f" Distillation adds {gain:+.2f} {metric} over the same student trained without the teacher."
        else:
            text += (f" Distillation changes {metric} by {gain:+.2f} against the same student trained without the "
                     f"teacher ({by['baseline'][metric]:.2f}; lower is better).")
    return text


def _html_deployment(summary: dict[str, Any]) -> str:
    if "deployment" not in summary:
        return ""
    head, body = deployment_table(summary["deployment"])
    rows = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    rows += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
    return f"<h2>Deployment (exported models, CPU)</h2><table>{rows}</table>"


def _html_suite(summary: dict[str, Any]) -> str:
    if not summary.get("suite"):
        return ""
    lines = [line for line in summarize_suite(summary["suite"]).splitlines() if not line.startswith("|--")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    rows = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells[0]) + "</tr>"
    rows += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells[1:])
    return f"<h2>Evaluation suite</h2><p>{html.escape(_SUITE_NOTE)}</p><table>{rows}</table>"


def _inline_code(text: str) -> str:
    """Markdown's `code` spans as HTML <code>, everything else escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: show it as written
        return html.escape(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def _html(summary: dict[str, Any], head: list[str], body: list[list[str]], rows: list[dict[str, Any]],
          metric: str, folder: Path) -> str:
    esc = html.escape
    verdict = _verdict(rows, metric, summary.get("higher_is_better", True), summary.get("baseline_untrained", False))
    if "overtraining" in summary:
        verdict += " " + summary["overtraining"]
    table = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>" for line in body)
    facts = "".join(f"<li>{_inline_code(line[2:])}</li>" for line in _facts(summary).splitlines())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>distill report: {esc(summary['recipe'])}</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "</style></head><body>"
        f"<h1>Distillation report: {esc(summary['recipe'])}</h1><ul>{facts}</ul>"
        f"<table>{table}</table>"
        f"<p>{_inline_code(verdict)}</p>"
        f"{_html_suite(summary)}"
        f"{_html_deployment(summary)}"
        f"{_img(folder / 'curves.png')}<br>{_img(folder / 'tradeoff.png')}</body></html>\n"
    )


def headline(folder: Path) -> str:
    """What a finished run's report concludes, in a few sentences: the verdict on the student,
    and its suite average beside the baseline's and the teacher's when there is a suite."""
    report = json.loads((folder / "report.json").read_text())
    text = _verdict(report["table"], report["metric"], report.get("higher_is_better", True),
                    report.get("baseline_untrained", False))
    suite = report.get("suite") or {}
    if "student" in suite:
        mean = {role: sum(scores.values()) / len(scores) for role, scores in suite.items() if scores}
        others = [f"the {role} {mean[role]:.2f}" for role in ("baseline", "teacher") if role in mean]
        text += (f" On the evaluation suite ({len(suite['student'])} tasks) the student averages {mean['student']:.2f}"
                 + (f", {', '.join(others)}." if others else "."))
    if "overtraining" in report:
        text += " " + report["overtraining"]
    return text


def write_stages_report(folder: Path, name: str, stages: list[tuple[str, Path]]) -> Path:
    """The report of a staged run: each stage's report in turn, under its own heading.

    Args:
        folder: The staged run's folder.
        name: The recipe's name.
        stages: ``(stage name, stage run folder)`` in the order they ran; each has a report.
    """
    md = [f"# Distillation report: {name}, {len(stages)} stages", "",
          "Each stage is a run of its own; each later stage starts from the student the stage before it trained, "
          "and its baseline from the stage before's baseline: the baseline rows are the same stages without the "
          "teacher.", ""]
    md += [f"**Result** (the last stage's models, also in `student/` and `baseline/`): {headline(stages[-1][1])}", ""]
    pages = []
    for i, (stage, path) in enumerate(stages, 1):
        rel = path.relative_to(folder) if path.is_relative_to(folder) else path
        text = (path / "report.md").read_text()
        body = text.split("\n", 1)[1] if text.startswith("# ") else text
        body = re.sub(r"^(#+) ", r"\1# ", body, flags=re.M)  # one level below the stage's heading
        body = re.sub(r"\]\((?!https?:|/)([^)]+)\)", rf"]({rel}/\1)", body)  # links from here
        md += [f"## Stage {i}: {stage} (`{rel}`)", body.strip(), ""]
        pages.append(f'<li><a href="{html.escape(str(rel))}/report.html">stage {i}: {html.escape(stage)}</a></li>')
    (folder / "report.md").write_text("\n".join(md))
    (folder / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(name)}</title>"
                                        f"<h1>Distillation report: {html.escape(name)}</h1><ol>{''.join(pages)}</ol>")
    return folder / "report.md"

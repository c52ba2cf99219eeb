"""Runs side by side: ``distill compare RUN...`` and the report of one recipe over several seeds.

Runs whose recipes differ only in ``seed`` (and where they were written) form one group: its
quality is reported as mean +- std over the seeds (the sample standard deviation, n - 1), with
one row per seed below, and the plot draws the spread as error bars.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from distill.errors import RunFolderError  # noqa: E402
from distill.records import read_evaluation  # noqa: E402
from distill.report import ROLES, megabytes  # noqa: E402
from distill.suite import summarize_suite  # noqa: E402

__all__ = ["comparison_rows", "group_runs", "run_figures", "write_comparison"]


def _recipe(folder: Path) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunFolderError(f"{folder} is not a distill run folder (its recipe.yaml: {exc})") from None
    if not isinstance(recipe, dict):
        raise RunFolderError(f"{folder}/recipe.yaml is not a recipe")
    return recipe


def run_figures(folder: Path) -> dict[str, Any]:
    """A finished run's ``eval.json``; for a staged run, its last stage's."""
    recipe = _recipe(folder)
    path = folder / "eval.json"
    if recipe.get("stages") and not path.is_file():
        path = folder / recipe["stages"][-1]["name"] / "eval.json"
    if not path.is_file():
        raise RunFolderError(f"{folder} has no evaluation yet ({path.name}): finish it with distill run, or "
                             "measure it with distill eval")
    return read_evaluation(path)


def group_runs(folders: list[Path]) -> list[list[Path]]:
    """The runs in groups of one recipe that differ only in ``seed`` (first-seen order)."""
    groups: dict[str, list[Path]] = {}
    for folder in folders:
        recipe = {k: v for k, v in _recipe(folder).items() if k not in ("seed", "output_dir")}
        groups.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append(folder)
    return list(groups.values())


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _group_names(groups: list[list[Path]], recipes: list[str]) -> list[str]:
    """A label per group: its recipe's name (with the seed count), and where two groups would
    read the same (one recipe run with different settings), the first run folder's name too."""
    names = [recipe if len(group) == 1 else f"{recipe} ({len(group)} seeds)"
             for group, recipe in zip(groups, recipes, strict=True)]
    return [f"{name} [{group[0].name}]" if names.count(name) > 1 else name
            for name, group in zip(names, groups, strict=True)]


def comparison_rows(folders: list[Path]) -> list[dict[str, Any]]:
    """One row per (group of seeds, model): mean and std of the quality metric over the seeds,
    mean latency and size, and the per-seed values. A teacher shared by several groups gets one row."""
    rows: list[dict[str, Any]] = []
    teachers: set[str] = set()
    groups = group_runs(folders)
    figured = [[run_figures(folder) for folder in group] for group in groups]
    names = _group_names(groups, [figures[0]["recipe"] for figures in figured])
    for group, figures, name in zip(groups, figured, names, strict=True):
        first = figures[0]
        for role in ROLES:
            if role not in first["models"]:
                continue
            if role == "teacher":
                if first["teacher"] in teachers:
                    continue
                teachers.add(first["teacher"])
            models = [f["models"][role] for f in figures]
            values = [m[first["metric"]] for m in models]
            mean, std = _spread(values)
            suites = [f["suite"][role] for f in figures if role in f.get("suite", {})]
            rows.append({
                "run": name if role != "teacher" else f"teacher of {first['recipe']}", "model": role,
                "metric": first["metric"], "higher_is_better": first.get("higher_is_better", True),
                "mean": mean, "std": std, "seeds": [_recipe(f).get("seed", 0) for f in group], "values": values,
                "folders": [str(f) for f in group], "parameters": models[0]["parameters"],
                "size_bytes": models[0]["size_bytes"],
                "latency_ms": statistics.mean(m["latency_ms"] for m in models),
                "throughput": statistics.mean(m["throughput"] for m in models),
                "throughput_unit": models[0].get("throughput_unit", "examples"),
                "suite": {task: statistics.mean(s[task] for s in suites) for task in suites[0]
                          if all(task in s for s in suites)} if len(suites) == len(group) else None,
            })
    return rows


def _markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "", "| run | model | metric | mean +- std | seeds | size (MB) | latency b1 (ms) | "
             "throughput b64 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quality = f"{r['mean']:.2f} +- {r['std']:.2f}" if len(r["values"]) > 1 else f"{r['mean']:.2f}"
        lines.append(f"| {r['run']} | {r['model']} | {r['metric']} | {quality} | {len(r['values'])} | "
                     f"{megabytes(r['size_bytes'])} | {r['latency_ms']:.2f} | "
                     f"{r['throughput']:.0f} {r['throughput_unit']}/s |")
    suites = {f"{r['run']}: {r['model']}": r["suite"] for r in rows if r["suite"]}
    reference = next((f"{r['run']}: {r['model']}" for r in rows if r["suite"] and r["model"] == "teacher"), None)
    if reference is not None:
        lines += ["", "Evaluation suite (mean over the seeds; in brackets, the share of the teacher's score):", "",
                  summarize_suite(suites, reference).rstrip("\n")]
    several = [r for r in rows if len(r["values"]) > 1 and r["model"] != "teacher"]
    if several:
        lines += ["", "Per seed:", "", "| run | model | seed | value | folder |", "|---|---|---|---|---|"]
        for r in several:
            lines += [f"| {r['run']} | {r['model']} | {seed} | {value:.2f} | `{folder}` |"
                      for seed, value, folder in zip(r["seeds"], r["values"], r["folders"], strict=True)]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for r in (r for r in rows if r["metric"] == metric):
            ax.errorbar(r["latency_ms"], r["mean"], yerr=r["std"] or None, fmt="o", capsize=3)
            ax.annotate(f"{r['run']}: {r['model']}", (r["latency_ms"], r["mean"]), textcoords="offset points",
                        xytext=(5, 3), fontsize=7)
        ax.set(xlabel="CPU latency at batch 1 (ms)", ylabel=f"test {metric}", title="quality vs latency",
               xscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier(out: Path) -> bool:
    """Whether ``out`` holds what a comparison writes and nothing else (written before the marker was)."""
    names = {p.name for p in out.iterdir()}
    return names <= {"report.md", "report.json", "tradeoff.png"} and "report.json" in names


def write_comparison(folders: list[Path], out: Path, title: str = "Comparison") -> Path:
    """Write ``report.md`` (the table), ``report.json`` (its rows) and ``tradeoff.png`` into
    ``out`` for the runs in ``folders``; returns the markdown's path."""
    if not folders:
        raise RunFolderError("no runs to compare")
    unique = list(dict.fromkeys(Path(f).resolve() for f in folders))  # one run named twice is one run
    marker = out / ".distill-compare"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not marker.is_file() and not _earlier(out))):
        raise RunFolderError(f"--out {out} holds files that are not an earlier comparison; nothing was written. "
                             "Give an empty or new folder")
    rows = comparison_rows(unique)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by distill compare\n")
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, out / "tradeoff.png")
    (out / "report.md").write_text(_markdown(rows, title) + "\n![quality vs latency](tradeoff.png)\n")
    return out / "report.md"

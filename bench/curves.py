"""Validation curves of finished runs side by side: the metric at every evaluation step of each
trained model (student, baseline), read from ``train/<role>/metrics.jsonl``; a markdown table.

    python bench/curves.py runs/A runs/B ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(run: Path) -> dict[str, dict[int, float]]:
    """``{"<run>: <role>": {step: metric}}`` for each trained role of the run."""
    out = {}
    for role in ("student", "baseline"):
        path = run / "train" / role / "metrics.jsonl"
        if not path.is_file():
            continue
        evals = [json.loads(line) for line in path.read_text().splitlines() if '"split": "eval"' in line]
        metric = next(k for k in evals[0] if k not in ("step", "split")) if evals else None
        out[f"{run.name}: {role}"] = {r["step"]: r[metric] for r in evals}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    table: dict[str, dict[int, float]] = {}
    for run in args.runs:
        table.update(curves(run))
    steps = sorted({s for values in table.values() for s in values})
    print("| model | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{values[s]:.2f}" if s in values else "-" for s in steps) + " |")


if __name__ == "__main__":
    main()

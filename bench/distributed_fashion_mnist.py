"""The Fashion-MNIST recipe in one process and in N processes on this machine (gloo on CPU).

Each process count gets its own run folder and teacher cache (so each builds its cache), and the
same recipe: ``train.batch_size`` is the global batch, so both take the same optimizer steps
on the same batches. Prints a markdown table: wall time of the whole run, time of the student's
training loop, the student's and baseline's test accuracy, and how far the N-process student's
weights are from the one-process student's. The ConvNet has batch norm and dropout, which on CPU
see each process's share of the batch and draw per process, so the runs agree in quality, not
to the last digit (tests/test_distributed.py checks the exact agreement on a model without them).

    python bench/distributed_fashion_mnist.py                                   # the full recipe (3 epochs)
    python bench/distributed_fashion_mnist.py --set train.max_steps=100         # a short check
    python bench/distributed_fashion_mnist.py --nproc 4 --out runs/ddp-bench

The teacher comes from ``runs/fashion-mnist-teacher/student`` (``distill run
recipes/fashion-mnist-teacher.yaml`` makes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def run(recipe: str, nproc: int, root: Path, overrides: list[str]) -> dict[str, float]:
    """Run the recipe in ``nproc`` processes in ``root/nN``; return its figures."""
    folder, cache = root / f"n{nproc}", root / f"cache-n{nproc}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "distill.cli", "run", recipe, "--nproc", str(nproc),
               "--set", f"output_dir={folder}", "--set", f"cache.dir={cache}"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    models = json.loads((folder / "eval.json").read_text())["models"]
    trained = json.loads((folder / "student" / "distill.json").read_text())
    figures = {"wall": wall, "train": trained["seconds"], "steps": trained["steps"],
               "student": models["student"]["accuracy"]}
    if "baseline" in models:
        figures["baseline"] = models["baseline"]["accuracy"]
    return figures


def weight_gap(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved students' parameters."""
    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())


def table(results: dict[int, dict[str, float]], gaps: dict[int, float]) -> str:
    rows = ["| processes | wall (s) | student training (s) | s / step | student acc. | baseline acc. | "
            "max abs. weight gap to 1 process |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for nproc, f in results.items():
        baseline = f"{f['baseline']:.2f}" if "baseline" in f else "-"
        gap = "-" if nproc == 1 else f"{gaps[nproc]:.2e}"
        rows.append(f"| {nproc} | {f['wall']:.1f} | {f['train']:.1f} | {f['train'] / f['steps']:.3f} | "
                    f"{f['student']:.2f} | {baseline} | {gap} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/fashion-mnist.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the second run (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-distributed-fashion-mnist"),
                        help="folder of the runs and their caches (replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both runs, e.g. --set train.max_steps=100")
    args = parser.parse_args()
    results = {n: run(args.recipe, n, args.out, args.overrides) for n in (1, args.nproc)}
    gaps = {args.nproc: weight_gap(args.out / "n1", args.out / f"n{args.nproc}")}
    print(f"{args.recipe} {' '.join(args.overrides)}, {results[1]['steps']} steps\n")
    print(table(results, gaps))


if __name__ == "__main__":
    main()

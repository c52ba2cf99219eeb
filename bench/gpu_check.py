"""Step time of the Fashion-MNIST and Tiny Shakespeare recipes on a GPU (bf16 autocast) vs the CPU.

One prepared check for a GPU machine: each recipe runs a short training (``train.max_steps``) on
the GPU with ``train.mixed_precision: bf16``, and a shorter one on the CPU in float32, each in a
run folder of its own under ``--out``; the table compares the steady step time (the first step,
which holds the warm-up, is left out), and shows the validation metric each reached. With
``--compile`` each recipe also runs on the GPU with ``train.compile: true``.

    python bench/gpu_check.py                          # GPU and CPU, about 3 minutes on one GPU
    python bench/gpu_check.py --steps 300 --compile    # longer, and with torch.compile
    python bench/gpu_check.py --cpu-only               # the CPU half, on a machine without a GPU

Needs the teachers: ``runs/fashion-mnist-teacher/student`` (``distill run
recipes/fashion-mnist-teacher.yaml``) and ``runs/tinyshakespeare-teacher/student`` with the
student folder ``runs/tinyshakespeare-models/student`` (``python examples/tinyshakespeare.py``).
Without a GPU it stops at once and says so (exit status 2), unless ``--cpu-only``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RECIPES = {
    "fashion-mnist": ("recipes/fashion-mnist.yaml", ["runs/fashion-mnist-teacher/student"]),
    "tinyshakespeare": ("recipes/tinyshakespeare.yaml",
                        ["runs/tinyshakespeare-teacher/student", "runs/tinyshakespeare-models/student"]),
}
#: Short runs: no baseline, one evaluation at the end, little timing of the final models.
COMMON = ["baseline=false", "train.eval_every=1000000", "train.checkpoint_every=1000000",
          "evaluate.latency_repeats=1", "evaluate.throughput_repeats=1", "evaluate.warmup=0"]


def configs(cpu_only: bool, compile_too: bool, steps: int, cpu_steps: int) -> list[tuple[str, int, list[str]]]:
    """(label, steps, overrides) of each run."""
    cpu = [("cpu float32", cpu_steps, ["train.device=cpu"])]  # the recipes' mixed_precision is "no"
    if cpu_only:
        return cpu
    gpu = [("cuda bf16", steps, ["train.device=cuda", "train.mixed_precision=bf16"])]
    if compile_too:
        gpu.append(("cuda bf16 compiled", steps, ["train.device=cuda", "train.mixed_precision=bf16",
                                                  "train.compile=true"]))
    return gpu + cpu


def run_one(recipe: str, label: str, steps: int, overrides: list[str], out: Path) -> dict[str, float]:
    folder = out / label.replace(" ", "-")
    shutil.rmtree(folder, ignore_errors=True)
    sets = [*COMMON, *overrides, f"train.max_steps={steps}", f"output_dir={folder}", f"cache.dir={out / 'cache'}"]
    command = [sys.executable, "-m", "distill.cli", "run", recipe] + [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    trained = json.loads((folder / "student" / "distill.json").read_text())
    steady = (trained["seconds"] - trained["first_step_seconds"]) / max(1, trained["steps_run"] - 1)
    (metric, score), = ((k, v) for k, v in trained["eval"][-1].items() if k not in ("step", "split"))
    return {"wall": time.perf_counter() - start, "steps": trained["steps_run"], "step_s": steady,
            "first_step_s": trained["first_step_seconds"], "metric": metric, "score": score}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = ["| recipe | run | steps | s / step | first step (s) | speed-up vs CPU | validation |",
            "|---|---|---:|---:|---:|---:|---|"]
    for name, runs in results.items():
        cpu = runs.get("cpu float32")
        for label, r in runs.items():
            speedup = f"{cpu['step_s'] / r['step_s']:.1f}x" if cpu else "-"
            rows.append(f"| {name} | {label} | {r['steps']} | {r['step_s']:.4f} | {r['first_step_s']:.2f} | "
                        f"{speedup} | {r['metric']} {r['score']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each GPU run (default 200)")
    parser.add_argument("--cpu-steps", type=int, default=20, help="optimizer steps of each CPU run (default 20)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--compile", action="store_true", help="also run each recipe compiled (train.compile)")
    parser.add_argument("--cpu-only", action="store_true", help="time the CPU half only (no GPU needed)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="run folders (replaced)")
    args = parser.parse_args()
    if not args.cpu_only and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False). "
              "Run it on a machine with a GPU and a CUDA build of PyTorch, or with --cpu-only for the CPU half.",
              file=sys.stderr)
        return 2
    missing = [path for name in args.recipes for path in RECIPES[name][1] if not Path(path).is_dir()]
    if missing:
        print(f"gpu_check: missing {missing}; make the teachers first (see --help)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"{device}; CPU: {torch.get_num_threads()} torch threads; torch {torch.__version__}\n")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.recipes:
        for label, steps, overrides in configs(args.cpu_only, args.compile, args.steps, args.cpu_steps):
            results.setdefault(name, {})[label] = run_one(RECIPES[name][0], label, steps, overrides, args.out / name)
            print(f"{name} / {label}: {results[name][label]['step_s']:.4f} s per step", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

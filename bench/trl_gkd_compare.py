"""Token-level distillation of a causal LM: distill side by side with TRL's ``GKDTrainer``.

Step time and peak memory of the same off-policy distillation in both tools: the same GPT-2
style teacher and student, the same text blocks in the same order, generalized JSD (beta 0.5,
temperature 1) over every next-token distribution, AdamW at a constant learning rate, gradient
norm clipped to 1.0, float32 on CPU, the same number of torch threads. Each (tool, repeat) runs
in a fresh child process; the order of the two tools alternates from one repeat to the next, so
that changes in the machine's load hit both alike.

    python3 -m venv /tmp/trl-venv   # a separate environment: the project's .venv stays as it is
    /tmp/trl-venv/bin/pip install torch==2.13.0   # the CPU build (a CPU wheel); check that pip keeps it
    /tmp/trl-venv/bin/pip install trl -e '.[hf]'   # TRL 1.16.0 here; the bench imports distill from this checkout
    /tmp/trl-venv/bin/python bench/trl_gkd_compare.py [--steps 8] [--warmup 2] [--repeats 3] [--threads 2] \\
        [--write docs/results.md]

``--write`` puts the table between the ``<!-- trl-gkd:start -->`` and ``<!-- trl-gkd:end -->``
markers of that file.

The models, built once under runs/trl-gkd-compare/models (and reused while the settings are the
same): a byte-level BPE tokenizer with a 16,384-token vocabulary trained with ``tokenizers`` on
Tiny Shakespeare; a teacher of 4 blocks at width 256 (4 heads) and a student of 2 blocks at width
128 (2 heads), GPT-2 architecture, tied input and output embeddings, dropout 0, freshly
initialised (speed and memory do not depend on what the weights hold). The data: Tiny
Shakespeare's training part cut by distill's language-modelling task into blocks of 1,536
characters; each block holds more than 256 tokens, so every batch is 8 full rows of 256 tokens
(255 predicted per row) in both tools, no padding.

Tool A, distill: ``distill.run`` on a recipe dict (task ``lm``, loss ``token_kd`` with ``kind:
jsd``, no task loss, no baseline, teacher online), the training path a user runs. Its loss never
forms the ``(tokens, vocab)`` logits: it takes both models' final hidden states and output
heads and computes logits, divergence and gradients chunk by chunk. After training it still
evaluates and times the models; that part is not measured.

Tool B, TRL: ``GKDTrainer`` (``trl.experimental.gkd``) with ``lmbda=0`` and ``seq_kd=False``
(every batch is the dataset's own text: no generation), ``beta=0.5``, ``temperature=1``,
``optim="adamw_torch"`` (``torch.optim.AdamW``, like distill; the Trainer's default is the fused
variant), ``gradient_checkpointing=False`` and ``bf16=False`` (TRL's SFT defaults turn both on),
the dataset fed in distill's batch order (sequential sampler) through a collator that tokenises
like distill's adapter, the loss logged every step (as distill writes its metrics.jsonl), no
checkpoints, no evaluation. Its loss takes the full logits of both models.

Measured in every child process the same way, by hooks that neither tool knows of:

- step time: a global optimizer-step hook notes the clock after every ``optimizer.step()``;
  a step's time is the interval since the previous one, so it holds everything the loop does
  per step (data, teacher, student, loss, backward, clipping, optimizer, logging). The first
  ``--warmup`` steps are left out; the child's value is the median of the rest.
- CPU time per step: the process's CPU time (all threads) over the same steps; less sensitive
  than the clock to other jobs on the machine.
- memory: the resident set size (RSS) just before the first training forward of the student
  (a one-shot global forward pre-hook: everything is loaded by then; glibc's ``malloc_trim``
  first hands back what the set-up freed, such as distill's check of the losses on a sample
  batch, so that it does not count as in use), and the peak RSS of the process (``ru_maxrss``)
  after the last optimizer step. "Rise" is their difference: what training itself added
  (activations, logits, gradients, optimizer state, and what the allocator keeps).

The table gives for each tool the median over repeats and the range (min-max), and distill's
value over TRL's: the median (and range) of the per-repeat ratios. The loss of the first and
last step shows that the two runs compute the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path("../shared/data/tinyshakespeare")
OUT = Path("runs/trl-gkd-compare")
VOCAB = 16384
MAX_LENGTH = 256
BLOCK_CHARS = 1536
BATCH_SIZE = 8
LR = 5e-4
BETA = 0.5
TEMPERATURE = 1.0
MAX_GRAD_NORM = 1.0
SEED = 0
#: name -> (blocks, width, heads, init seed)
MODELS = {"teacher": (4, 256, 4, 0), "student": (2, 128, 2, 1)}
TOOLS = ("distill", "trl")


# ---------------------------------------------------------------- the shared setup


def build_models(folder: Path) -> dict[str, Path]:
    """The tokenizer, teacher and student folders (built once per settings, then reused)."""
    import torch
    import transformers

    from distill.models.causal_lm import byte_level_bpe

    settings = {"vocab": VOCAB, "max_length": MAX_LENGTH, "models": MODELS, "transformers": transformers.__version__}
    paths = {name: folder / name for name in MODELS}
    stamp = folder / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(settings)):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    text = (DATA / "input.txt").read_text()
    tokenizer = byte_level_bpe(text, VOCAB)
    for name, (layers, width, heads, seed) in MODELS.items():
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_positions=MAX_LENGTH, n_embd=width, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        transformers.GPT2LMHeadModel(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    stamp.write_text(json.dumps(settings) + "\n")
    return paths


def data_spec(steps: int) -> dict[str, Any]:
    """The recipe's ``data`` section: exactly ``steps`` batches in one epoch, so every batch is full."""
    return {"format": "text", "path": str(DATA), "block_chars": BLOCK_CHARS, "train_limit": steps * BATCH_SIZE,
            "eval_limit": 4, "test_limit": 4}


def training_blocks(steps: int) -> list[str]:
    """The text blocks in the order distill's loop takes them (its task, its seeded batch order)."""
    from distill.batches import ShuffledBatches
    from distill.config import DataSpec
    from distill.tasks import LanguageModelingTask

    task = LanguageModelingTask(DataSpec(**data_spec(steps)))

    class Positions:  # stands for the dataset: a "batch" holds its indices
        def __len__(self) -> int:
            return len(task.train)

        def batch(self, indices: list[int]) -> dict[str, list[int]]:
            return {"index": indices}

    order = ShuffledBatches(Positions(), BATCH_SIZE, SEED, lengths=task.lengths())  # as distill.runner builds it
    return [task.train.blocks[i] for batch in order.epoch(0) for i in batch["index"]]


def check_blocks(blocks: list[str], tokenizer_dir: Path) -> None:
    """Every block must fill ``MAX_LENGTH`` tokens: both tools then see the same full batches."""
    from transformers import AutoTokenizer

    counts = [len(ids) for ids in AutoTokenizer.from_pretrained(tokenizer_dir)(blocks)["input_ids"]]
    if min(counts) < MAX_LENGTH:
        raise SystemExit(f"a block of {BLOCK_CHARS} characters holds only {min(counts)} tokens (< {MAX_LENGTH}): "
                         "raise BLOCK_CHARS")


# ---------------------------------------------------------------- measuring inside a child


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _trim() -> None:
    """Hand the memory that the C allocator holds free back to the system (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Probe:
    """Step clock and memory marks through global torch hooks, installed alike in both tools' processes."""

    def __init__(self) -> None:
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.torch = torch
        self.ends: list[tuple[float, float]] = []
        self.start_rss: int | None = None
        self.peak = 0
        self._forward = register_module_forward_pre_hook(self._first_forward)
        self._step = register_optimizer_step_post_hook(self._stepped)

    def _first_forward(self, module: Any, args: Any) -> None:
        # The student's transformer body in training mode with gradients: the first training step begins.
        if type(module).__name__ == "GPT2Model" and module.training and self.torch.is_grad_enabled():
            self._forward.remove()
            _trim()  # what the set-up freed (a tool's checks on a sample batch) does not count as in use
            self.start_rss = _rss()

    def _stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))
        self.peak = _peak()

    def close(self) -> dict[str, Any]:
        self._forward.remove()
        self._step.remove()
        steps = list(zip(self.ends, self.ends[1:], strict=False))
        return {"step_seconds": [b[0] - a[0] for a, b in steps], "step_cpu_seconds": [b[1] - a[1] for a, b in steps],
                "start_rss": self.start_rss, "peak_rss": self.peak}


def run_distill(paths: dict[str, Path], steps: int, threads: int, folder: Path) -> list[float]:
    """Train with ``distill.run``; returns the loss of every step (from its metrics.jsonl)."""
    import distill

    recipe = {
        "name": "trl-gkd-compare", "task": "lm", "seed": SEED,
        "teacher": {"kind": "hf-causal-lm", "source": str(paths["teacher"]), "max_length": MAX_LENGTH},
        "student": {"source": str(paths["student"]), "max_length": MAX_LENGTH},
        "data": data_spec(steps),
        "losses": [{"name": "token_kd", "params": {"kind": "jsd", "beta": BETA, "temperature": TEMPERATURE}}],
        "task_loss_weight": 0.0,
        "baseline": False,
        "output_dir": str(folder),
        "train": {"max_steps": steps, "batch_size": BATCH_SIZE, "lr": LR, "weight_decay": 0.0, "warmup_ratio": 0.0,
                  "schedule": "constant", "max_grad_norm": MAX_GRAD_NORM, "eval_every": 10**9,
                  "checkpoint_every": 10**9, "device": "cpu", "threads": threads},
        "cache": {"enabled": False, "dir": str(folder / "cache")},
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 4},
    }
    distill.run(recipe)
    lines = (folder / "train" / "student" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def import_gkd() -> tuple[Any, Any]:
    """TRL's GKDConfig and GKDTrainer (``trl.experimental.gkd`` since TRL 0.26, ``trl`` before)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its "experimental API" warning, once per import
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


class BlockCollator:
    """Tokenises text blocks as distill's causal-LM adapter does: right padding to the longest,
    truncation at ``max_length``; labels -100 on padding and on position 0, which predicts nothing."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        enc = self.tokenizer([row["text"] for row in rows], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, 0] = -100
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def run_trl(paths: dict[str, Path], steps: int, threads: int, folder: Path) -> list[float]:
    """Train with TRL's GKDTrainer, off-policy; returns the loss of every step (logged every step)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    GKDConfig, GKDTrainer = import_gkd()
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    config = GKDConfig(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=BATCH_SIZE, learning_rate=LR,
        weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch", lmbda=0.0, seq_kd=False, beta=BETA, temperature=TEMPERATURE,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=SEED,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=0, max_length=MAX_LENGTH,
    )
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"text": training_blocks(steps)}),
        data_collator=BlockCollator(tokenizer, MAX_LENGTH), callbacks=[Losses()],
    )
    trainer.train()
    return losses


def child(tool: str, steps: int, threads: int, models: Path, folder: Path) -> None:
    """One measured training run; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    paths = {name: models / name for name in MODELS}
    shutil.rmtree(folder, ignore_errors=True)
    probe = Probe()
    with contextlib.redirect_stdout(sys.stderr):  # the tools' own output stays off the result line
        losses = (run_distill if tool == "distill" else run_trl)(paths, steps, threads, folder)
    print(json.dumps({"tool": tool, "threads": torch.get_num_threads(), "losses": losses, **probe.close()}))


# ---------------------------------------------------------------- running and reporting


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("distill", "trl", "transformers", "accelerate", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def measure(tool: str, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one child process and return its result, with the median step time after warm-up."""
    folder = OUT / f"{tool}-{repeat}"
    command = [sys.executable, __file__, "--child", tool, "--steps", str(args.steps), "--threads", str(args.threads),
               "--folder", str(folder)]
    log = OUT / f"{tool}-{repeat}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{tool} (repeat {repeat}) failed with exit code {done.returncode}; end of {log}:\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timed = result["step_seconds"][args.warmup - 1:]  # intervals; the first one ends step 2
    if not timed:
        raise SystemExit(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")
    return {**result, "repeat": repeat, "process_seconds": took, "seconds": statistics.median(timed),
            "cpu_seconds": statistics.median(result["step_cpu_seconds"][args.warmup - 1:]),
            "rise": result["peak_rss"] - result["start_rss"]}


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{statistics.median(values) / scale:,.{digits}f} "
            f"({min(values) / scale:,.{digits}f}-{max(values) / scale:,.{digits}f})")


def table(rows: list[dict[str, Any]], args: argparse.Namespace, found: dict[str, str]) -> str:
    """Markdown table: per tool the median (min-max) over repeats; then distill / TRL per repeat."""
    by = {tool: sorted((r for r in rows if r["tool"] == tool), key=lambda r: r["repeat"]) for tool in TOOLS}
    names = {"distill": f"distill {found['distill']} (`distill.run`, token_kd jsd)",
             "trl": f"TRL {found['trl']} (`GKDTrainer`, lmbda 0)"}
    mib = 2**20
    lines = ["| tool | step time (s) | CPU time per step (s) | peak RSS (MiB) | RSS rise in training (MiB) "
             f"| loss, step 1 | loss, step {args.steps} |", "|---|---|---|---|---|---|---|"]
    for tool in TOOLS:
        mine = by[tool]
        cells = [names[tool], _spread([r["seconds"] for r in mine], digits=3),
                 _spread([r["cpu_seconds"] for r in mine], digits=3), _spread([r["peak_rss"] for r in mine], mib, 0),
                 _spread([r["rise"] for r in mine], mib, 0), f"{statistics.median(r['losses'][0] for r in mine):.5f}",
                 f"{statistics.median(r['losses'][-1] for r in mine):.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = list(zip(by["distill"], by["trl"], strict=True))
    ratios = [_spread([a[key] / b[key] for a, b in pairs], digits=3)
              for key in ("seconds", "cpu_seconds", "peak_rss", "rise")]
    lines.append("| distill / TRL | " + " | ".join(ratios) + " | | |")
    teacher, student = MODELS["teacher"], MODELS["student"]
    lines.append("")
    lines.append(
        f"Median (min-max) over {len(pairs)} repeats, each tool in a fresh process, the order alternating; step "
        f"time is the median of steps {args.warmup + 1}-{args.steps} of each run. GPT-2 teacher {teacher[0]} x "
        f"{teacher[1]}, student {student[0]} x {student[1]}, vocabulary {VOCAB:,}, batch {BATCH_SIZE} x "
        f"{MAX_LENGTH} tokens, JSD beta {BETA}, T {TEMPERATURE:g}, AdamW lr {LR:g}, float32, CPU, "
        f"{rows[0]['threads']} torch threads; transformers {found['transformers']}, accelerate "
        f"{found['accelerate']}, torch {found['torch']}. CPU time per step: the process's CPU time (all threads) "
        "over the same steps. RSS rise: peak RSS after the last step less the RSS before the first training "
        "forward.")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the step time (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both tools")
    parser.add_argument("--write", type=Path, help="update this markdown file between the trl-gkd markers")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need --warmup >= 1 and --steps > --warmup")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args.steps, args.threads, OUT / "models", args.folder)
        return
    try:
        import_gkd()
    except ImportError as exc:
        raise SystemExit(f"cannot import TRL's GKDTrainer ({exc}); install it in a separate environment, as the "
                         "docstring says: pip install trl -e '.[hf]'") from None
    OUT.mkdir(parents=True, exist_ok=True)
    paths = build_models(OUT / "models")
    check_blocks(training_blocks(args.steps), paths["student"])
    found = versions()
    print(json.dumps(found), flush=True)
    rows = []
    for repeat in range(args.repeats):
        for tool in TOOLS if repeat % 2 == 0 else TOOLS[::-1]:
            rows.append(measure(tool, repeat, args))
            shown = {k: rows[-1][k] for k in ("tool", "repeat", "process_seconds", "seconds", "cpu_seconds",
                                               "start_rss", "peak_rss", "rise", "threads")}
            print(json.dumps({**shown, "loss_first": rows[-1]["losses"][0], "loss_last": rows[-1]["losses"][-1]}),
                  flush=True)
    text = table(rows, args, found)
    print(text)
    if args.write:
        from _markdown import write_section

        write_section(args.write, "trl-gkd", text)


if __name__ == "__main__":
    main()

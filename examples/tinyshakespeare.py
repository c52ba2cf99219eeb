"""Train the GPT-style teacher that the Tiny Shakespeare recipes distil, with distill itself.

    python examples/tinyshakespeare.py            # tokenizer, model folders, then the teacher run

1. A byte-level BPE tokenizer is trained on the training part of Tiny Shakespeare (the first
   90%; the last 10% is held out, as the recipes hold it out).
2. Two GPT-2 model folders are written under ``runs/tinyshakespeare-models/``: ``teacher-init`` (the
   teacher's architecture with fresh weights) and ``student`` (the student's architecture; the
   recipes build it with fresh weights per seed, ``init: random``).
3. ``recipes/tinyshakespeare-teacher.yaml`` trains the teacher on the text alone (a recipe with
   no distillation loss). The trained teacher lands in ``runs/tinyshakespeare-teacher/student``,
   which ``recipes/tinyshakespeare.yaml`` names as its teacher.

Running it again reuses what is there: the tokenizer and folders are kept, and the teacher run
resumes or is skipped when finished.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import distill
from distill.data import read_text
from distill.models.causal_lm import byte_level_bpe

ROOT = Path("runs/tinyshakespeare-models")
ARCHITECTURES = {
    # Small enough to train on a laptop CPU in minutes: about 0.96M parameters against about
    # 0.18M, so the student is over 5x smaller.
    "teacher-init": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "student": {"n_layer": 2, "n_embd": 64, "n_head": 2},
}


def write_models(data: Path, vocab_size: int, context: int, seed: int = 0) -> None:
    """Tokenizer and the two model folders (skipped when they exist)."""
    import transformers

    if all((ROOT / name / "config.json").is_file() for name in ARCHITECTURES):
        return
    text = read_text(data)
    tokenizer = byte_level_bpe(text[: int(len(text) * 0.9)], vocab_size)
    for name, arch in ARCHITECTURES.items():
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=context,
                                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         **arch)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(ROOT / name)
        tokenizer.save_pretrained(ROOT / name)
        print(f"{ROOT / name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tinyshakespeare"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256, help="positions the models can attend to")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tinyshakespeare-teacher.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the teacher recipe (repeatable)")
    args = parser.parse_args(argv)
    write_models(args.data, args.vocab_size, args.context)
    result = distill.run(args.recipe, [f"data.path={args.data}", *args.overrides])
    print(f"teacher: {result.folder / 'student'}\nreport: {result.report}")


if __name__ == "__main__":
    main()

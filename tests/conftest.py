"""Shared fixtures: tiny models built in the test, real data from ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DISTILL_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 2-layer BERT (hidden 32, 4 heads) with a word-piece vocabulary from STS-B, saved to disk."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from distill.data import read_stsb

    folder = tmp_path_factory.mktemp("tiny-bert")
    pairs = read_stsb(data_dir / "stsbenchmark", "train", limit=400)
    words = sorted({w.lower().strip(".,!?\"'") for s in pairs.first + pairs.second for w in s.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:600]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


#: A chat template in the usual ChatML layout, for tokenizers built here (they have none).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Fashion-MNIST classes written as image folders, by folder name.
IMAGE_CLASSES = {"bag": 8, "sneaker": 7, "trouser": 1}


def write_image_folder(root: Path, data_dir: Path, per_class: dict[str, int], rgb: bool = True) -> Path:
    """Real Fashion-MNIST images as PNG files in ``root/SPLIT/CLASS/``: ``per_class`` images of
    each class per split (``train``, ``test``), tinted with a random colour each when ``rgb``."""
    from PIL import Image

    from distill.data import read_idx_images

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        images, labels = read_idx_images(data_dir / "fashion-mnist", "train" if split == "train" else "test")
        for name, label in IMAGE_CLASSES.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[:count]):
                pixels = images[index]
                if rgb:
                    tint = rng.uniform(0.3, 1.0, size=3)
                    image = Image.fromarray((pixels[..., None] * tint).astype(np.uint8), "RGB")
                else:
                    image = Image.fromarray(pixels, "L")
                image.save(root / split / name / f"{i:04d}.png")
    return root


def bpe_tokenizer(text: str, vocab_size: int = 300):  # noqa: ANN201 - a transformers tokenizer
    """A byte-level BPE tokenizer trained on ``text``, end-of-text token ``<|endoftext|>`` (id 0)."""
    from distill.models.causal_lm import byte_level_bpe

    return byte_level_bpe(text, vocab_size)


def _gpt(folder: Path, tokenizer, layers: int, width: int, seed: int) -> Path:  # noqa: ANN001
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers,
                                     n_head=2, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt_pair(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """A 2-layer GPT-2 teacher (width 32) and a 1-layer student (width 16) sharing a byte-level
    BPE tokenizer of 300 tokens trained on Tiny Shakespeare; the tokenizer has a chat template."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    tokenizer = bpe_tokenizer((data_dir / "tinyshakespeare" / "input.txt").read_text()[:200_000])
    tokenizer.chat_template = CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("gpt")
    return _gpt(root / "teacher", tokenizer, 2, 32, 0), _gpt(root / "student", tokenizer, 1, 16, 1)


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied; nested sections merge (a ``None`` value removes a key)."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def tiny_lm_recipe(tmp_path: Path, data_dir: Path, teacher_dir: Path, student_dir: Path | None = None,
                   **changes) -> dict:
    """A recipe dict distilling the tiny GPT teacher on Tiny Shakespeare in a few steps.

    ``student_dir`` loads a student folder; without it the student is derived from layers 0 and 2 of
    the teacher. ``changes`` override fields, nested sections merging into the defaults.
    """
    base = {
        "name": "tiny-lm", "task": "lm", "seed": 0,
        "teacher": {"kind": "hf-causal-lm", "source": str(teacher_dir), "max_length": 64},
        "student": ({"source": str(student_dir), "max_length": 64} if student_dir is not None
                    else {"derive": {"layers": [0, 2], "calibration_batches": 2}}),
        "data": {"format": "text", "path": str(data_dir / "tinyshakespeare"), "block_chars": 200,
                 "train_limit": 64, "eval_limit": 8, "test_limit": 16},
        "losses": [{"name": "token_kd", "params": {"kind": "jsd", "beta": 0.5, "chunk_size": 50}}],
        "task_loss_weight": 0.5,
        "output_dir": str(tmp_path / "run"),
        "train": {"max_steps": 6, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3, "lr": 3e-3},
        "cache": {"dir": str(tmp_path / "cache")},
        "evaluate": {"latency_repeats": 2, "throughput_repeats": 1, "warmup": 0, "batch_size": 4},
    }
    return _merged(base, changes)


def run_recipe_cli(recipe: Path, out: Path, env: dict | None = None):  # noqa: ANN201 - a CompletedProcess
    """``distill run RECIPE --set output_dir=OUT`` in a child process (``env`` adds variables, e.g. the
    ``DISTILL_KILL_AT_STEP`` test hook), its output captured."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "distill.cli", "run", str(recipe), "--set", f"output_dir={out}"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def metrics_lines(folder):
    """``folder/metrics.jsonl`` as JSON lines without their timing fields (time, throughput):
    what two runs of one recipe write alike, byte for byte."""
    from distill.checkpoint import without_timing

    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.dumps(without_timing(json.loads(line))) for line in lines]


def killed_then_resumed(recipe: dict, folder: Path, step: int):  # noqa: ANN201 - (lines, lines, CompletedProcess)
    """Run ``recipe`` through the CLI killed (SIGKILL) after ``step``, resume it, and run it again
    uninterrupted in another folder; returns both runs' student metrics lines and the resume's process."""
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    killed = run_recipe_cli(path, folder / "killed", {"DISTILL_KILL_AT_STEP": str(step)})
    assert killed.returncode == -9, killed.stderr
    resumed = run_recipe_cli(path, folder / "killed")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_recipe_cli(path, folder / "straight")
    assert straight.returncode == 0, straight.stderr
    killed_lines, straight_lines = (metrics_lines(folder / name / "train/student") for name in ("killed", "straight"))
    return killed_lines, straight_lines, resumed

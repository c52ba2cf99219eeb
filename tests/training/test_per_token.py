"""Token-level losses average over every token of an optimizer step, whatever the batches' split.

A micro-batch with 10 completion tokens must weigh a hundredth of one with 1,000: gradient
accumulation and several processes give the step of one large batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import bpe_tokenizer, tiny_lm_recipe
from safetensors.torch import load_file

import distill

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    """A dropout-free GPT teacher and student, and prompt/completion records of very uneven lengths."""
    import transformers

    root = tmp_path_factory.mktemp("per-token")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    tokenizer = bpe_tokenizer(text)
    for name, layers, width, seed in (("teacher", 2, 32, 0), ("student", 1, 16, 1)):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        transformers.GPT2LMHeadModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = []
    for i in range(72):
        start = 500 * i
        size = [4, 40, 160, 12][i % 4] + i % 7  # completions from a few characters to a few hundred
        rows.append({"prompt": text[start : start + 30], "completion": text[start + 30 : start + 30 + size]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _recipe(setup, data_dir, out, batch_size, grad_accum):
    return tiny_lm_recipe(
        setup, data_dir, setup / "teacher", setup / "student", name="per-token", baseline=False,
        output_dir=str(out), data={"format": "jsonl", "path": str(setup / "train.jsonl"), "block_chars": None,
                                   "train_limit": 64, "eval_limit": 4, "test_limit": 4},
        losses=[{"name": "token_kd", "params": {"kind": "forward_kl"}}],
        cache={"enabled": False, "dir": str(setup / "cache")},
        train={"max_steps": 3, "batch_size": batch_size, "grad_accum": grad_accum, "group_by_length": False,
               "eval_every": 100, "checkpoint_every": 100, "lr": 3e-3, "warmup_ratio": 0.0},
    )


def _steps(folder):
    lines = (folder / "train/student/metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if "loss" in json.loads(x)]


def _same(a, b):
    for ra, rb in zip(_steps(a), _steps(b), strict=True):
        for key in ("loss", "token_kd_loss", "task_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5)
    wa, wb = (load_file(str(f / "student/model.safetensors")) for f in (a, b))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=2e-6, rtol=1e-5)


def test_accumulated_batches_equal_one_batch_four_times_as_large(setup, data_dir):
    distill.run(_recipe(setup, data_dir, setup / "big", 32, 1))
    distill.run(_recipe(setup, data_dir, setup / "accumulated", 8, 4))
    _same(setup / "big", setup / "accumulated")


def test_two_processes_equal_one(setup, data_dir):
    one, two = setup / "one", setup / "two"
    distill.run(_recipe(setup, data_dir, one, 16, 2))
    path = setup / "two.yaml"
    path.write_text(yaml.safe_dump(_recipe(setup, data_dir, two, 16, 2)))
    out = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path), "--nproc", "2"],
                         capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _same(one, two)

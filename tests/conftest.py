"""Shared fixtures: tiny models built in the test, real data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

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

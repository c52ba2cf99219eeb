"""Fixtures of the ``distill generate`` tests: tiny GPT-2 teachers built here, and a server over one."""

import pytest
import torch
from conftest import bpe_tokenizer

from .helpers import CHAT_TEMPLATE, KEY, TinyOpenAI


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Generation here is many tiny steps; a second intra-op thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def models(tmp_path_factory, data_dir):
    """A 2-layer GPT-2 (width 32) whose tokenizer has a chat template, and the same without one."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:50_000]
    tokenizer = bpe_tokenizer(text)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    root = tmp_path_factory.mktemp("gpt")
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "chat")
    tokenizer.save_pretrained(root / "chat")
    return root / "chat", root / "plain"


@pytest.fixture
def server(models):
    srv = TinyOpenAI(models[0], KEY)
    yield srv
    srv.close()

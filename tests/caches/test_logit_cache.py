"""The teacher's top-k logit cache: the sparse loss it feeds, the files, resume and corruption."""

import json

import numpy as np
import pytest
import torch
from conftest import killed_then_resumed, tiny_lm_recipe

import distill
from distill.config import DataSpec, parse_recipe
from distill.errors import CacheError, RecipeError
from distill.logit_cache import TokenLogitCache, drawn_log_frequencies
from distill.losses.chunked import chunked_topk_loss, token_loss
from distill.losses.divergence import DIVERGENCES, sparse_token_divergence, token_divergence
from distill.losses.tokens import TokenKDLoss
from distill.models.load import load_hf
from distill.runner import build_caches
from distill.tasks import LanguageModelingTask

pytest.importorskip("transformers")


def _logits(rows=24, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3, \
        torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 50])
def test_sparse_teacher_equals_the_top_k_restriction_of_full_logits(kind, k):
    s, t = _logits()
    temperature = 2.0
    logp = torch.log_softmax(t / temperature, -1)
    top = logp.topk(k, dim=-1)
    ours = sparse_token_divergence(s, top.values, top.indices, kind, temperature=temperature, beta=0.3, alpha=0.2)
    reference = token_divergence(s, t, kind, temperature=temperature, beta=0.3, alpha=0.2, top_k=k)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_full_cached_distribution_equals_the_unrestricted_divergence():
    s, t = _logits()
    ours = sparse_token_divergence(s, torch.log_softmax(t, -1), None, "jsd", beta=0.7)
    torch.testing.assert_close(ours, token_divergence(s, t, "jsd", beta=0.7), rtol=1e-9, atol=1e-9)


def test_mass_outside_the_top_k_counts():
    # The teacher puts 90% of its mass outside its top 2: a student that matches only the top 2
    # tokens' probabilities, not the rest, must still be penalised through the pooled bucket.
    s, t = _logits(rows=4, vocab=30)
    logp = torch.log_softmax(t, -1)
    top = logp.topk(2, dim=-1)
    assert float(sparse_token_divergence(s, top.values, top.indices).min()) > 0
    assert float(sparse_token_divergence(t, top.values, top.indices).abs().max()) < 1e-12  # identity: zero


@pytest.mark.parametrize("ids", [True, False])
def test_chunked_topk_loss_and_gradients_equal_the_naive_form(ids):
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    head = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    t_hidden, t_head = torch.randn(37, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    mask = (torch.rand(37) > 0.3).float()
    logp = torch.log_softmax(t_hidden @ t_head.T, -1)
    top = logp.topk(6, dim=-1) if ids else None
    ours = chunked_topk_loss(hidden, head, top.values if ids else logp, top.indices if ids else None, mask,
                             "reverse_kl", chunk_size=5)
    (g_h, g_w) = torch.autograd.grad(ours, (hidden, head))
    naive = token_loss(hidden, head, t_hidden, t_head, mask, "reverse_kl", top_k=6 if ids else None)
    (n_h, n_w) = torch.autograd.grad(naive, (hidden, head))
    torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_h, n_h, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_w, n_w, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def lm(gpt_pair, data_dir):
    teacher = load_hf("hf-causal-lm", str(gpt_pair[0]), max_length=64)
    teacher.module.eval()
    task = LanguageModelingTask(DataSpec(format="text", path=data_dir / "tinyshakespeare", block_chars=120,
                                         train_limit=23, test_limit=4))
    return teacher, task


def _open(root, teacher, task, k, **kw):
    return TokenLogitCache.open_or_build(root, "teacher", task.fingerprint(), teacher=teacher,
                                         batches=task.train.batch, examples=len(task.train), k=k, batch_size=4,
                                         shard_size=5, **kw)


def test_cache_round_trip_holds_the_teachers_top_k(tmp_path, lm):
    teacher, task = lm
    cache = _open(tmp_path, teacher, task, k=8, temperature=2.0)
    assert len(cache.meta["shards"]) == 5  # 23 examples in shards of 5
    batch = task.train.batch([3, 11, 22])
    with torch.no_grad():
        out = teacher(batch["inputs"])
    got = cache.lookup(batch["index"])
    assert got.logp.shape == (3, out["hidden"].shape[1], 8) and got.ids.dtype == torch.long
    logp = torch.log_softmax(out["hidden"] @ out["head"].T / 2.0, -1)
    top = logp.topk(8, dim=-1)
    real = out["token_mask"].bool()  # plain text: every real position is cached
    torch.testing.assert_close(got.logp[real], top.values[real], atol=2e-2, rtol=1e-2)  # float16 on disk
    assert (got.ids[real] == top.indices[real]).float().mean() > 0.99  # ties in float16 aside
    # bytes per token: 8 x (2 bytes value + 2 bytes id, a 300-token vocabulary) plus the offsets
    assert 32 <= cache.bytes_per_token() < 36  # the rest: npy headers and offsets of 23 short texts


def test_full_cache_and_loss_from_it_match_the_online_teacher(tmp_path, lm, gpt_pair):
    teacher, task = lm
    student = load_hf("hf-causal-lm", str(gpt_pair[1]), max_length=64)
    cache = _open(tmp_path, teacher, task, k=0)
    assert "ids" not in json.dumps(cache.meta["shards"]["0"]["files"])
    batch = task.train.batch([0, 1, 2, 3])
    s_out = student(batch["inputs"])
    with torch.no_grad():
        t_out = teacher(batch["inputs"])
    loss = TokenKDLoss("jsd", beta=0.5)
    online = loss(s_out["hidden"], t_out["hidden"], mask=s_out["token_mask"], student_head=s_out["head"],
                  teacher_head=t_out["head"])
    cached = loss.forward_cached(s_out["hidden"], cache.lookup(batch["index"]), mask=s_out["token_mask"],
                                 student_head=s_out["head"])
    torch.testing.assert_close(cached, online, rtol=2e-3, atol=1e-4)


def test_killed_build_resumes_at_the_first_unfinished_shard(tmp_path, lm):
    teacher, task = lm
    calls = []

    def failing(indices):
        calls.append(indices[0])
        if indices[0] >= 10:
            raise KeyboardInterrupt  # killed while writing shard 2
        return task.train.batch(indices)

    with pytest.raises(KeyboardInterrupt):
        TokenLogitCache.open_or_build(tmp_path, "teacher", task.fingerprint(), teacher=teacher, batches=failing,
                                      examples=len(task.train), k=4, batch_size=5, shard_size=5)
    folder = TokenLogitCache.folder_for(tmp_path, "teacher", task.fingerprint(), 4, 1.0)
    assert sorted(json.loads((folder / "meta.json").read_text())["shards"]) == ["0", "1"]
    with pytest.raises(CacheError, match="unfinished"):
        TokenLogitCache.load(folder)
    calls.clear()
    cache = TokenLogitCache.open_or_build(tmp_path, "teacher", task.fingerprint(), teacher=teacher,
                                          batches=lambda i: (calls.append(i[0]), task.train.batch(i))[1],
                                          examples=len(task.train), k=4, batch_size=5, shard_size=5)
    assert calls == [10, 15, 20] and len(cache.meta["shards"]) == 5


def test_a_run_that_waited_for_another_s_build_reads_its_shards(tmp_path, lm):
    """Two runs of one recipe open the same logit cache together: the second waits for the first's
    build and finds its shards written, instead of running the teacher over them again."""
    import threading

    teacher, task = lm
    started, go = threading.Event(), threading.Event()

    def first_batches(indices):
        started.set()
        go.wait(10)
        return task.train.batch(indices)

    second_calls = []
    first = threading.Thread(target=lambda: TokenLogitCache.open_or_build(
        tmp_path, "teacher", task.fingerprint(), teacher=teacher, batches=first_batches, examples=len(task.train),
        k=4, batch_size=5, shard_size=5))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: TokenLogitCache.open_or_build(
        tmp_path, "teacher", task.fingerprint(), teacher=teacher,
        batches=lambda i: (second_calls.append(i[0]), task.train.batch(i))[1], examples=len(task.train),
        k=4, batch_size=5, shard_size=5))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first build's turn
    go.set()
    first.join(60)
    second.join(60)
    assert not second_calls


def test_files_half_written_by_a_killed_process_are_swept_on_reopening(tmp_path, lm):
    import os
    import subprocess
    import sys

    teacher, task = lm
    args = dict(teacher=teacher, batches=task.train.batch, examples=len(task.train), k=4, batch_size=5, shard_size=5)
    cache = TokenLogitCache.open_or_build(tmp_path, "teacher", task.fingerprint(), **args)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a kill -9 between writing and renaming leaves the temporary name behind
    abandoned = [cache.folder / f"shard-00001.logp.npy.tmp-{dead.pid}", cache.folder / f"meta.json.tmp-{dead.pid}"]
    running = cache.folder / f"meta.json.tmp-{os.getppid()}"  # a live writer's is left alone
    for tmp in (*abandoned, running):
        tmp.write_bytes(b"half written")
    again = TokenLogitCache.open_or_build(tmp_path, "teacher", task.fingerprint(), **args)
    assert not any(p.exists() for p in abandoned) and running.exists()
    assert again.meta["shards"] == cache.meta["shards"]


def test_corrupt_shard_is_detected_and_rebuilt(tmp_path, lm):
    teacher, task = lm
    cache = _open(tmp_path, teacher, task, k=4)
    before = cache.rows(7)[0].copy()
    path = cache.folder / "shard-00001.logp.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard\(s\) \[1\].*corrupt"):
        TokenLogitCache.load(cache.folder)
    rebuilt = _open(tmp_path, teacher, task, k=4)
    np.testing.assert_array_equal(rebuilt.rows(7)[0], before)


@pytest.mark.parametrize("sample", [False, True])
def test_recipe_trains_from_the_cache(tmp_path, data_dir, gpt_pair, sample):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(
        tmp_path, data_dir, teacher, student, name="tiny-lm-cache", task_loss_weight=0.0, baseline=False,
        data={"train_limit": 24, "eval_limit": 4, "test_limit": 4},
        losses=[{"name": "token_kd", "params": {"kind": "forward_kl", "temperature": 2.0}}],
        cache={"enabled": True, "top_k": 8, "shard_size": 10, "sample": sample},
        train={"epochs": 1, "max_steps": None, "lr": 1e-3, "eval_every": 100, "checkpoint_every": 100},
    )
    ((name, built),) = build_caches(recipe)
    assert name == "tiny-lm-cache"
    assert built.k == 8 and built.temperature == 2.0 and built.examples == 24 and built.sample == sample
    result = distill.run(recipe)
    metrics = (result.folder / "train" / "student" / "metrics.jsonl").read_text()
    log = [json.loads(line) for line in metrics.splitlines()]
    losses = [r["token_kd_loss"] for r in log if "token_kd_loss" in r]
    assert losses and all(np.isfinite(losses)) and losses[-1] < losses[0]
    two = [*recipe["losses"], {"name": "token_kd", "params": {"kind": "forward_kl", "temperature": 1.0}}]
    with pytest.raises(distill.RecipeError, match="different temperatures"):
        build_caches({**recipe, "losses": two})


def test_a_cache_fed_run_resumed_after_sigkill_equals_an_uninterrupted_one(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(
        tmp_path, data_dir, teacher, student, name="tiny-lm-cache-resume", task_loss_weight=0.5, baseline=False,
        data={"train_limit": 32, "eval_limit": 4, "test_limit": 4},
        losses=[{"name": "token_kd", "params": {"kind": "forward_kl", "temperature": 1.0}}],
        cache={"enabled": True, "top_k": 8, "shard_size": 10},
        train={"max_steps": 8, "batch_size": 4, "lr": 1e-3, "eval_every": 4, "checkpoint_every": 2},
    )
    killed, straight, resumed = killed_then_resumed(recipe, tmp_path, step=5)
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert killed == straight and any("token_kd_loss" in x for x in straight)


def test_drawn_frequencies_give_the_full_forward_kl_gradient_on_average():
    """A sampled cache's frequencies are unbiased: averaged over draws, forward KL against them
    has the gradient of forward KL against the whole distribution, the tail included; a top-k
    cache of the same size does not."""
    s, t = _logits(rows=6, vocab=40)
    s = s.requires_grad_()
    logp = torch.log_softmax(t, -1)
    (full,) = torch.autograd.grad(token_divergence(s, t, "forward_kl").sum(), s)
    mean = torch.zeros_like(s)
    draws = 400
    for seed in range(draws):
        values, ids = drawn_log_frequencies(logp, 8, seed)
        assert torch.allclose(values.exp().sum(-1), torch.ones(6, dtype=values.dtype))
        mean += torch.autograd.grad(sparse_token_divergence(s, values, ids).sum(), s)[0] / draws
    top = logp.topk(8, dim=-1)
    (topk,) = torch.autograd.grad(sparse_token_divergence(s, top.values, top.indices).sum(), s)
    assert float((mean - full).abs().max()) < 0.04 < float((topk - full).abs().max())
    same = drawn_log_frequencies(logp, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(same, drawn_log_frequencies(logp, 8, 3), strict=True))


def test_sampled_cache_holds_draws_from_the_teacher(tmp_path, lm):
    teacher, task = lm
    cache = _open(tmp_path, teacher, task, k=16, sample=True)
    assert cache.sample and cache.folder.name.startswith("logits-s16-")
    assert cache.folder != _open(tmp_path, teacher, task, k=16).folder  # a top-k cache is another one
    logp, ids = (np.asarray(a) for a in cache.rows(7))
    mass = np.exp(logp.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)  # the frequencies of 16 draws, float16 on disk
    counts = np.round(np.exp(logp.astype(np.float64)) * 16)
    assert set(np.unique(counts)) <= set(range(17)) and (counts[:, 0] >= 1).all()
    batch = task.train.batch([7])
    with torch.no_grad():
        out = teacher(batch["inputs"])
        probs = torch.softmax(out["hidden"][0] @ out["head"].T, -1)[: len(ids)]
    drawn = torch.from_numpy(ids.astype(np.int64))[torch.from_numpy(counts > 0)]
    rows = torch.arange(len(ids))[:, None].expand_as(torch.from_numpy(counts))[torch.from_numpy(counts > 0)]
    assert float(probs[rows, drawn].min()) > 0  # only tokens the teacher gives mass to are drawn
    rebuilt = TokenLogitCache.open_or_build(tmp_path / "again", "teacher", task.fingerprint(), teacher=teacher,
                                            batches=task.train.batch, examples=len(task.train), k=16,
                                            batch_size=3, shard_size=5, sample=True)
    np.testing.assert_array_equal(np.asarray(rebuilt.rows(7)[1]), ids)  # seeded by example, not by batch


def test_sampled_cache_refuses_other_divergences(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, task_loss_weight=0.0, baseline=False,
                            cache={"enabled": True, "top_k": 8, "sample": True})
    with pytest.raises(RecipeError, match="forward KL only.*jsd"):
        parse_recipe(recipe)  # refused when the recipe is read (distill validate), not when the cache is built
    with pytest.raises(RecipeError, match="cache.sample: draws top_k tokens"):
        parse_recipe({**recipe, "cache": {"top_k": 0, "sample": True}})

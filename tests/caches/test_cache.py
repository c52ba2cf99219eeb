import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.cache import TeacherCache, model_fingerprint
from distill.errors import CacheError


class Data:
    def __init__(self, n=10):
        self.x = torch.randn(n, 3)

    def batch(self, idx):
        return {"index": torch.tensor(idx), "inputs": {"x": self.x[idx]}}


def teacher(weight):
    return lambda inputs: {"logits": inputs["x"] @ weight}


def build(tmp_path, data, weight, teacher_id="t1"):
    return TeacherCache.open_or_build(
        tmp_path, teacher_id, "d1", teacher=teacher(weight), batches=data.batch,
        lengths=list(range(10, 0, -1)), names=["logits"], batch_size=4,
    )


def test_lookup_returns_teacher_outputs_in_dataset_order(tmp_path):
    data, w = Data(), torch.randn(3, 5)
    cache = build(tmp_path, data, w)
    idx = torch.tensor([7, 0, 3])
    torch.testing.assert_close(cache.lookup(idx)["logits"], data.x[idx] @ w)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_build_that_waited_for_the_lock_uses_the_cache_built_meanwhile(tmp_path):
    """Two runs of one recipe start together: the second waits for the first's build, then opens
    its cache instead of running the teacher again."""
    data, w = Data(), torch.randn(3, 5)
    first = build(tmp_path, data, w)

    def refuses(inputs):
        raise AssertionError("the teacher ran again")

    # What the waiting run does once the lock is its: it had seen no cache before waiting.
    again = TeacherCache.build(first.folder, "t1", "d1", teacher=refuses, batches=data.batch,
                               lengths=list(range(10, 0, -1)), names=["logits"], batch_size=4)
    torch.testing.assert_close(again.lookup(torch.arange(10))["logits"], data.x @ w)


def test_stale_cache_is_refused(tmp_path):
    data, w = Data(), torch.randn(3, 5)
    cache = build(tmp_path, data, w)
    with pytest.raises(CacheError, match="stale"):
        TeacherCache.load(cache.folder, "another-teacher", "d1")
    with pytest.raises(CacheError, match="stale"):
        TeacherCache.load(cache.folder, "t1", "other-data")


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog):
    data, w = Data(), torch.randn(3, 5)
    cache = build(tmp_path, data, w)
    path = cache.folder / "logits.npy"
    del cache
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="corrupt"):
        TeacherCache.load(path.parent, "t1", "d1")
    with caplog.at_level(logging.WARNING):
        rebuilt = build(tmp_path, data, w)
    assert caplog.text.count("rebuilding it") == 1 and "corrupt" in caplog.text  # said once
    torch.testing.assert_close(rebuilt.lookup(torch.arange(10))["logits"], data.x @ w)


def test_changed_teacher_gets_its_own_cache(tmp_path):
    a, b = torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a, {"pooling": "mean"}) != model_fingerprint(a, {"pooling": "cls"})
    assert TeacherCache.folder_for(tmp_path, model_fingerprint(a), "d") != TeacherCache.folder_for(
        tmp_path, model_fingerprint(b), "d")


def test_meta_records_identity_and_checksum(tmp_path):
    cache = build(tmp_path, Data(), torch.randn(3, 5))
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["teacher"] == "t1" and meta["data"] == "d1" and len(meta["outputs"]["logits"]["sha256"]) == 64
    assert isinstance(cache.arrays["logits"], np.memmap)


def test_each_set_of_outputs_has_its_own_cache(tmp_path):
    data, w = Data(), torch.randn(3, 5)
    first = build(tmp_path, data, w)

    def layers_only(inputs):  # a teacher tapped at another layer, without the logits
        return {"layer:h": inputs["x"] * 2}

    other = TeacherCache.open_or_build(tmp_path, "t1", "d1", teacher=layers_only, batches=data.batch,
                                       lengths=list(range(10)), names=["layer:h"], batch_size=4)
    assert other.folder != first.folder and set(other.arrays) == {"layer:h"}
    assert (other.folder / "layer_h.npy").is_file()
    torch.testing.assert_close(build(tmp_path, data, w).lookup(torch.arange(3))["logits"], data.x[:3] @ w)


def test_builds_abandoned_by_dead_processes_are_removed(tmp_path):
    data, w = Data(), torch.randn(3, 5)
    folder = build(tmp_path, data, w).folder
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = folder.with_name(f"{folder.name}.tmp-{dead.pid}")
    running = folder.with_name(f"{folder.name}.tmp-{os.getppid()}")
    for tmp in (abandoned, running):
        tmp.mkdir()
        (tmp / "logits.npy").write_bytes(b"half written")
    (folder / "meta.json").unlink()  # force a rebuild
    build(tmp_path, data, w)
    assert not abandoned.exists() and running.exists()


def test_a_killed_build_resumes_where_its_progress_stopped(tmp_path, monkeypatch):
    import distill.cache as cache_module

    monkeypatch.setattr(cache_module, "PROGRESS_EVERY", 3)
    data, weight = Data(40), torch.randn(3, 5)
    calls = []

    def counting(inputs, fail_at=None):
        calls.append(len(inputs["x"]))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # killed while writing batch 8 (batches 1-6 are recorded)
        return {"logits": inputs["x"] @ weight}

    def run(root, fail_at=None):
        return TeacherCache.open_or_build(
            root, "t1", "d1", teacher=lambda inputs: counting(inputs, fail_at), batches=data.batch,
            lengths=[i % 7 for i in range(40)], names=["logits"], batch_size=4)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a", fail_at=8)
    assert len(calls) == 8 and list((tmp_path / "a").glob("*.building"))
    calls.clear()
    resumed = run(tmp_path / "a")
    assert len(calls) == 10 - 6  # only the batches after the last recorded progress
    calls.clear()
    whole = run(tmp_path / "b")
    assert len(calls) == 10
    np.testing.assert_array_equal(resumed.arrays["logits"], whole.arrays["logits"])
    assert resumed.lookup(torch.tensor([5]))["logits"].shape == (1, 5)
    assert not list((tmp_path / "a").glob("*.building"))


# --- rows reused by content ------------------------------------------------------------------


class Texts:
    def __init__(self, texts):
        self.texts = texts

    def batch(self, idx):
        return {"index": torch.tensor(idx), "inputs": {"text": [self.texts[i] for i in idx]}}


def counting_teacher(seen):
    """Embeds a text as (its length, its first letter's code); records every text it runs on."""

    def teacher(inputs):
        seen.extend(inputs["text"])
        return {"embedding": torch.tensor([[float(len(t)), float(ord(t[0]))] for t in inputs["text"]])}

    return teacher


def text_cache(root, texts, seen, teacher_id="t1", data_id=None):
    data = Texts(texts)
    return TeacherCache.open_or_build(
        root, teacher_id, data_id or "-".join(texts), teacher=counting_teacher(seen), batches=data.batch,
        lengths=[len(t) for t in texts], names=["embedding"], batch_size=2,
    )


def expected(texts):
    return torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts])


def test_the_teacher_runs_only_on_texts_no_earlier_cache_holds_and_once_per_repeat(tmp_path, caplog):
    seen = []
    text_cache(tmp_path, ["apple", "bread", "cherry", "dough"], seen)
    assert sorted(seen) == ["apple", "bread", "cherry", "dough"]
    seen.clear()
    grown = ["cherry", "fig", "apple", "fig", "grape", "cherry"]
    with caplog.at_level(logging.INFO, logger="distill.cache"):
        cache = text_cache(tmp_path, grown, seen)
    assert sorted(seen) == ["fig", "grape"]  # the new texts, each once
    assert "6 examples, 2 rows from earlier caches, 2 repeats, 2 for the teacher" in caplog.text
    torch.testing.assert_close(cache.lookup(torch.arange(len(grown)))["embedding"], expected(grown))
    # The merged cache keeps its own keys, so a third build reuses rows from either.
    seen.clear()
    third = text_cache(tmp_path, ["grape", "dough", "kiwi"], seen)
    assert seen == ["kiwi"]
    torch.testing.assert_close(third.lookup(torch.arange(3))["embedding"], expected(["grape", "dough", "kiwi"]))


def test_rows_of_another_teacher_or_of_a_damaged_cache_are_not_reused(tmp_path):
    seen = []
    first = text_cache(tmp_path, ["apple", "bread"], seen)
    seen.clear()
    text_cache(tmp_path, ["apple", "bread", "kiwi"], seen, teacher_id="t2")
    assert sorted(seen) == ["apple", "bread", "kiwi"]  # another teacher's rows are not this one's
    (first.folder / "keys.npy").write_bytes(b"damaged")
    seen.clear()
    text_cache(tmp_path, ["bread", "kiwi"], seen)
    assert sorted(seen) == ["bread", "kiwi"]
    with pytest.raises(CacheError, match="keys.npy is missing or corrupt"):
        TeacherCache.load(first.folder, "t1", "apple-bread")


def test_a_build_in_several_processes_reuses_the_same_rows_as_one(tmp_path):
    seen = []
    text_cache(tmp_path / "one", ["apple", "bread"], seen)
    text_cache(tmp_path / "four", ["apple", "bread"], seen)
    texts = ["bread", "kiwi", "apple", "kiwi", "lime", "melon"]
    data = Texts(texts)
    args = {"teacher": counting_teacher(seen), "batches": data.batch, "lengths": [len(t) for t in texts],
            "names": ["embedding"], "batch_size": 2}
    folder = TeacherCache.folder_for(tmp_path, "t1", "d2", ["embedding"])
    seen.clear()
    one = TeacherCache.build(tmp_path / "one" / folder.name, "t1", "d2", **args)
    assert sorted(seen) == ["kiwi", "lime", "melon"]
    seen.clear()
    read = []  # the examples each call to `batches` reads: hashed once, in planning, then read for the teacher

    def batches(idx):
        read.extend(idx)
        return data.batch(idx)

    TeacherCache.plan_parts(tmp_path / "four" / folder.name, 4, teacher_id="t1", **{**args, "batches": batches})
    assert sorted(read) == list(range(len(texts)))
    for rank in range(4):
        TeacherCache.build_part(tmp_path / "four" / folder.name, rank, 4, **{**args, "batches": batches})
    four = TeacherCache.merge_parts(tmp_path / "four" / folder.name, "t1", "d2", 4, ["embedding"], len(texts))
    assert sorted(seen) == ["kiwi", "lime", "melon"] and len(read) == len(texts) + 3
    assert not list((tmp_path / "four").glob("*.part-*"))  # the plan and the parts are gone
    assert json.loads((four.folder / "meta.json").read_text()) == json.loads((one.folder / "meta.json").read_text())
    torch.testing.assert_close(four.lookup(torch.arange(len(texts)))["embedding"], expected(texts))

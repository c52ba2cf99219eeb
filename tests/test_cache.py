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
    assert "corrupt" in caplog.text
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

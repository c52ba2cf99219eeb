"""A teacher cache's files and rows: array file names, checksums, reading a cache back verified,
and the content key of each example with the plan of which rows a build computes, which it
repeats and which it copies from an earlier cache (:mod:`distill.cache` builds and opens caches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from distill.errors import CacheError

__all__ = ["KEYS_FILE", "RowPlan", "array_file", "example_keys", "file_sha256", "plan_rows", "read_arrays"]

log = logging.getLogger("distill.cache")
_CHUNK = 1 << 20


#: Bytes kept of an example's SHA-256 key, and the file a cache keeps its examples' keys in.
_KEY_BYTES = 16
KEYS_FILE = "keys.npy"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def array_file(output: str) -> str:
    """A portable file name for an output name (``layer:features.15`` -> ``layer_features.15.npy``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", output) + ".npy"


def read_arrays(folder: Path, teacher_id: str, data_id: str) -> dict[str, np.ndarray]:
    """The output arrays of the cache in ``folder``, memory-mapped, every checksum verified.

    Raises:
        CacheError: The cache is missing, was made by another teacher or on other data
            (stale), or a file does not match its checksum (corrupt).
    """
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CacheError(f"no teacher cache at {folder}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"teacher cache {folder}: meta.json is corrupt ({exc})") from None
    if meta.get("teacher") != teacher_id or meta.get("data") != data_id:
        raise CacheError(f"teacher cache {folder} is stale: it was made by another teacher or on other data")
    arrays = {}
    for name, info in meta["outputs"].items():
        path = folder / info["file"]
        if not path.is_file() or file_sha256(path) != info["sha256"]:
            raise CacheError(f"teacher cache {folder}: {info['file']} is missing or corrupt (checksum mismatch)")
        arrays[name] = np.load(path, mmap_mode="r")
    keys = meta.get("keys")
    if keys is not None and (not (folder / keys["file"]).is_file()
                             or file_sha256(folder / keys["file"]) != keys["sha256"]):
        raise CacheError(f"teacher cache {folder}: {keys['file']} is missing or corrupt (checksum mismatch)")
    return arrays


def example_keys(batches: Callable[[Sequence[int]], dict[str, Any]], examples: int, chunk: int = 1024
                 ) -> np.ndarray | None:
    """A ``(examples, 16)`` uint8 key per example: the SHA-256 of the inputs ``batches`` gives the
    teacher for it (texts, a pair's two texts, an image's normalised pixels), truncated.

    ``None`` when a batch's inputs cannot be split into one part per example (then nothing is reused).
    """
    keys = np.zeros((examples, _KEY_BYTES), dtype=np.uint8)
    for start in range(0, examples, chunk):
        idx = list(range(start, min(examples, start + chunk)))
        parts = {}
        for name, value in sorted(batches(idx)["inputs"].items()):
            parts[name] = _per_example(value, len(idx))
            if parts[name] is None:
                return None
        for j, i in enumerate(idx):
            digest = hashlib.sha256()
            for name, rows in parts.items():
                digest.update(name.encode() + b"\0" + _serialise(rows[j]) + b"\0")
            keys[i] = np.frombuffer(digest.digest()[:_KEY_BYTES], dtype=np.uint8)
    return keys


def _per_example(value: Any, n: int) -> list[Any] | None:
    """A batch field cut into ``n`` equal parts, one per example (a pair's two texts stay together)."""
    if not isinstance(value, (list, tuple, Tensor, np.ndarray)) or len(value) % max(n, 1):
        return None
    size = len(value) // max(n, 1)
    return [value[j * size : (j + 1) * size] for j in range(n)]


def _serialise(part: Any) -> bytes:
    if isinstance(part, Tensor):
        part = part.detach().cpu().numpy()
    if isinstance(part, np.ndarray):
        part = np.ascontiguousarray(part)
        return f"{part.dtype}{part.shape}".encode() + part.tobytes()
    return json.dumps(part, sort_keys=True, default=str).encode()


@dataclass
class RowPlan:
    """How a build fills a cache's rows: the examples the teacher runs on (``todo``), the rows
    copied from earlier caches (``copies``: folder, its rows, this cache's rows) and the repeats
    of an example earlier in the set (``repeats``: this cache's rows, the rows they repeat)."""

    todo: np.ndarray
    keys: np.ndarray | None = None
    copies: list[tuple[Path, np.ndarray, np.ndarray]] = field(default_factory=list)
    repeats: tuple[np.ndarray, np.ndarray] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    verified: dict[Path, dict[str, np.ndarray]] = field(default_factory=dict)
    """The earlier caches' arrays as planning verified them (a plan read back from disk has none)."""

    def fill(self, arrays: dict[str, np.ndarray], tmp: Path, examples: int) -> None:
        """Write the copied rows and the repeats into ``arrays`` (memory maps in ``tmp``, created
        here from an earlier cache's shapes when the teacher wrote none)."""
        for other, src, dst in self.copies:
            source = self.verified.get(other) or read_arrays(other, *_identity(other))
            for name, rows in source.items():
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / array_file(name), mode="w+", dtype=np.float32, shape=(examples, *rows.shape[1:]))
                arrays[name][dst] = rows[src]
        dst, src = self.repeats
        for array in arrays.values():
            array[dst] = array[src]

    def save(self, folder: Path) -> None:
        """Keep the plan in ``folder`` (the first process's part of a build in several)."""
        copies = {f"copy{i}_{end}": rows for i, (_, *ends) in enumerate(self.copies)
                  for end, rows in zip(("src", "dst"), ends, strict=True)}
        extra = {"keys": self.keys} if self.keys is not None else {}
        np.savez(folder / "plan.npz", todo=self.todo, repeat_dst=self.repeats[0], repeat_src=self.repeats[1],
                 **copies, **extra)
        (folder / "plan.json").write_text(json.dumps([str(other) for other, _, _ in self.copies]))

    @classmethod
    def load(cls, folder: Path) -> RowPlan:
        with np.load(folder / "plan.npz") as saved:
            others = [Path(p) for p in json.loads((folder / "plan.json").read_text())]
            copies = [(other, saved[f"copy{i}_src"], saved[f"copy{i}_dst"]) for i, other in enumerate(others)]
            keys = saved["keys"] if "keys" in saved.files else None
            return cls(saved["todo"], keys, copies, (saved["repeat_dst"], saved["repeat_src"]))


def _identity(folder: Path) -> tuple[str, str]:
    meta = json.loads((folder / "meta.json").read_text())
    return meta["teacher"], meta["data"]


def plan_rows(folder: Path, siblings: Sequence[Path], teacher_id: str, names: Sequence[str], examples: int,
              keys: np.ndarray | None) -> RowPlan:
    """Which rows of the cache in ``folder`` the teacher must compute, given each example's ``keys``.

    An example that repeats one earlier in the set takes its row; one held by a valid cache among
    ``siblings`` (earlier caches of the same teacher and outputs that kept their keys) takes that
    cache's row; the teacher runs on the rest. Without keys it runs on every example.
    """
    if keys is None:
        return RowPlan(np.arange(examples, dtype=np.int64))
    first: dict[bytes, int] = {}
    repeat_dst, repeat_src = [], []
    for i, key in enumerate(keys):
        j = first.setdefault(key.tobytes(), i)
        if j != i:
            repeat_dst.append(i)
            repeat_src.append(j)
    wanted = dict(first)
    copies, verified = [], {}
    for other in siblings:
        if not wanted:
            break
        stored = _stored(other, teacher_id, names)
        if stored is None:
            continue
        stored_keys, verified[other] = stored
        src, dst = [], []
        for row, key in enumerate(stored_keys):
            i = wanted.pop(key.tobytes(), None)
            if i is not None:
                src.append(row)
                dst.append(i)
        if dst:
            copies.append((other, np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)))
    reused = sum(len(dst) for _, _, dst in copies)
    if reused or repeat_dst:
        log.info("teacher cache %s: %d examples, %d rows from earlier caches, %d repeats, %d for the teacher",
                 folder.name, len(keys), reused, len(repeat_dst), len(wanted))
    used = {other: verified[other] for other, _, _ in copies}
    return RowPlan(np.asarray(sorted(wanted.values()), dtype=np.int64), keys, copies,
                   (np.asarray(repeat_dst, dtype=np.int64), np.asarray(repeat_src, dtype=np.int64)), used)


def _stored(folder: Path, teacher_id: str, names: Sequence[str]
            ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """The example keys and the verified arrays of a valid earlier cache of ``teacher_id`` holding
    ``names``, else ``None``."""
    try:
        teacher, data = _identity(folder)
        if teacher != teacher_id:
            return None
        arrays = read_arrays(folder, teacher, data)
        if not set(names) <= set(arrays) or not (folder / KEYS_FILE).is_file():
            return None
        return np.load(folder / KEYS_FILE), arrays
    except (OSError, ValueError, KeyError, CacheError):
        return None

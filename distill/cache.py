"""Teacher-output cache: run the teacher once, store its outputs memory-mapped, train from them.

A cache folder is named after the teacher's and the data's identity and holds ``meta.json``
(both identities, the shape, dtype and SHA-256 of every array) next to one ``.npy`` per output.
It is written to a temporary folder and renamed into place, so a killed run never leaves a
half-written cache. On load every checksum is verified: a stale or corrupt cache is reported
and rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.errors import CacheError

__all__ = ["TeacherCache", "model_fingerprint"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def model_fingerprint(module: nn.Module, extra: dict[str, Any] | None = None) -> str:
    """SHA-256 of a model's state (names, shapes, values) and of settings that change its outputs."""
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _remove_abandoned(folder: Path) -> None:
    """Delete the half-written ``<folder>.tmp-<pid>`` builds of processes that no longer run
    (a build killed before its final rename). Builds of live processes are left alone."""
    for tmp in folder.parent.glob(folder.name + ".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing the abandoned teacher-cache build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by another user


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _file_name(output: str) -> str:
    """A portable file name for an output name (``layer:features.15`` -> ``layer_features.15.npy``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", output) + ".npy"


class TeacherCache:
    """Memory-mapped teacher outputs, one row per training example.

    Args:
        folder: The cache folder (``meta.json`` and one ``.npy`` per output).
        arrays: Output name to a read-only ``(N, k, ...)`` memory map; ``k`` rows per example
            (2 for a sentence pair).
    """

    def __init__(self, folder: Path, arrays: dict[str, np.ndarray]) -> None:
        self.folder = folder
        self.arrays = arrays

    def lookup(self, index: Tensor) -> dict[str, Tensor]:
        """Teacher outputs of the examples at ``index``, flattened to ``(len(index) * k, ...)``."""
        idx = index.cpu().numpy()
        out = {}
        for name, array in self.arrays.items():
            rows = torch.from_numpy(np.ascontiguousarray(array[idx]))
            out[name] = rows.reshape(-1, *rows.shape[2:])
        return out

    @staticmethod
    def folder_for(root: Path, teacher_id: str, data_id: str, names: Sequence[str] = ()) -> Path:
        """Where the cache of this teacher's outputs ``names`` on this data lives.

        Each set of outputs has its own folder, so runs that read different teacher layers
        never rebuild each other's cache.
        """
        outputs = hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()[:8]
        return root / f"teacher-{teacher_id[:16]}-data-{data_id[:16]}-out-{outputs}"

    @classmethod
    def load(cls, folder: Path, teacher_id: str, data_id: str) -> TeacherCache:
        """Open and verify a cache.

        Raises:
            CacheError: The cache is missing, was made by another teacher or on other data
                (stale), or an array does not match its checksum (corrupt).
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
            if not path.is_file() or _file_sha256(path) != info["sha256"]:
                raise CacheError(f"teacher cache {folder}: {info['file']} is missing or corrupt (checksum mismatch)")
            arrays[name] = np.load(path, mmap_mode="r")
        return cls(folder, arrays)

    @classmethod
    def build(
        cls,
        folder: Path,
        teacher_id: str,
        data_id: str,
        teacher: Callable[[dict[str, Any]], dict[str, Tensor]],
        batches: Callable[[Sequence[int]], dict[str, Any]],
        lengths: Sequence[int],
        names: Sequence[str],
        batch_size: int = 64,
    ) -> TeacherCache:
        """Run the teacher over every training example and write the cache atomically.

        Examples are visited in order of ``lengths`` so that each batch pads little.
        """
        order = np.argsort(np.asarray(lengths), kind="stable")
        _remove_abandoned(folder)
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="teacher cache", unit="batch"):
                idx = order[start : start + batch_size]
                outputs = teacher(batches(idx.tolist())["inputs"])
                for name in names:
                    value = outputs[name].float().cpu()
                    rows = value.reshape(len(idx), -1, *value.shape[1:]).numpy()
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(
                            tmp / _file_name(name), mode="w+", dtype=np.float32, shape=(len(order), *rows.shape[1:])
                        )
                    arrays[name][idx] = rows
        outputs_meta = {}
        for name, array in arrays.items():
            array.flush()
            del array
            path = tmp / _file_name(name)
            outputs_meta[name] = {"file": path.name, "sha256": _file_sha256(path)}
        arrays.clear()
        meta = {"teacher": teacher_id, "data": data_id, "examples": len(order), "outputs": outputs_meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return cls.load(folder, teacher_id, data_id)

    @classmethod
    def open_or_build(cls, root: Path, teacher_id: str, data_id: str, **build_args: Any) -> TeacherCache:
        """Use a valid cache, or report why the existing one cannot be used and rebuild it."""
        folder = cls.folder_for(root, teacher_id, data_id, build_args["names"])
        if (folder / "meta.json").exists():
            try:
                cache = cls.load(folder, teacher_id, data_id)
                missing = sorted(set(build_args["names"]) - set(cache.arrays))
                if not missing:
                    log.info("using teacher cache %s", folder)
                    return cache
                log.warning("teacher cache %s lacks %s; rebuilding it", folder, missing)
                del cache
            except CacheError as exc:
                log.warning("%s; rebuilding it", exc)
        try:
            return cls.build(folder, teacher_id, data_id, **build_args)
        except OSError as exc:
            raise CacheError(f"cannot write teacher cache at {folder}: {exc}") from None

"""Teacher-output cache: run the teacher once, store its outputs memory-mapped, train from them.

A cache folder is named after the teacher's and the data's identity and holds ``meta.json``
(both identities, the shape, dtype and SHA-256 of every array) next to one ``.npy`` per output.
It is written to a temporary folder and renamed into place, so a killed run never leaves a
half-written cache. On load every checksum is verified: a stale or corrupt cache is reported
and rebuilt, never silently used.

Rows are addressed by content too: a cache keeps a key per example (a hash of the inputs the
task hands the teacher), and a new build takes the rows of examples that an earlier cache of the
same teacher and outputs already holds, and runs the teacher once per distinct example. A corpus
grown by a file, remixed or repeated costs the teacher only its new texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.cache_rows import KEYS_FILE, RowPlan, array_file, example_keys, file_sha256, plan_rows, read_arrays
from distill.errors import CacheError
from distill.locks import exclusive
from distill.progress import progress
from distill.tmpfiles import remove_abandoned, temporary_name

__all__ = ["TeacherCache", "model_fingerprint"]

log = logging.getLogger(__name__)
def model_fingerprint(module: nn.Module, extra: dict[str, Any] | None = None) -> str:
    """SHA-256 of a model's state (names, shapes, values) and of settings that change its outputs."""
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    def siblings(cls, folder: Path, teacher_id: str, names: Sequence[str]) -> list[Path]:
        """The other caches of this teacher's outputs ``names`` beside ``folder`` (on any data)."""
        pattern = cls.folder_for(folder.parent, teacher_id, "*", names).name
        return [other for other in sorted(folder.parent.glob(pattern)) if other != folder]

    @classmethod
    def load(cls, folder: Path, teacher_id: str, data_id: str) -> TeacherCache:
        """Open and verify a cache.

        Raises:
            CacheError: The cache is missing, was made by another teacher or on other data
                (stale), or an array does not match its checksum (corrupt).
        """
        return cls(folder, read_arrays(folder, teacher_id, data_id))

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

        Examples are visited in order of ``lengths`` so that each batch pads little. The rows
        go into memory-mapped files in ``<folder>.building``, whose ``progress.json`` records
        how many batches are written (every :data:`PROGRESS_EVERY` batches): a build killed
        part-way resumes from there. A lock file keeps two builds of one cache apart; a run that
        waited for another's build uses the cache it built. The teacher runs once per distinct
        example that no earlier cache of it (beside ``folder``, same outputs) holds; the others'
        rows are copied (:func:`plan_rows`).
        """
        plan = cls._plan(folder, teacher_id, names, batches, len(lengths))
        chunks = _chunks(lengths, batch_size, plan.todo)
        remove_abandoned(folder.parent, folder.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(folder.with_name(folder.name + ".lock"), wait=True):
            # Another run may have built it while this one waited for the lock.
            built = cls._usable(folder, teacher_id, data_id, names, quiet=True)
            if built is not None:
                return built
            tmp = folder.with_name(folder.name + ".building")
            record = {"teacher": teacher_id, "data": data_id, "names": list(names), "examples": len(lengths),
                      "batch_size": batch_size, "todo": _digest(plan.todo)}
            done = _resumable(tmp, record)
            arrays = {name: np.load(tmp / array_file(name), mmap_mode="r+") for name in names} if done else {}
            if done:
                log.info("teacher cache %s: resuming its build after %d of %d batches", folder, done, len(chunks))
            for n, (idx, rows) in enumerate(_teacher_rows(teacher, batches, chunks[done:], names, show=True), done + 1):
                for name, value in rows.items():
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(
                            tmp / array_file(name), mode="w+", dtype=np.float32, shape=(len(lengths), *value.shape[1:]))
                    arrays[name][idx] = value
                if n % PROGRESS_EVERY == 0 or n == len(chunks):
                    _save_progress(tmp, arrays, record, n)
            plan.fill(arrays, tmp, len(lengths))
            (tmp / "progress.json").unlink(missing_ok=True)
            return cls._finish(tmp, folder, arrays, teacher_id, data_id, len(lengths), plan.keys)

    @classmethod
    def _finish(cls, tmp: Path, folder: Path, arrays: dict[str, np.ndarray], teacher_id: str, data_id: str,
                examples: int, keys: np.ndarray | None = None) -> TeacherCache:
        """Checksum the arrays written in ``tmp`` (and the examples' ``keys``), add ``meta.json`` and
        rename it to ``folder``."""
        outputs_meta = {}
        for name, array in arrays.items():
            array.flush()
            path = tmp / array_file(name)
            outputs_meta[name] = {"file": path.name, "sha256": file_sha256(path)}
        arrays.clear()
        meta = {"teacher": teacher_id, "data": data_id, "examples": examples, "outputs": outputs_meta}
        if keys is not None:
            np.save(tmp / KEYS_FILE, keys)
            meta["keys"] = {"file": KEYS_FILE, "sha256": file_sha256(tmp / KEYS_FILE)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return cls.load(folder, teacher_id, data_id)

    @classmethod
    def _plan(cls, folder: Path, teacher_id: str, names: Sequence[str],
              batches: Callable[[Sequence[int]], dict[str, Any]], examples: int) -> RowPlan:
        """Which rows a build of ``folder`` runs the teacher on, repeats or copies (:func:`plan_rows`)."""
        return plan_rows(folder, cls.siblings(folder, teacher_id, names), teacher_id, names, examples,
                         example_keys(batches, examples))

    @staticmethod
    def _part(folder: Path, rank: int | str, world: int) -> Path:
        return folder.with_name(f"{folder.name}.part-{rank}-of-{world}")

    @classmethod
    def plan_parts(cls, folder: Path, world: int, *, teacher_id: str, names: Sequence[str],
                   batches: Callable[[Sequence[int]], dict[str, Any]], lengths: Sequence[int], **_: Any) -> RowPlan:
        """Before a build in ``world`` processes, one of them plans its rows (hashing every example
        and checking the earlier caches once) and writes the plan that :meth:`build_part` and
        :meth:`merge_parts` then read; it returns the plan, whose verified earlier arrays the same
        process's merge reuses. Takes the keyword arguments of :meth:`build`."""
        plan = cls._plan(folder, teacher_id, names, batches, len(lengths))
        final = cls._part(folder, "plan", world)
        tmp = final.with_name(final.name + ".tmp")
        for old in (tmp, final):
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
        plan.save(tmp)
        os.replace(tmp, final)
        return plan

    @classmethod
    def build_part(cls, folder: Path, rank: int, world: int, *, teacher: Callable[[dict[str, Any]], dict[str, Tensor]],
                   batches: Callable[[Sequence[int]], dict[str, Any]], lengths: Sequence[int], names: Sequence[str],
                   batch_size: int = 64) -> None:
        """Process ``rank`` of ``world``: run the teacher on every ``world``-th batch of the
        one-process build of :meth:`plan_parts`'s plan (the same batches, so the same numbers) and
        write the rows and their example indices to this process's part folder, for :meth:`merge_parts`."""
        plan = RowPlan.load(cls._part(folder, "plan", world))
        chunks = _chunks(lengths, batch_size, plan.todo)[rank::world]
        part = cls._part(folder, rank, world)
        tmp = part.with_name(part.name + ".tmp")
        for old in (tmp, part):
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
        index = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        at = 0
        for idx, rows in _teacher_rows(teacher, batches, chunks, names, show=rank == 0):
            for name, value in rows.items():
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / array_file(name), mode="w+", dtype=np.float32, shape=(len(index), *value.shape[1:]))
                arrays[name][at : at + len(idx)] = value
            at += len(idx)
        for array in arrays.values():
            array.flush()
        arrays.clear()
        np.save(tmp / "index.npy", index)
        os.replace(tmp, part)

    @classmethod
    def merge_parts(cls, folder: Path, teacher_id: str, data_id: str, world: int, names: Sequence[str],
                    examples: int, plan: RowPlan | None = None) -> TeacherCache:
        """Assemble the ``world`` part folders into one cache, checksummed like a one-process build
        (byte for byte the same), and delete the parts. ``plan`` is :meth:`plan_parts`'s, when this
        process made it (default: read back from its folder)."""
        remove_abandoned(folder.parent, folder.name)
        tmp = temporary_name(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays: dict[str, np.ndarray] = {}
        for rank in range(world):
            part = cls._part(folder, rank, world)
            index = np.load(part / "index.npy")
            for name in names if len(index) else ():
                rows = np.load(part / array_file(name), mmap_mode="r")
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / array_file(name), mode="w+", dtype=np.float32, shape=(examples, *rows.shape[1:]))
                arrays[name][index] = rows
                del rows
        plan = plan or RowPlan.load(cls._part(folder, "plan", world))
        plan.fill(arrays, tmp, examples)
        cache = cls._finish(tmp, folder, arrays, teacher_id, data_id, examples, plan.keys)
        for part in folder.parent.glob(folder.name + ".part-*"):
            shutil.rmtree(part, ignore_errors=True)
        return cache

    @classmethod
    def open_or_build(cls, root: Path, teacher_id: str, data_id: str, *, rank: int = 0, world: int = 1,
                      barrier: Callable[[], None] | None = None, **build_args: Any) -> TeacherCache:
        """Use a valid cache, or report why the existing one cannot be used and rebuild it.

        With ``world`` processes (each calling this, with its ``rank`` and a ``barrier`` that
        waits for all of them) each runs the teacher on its share of the batches, the process of
        rank 0 merges the shares into one cache, and every process opens it.
        """
        folder = cls.folder_for(root, teacher_id, data_id, build_args["names"])
        cache = cls._usable(folder, teacher_id, data_id, build_args["names"])
        if world > 1:
            if barrier is None:
                raise ValueError("a teacher cache built by several processes needs a barrier")
            barrier()  # every process has looked at the cache before one replaces it
        if cache is not None:
            return cache
        try:
            if world == 1:
                return cls.build(folder, teacher_id, data_id, **build_args)
            assert barrier is not None
            plan = cls.plan_parts(folder, world, teacher_id=teacher_id, **build_args) if rank == 0 else None
            barrier()
            cls.build_part(folder, rank, world, **build_args)
            barrier()
            if rank == 0:
                cls.merge_parts(folder, teacher_id, data_id, world, build_args["names"], len(build_args["lengths"]),
                                plan)
            barrier()
            return cls.load(folder, teacher_id, data_id)
        except OSError as exc:
            raise CacheError(f"cannot write teacher cache at {folder}: {exc}") from None

    @classmethod
    def _usable(cls, folder: Path, teacher_id: str, data_id: str, names: Sequence[str], quiet: bool = False
                ) -> TeacherCache | None:
        """The valid cache in ``folder`` holding ``names``, or ``None`` (saying why it cannot be
        used, unless ``quiet``: the caller has said it already)."""
        if not (folder / "meta.json").exists():
            return None
        try:
            cache = cls.load(folder, teacher_id, data_id)
        except CacheError as exc:
            if not quiet:
                log.warning("%s; rebuilding it", exc)
            return None
        missing = sorted(set(names) - set(cache.arrays))
        if missing:
            if not quiet:
                log.warning("teacher cache %s lacks %s; rebuilding it", folder, missing)
            return None
        log.info("using teacher cache %s", folder)
        return cache


#: Batches between two records of a build's progress (the most a killed build repeats).
PROGRESS_EVERY = 20


def _resumable(tmp: Path, plan: dict[str, Any]) -> int:
    """Batches already written by an interrupted build of the same ``plan`` in ``tmp`` (0: start over)."""
    progress = tmp / "progress.json"
    try:
        saved = json.loads(progress.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved.get("plan") == plan and all(
            (tmp / array_file(name)).is_file() for name in plan["names"]):
        return int(saved["batches"])
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return 0


def _save_progress(tmp: Path, arrays: dict[str, np.ndarray], plan: dict[str, Any], batches: int) -> None:
    for array in arrays.values():
        array.flush()
    part = tmp / "progress.json.tmp"
    part.write_text(json.dumps({"plan": plan, "batches": batches}))
    os.replace(part, tmp / "progress.json")


def _chunks(lengths: Sequence[int], batch_size: int, todo: np.ndarray | None = None) -> list[np.ndarray]:
    """The teacher's batches: the example indices ``todo`` (default: all) in order of length,
    ``batch_size`` at a time."""
    todo = np.arange(len(lengths)) if todo is None else np.asarray(todo, dtype=np.int64)
    order = todo[np.argsort(np.asarray(lengths)[todo] if len(todo) else todo, kind="stable")]
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _teacher_rows(teacher: Callable[[dict[str, Any]], dict[str, Tensor]],
                  batches: Callable[[Sequence[int]], dict[str, Any]], chunks: list[np.ndarray], names: Sequence[str],
                  show: bool) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """For each chunk of example indices, the teacher's outputs ``names`` as ``(len(chunk), k, ...)`` rows."""
    with torch.inference_mode():
        for idx in progress(chunks, desc="teacher cache", unit="batch", show=show):
            outputs = teacher(batches(idx.tolist())["inputs"])
            rows = {}
            for name in names:
                value = outputs[name].float().cpu()
                rows[name] = value.reshape(len(idx), -1, *value.shape[1:]).numpy()
            yield idx, rows

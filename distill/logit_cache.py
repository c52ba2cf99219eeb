"""Offline teacher logits for language models: the teacher's top-k next-token log-probabilities.

A causal LM's full next-token distribution is ``vocab`` numbers per token: at a 128k vocabulary
that is 256 KB per token in float16, too much to keep for a corpus. The cache keeps, for every
position of every training text, the teacher's ``k`` most likely tokens and their tempered
log-probabilities; training then reads them instead of running the teacher. The mass outside
the ``k`` tokens is not thrown away: it is ``1 - sum(p)`` of the kept ones, and the loss pools
it into one "other" bucket for both models (:func:`distill.losses.chunked.chunked_topk_loss`).
``k = 0`` keeps the whole distribution.

With ``sample``, the ``k`` places hold ``k`` tokens drawn from the teacher's distribution instead
(with replacement, seeded by the example's index), stored as the distinct tokens drawn and
``log(count / k)`` (Anshumann et al. 2025, "Sparse Logit Sampling"): the drawn frequencies are an
unbiased estimate of the whole distribution, so forward KL against them gives the student the
full-distribution gradient on average, the tail included, where a top-k cache pools the tail
into one bucket. Unused places hold tokens not drawn, with ``-inf``.

On disk a cache folder holds shards of ``shard_size`` consecutive examples. A shard is three
arrays: ``offsets`` (where each example's rows start), ``logp`` (rows x k, float16) and ``ids``
(rows x k, uint16 or int32; absent for the full distribution). ``meta.json`` lists the
finished shards with the SHA-256 of each file and is rewritten (atomically) after each one, so
a killed build resumes at the first unfinished shard, and a corrupt shard is detected by its
checksum on open and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.cache_rows import file_sha256
from distill.errors import CacheError
from distill.locks import exclusive
from distill.losses.tokens import TeacherTopK
from distill.progress import progress
from distill.tmpfiles import remove_abandoned, temporary_name

__all__ = ["TokenLogitCache", "drawn_log_frequencies"]

log = logging.getLogger(__name__)
FORMAT = 1
#: The ``meta.json`` fields that must match for shards to belong to one cache.
_IDENTITY = ("format", "teacher", "data", "k", "temperature", "examples", "shard_size", "sample")


def _ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.int32)


def drawn_log_frequencies(logp: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``k`` tokens drawn with replacement from each row of ``logp`` (``(n, V)`` log-probabilities),
    as ``(log(count / k), ids)``, both ``(n, k)``: the distinct tokens drawn first, then tokens not
    drawn at ``-inf``. Seeded: the same rows and seed give the same draws on any device."""
    probs = logp.float().exp().cpu()
    drawn = torch.multinomial(probs, k, replacement=True, generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros_like(probs).scatter_add_(1, drawn, torch.ones(drawn.shape))
    top = counts.topk(k, dim=-1)
    return torch.log(top.values / k), top.indices


def _write_array(path: Path, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` through a temporary name; return the file's SHA-256."""
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
            # np.save writes the data through a C stream and does not check its last flush: on a
            # full disk a short file would pass for a whole one (and be checksummed as such).
            written, size = os.fstat(handle.fileno()).st_size, handle.tell()
            if written != size:
                raise OSError(errno.EIO, f"only {written} of {size} bytes were written (is the disk full?)", str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(path)


class TokenLogitCache:
    """The teacher's top-k next-token log-probabilities for every training example.

    Args:
        folder: The cache folder.
        meta: Its ``meta.json`` content (``k``, ``temperature``, ``vocab``, ``shard_size``, shards).
    """

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self.k = int(meta["k"])
        self.temperature = float(meta["temperature"])
        self.vocab = int(meta["vocab"])
        self.shard_size = int(meta["shard_size"])
        self.sample = bool(meta.get("sample"))
        self._meta_file = "meta.json"
        self._shards: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    # --- identity and layout -------------------------------------------------------------

    @staticmethod
    def folder_for(root: Path, teacher_id: str, data_id: str, k: int, temperature: float,
                   sample: bool = False) -> Path:
        """Where the cache of this teacher on this data, at this ``k`` and temperature, lives."""
        key = f"{teacher_id}:{data_id}:{k}:{temperature}" + (":sample" if sample else "")
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        return root / f"logits-{'s' if sample else 'k'}{k or 'full'}-{tag}"

    @property
    def examples(self) -> int:
        return int(self.meta["examples"])

    def bytes_per_token(self) -> float:
        """Disk bytes per cached token position (values, ids and offsets)."""
        tokens = sum(s["tokens"] for s in self.meta["shards"].values())
        size = sum((self.folder / f).stat().st_size for s in self.meta["shards"].values() for f in s["files"])
        return size / max(tokens, 1)

    def _shard_files(self, shard: int) -> dict[str, str]:
        names = {"offsets": f"shard-{shard:05d}.offsets.npy", "logp": f"shard-{shard:05d}.logp.npy"}
        if self.k:
            names["ids"] = f"shard-{shard:05d}.ids.npy"
        return names

    # --- reading ---------------------------------------------------------------------------

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if shard not in self._shards:
            files = self._shard_files(shard)
            arrays = {name: np.load(self.folder / file, mmap_mode="r") for name, file in files.items()}
            self._shards[shard] = (arrays["offsets"], arrays["logp"], arrays.get("ids"))
        return self._shards[shard]

    def rows(self, example: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-probabilities ``(n, k)`` and token ids ``(n, k)`` (``None`` when full) of one example."""
        offsets, logp, ids = self._shard(example // self.shard_size)
        i = example % self.shard_size
        part = slice(int(offsets[i]), int(offsets[i + 1]))
        return logp[part], None if ids is None else ids[part]

    def lookup(self, index: Tensor) -> TeacherTopK:
        """The teacher side of a batch, padded like the student's next-token states.

        Returns log-probabilities ``(B, n, k)`` float32 and, unless the cache holds full
        distributions, their ids ``(B, n, k)`` int64; ``n`` is the batch's longest example.
        Padded rows, which the loss masks out, hold a valid distribution (uniform when full;
        all mass outside the kept tokens otherwise), so that they stay finite.
        """
        rows = [self.rows(int(i)) for i in index.tolist()]
        width = max(len(lp) for lp, _ in rows)
        k = self.k or self.vocab
        pad = -math.log(self.vocab) if not self.k else -30.0
        logp = torch.full((len(rows), width, k), pad, dtype=torch.float32)
        ids = torch.zeros((len(rows), width, k), dtype=torch.long) if self.k else None
        for b, (lp, tok) in enumerate(rows):
            logp[b, : len(lp)] = torch.from_numpy(np.asarray(lp, dtype=np.float32))
            if ids is not None and tok is not None:
                ids[b, : len(tok)] = torch.from_numpy(np.asarray(tok, dtype=np.int64))
        return TeacherTopK(logp, ids)

    # --- opening and building ------------------------------------------------------------------

    @classmethod
    def _read_meta(cls, folder: Path) -> dict[str, Any] | None:
        """``meta.json``, with the shards that processes of a build by several processes listed
        in their own ``meta.rank-N.json`` (one not merged yet, or killed) added."""
        path = folder / "meta.json"
        meta = None
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise CacheError(f"logit cache {folder}: meta.json is corrupt ({exc})") from None
        for part in sorted(folder.glob("meta.rank-*.json")):
            try:
                other = json.loads(part.read_text())
            except json.JSONDecodeError:
                continue  # its shards are rebuilt
            if meta is None:
                meta = other
            elif all(other.get(key) == meta.get(key) for key in _IDENTITY):
                meta["shards"].update(other["shards"])
                meta["vocab"] = meta.get("vocab") or other.get("vocab")
        return meta

    def _merge_ranks(self) -> None:
        """Add the shards of every process's ``meta.rank-N.json`` (of this cache's settings) to
        this one's and write them to ``meta.json``."""
        parts = sorted(self.folder.glob("meta.rank-*.json"))
        for part in parts:
            try:
                other = json.loads(part.read_text())
            except json.JSONDecodeError:
                continue
            if all(other.get(key) == self.meta.get(key) for key in _IDENTITY):
                self.meta["shards"].update(other["shards"])
                self.meta["vocab"] = self.meta["vocab"] or other.get("vocab") or 0
        self._meta_file = "meta.json"
        self._save_meta()
        for part in parts:
            part.unlink()

    def _verify(self) -> list[int]:
        """Shards whose files are missing or do not match their checksums (dropped from ``meta``)."""
        bad = []
        for key, shard in list(self.meta["shards"].items()):
            for file, digest in zip(shard["files"], shard["sha256"], strict=True):
                path = self.folder / file
                if not path.is_file() or file_sha256(path) != digest:
                    bad.append(int(key))
                    del self.meta["shards"][key]
                    break
        return bad

    @classmethod
    def load(cls, folder: Path) -> TokenLogitCache:
        """Open a finished cache, verifying every shard.

        Raises:
            CacheError: No cache there, it is unfinished, or a shard fails its checksum.
        """
        meta = cls._read_meta(folder)
        if meta is None:
            raise CacheError(f"no logit cache at {folder}")
        cache = cls(folder, meta)
        bad = cache._verify()
        if bad:
            raise CacheError(f"logit cache {folder}: shard(s) {bad} are missing or corrupt (checksum mismatch)")
        if len(meta["shards"]) != cache.shard_count:
            raise CacheError(f"logit cache {folder} is unfinished ({len(meta['shards'])} of "
                             f"{cache.shard_count} shards); build it again to resume")
        return cache

    @property
    def shard_count(self) -> int:
        return -(-self.examples // self.shard_size)

    def _save_meta(self) -> None:
        path = self.folder / self._meta_file
        tmp = temporary_name(path)
        try:
            tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def open_or_build(
        cls,
        root: Path,
        teacher_id: str,
        data_id: str,
        *,
        teacher: Any,
        batches: Callable[[Sequence[int]], dict[str, Any]],
        examples: int,
        k: int,
        temperature: float = 1.0,
        sample: bool = False,
        batch_size: int = 16,
        shard_size: int = 256,
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> TokenLogitCache:
        """Open the cache of this teacher on this data, building (or finishing) it first.

        Shards already written and intact are kept; missing or corrupt ones are (re)built.
        With ``world > 1`` this process builds only every ``world``-th shard (from ``rank``) and
        lists them in its own ``meta.rank-N.json``. Given a ``barrier`` (waits for all the
        processes), the process of rank 0 then merges the lists into ``meta.json`` and every
        process opens the whole cache; without one, the caller waits for all processes and
        opens the cache again. The shards are the same, byte for byte, as one process writes.

        Args:
            root: Folder holding caches.
            teacher_id: Fingerprint of the teacher's weights and settings.
            data_id: Fingerprint of the training data.
            teacher: A causal-LM adapter (``encode`` and ``__call__``).
            batches: ``indices -> batch`` of the training set.
            examples: Number of training examples.
            k: Tokens kept per position; 0 keeps the full distribution.
            temperature: The distillation temperature the log-probabilities are taken at.
            sample: Keep ``k`` tokens drawn from the distribution (their frequencies), not the top ``k``.
            batch_size, shard_size: Examples per teacher pass, and per shard.
            rank, world: This process's index, and the number of processes building the cache.
            barrier: Waits for all ``world`` processes.
        """
        if sample and not k:
            raise CacheError("a sampled logit cache draws k tokens per position; k must be at least 1")
        identity = {"format": FORMAT, "teacher": teacher_id, "data": data_id, "k": k, "temperature": temperature,
                    "examples": examples, "shard_size": shard_size, **({"sample": True} if sample else {})}
        folder = cls.folder_for(root, teacher_id, data_id, k, temperature, sample)
        # The processes of one run write disjoint shards, each its own list; separate runs of one
        # cache take turns, so that a run that waited reads the shards the other wrote meanwhile.
        turns = exclusive(folder.with_name(f".{folder.name}.lock"), wait=True) if world == 1 else nullcontext()
        with turns:
            cache = cls._reopen(folder, identity)
            if world > 1:
                cache._meta_file = f"meta.rank-{rank}.json"
            cache._complete(rank, world, teacher, batches, batch_size)
        return cls._opened(cache, rank, world, barrier)

    def _complete(self, rank: int, world: int, teacher: Any, batches: Callable[[Sequence[int]], dict[str, Any]],
                  batch_size: int) -> None:
        """Write this process's shards that are missing or corrupt."""
        for shard in self._verify():
            log.warning("logit cache %s: shard %d is missing or corrupt; rebuilding it", self.folder, shard)
        todo = [s for s in range(rank, self.shard_count, world) if str(s) not in self.meta["shards"]]
        if todo:
            try:
                self._build(todo, teacher, batches, batch_size, show=rank == 0)
            except OSError as exc:
                raise CacheError(f"cannot write the logit cache at {self.folder}: {exc}") from None

    @classmethod
    def _opened(cls, cache: TokenLogitCache, rank: int, world: int, barrier: Callable[[], None] | None
                ) -> TokenLogitCache:
        """After this process's shards: with a ``barrier``, rank 0 merges every process's list
        and all open the whole cache; without one, the caller waits and opens it again."""
        if world > 1 and barrier is not None:
            barrier()
            if rank == 0:
                cache._merge_ranks()
            barrier()
            return cls.load(cache.folder)
        return cache if world > 1 else cls.load(cache.folder)

    @classmethod
    def _reopen(cls, folder: Path, identity: dict[str, Any]) -> TokenLogitCache:
        """The cache in ``folder`` as far as it was written with these settings (empty otherwise),
        without the temporaries of writers that were killed."""
        remove_abandoned(folder)
        meta = cls._read_meta(folder)
        if meta is not None and any(meta.get(key) != value for key, value in identity.items()):
            log.warning("logit cache %s was made with other settings; rebuilding it", folder)
            meta = None
        if meta is None:
            folder.mkdir(parents=True, exist_ok=True)
            meta = {**identity, "vocab": None, "shards": {}}
        return cls(folder, {**meta, "vocab": meta["vocab"] or 0})

    def _build(self, shards: list[int], teacher: Any, batches: Callable[[Sequence[int]], dict[str, Any]],
               batch_size: int, show: bool = True) -> None:
        what = f"{self.k} drawn" if self.sample else f"top-{self.k}" if self.k else "full"
        log.info("writing the teacher's %s log-probabilities to %s (%d shards)", what, self.folder, len(shards))
        module = teacher.module
        was_training = module.training
        module.eval()
        try:
            for shard in progress(shards, desc="logit cache", unit="shard", show=show):
                self._build_shard(shard, teacher, batches, batch_size)
        finally:
            module.train(was_training)

    @torch.inference_mode()
    def _build_shard(self, shard: int, teacher: Any, batches: Callable[[Sequence[int]], dict[str, Any]],
                     batch_size: int) -> None:
        first, last = shard * self.shard_size, min((shard + 1) * self.shard_size, self.examples)
        offsets, values, tokens = [0], [], []
        for start in range(first, last, batch_size):
            inputs = batches(list(range(start, min(start + batch_size, last))))["inputs"]
            lengths = (teacher.encode(inputs)["attention_mask"].sum(1) - 1).tolist()
            out = teacher(inputs)
            head, bias = out["head"], out.get("head_bias")
            self.meta["vocab"] = self.vocab = int(head.shape[0])
            for row, n in enumerate(lengths):
                logits = out["hidden"][row, :n].float() @ head.float().T
                if bias is not None:
                    logits = logits + bias.float()
                logp = F.log_softmax(logits / self.temperature, -1)
                if self.k:
                    k = min(self.k, logp.shape[-1])
                    kept, ids = (drawn_log_frequencies(logp, k, start + row) if self.sample
                                 else logp.topk(k, dim=-1))
                    values.append(kept.cpu().numpy().astype(np.float16))
                    tokens.append(ids.cpu().numpy().astype(_ids_dtype(self.vocab)))
                else:
                    values.append(logp.cpu().numpy().astype(np.float16))
                offsets.append(offsets[-1] + n)
        files = self._shard_files(shard)
        width = self.k or self.vocab
        digests = [_write_array(self.folder / files["offsets"], np.asarray(offsets, dtype=np.int64)),
                   _write_array(self.folder / files["logp"],
                                np.concatenate(values) if values else np.zeros((0, width), np.float16))]
        if self.k:
            digests.append(_write_array(self.folder / files["ids"], np.concatenate(tokens) if tokens
                                        else np.zeros((0, width), _ids_dtype(self.vocab))))
        self.meta["shards"][str(shard)] = {"files": list(files.values()), "sha256": digests, "tokens": offsets[-1]}
        self._save_meta()

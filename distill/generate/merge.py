"""Merging the outputs of ``--shard 0/N`` ... ``--shard N-1/N`` into one output, with checksums."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.generate.outputs import META_FORMAT, OutputPaths, read_rows, write_rows_atomically
from distill.generate.prompts import parse_shard

__all__ = ["merge_shards"]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_metas(shard_files: Sequence[Path]) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Shard index -> (file, meta), checked: every shard of one split, once, with the same settings."""
    metas: dict[int, tuple[Path, dict[str, Any]]] = {}
    for file in shard_files:
        meta_path = OutputPaths.of(file).meta
        if not file.is_file() or not meta_path.is_file():
            raise DistillError(f"{file}: not a shard output (missing file or its {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot read {meta_path}: {exc}") from None
        shard = parse_shard(meta.get("shard") or "") if meta.get("shard") else None
        if shard is None:
            raise DistillError(f"{file}: not a shard output (its meta file names no shard)")
        if shard[0] in metas:
            raise DistillError(f"shard {shard[0]} given twice: {metas[shard[0]][0]} and {file}")
        metas[shard[0]] = (file, meta)
    count = {parse_shard(m["shard"])[1] for _, m in metas.values()}
    first_file, first = metas[min(metas)]
    if len(count) > 1:
        raise DistillError(f"the shard files come from splits into different counts: {sorted(count)}")
    missing = sorted(set(range(count.pop())) - set(metas))
    if missing:
        raise DistillError(f"shard(s) {missing} missing; merge needs every shard of the split")
    for file, meta in metas.values():
        for part in ("settings", "teacher"):
            if meta.get(part) != first.get(part):
                raise DistillError(f"{file} and {first_file} were generated with different {part}")
    return metas


def merge_shards(output: Path, shard_files: Sequence[Path]) -> str:
    """Merge the outputs of ``--shard 0/N`` ... ``--shard N-1/N`` into one output, in input order.

    Writes ``output``, its rejected and meta files (the same as one unsharded run would leave,
    so the merged output can itself be resumed), and ``<stem>.sha256`` with the checksums of
    the two data files (``sha256sum -c`` reads it in the output's folder).

    Returns:
        A one-line summary.

    Raises:
        DistillError: A shard is missing or twice, the shards' settings differ, or rows overlap.
    """
    if not shard_files:
        raise DistillError("--merge OUT needs the shard files to merge after it")
    if output.resolve() in {Path(f).resolve() for f in shard_files}:
        raise DistillError(f"--merge: the merged output {output} is one of the shard files")
    metas = _shard_metas(shard_files)
    first = metas[0][1]
    paths = OutputPaths.of(output)
    merged: dict[str, list[dict[str, Any]]] = {"output": [], "rejected": []}
    for i in sorted(metas):
        shard_paths = OutputPaths.of(metas[i][0])
        merged["output"] += read_rows(shard_paths.output, repair=False)
        merged["rejected"] += read_rows(shard_paths.rejected, repair=False)
    seen: set[tuple[int, int]] = set()
    for rows in merged.values():
        rows.sort(key=lambda r: (r["index"], r["sample"]))
        for r in rows:
            if (r["index"], r["sample"]) in seen:
                raise DistillError(f"prompt {r['index']} sample {r['sample']} is in more than one shard file")
            seen.add((r["index"], r["sample"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_rows_atomically(paths.output, merged["output"])
    write_rows_atomically(paths.rejected, merged["rejected"])
    meta = {"format": META_FORMAT, "settings": first["settings"], "teacher": first["teacher"], "shard": None,
            "input": first.get("input"), "merged_from": [str(metas[i][0]) for i in sorted(metas)],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    paths.meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    paths.checksums.write_text("".join(f"{_sha256_file(p)}  {p.name}\n" for p in (paths.output, paths.rejected)))
    return (f"{paths.output}: {len(merged['output'])} sample(s) from {len(metas)} shard(s), "
            f"{len(merged['rejected'])} rejected in {paths.rejected.name}; checksums in {paths.checksums.name}")

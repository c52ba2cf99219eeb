"""Readers for the data sets recipes name, with errors that say what is wrong and where."""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DataError

__all__ = ["LABELLED_SUFFIXES", "SentencePairs", "Text", "dataset_rows", "dataset_splits", "decoded_lines",
           "expand_path", "labelled_file", "mix_texts", "read_idx_images", "read_labelled", "read_lines",
           "read_records", "read_stsb", "read_text", "read_texts", "unique", "mix_sources"]


@dataclass(frozen=True)
class SentencePairs:
    """Sentence pairs with a similarity score (0-5 in STS Benchmark)."""

    first: list[str]
    second: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def fingerprint(self) -> str:
        """Hash of the content, so caches can tell two data sets apart."""
        digest = hashlib.sha256()
        for a, b, s in zip(self.first, self.second, self.scores.tolist(), strict=True):
            digest.update(f"{a}\t{b}\t{s}\n".encode())
        return digest.hexdigest()


def expand_path(folder: Path) -> Path:
    """``folder`` with ``~`` and ``$VARS`` expanded."""
    import os

    return Path(os.path.expandvars(str(folder))).expanduser()


def decoded_lines(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The lines of a text file, line ends kept; a line that is not ``encoding`` text stops with a
    :class:`DataError` naming ``file:line``."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                yield raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not {encoding} text ({exc.reason} at byte {exc.start} of the "
                                "line)") from None


def read_stsb(folder: Path, split: str, limit: int | None = None) -> SentencePairs:
    """Read ``sts-<split>.csv``: tab-separated genre, file, year, id, score, sentence1, sentence2.

    Lines may carry extra columns after the seventh; they are ignored.

    Raises:
        DataError: Missing file, a line that is not UTF-8, too few columns, or a score that is not a number.
    """
    path = expand_path(folder) / f"sts-{split}.csv"
    if not path.is_file():
        raise DataError(f"STS Benchmark file not found: {path} (expected sts-train.csv, sts-dev.csv, sts-test.csv)")
    first, second, scores = [], [], []
    for lineno, row in enumerate(csv.reader(decoded_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE), 1):
        if len(row) < 7:
            raise DataError(
                f"{path}:{lineno}: expected 7 tab-separated columns (genre, file, year, id, score, "
                f"sentence1, sentence2), found {len(row)}"
            )
        try:
            score = float(row[4])
        except ValueError:
            raise DataError(f"{path}:{lineno}: column 5 (score) is not a number: {row[4]!r}") from None
        first.append(row[5])
        second.append(row[6])
        scores.append(score)
        if limit is not None and len(scores) >= limit:
            break
    if not scores:
        raise DataError(f"{path}: no sentence pairs")
    return SentencePairs(first, second, np.asarray(scores, dtype=np.float32))


_IDX_NAMES = {"train": "train", "test": "t10k"}


def _open_idx(folder: Path, stem: str) -> tuple[Path, bytes]:
    for name in (f"{stem}.gz", stem):
        path = folder / name
        if path.is_file():
            raw = path.read_bytes()
            try:
                return path, gzip.decompress(raw) if name.endswith(".gz") else raw
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: not a valid gzip file, or truncated ({exc})") from None
    raise DataError(f"IDX file not found: {folder / stem}(.gz)")


def _parse_idx(path: Path, raw: bytes, dims: int) -> np.ndarray:
    if len(raw) < 4 + 4 * dims or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != dims:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {dims} dimension(s)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but the file holds {body.size} bytes of data")
    return body.reshape(shape)


def read_idx_images(folder: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` (gzipped or not).

    Returns:
        ``(images, labels)``: ``(N, H, W)`` uint8 and ``(N,)`` int64.

    Raises:
        DataError: Missing or malformed files, or image and label counts that differ.
    """
    folder = expand_path(folder)
    prefix = _IDX_NAMES[split]
    img_path, img_raw = _open_idx(folder, f"{prefix}-images-idx3-ubyte")
    lbl_path, lbl_raw = _open_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = _parse_idx(img_path, img_raw, 3)
    labels = _parse_idx(lbl_path, lbl_raw, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def read_text(path: Path) -> str:
    """A plain-text corpus: ``path`` is a ``.txt`` file, or a folder holding ``input.txt`` or a
    single ``.txt`` file (Tiny Shakespeare's layout)."""
    path = expand_path(path)
    if path.is_dir():
        candidates = [path / "input.txt"] if (path / "input.txt").is_file() else sorted(path.glob("*.txt"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise DataError(f"{path}: expected input.txt or exactly one .txt file (found: {found})")
        path = candidates[0]
    if not path.is_file():
        raise DataError(f"text data not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


_RECORD_KINDS = (("text",), ("prompt", "completion"), ("messages",))


def _record_kind(record: dict, where: str) -> tuple[str, ...]:
    for fields in _RECORD_KINDS:
        if all(f in record for f in fields):
            return fields
    raise DataError(f"{where}: a record needs 'text', or 'prompt' and 'completion', or 'messages' "
                    f"(found fields {sorted(record)})")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message is from '{messages[-1]['role']}'; the model learns the last "
                        "message, so it must be the assistant's")


def _jsonl_rows(path: Path) -> list[tuple[dict, str]]:
    import json

    rows = []
    for number, line in enumerate(decoded_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        rows.append((record, f"{path}, line {number}"))
    return rows


def _parquet_rows(path: Path) -> list[tuple[dict, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("data.format 'parquet' needs pyarrow: pip install pyarrow") from None
    try:
        records = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: not a parquet file that can be read ({reason})") from None
    return [(r, f"{path}, row {i}") for i, r in enumerate(records)]


def _dataset_split(source: Path | str, split: str) -> Any:
    """One split of a Hugging Face dataset (a ``save_to_disk`` folder or a Hub id)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.format 'hf-dataset' needs the datasets package: pip install datasets") from None
    local = Path(source)
    data = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(str(source))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{source}: no split '{split}' (has {sorted(data)}); set data.split")
        data = data[split]
    return data


def dataset_rows(source: str, split: str) -> list[tuple[dict, str]]:
    """The records of one split of a Hugging Face dataset (a ``save_to_disk`` folder or a Hub
    id), each with where it is."""
    return [(r, f"{source}[{split}], row {i}") for i, r in enumerate(_dataset_split(source, split))]


def dataset_class_names(source: Path | str, split: str, column: str) -> list[str] | None:
    """The class names of a Hugging Face dataset's label ``column`` when it is a ``ClassLabel``
    (its integer ids index them), else ``None``."""
    import datasets

    feature = _dataset_split(source, split).features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def dataset_splits(source: Path | str) -> list[str]:
    """The split names of a Hugging Face dataset (``[]`` for a single split saved alone)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.format 'hf-dataset' needs the datasets package: pip install datasets") from None
    local = Path(source)
    if local.is_dir():
        data = datasets.load_from_disk(str(local))
        return sorted(data) if isinstance(data, datasets.DatasetDict) else []
    return sorted(datasets.get_dataset_split_names(str(source)))


def _record_rows(path: Path, fmt: str, split: str) -> list[tuple[dict, str]]:
    """Every record of ``jsonl`` / ``parquet`` files (a file, or a folder's files in name order)
    or of a ``hf-dataset``, with where it came from."""
    if fmt == "hf-dataset":
        return dataset_rows(str(expand_path(path)) if expand_path(path).exists() else str(path), split)
    path = expand_path(path)
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet"}[fmt]
    files = sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError(f"{fmt} data not found: {path}")
    reader = _jsonl_rows if fmt == "jsonl" else _parquet_rows
    return [row for file in files for row in reader(file)]


def read_records(path: Path, fmt: str, split: str = "train") -> list[dict]:
    """Training records for language modelling, each ``{"text"}``, ``{"prompt", "completion"}``
    or ``{"messages"}`` (a chat whose last message is the assistant's).

    ``fmt`` is ``jsonl`` or ``parquet`` (a file, or a folder whose files of that type are read in
    name order) or ``hf-dataset``. Every record must be of the same kind; other fields are dropped.
    """
    rows = _record_rows(path, fmt, split)
    if not rows:
        raise DataError(f"{path}: no records")
    kind = _record_kind(rows[0][0], rows[0][1])
    records = []
    for record, where in rows:
        if _record_kind(record, where) != kind:
            raise DataError(f"{where}: has fields {'/'.join(_record_kind(record, where))} but earlier records "
                            f"have {'/'.join(kind)}; a data set holds one kind of record")
        if kind == ("messages",):
            _check_messages(record["messages"], where)
        elif not all(isinstance(record[f], str) for f in kind):
            raise DataError(f"{where}: {'/'.join(kind)} must be strings")
        records.append({f: record[f] for f in kind})
    return records


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise DataError(f"{path}: no .txt or .txt.gz files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"text data not found: {path}")
    return [path]


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Unlabelled texts, one a line: a ``.txt`` (or ``.txt.gz``) file, or a folder of them read in
    name order. Lines are read one at a time (a corpus of any size streams through), stripped,
    and blank ones skipped.

    Raises:
        DataError: Missing file, a line that is not UTF-8 (named by file:line), a damaged
            ``.gz`` file, or no text at all.
    """
    texts: list[str] = []
    for file in _text_files(expand_path(path)):
        opener = gzip.open if file.name.endswith(".gz") else open
        try:
            with opener(file, "rb") as handle:
                for lineno, raw in enumerate(handle, 1):
                    try:
                        line = raw.decode(encoding).strip()
                    except UnicodeDecodeError as exc:
                        raise DataError(f"{file}:{lineno}: not {encoding} text ({exc.reason} at byte {exc.start} "
                                        "of the line); set data.encoding (a data.mix entry: its own encoding) "
                                        "if the file is in another one (e.g. latin-1)") from None
                    if line:
                        texts.append(line)
        except (OSError, EOFError) as exc:
            raise DataError(f"{file}: cannot be read to the end ({exc}); is it truncated?") from None
    if not texts:
        raise DataError(f"{path}: no text (every line is blank)")
    return texts


def read_texts(path: Path, fmt: str, column: str = "text", split: str = "train", encoding: str = "utf-8"
               ) -> list[str]:
    """Unlabelled texts from ``text`` files (one a line in ``encoding``, see :func:`read_lines`) or
    from the ``column`` field of ``jsonl`` / ``parquet`` / ``hf-dataset`` records; blank ones skipped."""
    if fmt == "text":
        return read_lines(path, encoding)
    rows = _record_rows(path, fmt, split)
    texts = []
    for record, where in rows:
        if column not in record:
            raise DataError(f"{where}: no field '{column}' (found {sorted(record)}); set data.text_column")
        if not isinstance(record[column], str):
            raise DataError(f"{where}: '{column}' must be a string")
        if record[column].strip():
            texts.append(record[column].strip())
    if not texts:
        raise DataError(f"{path}: no texts in field '{column}'")
    return texts


def mix_sources(spec: Any) -> list[tuple[list[str], float]]:
    """Each corpus of ``data.mix`` as unlabelled texts (read in its own ``format``, else
    ``data.format`` where that is one of unlabelled texts, else ``text``), repeats removed, with
    its weight: the sources :func:`mix_texts` takes."""
    fallback = spec.format if spec.format in ("text", "jsonl", "parquet", "hf-dataset") else "text"
    return [(unique(read_texts(m.path, m.format or fallback, spec.text_column, spec.split,
                               m.encoding or spec.encoding)), m.weight) for m in spec.mix]


def unique(texts: list[str]) -> list[str]:
    """The texts with repeats removed, first occurrences kept in order."""
    return list(dict.fromkeys(texts))


def mix_texts(sources: list[tuple[list[str], float]], seed: int = 0) -> list[str]:
    """One training list from several corpora, each taken ``weight`` times: whole copies for the
    integer part, a seeded sample (without repeats) for the fraction. Weight 1 takes a corpus
    once, 0.5 a random half of it, 2 twice."""
    rng = np.random.default_rng(seed)
    mixed: list[str] = []
    for texts, weight in sources:
        whole, part = divmod(weight, 1.0)
        mixed += texts * int(whole)
        take = round(part * len(texts))
        if take:
            mixed += [texts[i] for i in np.sort(rng.choice(len(texts), take, replace=False))]
    return mixed


#: Labelled-data formats of text classification, and the file suffixes a folder of them holds.
LABELLED_SUFFIXES = {"labelled-text": (".txt", ".txt.gz"), "csv": (".csv",), "tsv": (".tsv",),
                     "jsonl": (".jsonl",), "parquet": (".parquet",)}


def labelled_file(folder: Path, fmt: str, split: str) -> Path | None:
    """The file of ``split`` (``train``, ``dev``, ``test``) in a folder of labelled data, if any.

    ``dev`` also answers to ``valid``, ``validation`` and ``val``.
    """
    stems = {"dev": ("dev", "valid", "validation", "val")}.get(split, (split,))
    for stem in stems:
        for suffix in LABELLED_SUFFIXES[fmt]:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def read_labelled(path: Path, fmt: str, text_column: str | Sequence[str] = "text", label_column: str = "label",
                  encoding: str = "utf-8", split: str = "train",
                  hint: str = "set data.text_column and data.label_column") -> tuple[list[Text], list[str]]:
    """Texts (or text pairs) and their class labels (as written, not yet numbered) from one labelled file.

    Formats: ``labelled-text``, one ``LABEL text`` a line (the label is the first word; fastText's
    ``__label__`` prefix is dropped), as SST-2 and TREC ship; ``csv`` / ``tsv`` with a header
    naming ``text_column`` and ``label_column``; ``jsonl`` / ``parquet`` records with those fields;
    ``hf-dataset``: the ``split`` of a dataset (a ``save_to_disk`` folder or a Hub id). Two text
    columns (``[premise, hypothesis]``) make each example a pair of texts. ``hint`` tells a file's
    missing column how to name the right one.

    Raises:
        DataError: A missing file or column, a line without a text, bytes that are not UTF-8
            (file:line), or no examples.
    """
    path = expand_path(path) if fmt != "hf-dataset" else path
    columns = [text_column] if isinstance(text_column, str) else list(text_column)
    if fmt == "labelled-text":
        if len(columns) > 1:
            raise DataError(f"{path}: labelled-text holds one text a line; text pairs need csv, tsv, jsonl, parquet "
                            "or hf-dataset with two data.text_column names")
        pairs = []
        for number, line in enumerate(read_lines(path, encoding), 1):
            label, _, text = line.partition(" ")
            if not text.strip():
                raise DataError(f"{path}: example {number}: expected 'LABEL text', found {line[:40]!r}")
            pairs.append((text.strip(), label.removeprefix("__label__")))
    elif fmt in ("csv", "tsv"):
        pairs = _delimited(path, "," if fmt == "csv" else "\t", columns, label_column, encoding, hint)
    else:
        pairs = []
        for record, where in _record_rows(path, fmt, split):
            missing = [c for c in (*columns, label_column) if c not in record]
            if missing:
                raise DataError(f"{where}: no field {missing} (found {sorted(record)}); {hint}")
            label = record[label_column]
            if label is None or not str(label).strip():
                raise DataError(f"{where}: the label ('{label_column}') is empty; every example needs one")
            pairs.append((_text_of(record, columns), str(label).strip()))
    if not pairs:
        raise DataError(f"{path}: no examples")
    texts, labels = zip(*pairs, strict=True)
    return list(texts), list(labels)


#: One example's text: a string, or a pair of strings (two text columns).
Text = str | tuple[str, ...]


def _text_of(row: dict, columns: list[str]) -> Text:
    texts = tuple(str(row[c] or "").strip() for c in columns)
    return texts[0] if len(texts) == 1 else texts


def _delimited(path: Path, delimiter: str, columns: list[str], label_column: str, encoding: str, hint: str
               ) -> list[tuple[Text, str]]:
    if not path.is_file():
        raise DataError(f"labelled data not found: {path}")
    try:
        # A spreadsheet's "CSV UTF-8" starts with a byte-order mark, which is not part of the first name.
        bom = "utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding
        with path.open(newline="", encoding=bom) as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [c for c in (*columns, label_column) if c not in header]
            if missing:
                raise DataError(f"{path}: no column {missing} in the header {header}; {hint}")
            rows = []
            for row in reader:
                if not (row[columns[0]] or "").strip():
                    continue
                label = (row[label_column] or "").strip()
                if not label:
                    raise DataError(f"{path}:{reader.line_num}: the label ('{label_column}') is empty; every example "
                                    "needs one")
                rows.append((_text_of(row, columns), label))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc.reason}); set data.encoding") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not valid {'CSV' if delimiter == ',' else 'TSV'} ({exc})") from None

"""The prompts file: reading and checking its rows, dropping repeated prompts, choosing a shard."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.data import decoded_lines
from distill.errors import DataError, DistillError

__all__ = ["PromptRow", "parse_shard", "prompt_key", "read_prompts", "select_shard", "unique_prompts"]


@dataclass(frozen=True)
class PromptRow:
    """One prompt of the input file."""

    index: int
    """Position in the input file, from 0, blank lines not counted."""
    id: Any
    """The row's ``id``, or ``index`` when it has none."""
    prompt: str | None = None
    """Plain-text prompt, for ``/completions``."""
    messages: list[dict[str, str]] | None = None
    """A chat (``role``, ``content``), for ``/chat/completions`` or a chat template."""
    key: str = field(init=False, repr=False, compare=False)
    """SHA-256 of the prompt or chat: what dedup and resume compare."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", prompt_key(self.prompt, self.messages))

    def text(self) -> str:
        """The prompt, or the chat as JSON (what a verifier receives)."""
        return self.prompt if self.prompt is not None else json.dumps(self.messages, ensure_ascii=False)

    def fields(self) -> dict[str, Any]:
        """``prompt`` or ``messages``, as written to the output."""
        return {"prompt": self.prompt} if self.prompt is not None else {"messages": self.messages}


def prompt_key(prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """Content hash of a prompt or chat (a prompt and a one-message chat differ)."""
    value = {"prompt": prompt} if prompt is not None else {"messages": messages}
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _prompt_row(record: Any, index: int, where: str) -> PromptRow:
    needs = "a row needs 'prompt' (a string) or 'messages' (a list of {role, content})"
    if not isinstance(record, dict):
        raise DataError(f"{where}: {needs}, found {type(record).__name__}")
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and messages is not None:
        raise DataError(f"{where}: a row has 'prompt' or 'messages', not both")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
    elif messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} with string values")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        raise DataError(f"{where}: {needs}; found keys {sorted(record)}")
    return PromptRow(index, record.get("id", index), prompt, messages)


def read_prompts(path: Path) -> list[PromptRow]:
    """Read a JSONL file of prompts, one ``prompt`` or ``messages`` per row, ``id`` optional.

    Raises:
        DataError: Missing file, bad JSON, or a row without a prompt (naming the line).
    """
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    rows: list[PromptRow] = []
    for lineno, line in enumerate(decoded_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        rows.append(_prompt_row(record, len(rows), f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def unique_prompts(rows: Iterable[PromptRow]) -> list[PromptRow]:
    """The first row of each distinct prompt, in input order."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.key not in seen:
            seen.add(row.key)
            unique.append(row)
    return unique


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, with ``0 <= I < N``.

    Raises:
        DistillError: Not of that form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise DistillError(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4; got '{text}'")
    return int(match[1]), int(match[2])


def select_shard(unique: Sequence[PromptRow], shard: tuple[int, int] | None) -> list[PromptRow]:
    """The distinct prompts of shard ``(I, N)``: those at positions ``p`` with ``p % N == I`` (all without one)."""
    return [r for p, r in enumerate(unique) if shard is None or p % shard[1] == shard[0]]

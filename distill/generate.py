"""Sequence-level distillation data: a teacher's completions of a file of prompts.

The student then learns from the teacher's text (``prompt`` / ``messages`` + ``completion``
rows, loss on the completion only) instead of its logits: the recipe of Kim & Rush,
"Sequence-Level Knowledge Distillation" (2016), and of the models DeepSeek-R1 was distilled
into. The teacher is a local Hugging Face causal LM or any model behind an OpenAI-compatible
HTTP API.

A run is resumable at every point: each prompt's rows are appended and synced to disk as soon as
it is finished, rejected samples are recorded beside the output, and the same command run again
asks only for the (prompt, sample) pairs that are in neither file. The settings are written to a
meta file beside the output, and a resume with other settings is refused.

Files, for ``--output gen.jsonl``::

    gen.jsonl            kept samples, one row each
    gen.rejected.jsonl   samples a filter rejected, or duplicates of a kept one, with the reason
                         (the text under ``rejected_completion``, so no reader trains on it)
    gen.meta.json        settings and teacher identity (never the API key)
    gen.shard-I-of-N.*   the same three for shard I of N (``--shard I/N``)
    gen.sha256           checksums of a merged output (``--merge``)

Train on ``gen.jsonl`` itself rather than its folder: a folder's shard files would be read too.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

from distill.errors import DataError, DistillError, ModelError

__all__ = [
    "Filters",
    "GenerateSummary",
    "LocalTeacher",
    "OpenAITeacher",
    "OutputPaths",
    "PromptRow",
    "Sampling",
    "Teacher",
    "TeacherUnavailableError",
    "add_arguments",
    "cut_at_stop",
    "generate",
    "generate_command",
    "merge_shards",
    "parse_shard",
    "prompt_key",
    "read_prompts",
    "unique_prompts",
]

log = logging.getLogger(__name__)

META_FORMAT = "distill-generate/1"
PROMPT_ENV = "DISTILL_PROMPT"
"""Environment variable that hands the prompt to a verifier (a chat as JSON)."""


class TeacherUnavailableError(ModelError):
    """The teacher API kept failing (connection errors, 429 or 5xx) after every retry."""


# --------------------------------------------------------------------------- prompts


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
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (which is dropped); all of it when none occurs."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


# --------------------------------------------------------------------------- settings and filters


@dataclass(frozen=True)
class Sampling:
    """How the teacher samples; written to the meta file, and a resume must match it."""

    temperature: float = 1.0
    """0 decodes greedily (then every sample of a prompt is the same and only one is kept)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``."""
    max_new_tokens: int = 256
    """Most tokens generated per sample."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Base seed; each prompt's seed is derived from it and the prompt, so shards and resumes agree."""
    stop: tuple[str, ...] = ()
    """The completion is cut at the first of these (the stop string itself dropped)."""

    def __post_init__(self) -> None:
        checks = {
            "--temperature": self.temperature >= 0, "--top-p": 0 < self.top_p <= 1,
            "--max-new-tokens": self.max_new_tokens >= 1, "--n": self.n >= 1,
        }
        for option, ok in checks.items():
            if not ok:
                value = getattr(self, option[2:].replace("-", "_"))
                raise DistillError(f"{option}: bad value {value!r} (temperature >= 0, 0 < top-p <= 1, "
                                   "max-new-tokens >= 1, n >= 1)")

    def prompt_seed(self, row: PromptRow, first_sample: int) -> int:
        """Seed for the samples of ``row`` starting at ``first_sample`` (independent of order and shard)."""
        digest = hashlib.sha256(f"{self.seed}\n{row.key}\n{first_sample}".encode()).hexdigest()
        return int(digest[:8], 16) & 0x7FFFFFFF


class Filters:
    """Which completions to keep: a regular expression and/or a verifier command.

    Args:
        regex: Keep completions where ``re.search(regex, completion)`` finds a match.
        verifier: A command (split with ``shlex``, run without a shell) that gets the completion
            on stdin and the prompt in ``$DISTILL_PROMPT`` (a chat as JSON), plus ``$DISTILL_ID``
            and ``$DISTILL_SAMPLE``; exit status 0 keeps the completion.
        timeout: Seconds a verifier may run; one that runs longer rejects the completion.
        hide_env: Environment variables the verifier must not see (the API key).
    """

    def __init__(self, regex: str | None = None, verifier: str | None = None, timeout: float = 60.0,
                 hide_env: Iterable[str] = ()) -> None:
        self.regex = regex
        self.verifier = verifier
        self.timeout = timeout
        self.hide_env = tuple(hide_env)
        try:
            self._pattern = re.compile(regex) if regex is not None else None
        except re.error as exc:
            raise DistillError(f"--filter-regex: bad pattern {regex!r}: {exc}") from None
        try:
            self._argv = shlex.split(verifier) if verifier is not None else None
        except ValueError as exc:
            raise DistillError(f"--verifier: cannot split {verifier!r} into words: {exc}") from None
        if self._argv is not None and not self._argv:
            raise DistillError("--verifier: empty command")

    def settings(self) -> dict[str, Any]:
        """What the meta file records of the filters."""
        return {"filter_regex": self.regex, "verifier": self.verifier}

    def reject_reason(self, row: PromptRow, completion: str, sample: int) -> str | None:
        """Why ``completion`` is rejected, or ``None`` to keep it.

        Raises:
            DistillError: The verifier command cannot be started.
        """
        if self._pattern is not None and not self._pattern.search(completion):
            return "filter-regex"
        if self._argv is None:
            return None
        env = {k: v for k, v in os.environ.items() if k not in self.hide_env}
        env.update({PROMPT_ENV: row.text(), "DISTILL_ID": str(row.id), "DISTILL_SAMPLE": str(sample)})
        try:
            done = subprocess.run(self._argv, input=completion, env=env, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"verifier timed out after {self.timeout:g}s"
        except (OSError, ValueError) as exc:  # ValueError: a NUL character in the prompt
            too_long = " (the prompt is too long for an environment variable)" if getattr(
                exc, "errno", None) == errno.E2BIG else ""
            raise DistillError(f"--verifier: cannot run {self._argv[0]!r}: {exc}{too_long}") from None
        return None if done.returncode == 0 else f"verifier exit {done.returncode}"


# --------------------------------------------------------------------------- teachers


class Teacher(Protocol):
    """What the generation loop needs from a teacher."""

    def identity(self) -> dict[str, Any]:
        """What names the teacher in the meta file (a resume with another teacher is refused)."""
        ...

    def complete(self, row: PromptRow, count: int, seed: int) -> list[str]:
        """``count`` completions of ``row`` (before stop strings and filters)."""
        ...


_DTYPES = ("auto", "float32", "bfloat16", "float16")


class LocalTeacher:
    """A Hugging Face causal LM run here (loaded on the first prompt).

    Args:
        source: A local folder, ``pkg://`` path or Hub id (see :func:`distill.models.sources.resolve_source`).
        sampling: How to sample.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: Weights' dtype; ``auto`` is bfloat16 on CUDA, float32 elsewhere.
        trust_remote_code: Let ``transformers`` run the model repository's own code.
    """

    def __init__(self, source: str, sampling: Sampling, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False) -> None:
        from distill.models.sources import resolve_source

        if dtype not in _DTYPES:
            raise DistillError(f"--dtype: unknown dtype '{dtype}'; known: {', '.join(_DTYPES)}")
        self.source = resolve_source(source)
        self.sampling = sampling
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self._loaded: tuple[Any, Any, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """The source, and for a local folder a hash of its ``config.json``."""
        ident: dict[str, Any] = {"kind": "hf-causal-lm", "source": self.source}
        config = Path(self.source) / "config.json"
        if config.is_file():
            ident["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        return ident

    def _load(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            import torch

            from distill.models.adapters import require_transformers

            transformers = require_transformers()
            # Under --nproc, process i takes GPU i.
            gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            device = (gpu if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.source, trust_remote_code=self.trust_remote_code)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.source, dtype=getattr(torch, dtype), trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load teacher '{self.source}': {exc}") from None
            model.to(device).eval()
            log.info("teacher %s on %s (%s)", self.source, device, dtype)
            self._loaded = (torch, model, tokenizer)
        return self._loaded

    def complete(self, row: PromptRow, count: int, seed: int) -> list[str]:
        """Sample ``count`` completions; greedy decoding (temperature 0) runs once and repeats it.

        Raises:
            ModelError: A chat row, and the tokenizer has no chat template.
        """
        torch, model, tokenizer = self._load()
        if row.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise ModelError(f"teacher '{self.source}': its tokenizer has no chat template, so it cannot "
                                 f"answer 'messages' rows (row id {row.id!r}); give 'prompt' rows instead")
            text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tokenizer(row.prompt, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        s = self.sampling
        greedy = s.temperature == 0
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": not greedy,
                                  "num_return_sequences": 1 if greedy else count,
                                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id}
        if not greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        if s.stop:  # stops early; the text is still cut exactly by cut_at_stop
            kwargs.update(stop_strings=list(s.stop), tokenizer=tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts * count if greedy else texts


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _RateLimiter:
    """Spaces request starts at least ``1 / per_second`` apart."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval


class OpenAITeacher:
    """A model behind an OpenAI-compatible API: ``/completions`` for prompts, ``/chat/completions`` for chats.

    Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff (or after the server's
    ``Retry-After``); other HTTP errors fail at once. The key is sent as a Bearer header and kept
    out of every message.

    When a chat reply carries the model's reasoning apart from its answer (``reasoning_content``
    or ``reasoning``, as reasoning models served by vLLM or DeepSeek's API do), the completion is
    ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, so the student learns to reason too.

    Args:
        api_base: URL up to and including the version, e.g. ``http://localhost:8000/v1``.
        model: Model name sent with each request.
        sampling: How to sample.
        api_key: Bearer token, or ``None`` to send none.
        max_retries: Retries of one request before giving up.
        retry_delay: First backoff in seconds, doubled each retry (at most 60 s).
        timeout: Seconds to wait for one reply.
        max_requests_per_second: Rate limit on request starts (retries included).
    """

    def __init__(self, api_base: str, model: str, sampling: Sampling, api_key: str | None = None, *,
                 max_retries: int = 5, retry_delay: float = 1.0, timeout: float = 600.0,
                 max_requests_per_second: float | None = None) -> None:
        if not re.match(r"https?://", api_base):
            raise DistillError(f"--api-base must be an http:// or https:// URL, got '{api_base}'")
        if max_retries < 0 or retry_delay < 0 or timeout <= 0:
            raise DistillError("--max-retries and --retry-delay must be >= 0 and --timeout > 0")
        if max_requests_per_second is not None and max_requests_per_second <= 0:
            raise DistillError(f"--max-requests-per-second must be > 0, got {max_requests_per_second}")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.sampling = sampling
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._key = api_key or None
        self._limiter = _RateLimiter(max_requests_per_second)

    def identity(self) -> dict[str, Any]:
        """The API's address and the model name."""
        return {"kind": "openai-api", "api_base": self.api_base, "model": self.model}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.api_base + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode()
        problem = ""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            wait = None
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                try:
                    reply = json.loads(payload)
                except ValueError:
                    raise ModelError(f"teacher API {url}: reply is not JSON: "
                                     f"{self._redact(payload[:200].decode(errors='replace'))!r}") from None
                if not isinstance(reply, dict):
                    raise ModelError(f"teacher API {url}: reply is not a JSON object")
                return reply
            except urllib.error.HTTPError as exc:
                try:
                    detail = self._redact(exc.read()[:300].decode(errors="replace").strip())
                except OSError:
                    detail = ""
                if exc.code not in (408, 429) and exc.code < 500:
                    hint = " (is the key in the variable --api-key-env names right?)" if exc.code in (401, 403) else ""
                    raise ModelError(f"teacher API {url}: HTTP {exc.code}{hint}: {detail}") from None
                problem = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
                wait = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                problem = f"connection failed: {self._redact(str(reason))}"
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(60.0, self.retry_delay * 2**attempt) * random.uniform(0.8, 1.2)
            log.warning("teacher API %s: %s; retry %d of %d in %.2f s", url, problem, attempt + 1,
                        self.max_retries, wait)
            time.sleep(wait)
        raise TeacherUnavailableError(f"teacher API {url}: {problem} (gave up after {self.max_retries} retries)")

    @staticmethod
    def _choice_text(choice: Any, chat: bool) -> str:
        if not isinstance(choice, dict):
            raise ModelError(f"teacher API: a choice is not an object: {choice!r:.200}")
        if not chat:
            return str(choice.get("text") or "")
        message = choice.get("message") or {}
        answer = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        return f"<think>\n{reasoning}\n</think>\n\n{answer}" if reasoning else answer

    def complete(self, row: PromptRow, count: int, seed: int) -> list[str]:
        """Ask for ``count`` samples (again for the rest if the server returns fewer)."""
        s = self.sampling
        chat = row.messages is not None
        texts: list[str] = []
        while len(texts) < count:
            body: dict[str, Any] = {"model": self.model, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                                    "top_p": s.top_p, "n": count - len(texts), "seed": seed + len(texts)}
            if s.stop:
                body["stop"] = list(s.stop)
            body.update({"messages": row.messages} if chat else {"prompt": row.prompt})
            reply = self._post("/chat/completions" if chat else "/completions", body)
            choices = reply.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ModelError(f"teacher API {self.api_base}: reply has no 'choices': {str(reply)[:200]!r}")
            choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
            texts += [self._choice_text(c, chat) for c in choices]
        return texts[:count]


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class OutputPaths:
    """The files of one output (or one shard of it)."""

    output: Path
    """Kept samples."""
    rejected: Path
    """Rejected samples, with the reason."""
    meta: Path
    """Settings and teacher identity."""
    checksums: Path
    """SHA-256 of the data files (written by a merge)."""

    @classmethod
    def of(cls, output: Path, shard: tuple[int, int] | None = None) -> OutputPaths:
        """Paths for ``--output output`` (and ``--shard``): ``gen.jsonl`` -> ``gen.rejected.jsonl``, ..."""
        stem = output.name[: -len(output.suffix)] if output.suffix else output.name
        if shard is not None:
            stem = f"{stem}.shard-{shard[0]}-of-{shard[1]}"
        folder = output.parent
        return cls(folder / f"{stem}{output.suffix}", folder / f"{stem}.rejected.jsonl",
                   folder / f"{stem}.meta.json", folder / f"{stem}.sha256")


def _write_meta(paths: OutputPaths, header: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the meta file, or check the existing one when the output already holds rows.

    Raises:
        DistillError: The output was made with other settings or by another teacher, or has no meta file.
    """
    started = any(p.is_file() and p.stat().st_size > 0 for p in (paths.output, paths.rejected))
    if started and not paths.meta.is_file():
        raise DistillError(f"{paths.output} exists but {paths.meta.name} (its settings) does not; "
                           "move or delete the output to start over")
    if started:
        try:
            old = json.loads(paths.meta.read_text())
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot read {paths.meta}: {exc}") from None
        diffs = []
        for part, values in header.items():
            before = old.get(part)
            if isinstance(values, dict) and isinstance(before, dict):
                diffs += [f"{part}.{k}: {before.get(k)!r} -> {values.get(k)!r}"
                          for k in sorted(set(values) | set(before)) if before.get(k) != values.get(k)]
            elif before != values:
                diffs.append(f"{part}: {before!r} -> {values!r}")
        if diffs:
            raise DistillError(
                f"{paths.output} was generated with other settings ({'; '.join(diffs)}). Run with the same "
                f"settings to resume it, or delete {paths.output.name}, {paths.rejected.name} and "
                f"{paths.meta.name} to start over")
        return
    meta = {"format": META_FORMAT, **header, **extra,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = paths.meta.with_name(paths.meta.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, paths.meta)


def _read_rows(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL file this module wrote; an unfinished last line (a kill mid-write) is cut
    off, or with ``repair=False`` refused."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise DistillError(f"{path} ends in an unfinished line (its run was interrupted); resume that run first")
        log.warning("%s: dropping an unfinished last line (an interrupted write)", path)
        with path.open("r+b") as handle:
            handle.truncate(end)
    rows = []
    # Split on "\n" alone: completions may hold other line breaks (U+2028) that JSON leaves as they are.
    for lineno, line in enumerate(data[:end].decode("utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON; the file was changed by hand?") from None
    return rows


def _row_key(row: dict[str, Any], answered: bool) -> str:
    """Prompt key of an output row (``answered``: its chat ends with the completion) or rejected row."""
    messages = row.get("messages")
    if messages is not None and answered:
        messages = messages[:-1]
    return prompt_key(row.get("prompt"), messages)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Appender:
    """Appends JSONL rows and syncs them to disk; holds an exclusive lock so two runs cannot share a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = path.open("a", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this platform
            pass
        except OSError:
            self._handle.close()
            raise DistillError(f"{path} is being written by another run") from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------- the loop


@dataclass
class GenerateSummary:
    """What a run did."""

    output: Path
    prompts: int = 0
    """Rows in the input."""
    unique: int = 0
    """Distinct prompts among them."""
    selected: int = 0
    """Distinct prompts in this shard (all of them without ``--shard``)."""
    already_done: int = 0
    """Prompts whose every sample was in the output or the rejected file already."""
    generated: int = 0
    """Prompts sent to the teacher in this run."""
    kept: int = 0
    """Samples written to the output in this run."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Samples rejected in this run, by reason."""

    def __str__(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()))
        return (f"{self.output}: {self.kept} sample(s) kept, {sum(self.rejected.values())} rejected"
                f"{f' ({why})' if why else ''}; {self.generated} prompt(s) generated, {self.already_done} "
                f"already done, {self.prompts - self.unique} duplicate prompt(s) skipped, "
                f"{self.selected} of {self.unique} distinct prompt(s) selected")


def _load_done(paths: OutputPaths, n: int) -> tuple[dict[str, set[int]], dict[str, set[str]]]:
    """Sample indices already written or rejected per prompt key, and digests of kept completions
    of prompts still missing samples."""
    done: dict[str, set[int]] = {}
    kept: dict[str, set[str]] = {}
    for path, answered in ((paths.output, True), (paths.rejected, False)):
        for row in _read_rows(path):
            key = _row_key(row, answered)
            done.setdefault(key, set()).add(int(row["sample"]))
            if answered:
                kept.setdefault(key, set()).add(_digest(row["completion"]))
    return done, {k: v for k, v in kept.items() if len(done[k]) < n}


def _output_row(row: PromptRow, completion: str, sample: int) -> dict[str, Any]:
    """A kept sample: a chat gets the completion as its final assistant turn, which is what
    training reads (the loss counts the last assistant message only)."""
    out: dict[str, Any] = {"id": row.id, "index": row.index}
    if row.messages is not None:
        out["messages"] = [*row.messages, {"role": "assistant", "content": completion}]
    else:
        out["prompt"] = row.prompt
    return {**out, "completion": completion, "sample": sample}


def _judge(row: PromptRow, samples: list[int], completions: list[str], sampling: Sampling, filters: Filters,
           kept: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split one prompt's completions into output rows and rejected rows (``kept``: digests of the
    prompt's completions kept so far, updated)."""
    keep, reject = [], []
    for sample, text in zip(samples, completions, strict=True):
        text = cut_at_stop(text, sampling.stop)
        reason = filters.reject_reason(row, text, sample)
        if reason is None and _digest(text) in kept:
            reason = "duplicate"
        if reason is None:
            kept.add(_digest(text))
            keep.append(_output_row(row, text, sample))
        else:
            # Not "completion": a training reader pointed at the folder must not take these for data.
            reject.append({"id": row.id, "index": row.index, **row.fields(), "rejected_completion": text,
                           "sample": sample, "reason": reason})
    return keep, reject


def generate(input_path: Path, output: Path, teacher: Teacher, sampling: Sampling, filters: Filters | None = None,
             shard: tuple[int, int] | None = None, progress_every: float = 30.0) -> GenerateSummary:
    """Write ``sampling.n`` teacher completions of every distinct prompt of ``input_path``.

    Rows go to ``output`` (or its shard file), rejected samples beside it; both are appended and
    synced after each prompt. Pairs (prompt, sample) found in either file are not asked again.

    Args:
        input_path: JSONL prompts (see :func:`read_prompts`).
        output: The output JSONL file; its rejected and meta files are named after it.
        teacher: Where completions come from.
        sampling: Sampling settings (the teacher samples with the same ones).
        filters: Which completions to keep; all of them when ``None``.
        shard: ``(I, N)``: only the distinct prompts at positions ``p`` with ``p % N == I``.
        progress_every: Seconds between progress lines in the log.

    Raises:
        TeacherUnavailableError: The API kept failing; the message says the run can be resumed.
        DistillError: Bad input, or an output made with other settings.
    """
    filters = filters or Filters()
    rows = read_prompts(input_path)
    if len({r.prompt is None for r in rows}) > 1:
        log.warning("%s mixes 'prompt' and 'messages' rows; training reads one kind of record per data set, "
                    "so give each kind its own prompts file", input_path)
    unique = unique_prompts(rows)
    todo = [r for p, r in enumerate(unique) if shard is None or p % shard[1] == shard[0]]
    paths = OutputPaths.of(output, shard)
    header = {"settings": {**asdict(sampling), "stop": list(sampling.stop), **filters.settings()},
              "teacher": teacher.identity(), "shard": f"{shard[0]}/{shard[1]}" if shard else None}
    paths.output.parent.mkdir(parents=True, exist_ok=True)
    out = _Appender(paths.output)  # locked first, so a second run on the same output stops here
    rejected: _Appender | None = None
    try:
        rejected = _Appender(paths.rejected)
        _write_meta(paths, header, {"input": str(input_path)})
        done, kept = _load_done(paths, sampling.n)
        summary = GenerateSummary(paths.output, len(rows), len(unique), len(todo))
        last_log = time.monotonic()
        for row in todo:
            missing = [i for i in range(sampling.n) if i not in done.get(row.key, ())]
            if not missing:
                summary.already_done += 1
                continue
            try:
                completions = teacher.complete(row, len(missing), sampling.prompt_seed(row, missing[0]))
            except TeacherUnavailableError as exc:
                raise TeacherUnavailableError(
                    f"{exc}. {summary.generated + summary.already_done} of {len(todo)} prompt(s) are done in "
                    f"{paths.output}; run the same command again to resume") from None
            keep, reject = _judge(row, missing, completions, sampling, filters, kept.pop(row.key, set()))
            rejected.write(reject)
            out.write(keep)
            summary.generated += 1
            summary.kept += len(keep)
            summary.rejected.update(r["reason"].split()[0] for r in reject)
            if time.monotonic() - last_log > progress_every:
                last_log = time.monotonic()
                log.info("%d/%d prompts, %d samples kept", summary.generated + summary.already_done, len(todo),
                         summary.kept)
    finally:
        out.close()
        if rejected is not None:
            rejected.close()
    return summary


# --------------------------------------------------------------------------- shards


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_rows_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        merged["output"] += _read_rows(shard_paths.output, repair=False)
        merged["rejected"] += _read_rows(shard_paths.rejected, repair=False)
    seen: set[tuple[int, int]] = set()
    for rows in merged.values():
        rows.sort(key=lambda r: (r["index"], r["sample"]))
        for r in rows:
            if (r["index"], r["sample"]) in seen:
                raise DistillError(f"prompt {r['index']} sample {r['sample']} is in more than one shard file")
            seen.add((r["index"], r["sample"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_rows_atomically(paths.output, merged["output"])
    _write_rows_atomically(paths.rejected, merged["rejected"])
    meta = {"format": META_FORMAT, "settings": first["settings"], "teacher": first["teacher"], "shard": None,
            "input": first.get("input"), "merged_from": [str(metas[i][0]) for i in sorted(metas)],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    paths.meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    paths.checksums.write_text("".join(f"{_sha256_file(p)}  {p.name}\n" for p in (paths.output, paths.rejected)))
    return (f"{paths.output}: {len(merged['output'])} sample(s) from {len(metas)} shard(s), "
            f"{len(merged['rejected'])} rejected in {paths.rejected.name}; checksums in {paths.checksums.name}")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``distill generate``."""
    parser.add_argument("--input", type=Path, help="JSONL prompts: rows with 'prompt' or 'messages', 'id' optional")
    parser.add_argument("--output", type=Path, help="JSONL output; resumed when it exists")
    teacher = parser.add_argument_group("teacher (one of)")
    teacher.add_argument("--teacher", metavar="SOURCE", help="local Hugging Face causal LM: folder or Hub id")
    teacher.add_argument("--api-base", metavar="URL", help="OpenAI-compatible API, e.g. http://localhost:8000/v1")
    teacher.add_argument("--model", help="with --api-base: the model name to ask for")
    teacher.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                         help="environment variable holding the API key (default OPENAI_API_KEY)")
    teacher.add_argument("--trust-remote-code", action="store_true", help="with --teacher: run the model's own code")
    teacher.add_argument("--device", default="auto", help="with --teacher: auto, cpu, cuda, cuda:1, ...")
    teacher.add_argument("--dtype", default="auto", choices=_DTYPES, help="with --teacher (auto: bf16 on CUDA)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="cut the completion at this text (repeatable)")
    keep = parser.add_argument_group("filters")
    keep.add_argument("--filter-regex", metavar="PATTERN", help="keep completions where re.search finds PATTERN")
    keep.add_argument("--verifier", metavar="CMD", help=f"keep completions for which CMD exits 0 (completion on "
                      f"stdin, prompt in ${PROMPT_ENV}; run without a shell)")
    keep.add_argument("--verifier-timeout", type=float, default=60.0, metavar="SECONDS")
    api = parser.add_argument_group("API requests")
    api.add_argument("--max-retries", type=int, default=5, help="retries of a failed request (default 5)")
    api.add_argument("--retry-delay", type=float, default=1.0, metavar="SECONDS",
                     help="first backoff, doubled each retry (default 1)")
    api.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="per request (default 600)")
    api.add_argument("--max-requests-per-second", type=float, metavar="R")
    scale = parser.add_argument_group("scale-out")
    scale.add_argument("--shard", metavar="I/N", help="only distinct prompts p with p %% N == I, to a shard file")
    scale.add_argument("--merge", type=Path, metavar="OUT", help="merge SHARD_FILE... into OUT (and nothing else)")
    scale.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="N processes on this machine (one GPU each when there are GPUs), each a shard; "
                            "the first merges them into --output")
    parser.add_argument("shard_files", nargs="*", type=Path, metavar="SHARD_FILE", help="with --merge: shard outputs")


def generate_command(args: argparse.Namespace) -> str:
    """Run ``distill generate`` from parsed arguments; returns the summary to print.

    Raises:
        DistillError: Missing or conflicting options, or any error of :func:`generate`.
    """
    if args.merge is not None:
        if args.input or args.teacher or args.api_base:
            raise DistillError("--merge OUT SHARD_FILE... takes no --input, --teacher or --api-base")
        return merge_shards(args.merge, args.shard_files)
    if args.shard_files:
        raise DistillError(f"unexpected arguments {[str(f) for f in args.shard_files]} (shard files go with --merge)")
    if args.input is None or args.output is None:
        raise DistillError("generate needs --input PROMPTS.jsonl and --output OUT.jsonl")
    if (args.teacher is None) == (args.api_base is None):
        raise DistillError("give one teacher: --teacher SOURCE (a local model) or --api-base URL --model NAME")
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.n, args.seed, tuple(args.stop))
    teacher: Teacher
    if args.api_base is not None:
        if not args.model:
            raise DistillError("--api-base needs --model NAME")
        key = os.environ.get(args.api_key_env)
        if not key:
            log.info("$%s is not set: requests carry no API key", args.api_key_env)
        teacher = OpenAITeacher(args.api_base, args.model, sampling, key, max_retries=args.max_retries,
                                retry_delay=args.retry_delay, timeout=args.timeout,
                                max_requests_per_second=args.max_requests_per_second)
    else:
        teacher = LocalTeacher(args.teacher, sampling, device=args.device, dtype=args.dtype,
                               trust_remote_code=args.trust_remote_code)
    filters = Filters(args.filter_regex, args.verifier, args.verifier_timeout, hide_env=[args.api_key_env])
    shard = parse_shard(args.shard) if args.shard else None
    from distill.launch import launched

    if shard is None and launched() and int(os.environ["WORLD_SIZE"]) > 1:
        return _generate_in_processes(args, teacher, sampling, filters)
    return str(generate(args.input, args.output, teacher, sampling, filters, shard))


def _generate_in_processes(args: argparse.Namespace, teacher: Teacher, sampling: Sampling, filters: Filters) -> str:
    """One of ``--nproc`` processes: generate shard RANK of WORLD, wait for the others, and (the
    first process) merge every shard into ``--output``."""
    from accelerate import PartialState

    state = PartialState(cpu=True)  # joins the others over gloo: only to wait for them
    rank, world = state.process_index, state.num_processes
    summary = generate(args.input, args.output, teacher, sampling, filters, (rank, world))
    state.wait_for_everyone()
    if rank != 0:
        return f"process {rank}: {summary}"
    shards = [OutputPaths.of(args.output, (i, world)).output for i in range(world)]
    return f"{summary}\n{merge_shards(args.output, shards)}"

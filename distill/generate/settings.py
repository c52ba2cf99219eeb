"""How the teacher samples, and which of its completions are kept (stop strings, regex, verifier)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError
from distill.generate.prompts import PromptRow

__all__ = ["PROMPT_ENV", "Filters", "Sampling", "cut_at_stop"]

PROMPT_ENV = "DISTILL_PROMPT"
"""Environment variable that hands the prompt to a verifier (a chat as JSON)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (which is dropped); all of it when none occurs."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


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

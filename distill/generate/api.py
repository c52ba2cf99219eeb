"""The teacher behind an OpenAI-compatible HTTP API: requests, retries with backoff or the server's
``Retry-After``, a rate limit, and an API key kept out of every message."""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from distill.errors import DistillError, ModelError
from distill.generate.prompts import PromptRow
from distill.generate.settings import Sampling
from distill.generate.teacher import TeacherUnavailableError

__all__ = ["OpenAITeacher", "RateLimiter", "api_key_from_env", "retry_after"]

# Every module of the package logs as "distill.generate", the name its lines have always carried.
log = logging.getLogger(__package__)


def api_key_from_env(variable: str) -> str | None:
    """The API key in environment variable ``variable``; ``None`` (and a log line) when it is unset or empty.

    Surrounding whitespace (a key file's line ending) is dropped. A key that still holds a space
    or a control character is refused, without being shown.
    """
    key = (os.environ.get(variable) or "").strip()
    if not key:
        log.info("$%s is not set: requests carry no API key", variable)
        return None
    if not all("!" <= c <= "~" for c in key):
        raise DistillError(f"the API key in ${variable} holds a space, a control or a non-ASCII character, which "
                           "no HTTP header can carry (the key is not shown); check how it was set")
    return key


def retry_after(value: str | None) -> float | None:
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


class RateLimiter:
    """Spaces request starts at least ``1 / per_second`` apart."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0

    def wait(self) -> None:
        """Sleep until the next request may start."""
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
        timeout: The most one request may take, from sending it to the reply's last byte (a
            server trickling bytes does not hold a request longer).
        max_requests_per_second: Rate limit on request starts (retries included).
        max_wait: The longest wait between retries, whatever a ``Retry-After`` header asks.
    """

    def __init__(self, api_base: str, model: str, sampling: Sampling, api_key: str | None = None, *,
                 max_retries: int = 5, retry_delay: float = 1.0, timeout: float = 600.0,
                 max_requests_per_second: float | None = None, max_wait: float = 300.0) -> None:
        if not re.match(r"https?://", api_base):
            raise DistillError(f"--api-base must be an http:// or https:// URL, got '{api_base}'")
        numbers = (max_retries, retry_delay, timeout, max_wait)
        if not all(math.isfinite(x) for x in numbers) or max_retries < 0 or retry_delay < 0 or timeout <= 0 \
                or max_wait < 0:
            raise DistillError("--max-retries, --retry-delay and --max-wait must be finite and >= 0, "
                               "--timeout finite and > 0")
        if max_requests_per_second is not None and max_requests_per_second <= 0:
            raise DistillError(f"--max-requests-per-second must be > 0, got {max_requests_per_second}")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.sampling = sampling
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.timeout, self.max_wait = timeout, max_wait
        self._key = api_key or None
        self._limiter = RateLimiter(max_requests_per_second)

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
                payload = self._read(request)
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
                wait = retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                problem = f"connection failed: {self._redact(str(reason))}"
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(60.0, self.retry_delay * 2**attempt) * random.uniform(0.8, 1.2)
            wait = min(wait, self.max_wait)
            log.warning("teacher API %s: %s; retry %d of %d in %.2f s", url, problem, attempt + 1,
                        self.max_retries, wait)
            time.sleep(wait)
        raise TeacherUnavailableError(f"teacher API {url}: {problem} (gave up after {self.max_retries} retries)")

    def _read(self, request: urllib.request.Request) -> bytes:
        """The reply's body, within ``timeout`` seconds in all (not per read)."""
        deadline = time.monotonic() + self.timeout
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no complete reply within --timeout {self.timeout:g} s")
                # The socket's own timeout bounds one read; lowered to what is left, it bounds the whole reply.
                sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.read1(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

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

"""A flaky OpenAI-compatible server on 127.0.0.1: trickling bodies, huge Retry-After, bad JSON,
dropped connections, and an API key that must never be shown."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distill.errors import DistillError, ModelError
from distill.generate.api import OpenAITeacher, api_key_from_env
from distill.generate.prompts import PromptRow
from distill.generate.settings import Sampling
from distill.generate.teacher import TeacherUnavailableError

GOOD = json.dumps({"choices": [{"index": 0, "text": " fine"}]}).encode()


@pytest.fixture
def flaky():
    """A server answering each request by the next behaviour of ``server.plan``, then with a good reply."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            behaviour = server.plan.pop(0) if server.plan else "ok"
            server.seen.append(behaviour)
            if behaviour == "drop":
                self.connection.close()
                return
            status, body, headers = {"ok": (200, GOOD, {}), "bad-json": (200, b"<html>oops", {}),
                                     "trickle": (200, GOOD, {}), "busy": (429, b"{}", {"Retry-After": "1000000"}),
                                     "500": (500, b"{}", {})}[behaviour]
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if behaviour == "trickle":  # one byte every 0.2 s: 4 s for this reply
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
                    if i > 20:
                        return
            else:
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.plan, server.seen = [], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _ask(server, **options):
    teacher = OpenAITeacher(server.url, "m", Sampling(max_new_tokens=2), "sk-secret-123", **options)
    return teacher.complete(PromptRow(0, "a", prompt="hi"), 1, seed=0)


def test_a_trickling_reply_is_cut_at_the_total_timeout_and_retried(flaky):
    flaky.plan = ["trickle"]
    start = time.monotonic()
    assert _ask(flaky, timeout=1.0, max_retries=1, retry_delay=0.01) == [" fine"]
    assert time.monotonic() - start < 3.5 and flaky.seen == ["trickle", "ok"]


def test_retry_after_is_capped_by_max_wait(flaky):
    flaky.plan = ["busy"]
    start = time.monotonic()
    assert _ask(flaky, max_retries=1, max_wait=0.3) == [" fine"]
    assert time.monotonic() - start < 5


def test_bad_json_dropped_connections_and_500s(flaky):
    flaky.plan = ["drop", "500"]
    assert _ask(flaky, max_retries=2, retry_delay=0.01) == [" fine"]
    flaky.plan = ["bad-json"]
    with pytest.raises(ModelError, match="reply is not JSON"):
        _ask(flaky)
    flaky.plan = ["500"] * 3
    with pytest.raises(TeacherUnavailableError, match="gave up after 2 retries"):
        _ask(flaky, max_retries=2, retry_delay=0.01)


def test_a_key_with_a_line_ending_is_cleaned_and_a_bad_key_never_shown(monkeypatch):
    monkeypatch.setenv("DISTILL_FAULT_KEY", "sk-windows-line-ending\r\n")
    assert api_key_from_env("DISTILL_FAULT_KEY") == "sk-windows-line-ending"
    monkeypatch.setenv("DISTILL_FAULT_KEY", "sk-two words-secret")
    with pytest.raises(DistillError) as info:
        api_key_from_env("DISTILL_FAULT_KEY")
    assert "secret" not in str(info.value) and "DISTILL_FAULT_KEY" in str(info.value)

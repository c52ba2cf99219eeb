"""The OpenAI-compatible teacher, against a server on 127.0.0.1: the key, retries, Retry-After, rate limit,
and a run that fails part way and is resumed."""

import json
import logging
import time
from collections import Counter

import pytest

from distill.cli import main
from distill.generate.api import OpenAITeacher, RateLimiter, retry_after
from distill.generate.prompts import PromptRow, prompt_key
from distill.generate.settings import Sampling

from .helpers import KEY, KEY_ENV, PROMPTS, api_args, pairs, read_jsonl, write_prompts


def test_api_teacher_end_to_end_sends_the_key_and_never_writes_it(server, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    write_prompts(tmp_path / "prompts.jsonl")
    assert main(api_args(server, tmp_path, "--stop", "\n", "--temperature", "0.9", "--top-p", "0.95")) == 0
    rows = read_jsonl(tmp_path / "gen.jsonl")
    # Five distinct prompts ("a-again" repeats "a"), two samples each, less duplicates of a kept sample.
    assert pairs(tmp_path / "gen.jsonl", tmp_path / "gen.rejected.jsonl") == {(i, s): 1 for i in (0, 1, 2, 4, 5)
                                                                              for s in (0, 1)}
    assert rows and all(r["id"] == PROMPTS[r["index"]].get("id", r["index"]) for r in rows)
    for row in rows:
        assert "\n" not in row["completion"]
        if row["id"] == "c":  # a chat: the completion is its last assistant turn, as training reads it
            assert row["messages"] == [*PROMPTS[2]["messages"], {"role": "assistant", "content": row["completion"]}]
            assert "prompt" not in row
        else:
            assert row["prompt"] == PROMPTS[row["index"]]["prompt"]
    paths = Counter(path for path, *_ in server.requests)
    assert paths == {"/v1/completions": 4, "/v1/chat/completions": 1}  # one request per prompt, n=2 each
    body = server.requests[0][1]
    assert body["n"] == 2 and body["max_tokens"] == 8 and body["stop"] == ["\n"] and body["model"] == "tiny"
    assert body["temperature"] == 0.9 and body["top_p"] == 0.95
    meta = json.loads((tmp_path / "gen.meta.json").read_text())
    assert meta["teacher"] == {"kind": "openai-api", "api_base": server.url, "model": "tiny"}
    assert meta["settings"]["n"] == 2 and meta["shard"] is None
    # The key went out with every request (the server answers 401 otherwise), and nowhere else.
    out = capsys.readouterr()
    for text in [p.read_text() for p in tmp_path.iterdir()] + [out.out, out.err, caplog.text]:
        assert KEY not in text
    # A second run asks nothing: every pair is done.
    before = len(server.requests)
    assert main(api_args(server, tmp_path, "--stop", "\n", "--temperature", "0.9", "--top-p", "0.95")) == 0
    assert len(server.requests) == before and "0 prompt(s) generated, 5 already done" in capsys.readouterr().out
    # Other settings are refused; a wrong key is a clear error that does not echo it.
    assert main(api_args(server, tmp_path, "--temperature", "0.5")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "settings.temperature: 0.9 -> 0.5" in err and "delete gen.jsonl" in err
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
    assert main(api_args(server, tmp_path, "--output", str(tmp_path / "other.jsonl"))) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "--api-key-env" in err and "sk-wrong-key" not in err


def test_server_errors_fail_with_a_resume_message_and_the_rerun_asks_only_for_the_rest(
        server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    write_prompts(tmp_path / "prompts.jsonl")
    server.fail_after = 2
    assert main(api_args(server, tmp_path, "--max-retries", "2")) == 2
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "gave up after 2 retries" in err and "run the same command again to resume" in err
    assert len(server.requests) == 2 + 3  # two answers, then the third prompt tried once and retried twice
    assert set(pairs(tmp_path / "gen.jsonl", tmp_path / "gen.rejected.jsonl")) == {(i, s) for i in (0, 1)
                                                                                  for s in (0, 1)}
    # A kill in the middle of a write leaves half a line: the rerun drops it and asks for that sample again.
    text = (tmp_path / "gen.jsonl").read_text()
    start = text.rstrip("\n").rfind("\n") + 1
    lost = json.loads(text[start:])
    (tmp_path / "gen.jsonl").write_text(text[: start + 10])
    server.fail_after = None
    assert main(api_args(server, tmp_path, "--max-retries", "2")) == 0
    assert pairs(tmp_path / "gen.jsonl", tmp_path / "gen.rejected.jsonl") == {(i, s): 1 for i in (0, 1, 2, 4, 5)
                                                                              for s in (0, 1)}
    # Every distinct prompt was answered once over both runs, none done was asked again; the one whose
    # row was cut was asked once more, for that sample alone.
    lost_key = prompt_key(lost["prompt"], None)
    answered = server.ok_requests_per_prompt()
    assert len(answered) == 5 and answered.pop(lost_key) == 2 and set(answered.values()) == {1}
    again = [b for _, b, status in server.requests if status == 200 and b.get("prompt") == lost["prompt"]][-1]
    assert again["n"] == 1


def test_429_waits_for_retry_after_then_succeeds(server):
    server.script = [(429, {"Retry-After": "1"})]
    teacher = OpenAITeacher(server.url, "tiny", Sampling(max_new_tokens=4, n=3), KEY, max_retries=1,
                            retry_delay=0.01)
    start = time.monotonic()
    texts = teacher.complete(PromptRow(0, "a", prompt="ROMEO:\n"), 3, seed=7)
    assert time.monotonic() - start >= 0.95  # the server's wait, not the 0.01 s backoff
    assert len(texts) == 3 and [status for *_, status in server.requests] == [429, 200]
    # With no retries left, the same answer gives up at once, naming the status.
    server.script = [(429, {"Retry-After": "0"})]
    with pytest.raises(Exception, match="HTTP 429.*gave up after 0 retries"):
        OpenAITeacher(server.url, "tiny", Sampling(), KEY, max_retries=0).complete(
            PromptRow(0, "a", prompt="x"), 1, seed=0)
    # A dead server is retried too (connection refused), then given up on.
    dead = OpenAITeacher("http://127.0.0.1:9/v1", "tiny", Sampling(), KEY, max_retries=2, retry_delay=0.01)
    with pytest.raises(Exception, match="connection failed.*gave up after 2 retries"):
        dead.complete(PromptRow(0, "a", prompt="x"), 1, seed=0)


def test_retry_after_and_rate_limit():
    assert retry_after("3") == 3 and retry_after(None) is None and retry_after("soon") is None
    assert 8 < retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))) <= 10
    limiter = RateLimiter(20.0)
    start = time.monotonic()
    for _ in range(4):
        limiter.wait()
    assert time.monotonic() - start >= 0.14  # 3 gaps of 1/20 s

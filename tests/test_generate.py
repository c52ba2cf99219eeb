"""``distill generate``: a teacher's completions as training data, from a local model or an
OpenAI-compatible API that the tests serve on 127.0.0.1 from a tiny GPT-2 built here."""

import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import bpe_tokenizer

from distill.cli import main
from distill.errors import DataError
from distill.generate import (
    OpenAITeacher,
    PromptRow,
    Sampling,
    _Appender,
    _read_rows,
    _retry_after,
    cut_at_stop,
    parse_shard,
    prompt_key,
    read_prompts,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

KEY = "sk-test-0123456789abcdef"
KEY_ENV = "DISTILL_TEST_API_KEY"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = [
    {"id": "a", "prompt": "First Citizen:\n"},
    {"id": "b", "prompt": "ROMEO:\n"},
    {"id": "c", "messages": [{"role": "user", "content": "Speak, speak."}]},
    {"id": "a-again", "prompt": "First Citizen:\n"},
    {"prompt": "JULIET:\n"},
    {"id": "e", "prompt": "KING HENRY:\n"},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Generation here is many tiny steps; a second intra-op thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    """A 2-layer GPT-2 (width 32) whose tokenizer has a chat template, and the same without one."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:50_000]
    tokenizer = bpe_tokenizer(text)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    root = tmp_path_factory.mktemp("gpt")
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "chat")
    tokenizer.save_pretrained(root / "chat")
    return root / "chat", root / "plain"


class TinyOpenAI:
    """Just enough of the OpenAI API for our client, over a local model, with scripted failures."""

    def __init__(self, folder, key):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        self.key = key
        self.requests = []  # (path, body, status) of every request
        self.script = []  # statuses (with headers) to answer the next requests with, before generating
        self.fail_after = None  # answer 500 once this many requests have succeeded
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, reply = server.answer(self.path, self.headers.get("Authorization"), body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path, authorization, body):
        with self.lock:
            status, headers, reply = self._answer(path, authorization, body)
            self.requests.append((path, body, status))
            return status, headers, reply

    def _answer(self, path, authorization, body):
        if authorization != f"Bearer {self.key}":
            return 401, {}, {"error": {"message": f"bad key {authorization}"}}
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return 404, {}, {"error": {"message": "no such route"}}
        if self.script:
            status, headers = self.script.pop(0)
            return status, headers, {"error": {"message": "scripted"}}
        ok = sum(status == 200 for *_, status in self.requests)
        if self.fail_after is not None and ok >= self.fail_after:
            return 500, {}, {"error": {"message": "overloaded"}}
        if path.endswith("/chat/completions"):
            text = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        else:
            text = body["prompt"]
        texts = self.sample(text, body)
        if path.endswith("/chat/completions"):
            choices = [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": t} for i, t in enumerate(texts)]
        return 200, {}, {"object": "text_completion", "choices": choices}

    def sample(self, text, body):
        enc = self.tokenizer(text, return_tensors="pt")
        torch.manual_seed(body["seed"])
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=True, temperature=body["temperature"], top_p=body["top_p"],
                                      max_new_tokens=body["max_tokens"], num_return_sequences=body["n"],
                                      pad_token_id=self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in body.get("stop", []):
            texts = [t.split(stop)[0] for t in texts]
        return texts

    def ok_requests_per_prompt(self):
        return Counter(prompt_key(b.get("prompt"), b.get("messages")) for _, b, status in self.requests
                       if status == 200)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(models):
    srv = TinyOpenAI(models[0], KEY)
    yield srv
    srv.close()


def write_prompts(path, rows=PROMPTS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line] if path.exists() else []


def pairs(*paths):
    """Every (prompt position, sample) in the files, with repeats."""
    return Counter((r["index"], r["sample"]) for p in paths for r in read_jsonl(p))


def api_args(server, tmp_path, *extra):
    return ["generate", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "gen.jsonl"),
            "--api-base", server.url, "--model", "tiny", "--api-key-env", KEY_ENV, "--n", "2",
            "--max-new-tokens", "8", "--retry-delay", "0.01", *extra]


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
    assert _retry_after("3") == 3 and _retry_after(None) is None and _retry_after("soon") is None
    assert 8 < _retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))) <= 10
    from distill.generate import _RateLimiter

    limiter = _RateLimiter(20.0)
    start = time.monotonic()
    for _ in range(4):
        limiter.wait()
    assert time.monotonic() - start >= 0.14  # 3 gaps of 1/20 s


VERIFIER = """
import json, os, sys
text = sys.stdin.read()
if "{key_env}" in os.environ:
    sys.exit(3)
with open({log!r}, "a") as f:
    f.write(json.dumps([os.environ["DISTILL_ID"], os.environ["DISTILL_SAMPLE"], os.environ["DISTILL_PROMPT"]]) + "\\n")
sys.exit(0 if len(text) % 2 == 0 else 1)
"""


def local_args(tmp_path, teacher, output, *extra):
    return ["generate", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / output),
            "--teacher", str(teacher), "--n", "3", "--max-new-tokens", "10", "--seed", "1",
            "--api-key-env", KEY_ENV, *extra]


def test_local_teacher_stop_strings_samples_dedup_and_filters(models, tmp_path, monkeypatch, capsys):
    teacher, plain = models
    monkeypatch.setenv(KEY_ENV, KEY)
    write_prompts(tmp_path / "prompts.jsonl")
    assert main(local_args(tmp_path, teacher, "full.jsonl")) == 0
    full = {(r["index"], r["sample"]): r.get("completion", r.get("rejected_completion"))
            for p in ("full.jsonl", "full.rejected.jsonl") for r in read_jsonl(tmp_path / p)}
    assert set(full) == {(i, s) for i in (0, 1, 2, 4, 5) for s in range(3)}  # a-again generated once
    assert len(set(full.values())) > 10  # samples differ
    assert "1 duplicate prompt(s) skipped" in capsys.readouterr().out

    script = tmp_path / "verify.py"
    script.write_text(VERIFIER.format(key_env=KEY_ENV, log=str(tmp_path / "verifier.log")))
    stops = ["e", "\n"]
    assert main(local_args(tmp_path, teacher, "cut.jsonl", "--stop", "e", "--stop", "\n", "--filter-regex", r"\S",
                           "--verifier", f"{sys.executable} -S {script}")) == 0
    kept, rejected = read_jsonl(tmp_path / "cut.jsonl"), read_jsonl(tmp_path / "cut.rejected.jsonl")
    # Same seed, same samples: each completion is the uncut one up to its first stop string.
    assert {(r["index"], r["sample"]): r.get("completion", r.get("rejected_completion")) for r in kept + rejected} == {
        pair: cut_at_stop(text, stops) for pair, text in full.items()}
    assert any(len(cut_at_stop(t, stops)) < len(t) for t in full.values())
    reasons = Counter(r["reason"] for r in rejected)
    assert kept and reasons["filter-regex"] and reasons["verifier exit 1"] and set(reasons) <= {
        "filter-regex", "verifier exit 1", "duplicate"}
    assert all(re.search(r"\S", r["completion"]) and len(r["completion"]) % 2 == 0 for r in kept)
    assert all(not re.search(r"\S", r["rejected_completion"]) for r in rejected if r["reason"] == "filter-regex")
    assert all(len(r["rejected_completion"]) % 2 == 1 for r in rejected if r["reason"].startswith("verifier"))
    assert all("completion" not in r for r in rejected)  # so a reader never takes a rejected sample for data
    # The verifier saw each prompt (a chat as JSON), its id and sample, and never the API key.
    calls = [json.loads(line) for line in (tmp_path / "verifier.log").read_text().splitlines()]
    expected = {str(r.get("id", 4)): r.get("prompt") or json.dumps(r.get("messages")) for r in PROMPTS}
    assert calls and all(prompt == expected[i] for i, _, prompt in calls)
    passed_regex = {(str(r["id"]), str(r["sample"])) for r in kept + rejected if r.get("reason") != "filter-regex"}
    assert {(i, s) for i, s, _ in calls} == passed_regex
    chat = [r for r in kept + rejected if r["id"] == "c"]
    assert all(r["messages"][:1] == PROMPTS[2]["messages"] for r in chat)

    # Greedy decoding gives one sample n times: the repeats are dropped as duplicates.
    assert main(local_args(tmp_path, teacher, "greedy.jsonl", "--temperature", "0")) == 0
    greedy = read_jsonl(tmp_path / "greedy.jsonl")
    assert [r["sample"] for r in greedy] == [0] * 5
    assert Counter(r["reason"] for r in read_jsonl(tmp_path / "greedy.rejected.jsonl")) == {"duplicate": 10}

    # A chat needs a chat template; a row with no prompt is an error naming its line.
    capsys.readouterr()
    write_prompts(tmp_path / "prompts.jsonl", PROMPTS[2:3])
    assert main(local_args(tmp_path, plain, "plain.jsonl")) == 2
    assert "no chat template" in capsys.readouterr().err
    write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "x"}, {"id": 1, "text": "y"}])
    assert main(local_args(tmp_path, teacher, "bad.jsonl")) == 2
    assert "prompts.jsonl:2: a row needs 'prompt'" in capsys.readouterr().err


def test_shards_merge_into_the_unsharded_output(models, tmp_path, capsys):
    teacher, _ = models
    write_prompts(tmp_path / "prompts.jsonl")
    common = ["--n", "2", "--max-new-tokens", "6", "--filter-regex", "[aeiou]"]
    assert main(local_args(tmp_path, teacher, "all.jsonl", *common)) == 0
    shards = []
    for i in range(3):
        assert main(local_args(tmp_path, teacher, "gen.jsonl", *common, "--shard", f"{i}/3")) == 0
        shards.append(tmp_path / f"gen.shard-{i}-of-3.jsonl")
    # Distinct prompts 0..4 split 2+2+1 (a repeated prompt belongs to no shard twice).
    assert [sorted({r["index"] for r in read_jsonl(s) + read_jsonl(s.with_name(s.name.replace(".jsonl",
                   ".rejected.jsonl")))}) for s in shards] == [[0, 4], [1, 5], [2]]
    assert main(["generate", "--merge", str(tmp_path / "gen.jsonl"), *map(str, reversed(shards))]) == 0
    for name in ("", ".rejected"):
        assert (tmp_path / f"gen{name}.jsonl").read_bytes() == (tmp_path / f"all{name}.jsonl").read_bytes()
    sums = dict(reversed(line.split("  ")) for line in (tmp_path / "gen.sha256").read_text().splitlines())
    assert sums == {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
                    for n in ("gen.jsonl", "gen.rejected.jsonl")}
    # The merged output is what one run leaves: running it unsharded has nothing left to do.
    capsys.readouterr()
    assert main(local_args(tmp_path, teacher, "gen.jsonl", *common)) == 0
    assert "0 prompt(s) generated, 5 already done" in capsys.readouterr().out
    # Every shard is needed, once each.
    assert main(["generate", "--merge", str(tmp_path / "m.jsonl"), str(shards[0]), str(shards[2])]) == 2
    assert "shard(s) [1] missing" in capsys.readouterr().err
    assert main(["generate", "--merge", str(tmp_path / "m.jsonl"), str(shards[0]), str(shards[0])]) == 2
    assert "given twice" in capsys.readouterr().err


def test_processes_each_take_a_shard_and_the_first_merges_them(models, tmp_path):
    teacher, _ = models
    write_prompts(tmp_path / "prompts.jsonl")
    common = ["--n", "2", "--max-new-tokens", "6"]
    assert main(local_args(tmp_path, teacher, "one.jsonl", *common)) == 0
    out = subprocess.run([sys.executable, "-m", "distill.cli", *local_args(tmp_path, teacher, "two.jsonl", *common),
                          "--nproc", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # Seeds follow each prompt, not the process that draws it: the merged output is one process's.
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.glob("two.shard-*-of-2.jsonl")) == [
        "two.shard-0-of-2.jsonl", "two.shard-1-of-2.jsonl"]
    assert (tmp_path / "two.sha256").is_file()


def test_prompts_reader_and_helpers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}], "id": 7}\n')
    rows = read_prompts(path)
    assert [(r.index, r.id) for r in rows] == [(0, 0), (1, 7)]
    assert rows[1].text() == '[{"role": "user", "content": "b"}]'
    bad_rows = (('{"prompt": 3}', "non-empty string"), ('{"messages": [{"role": "user"}]}', "{role, content}"),
                ('{"prompt": "a", "messages": []}', "not both"), ("[1]", "found list"), ("{", "not valid JSON"))
    for line, message in bad_rows:
        path.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"p.jsonl:2: .*{re.escape(message)}"):
            read_prompts(path)
    assert cut_at_stop("abc\nde###f", ["###", "\n"]) == "abc" and cut_at_stop("abc", ["x", ""]) == "abc"
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(Exception, match="INDEX/COUNT"):
        parse_shard("4/4")
    # A reasoning model's chat reply keeps its reasoning, in think tags, ahead of the answer.
    reply = {"message": {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"}}
    assert OpenAITeacher._choice_text(reply, chat=True) == "<think>\n2+2 is 4\n</think>\n\n4"
    assert OpenAITeacher._choice_text({"text": "x"}, chat=False) == "x"
    # A completion may hold line breaks other than "\n" that JSON does not escape; a row stays one row.
    rows = [{"prompt": "p", "completion": "a\u2028b\x85c", "sample": 0}]
    writer = _Appender(tmp_path / "out.jsonl")
    writer.write(rows)
    writer.close()
    assert _read_rows(tmp_path / "out.jsonl") == rows


def test_two_runs_cannot_share_an_output(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl")
    holder = _Appender(tmp_path / "gen.jsonl")
    try:
        assert main(["generate", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "gen.jsonl"),
                     "--api-base", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    finally:
        holder.close()
    assert "being written by another run" in capsys.readouterr().err


def test_output_is_what_training_reads(models, tmp_path):
    data = pytest.importorskip("distill.data")
    if not hasattr(data, "read_records"):
        pytest.skip("this checkout has no prompt/completion reader")
    teacher, _ = models
    for name, rows in (("plain", [PROMPTS[0], PROMPTS[1]]), ("chat", [PROMPTS[2]])):
        write_prompts(tmp_path / "prompts.jsonl", rows)
        assert main(local_args(tmp_path, teacher, f"{name}.jsonl", "--n", "2", "--max-new-tokens", "4")) == 0
        written = read_jsonl(tmp_path / f"{name}.jsonl")
        records = data.read_records(tmp_path / f"{name}.jsonl", "jsonl")
        if name == "plain":
            assert records == [{"prompt": r["prompt"], "completion": r["completion"]} for r in written]
        else:
            assert records == [{"messages": r["messages"]} for r in written]
            assert all(r["messages"][-1] == {"role": "assistant", "content": r["completion"]} for r in written)

"""What the tests of ``distill generate`` share: prompts, a tiny OpenAI-compatible server over a
local model (on 127.0.0.1, with scripted failures), and command lines."""

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from distill.generate.prompts import prompt_key

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


class TinyOpenAI:
    """Just enough of the OpenAI API for our client, over a local model, with scripted failures."""

    def __init__(self, folder, key):
        import transformers  # not at the top: the tests that need no model run without it

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


def local_args(tmp_path, teacher, output, *extra):
    return ["generate", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / output),
            "--teacher", str(teacher), "--n", "3", "--max-new-tokens", "10", "--seed", "1",
            "--api-key-env", KEY_ENV, *extra]

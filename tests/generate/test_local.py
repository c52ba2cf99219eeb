"""The local teacher: samples, stop strings, dedup, the regex and verifier filters, chat templates."""

import json
import re
import sys
from collections import Counter

from distill.cli import main
from distill.generate.settings import cut_at_stop

from .helpers import KEY, KEY_ENV, PROMPTS, local_args, read_jsonl, write_prompts

VERIFIER = """
import json, os, sys
text = sys.stdin.read()
if "{key_env}" in os.environ:
    sys.exit(3)
with open({log!r}, "a") as f:
    f.write(json.dumps([os.environ["DISTILL_ID"], os.environ["DISTILL_SAMPLE"], os.environ["DISTILL_PROMPT"]]) + "\\n")
sys.exit(0 if len(text) % 2 == 0 else 1)
"""


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

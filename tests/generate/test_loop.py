"""The generation loop end to end: several processes, and output rows that training reads."""

import subprocess
import sys

import pytest

from distill.cli import main

from .helpers import PROMPTS, local_args, read_jsonl, write_prompts


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

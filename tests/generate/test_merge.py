"""Shards merged into the output one unsharded run leaves, with checksums."""

import hashlib

from distill.cli import main

from .helpers import local_args, read_jsonl, write_prompts


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

"""The output files: one run at a time per output."""

from distill.cli import main
from distill.generate.outputs import Appender

from .helpers import write_prompts


def test_two_runs_cannot_share_an_output(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl")
    holder = Appender(tmp_path / "gen.jsonl")
    try:
        assert main(["generate", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "gen.jsonl"),
                     "--api-base", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    finally:
        holder.close()
    assert "being written by another run" in capsys.readouterr().err

"""Progress off a terminal: a few plain lines, not a bar redrawn thousands of times."""

from __future__ import annotations

from distill.progress import progress


def test_off_a_terminal_progress_is_a_few_lines(capsys, monkeypatch):
    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    for _ in progress(range(5000), desc="steps", unit="step"):
        pass
    err = capsys.readouterr().err
    assert len(err) < 400 and err.count("\n") <= 3 and "steps: 5000/5000 step (100%)" in err


def test_progress_can_be_switched_off(capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS", "off")
    for _ in progress(range(10), desc="x"):
        pass
    assert capsys.readouterr().err == ""

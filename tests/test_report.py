"""The report's plots compare like with like."""

import html

import pytest

from distill import report


def test_curves_put_the_task_losses_on_one_axis_unweighted_and_the_distillation_terms_on_another(tmp_path,
                                                                                                  monkeypatch):
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    histories = {
        "student": [{"step": 1, "loss": 0.9, "kd_loss": 0.4, "task_loss": 0.5},
                    {"step": 2, "loss": 0.7, "kd_loss": 0.3, "task_loss": 0.4},
                    {"step": 2, "split": "eval", "accuracy": 80.0}],
        "baseline": [{"step": 1, "loss": 1.2, "task_loss": 1.2}, {"step": 2, "loss": 1.0, "task_loss": 1.0},
                     {"step": 2, "split": "eval", "accuracy": 78.0}],
    }
    report._plot_curves(histories, "accuracy", tmp_path / "curves.png", task_weight=0.5)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    task, terms, evals = figures[0].axes
    lines = {line.get_label(): list(line.get_ydata()) for line in task.lines}
    assert lines == {"student": [1.0, 0.8], "baseline": [1.2, 1.0]}  # the student's 0.5 x CE, divided by 0.5
    assert {line.get_label(): list(line.get_ydata()) for line in terms.lines} == {"student: kd_loss": [0.4, 0.3]}
    assert [list(line.get_ydata()) for line in evals.lines] == [[80.0], [78.0]]


def test_a_teacher_scoring_zero_or_below_gets_no_share_and_no_crash():
    models = {role: {"spearman": value, "parameters": 10, "size_bytes": 100, "latency_ms": 1.0, "throughput": 5.0}
              for role, value in (("teacher", -3.0), ("student", 12.0))}
    rows = report.summarize(models, "spearman")
    assert [r["retention_pct"] for r in rows] == [None, None]
    models["teacher"]["spearman"] = 0.0
    assert report.summarize(models, "spearman")[1]["retention_pct"] is None
    models["teacher"]["spearman"] = 40.0
    assert report.summarize(models, "spearman")[1]["retention_pct"] == pytest.approx(30.0)


def _evals(metric, values, merged=None):
    records = [{"step": 100 * (i + 1), "split": "eval", metric: v} for i, v in enumerate(values)]
    records.insert(1, {"step": 101, "loss": 0.5})  # training records are not evaluations
    return records + ([{"step": 100 * len(values), "split": "eval", metric: merged, "merged_start": 0.2}]
                      if merged is not None else [])


def test_a_validation_score_that_peaks_then_falls_is_reported_as_overtraining(tmp_path):
    note = report.overtraining_note(_evals("agreement", [67.0, 68.9, 68.2, 66.5]), "agreement")
    assert "peaked at step 200 (68.90) and ended at 66.50" in note and "fewer epochs" in note
    # A fall within 1% of the best is noise; a curve still rising is fine; two evaluations say nothing.
    assert report.overtraining_note(_evals("agreement", [67.0, 68.9, 68.5]), "agreement") == ""
    assert report.overtraining_note(_evals("agreement", [60.0, 65.0, 70.0], merged=50.0), "agreement") == ""
    assert report.overtraining_note(_evals("agreement", [70.0, 60.0]), "agreement") == ""
    # Lower is better for perplexity: a rise after its lowest point is the same warning.
    assert "peaked at step 200 (20.00)" in report.overtraining_note(
        _evals("perplexity", [25.0, 20.0, 23.0]), "perplexity", higher_is_better=False)
    models = {role: {"agreement": value, "parameters": 10, "size_bytes": 100, "latency_ms": 1.0, "throughput": 5.0,
                     "size_mb": 1e-4} for role, value in (("teacher", 100.0), ("student", 66.5))}
    summary = {"recipe": "r", "metric": "agreement", "teacher": "t", "student": "s", "data": "d", "losses": "l",
               "steps": 400, "machine": "m", "models": models}
    write = report.write_report(tmp_path, summary, {"student": _evals("agreement", [67.0, 68.9, 68.2, 66.5])})
    assert note in write.read_text() and html.escape(note) in (tmp_path / "report.html").read_text()
    assert report.headline(tmp_path).endswith(note)

import json

import pytest
import torch

from distill.batches import ShuffledBatches, lr_lambda, total_steps
from distill.checkpoint import BestStudent, MetricsLog
from distill.config import TrainSpec


class Items:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, indices):
        return {"index": torch.tensor(indices)}


@pytest.mark.parametrize("lengths", [None, [i % 17 for i in range(103)]])
def test_each_example_once_per_epoch_and_seeded(lengths):
    batches = ShuffledBatches(Items(103), 8, seed=3, lengths=lengths)
    epoch0 = [b["index"].tolist() for b in batches.epoch(0)]
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    assert len(epoch0) == len(batches) == 13
    assert epoch0 == [b["index"].tolist() for b in ShuffledBatches(Items(103), 8, 3, lengths=lengths).epoch(0)]
    assert epoch0 != [b["index"].tolist() for b in batches.epoch(1)]
    assert [b["index"].tolist() for b in batches.epoch(0, skip=5)] == epoch0[5:]


def test_grouping_by_length_cuts_padding():
    lengths = torch.randint(1, 100, (800,)).tolist()
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in (x["index"].tolist() for x in batches.epoch(0)))
    grouped = padding(ShuffledBatches(Items(800), 16, 0, lengths=lengths))
    plain = padding(ShuffledBatches(Items(800), 16, 0))
    assert grouped < plain / 5


def test_processes_split_the_data():
    ranks = [ShuffledBatches(Items(20), 4, 0, rank=r, world=2) for r in (0, 1)]
    seen = [i for s in ranks for b in s.epoch(0) for i in b["index"].tolist()]
    assert sorted(seen) == list(range(20))


def test_schedule_and_steps():
    spec = TrainSpec(epochs=2, grad_accum=2, warmup_ratio=0.1, schedule="linear")
    assert total_steps(11, spec) == 11
    assert total_steps(11, TrainSpec(max_steps=5)) == 5
    f = lr_lambda(spec, 100)
    assert f(0) < f(9) <= 1.0 and f(10) == pytest.approx(1.0) and f(99) < 0.05


def test_metrics_truncate_after_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_best_student_for_a_metric_where_lower_is_better(tmp_path):
    """Perplexity: the best is the lowest; a tie keeps the earlier; only the main process writes;
    evaluations after the best count toward ``train.patience``, records written after training do not."""
    model = torch.nn.Linear(2, 2)
    best = BestStudent(tmp_path / "best", "perplexity", higher_is_better=False, main=True)
    for step, score in ((2, 20.0), (4, 25.0), (6, 18.0), (8, 18.0), (10, 19.0)):
        with torch.no_grad():
            model.weight.fill_(step)
        best.offer(step, score, model)
    assert best.info() == {"step": 6, "score": 18.0, "metric": "perplexity"}
    records = [{"step": s, "split": "eval", "perplexity": p} for s, p in ((6, 18.0), (8, 18.0), (10, 19.0))]
    assert best.behind(records + [{"step": 10, "split": "eval", "perplexity": 18.0, "kept_best": 6}]) == 2
    other = BestStudent(tmp_path / "best", "perplexity", higher_is_better=False, main=False)
    assert not other.offer(12, 1.0, model) and best.info()["step"] == 6
    best.restore(model)
    assert bool((model.weight == 6).all())
    best.resume(4)  # resumed: kept
    assert best.info()["step"] == 6
    best.resume(0)  # started over: forgotten
    assert best.info() is None and best.behind(records) == 0


def test_freeze_by_prefix():
    from distill.errors import RecipeError
    from distill.models.weights import freeze

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    freeze(model, ["0."])
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    with pytest.raises(RecipeError, match="no student parameter starts with 'emb'"):
        freeze(model, ["emb"])


def test_loss_term_schedule_starts_and_ramps():
    from torch import nn

    from distill.step import LossTerm

    term = LossTerm("kd", 1.0, "logits", nn.Identity(), start_step=2, ramp_steps=4)
    assert [term.factor(s) for s in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LossTerm("kd", 1.0, "logits", nn.Identity()).factor(0) == 1.0

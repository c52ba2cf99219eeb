"""distill's training loop against a hand-written PyTorch loop doing the same arithmetic.

Both train the same Fashion-MNIST student (ConvNet width 12) with Hinton KD from the same
teacher (ConvNet width 32, random weights: the arithmetic, not the accuracy, is measured) on
the same batches: 0.5 KD at T=4 + 0.5 cross-entropy, AdamW, gradient clipping at 1.0. The
time per step is taken from the loader (after 5 warm-up steps), so setup is left out; the two
loops alternate, and the ratio of each pair is printed with their median:

    python bench/loop_overhead.py [--steps 60] [--repeats 3] [--threads 1]

A ratio near 1 means distill's loop (Accelerate, loss terms, metrics log, progress, checkpoint
bookkeeping) costs nothing a plain loop does not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill import Distiller
from distill.config import DataSpec
from distill.models.zoo import ConvNet
from distill.tasks import ClassificationTask

BATCH = 128


class Loader:
    """``steps`` batches of 128 in a seeded order; records when each batch is handed out."""

    def __init__(self, task: ClassificationTask, steps: int) -> None:
        self.task, self.steps, self.sampler, self.epoch, self.times = task, steps, self, 0, []
        self.dataset = task.train

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(self.steps):
            batch = self.dataset.batch(order[i * BATCH : (i + 1) * BATCH].tolist())
            self.times.append(time.perf_counter())
            yield batch["inputs"]["x"], batch["labels"]

    def seconds_per_step(self) -> float:
        return (self.times[-1] - self.times[5]) / (len(self.times) - 6)


def with_distill(task: ClassificationTask, teacher: torch.nn.Module, steps: int) -> float:
    torch.manual_seed(1)
    loader = Loader(task, steps)
    folder = Path(tempfile.mkdtemp())
    try:
        Distiller(teacher, ConvNet(width=12), losses=[{"name": "kd", "weight": 0.5, "params": {"temperature": 4.0}}],
                  task_loss_weight=0.5, folder=folder,
                  train={"epochs": 1, "batch_size": BATCH, "lr": 5e-3, "eval_every": 10**9,
                         "checkpoint_every": 10**9, "device": "cpu"}).fit(loader)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return loader.seconds_per_step()


def by_hand(task: ClassificationTask, teacher: torch.nn.Module, steps: int) -> float:
    torch.manual_seed(1)
    student = ConvNet(width=12).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-3, weight_decay=0.01)
    loader = Loader(task, steps)
    for x, y in loader:
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kd = F.kl_div(F.log_softmax(s / 4.0, -1), F.log_softmax(t / 4.0, -1), log_target=True,
                      reduction="batchmean") * 16.0
        (0.5 * kd + 0.5 * F.cross_entropy(s, y)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return loader.seconds_per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion-mnist"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = ClassificationTask(DataSpec(format="fashion-mnist", path=args.data, train_limit=BATCH * args.steps))
    torch.manual_seed(0)
    teacher = ConvNet(width=32).eval().requires_grad_(False)
    ratios = []
    for _ in range(args.repeats):
        ours, plain = with_distill(task, teacher, args.steps), by_hand(task, teacher, args.steps)
        ratios.append(ours / plain)
        print(f"distill {1000 * ours:.1f} ms/step, by hand {1000 * plain:.1f} ms/step, ratio {ratios[-1]:.3f}")
    print(f"median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

"""Fashion-MNIST: distill vs torchdistill on the same distillation; time per epoch and test accuracy.

One process trains the same student twice per method and seed, once with each tool: the two
tools back to back, the first one alternating with the seed, so load changes hit both alike.
It prints for each (tool, method) the wall-clock seconds of a training epoch (median over epochs
and seeds) and the top-1 accuracy on the 10,000 Fashion-MNIST test images after the last epoch,
per seed and averaged:

    .venv/bin/pip install --no-deps torchdistill   # once; keeps the CPU build of torch
    .venv/bin/python bench/torchdistill_compare.py [--epochs 2] [--seeds 0 1 2] [--methods kd hint] [--limit N]

Methods (each with the task's cross-entropy):
  kd    Hinton KD, 0.5 * T^2 * KL(teacher_T || student_T) at T=4, plus 0.5 * cross-entropy.
  hint  FitNets hint, MSE between a learned 1x1 convolution (no bias) of the student's
        ``features.12`` and the teacher's ``features.12`` (weight 1), plus cross-entropy (weight 1).

What both tools share: the teacher (runs/fashion-mnist-teacher/student, ConvNet width 32, eval
mode, run online on every batch: no teacher cache), the student (ConvNet width 12, initialised
under ``torch.manual_seed(seed)``), the data (``distill.tasks.ClassificationTask``: the training
split less the 10% validation hold-out, standardised), the very same batches of 128 in a
per-epoch order from a seeded ``torch.Generator`` (one loader object serves both tools), AdamW
(lr 5e-3, weight decay 0.01), 5% linear warm-up then cosine decay stepped per batch, gradient
norm clipped to 1.0, 2 torch threads, CPU.

Tool A, distill: ``distill.Distiller`` (losses ``kd`` / ``hint`` with ``layers``), trained through
its own loop (Accelerate, per-step metrics log, final checkpoint under runs/compare/).

Tool B, torchdistill: its real ``DistillationBox`` driven from Python with a config dict (no yaml
files): ``WeightedSumLoss`` over its ``KDLoss`` (which includes the cross-entropy through
``alpha``), or over ``MSELoss`` + ``CrossEntropyLoss`` in its ``SimpleLossWrapper``; its forward
hooks (``set_hooks`` / ``register_forward_hook_with_dict``) read ``features.12``; the regressor
is its ``Connector4DAB`` auxiliary student wrapper configured as a single 1x1 Conv2d without
bias and batch norm (torchdistill's own FitNets samples use a ``ConvReg`` adaptation inside a
truncated student for a separate hint stage, which cannot add the cross-entropy of the full
student in the same stage); its optimizer and scheduler registries (AdamW, LambdaLR with
``scheduling_step: 1``) and its ``max_grad_norm`` clipping in ``post_forward_process``. The epoch
loop is the one of torchdistill's example scripts (``pre_epoch_process``, then
``forward_process`` + ``post_forward_process`` per batch, then ``post_epoch_process``). Its
``ForwardHookManager`` probes the two models' ``features.12`` widths to size the regressor.

Epoch time, for both tools alike: from the moment the shared loader starts the epoch to the end
of the optimizer step of the epoch's last batch (a global optimizer step hook), so evaluation and
checkpoints between epochs are not counted. What still differs between the runs: the hint
regressor's initial weights and the dropout masks come from different random draws in the two
tools, and distill's loop also writes a metrics line and a progress-bar update every step
(counted, as part of its cost). distill runs the frozen teacher as it always does, with its
convolution weights in channels-last memory order (``distill.models.layout``); torchdistill runs
the teacher as loaded, in PyTorch's default order. Each tool loads its own copy of the teacher.
On the 54,000 training images one epoch is 422 steps.

Installing torchdistill without touching the venv's torch (2.13.0+cpu)::

    .venv/bin/pip install --no-deps torchdistill   # 1.1.5; its other imports (numpy, pyyaml, scipy) are there

torchdistill imports torchvision at import time (its CIFAR ResNet/DenseNet definitions and its
dataset registry), but PyPI's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build
whose ops library does not load with the CPU torch (``operator torchvision::nms does not
exist``), and the CPU wheels are not on PyPI. So when ``import torchvision`` fails, this script
puts a minimal stand-in into ``sys.modules`` while torchdistill is imported (the five names
torchdistill imports from it, each raising if ever called) and removes it afterwards. None of
the torchdistill components used here touches torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from distill import Distiller
from distill.config import DataSpec
from distill.models.adapters import load_torch_classifier
from distill.models.zoo import ConvNet
from distill.tasks import ClassificationTask, ImageSet

TEACHER = Path("runs/fashion-mnist-teacher/student")
DATA = Path("../shared/data/fashion-mnist")
OUT = Path("runs/compare")
LAYER = "features.12"  # last conv stage (after its ReLU), 14x14: 24 channels (student), 64 (teacher)
STUDENT_WIDTH = 12
BATCH_SIZE = 128
LR = 5e-3
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.05
MAX_GRAD_NORM = 1.0
THREADS = 2
TEMPERATURE = 4.0
DEVICE = torch.device("cpu")

#: method -> distill loss specs and task-loss weight (the torchdistill side is built to match).
OURS: dict[str, tuple[list[dict[str, Any]], float]] = {
    "kd": ([{"name": "kd", "weight": 0.5, "params": {"temperature": TEMPERATURE}}], 0.5),
    "hint": ([{"name": "hint", "weight": 1.0, "layers": {"student": [LAYER], "teacher": [LAYER]}}], 1.0),
}


# ---------------------------------------------------------------- shared data, timing, scoring


class EpochClock:
    """Per-epoch wall time: from the loader's start of an epoch to the last optimizer step in it."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.ends: dict[int, float] = {}
        self.epoch = 0
        self._handle: Any = None

    def begin(self, epoch: int) -> None:
        self.epoch = epoch
        self.starts[epoch] = time.perf_counter()
        self.ends.pop(epoch, None)

    def _step_done(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.ends[self.epoch] = time.perf_counter()

    def __enter__(self) -> EpochClock:
        self._handle = register_optimizer_step_post_hook(self._step_done)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def seconds(self) -> list[float]:
        return [self.ends[e] - self.starts[e] for e in sorted(self.ends)]


class SeededLoader:
    """``(x, y)`` batches of an :class:`ImageSet` in a seeded order per epoch (``set_epoch``).

    ``sampler`` is the loader itself, so that ``Distiller`` (which calls ``loader.sampler.set_epoch``)
    and the torchdistill loop (which calls ``set_epoch`` here) see the same order.
    """

    def __init__(self, data: ImageSet, batch_size: int, seed: int, clock: EpochClock) -> None:
        self.dataset, self.batch_size, self.seed, self.clock = data, batch_size, seed, clock
        self.sampler = self
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.clock.begin(self.epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=gen)
        for start in range(0, len(order), self.batch_size):
            batch = self.dataset.batch(order[start : start + self.batch_size].tolist())
            yield batch["inputs"]["x"], batch["labels"]


@torch.inference_mode()
def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on every example of ``data``."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(range(start, min(start + batch_size, len(data))))
        correct += int((model(batch["inputs"]["x"]).argmax(-1) == batch["labels"]).sum())
    return 100.0 * correct / len(data)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up over 5% of ``steps``, then cosine to 0."""
    warmup = int(WARMUP_RATIO * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def load_teacher() -> nn.Module:
    return load_torch_classifier(None, {}, str(TEACHER)).module.eval().requires_grad_(False)


def make_student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(width=STUDENT_WIDTH)


# ---------------------------------------------------------------- tool A: distill


def train_distill(method: str, loader: SeededLoader, epochs: int, seed: int) -> nn.Module:
    """Distil with ``distill.Distiller``; returns the trained student."""
    losses, task_weight = OURS[method]
    folder = OUT / f"distill-{method}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a Distiller resumes from a checkpoint it finds
    train = {"epochs": epochs, "batch_size": BATCH_SIZE, "lr": LR, "weight_decay": WEIGHT_DECAY,
             "warmup_ratio": WARMUP_RATIO, "schedule": "cosine", "max_grad_norm": MAX_GRAD_NORM,
             "eval_every": 10**9, "checkpoint_every": 10**9, "device": "cpu", "threads": THREADS}
    distiller = Distiller(load_teacher(), make_student(seed), losses=losses, task_loss_weight=task_weight,
                          train=train, folder=folder, seed=seed)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines stay off the JSON lines on stdout
        distiller.fit(loader)
    return distiller.student.module


# ---------------------------------------------------------------- tool B: torchdistill


class _NotInstalled:
    """Stands for a torchvision name that torchdistill imports but this benchmark never uses."""

    expansion = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision is not installed (a stand-in was imported for torchdistill)")


_TORCHVISION_STUB: dict[str, dict[str, Any]] = {
    "torchvision": {},
    "torchvision.datasets": {},
    "torchvision.models": {},
    "torchvision.models.resnet": {"BasicBlock": _NotInstalled, "conv1x1": _NotInstalled},
    "torchvision.models.densenet": {"_DenseBlock": _NotInstalled, "_Transition": _NotInstalled},
}


def _stub_torchvision() -> list[str]:
    """Put the stand-in modules into ``sys.modules``; returns their names."""
    for name, attrs in _TORCHVISION_STUB.items():
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so that submodule imports resolve from sys.modules
        module.__dict__.update(attrs)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return list(_TORCHVISION_STUB)


def import_torchdistill() -> types.SimpleNamespace:
    """torchdistill's DistillationBox and ForwardHookManager, importing it with a torchvision stand-in if needed."""
    stubbed: list[str] = []
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a CUDA build whose ops cannot load with this CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stubbed = _stub_torchvision()
    try:
        import torchdistill
        from torchdistill.core.distillation import DistillationBox
        from torchdistill.core.forward_hook import ForwardHookManager
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return types.SimpleNamespace(version=torchdistill.__version__, DistillationBox=DistillationBox,
                                 ForwardHookManager=ForwardHookManager)


def feature_widths(td: types.SimpleNamespace, student: nn.Module, teacher: nn.Module, x: Tensor) -> tuple[int, int]:
    """Channels of ``LAYER`` in the student and the teacher, read with torchdistill's ForwardHookManager."""
    widths = []
    for model in (student, teacher):
        manager = td.ForwardHookManager(DEVICE)
        manager.add_hook(model, LAYER, requires_input=False, requires_output=True)
        was_training = model.training
        with torch.no_grad():
            model.eval()(x)  # eval: the probe must not move batch-norm statistics
        model.train(was_training)
        widths.append(manager.pop_io_dict()[LAYER]["output"].shape[1])
        manager.clear()
    return widths[0], widths[1]


def _wrapped(criterion: dict[str, Any], source: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """A torchdistill loss term: ``criterion`` fed by SimpleLossWrapper from ``source`` and ``target``."""
    return {"criterion": criterion, "weight": 1.0,
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {"input": source, "target": target}}}


def torchdistill_models(method: str, widths: tuple[int, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher and student sections of torchdistill's train config."""
    teacher: dict[str, Any] = {"forward_proc": "forward_batch_only", "requires_grad": False}
    student: dict[str, Any] = {"forward_proc": "forward_batch_only", "requires_grad": True}
    if method == "hint":
        conv = {"in_channels": widths[0], "out_channels": widths[1], "kernel_size": 1, "bias": False}
        connector = {"io": "output", "path": f"student_model.{LAYER}", "conv2d_kwargs": conv}
        wrapper = {"key": "Connector4DAB", "kwargs": {"connectors": {"regressor": connector}}}
        student["auxiliary_model_wrapper"] = wrapper
        student["forward_hook"] = {"output": [f"student_model.{LAYER}", "connector_dict.regressor"]}
        teacher["forward_hook"] = {"output": [LAYER]}
    return teacher, student


def torchdistill_criterion(method: str) -> dict[str, Any]:
    """The criterion section of torchdistill's train config."""
    logits = {"is_from_teacher": False, "module_path": ".", "io": "output"}
    if method == "kd":
        kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                          "teacher_module_path": ".", "teacher_module_io": "output",
                                          "temperature": TEMPERATURE, "alpha": 0.5}}  # 0.5 CE + 0.5 T^2 KL
        terms = {"kd": {"criterion": kd, "weight": 1.0}}
    else:
        mse = {"key": "MSELoss", "kwargs": {"reduction": "mean"}}
        regressed = {"is_from_teacher": False, "module_path": "connector_dict.regressor", "io": "output"}
        hint = {"is_from_teacher": True, "module_path": LAYER, "io": "output"}
        ce = {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}}
        terms = {"hint": _wrapped(mse, regressed, hint), "ce": _wrapped(ce, logits, {"uses_label": True})}
    return {"key": "WeightedSumLoss", "kwargs": {"sub_terms": terms}}


def torchdistill_config(method: str, widths: tuple[int, int], epochs: int, steps: int) -> dict[str, Any]:
    """A DistillationBox train config (what torchdistill's yaml files hold), as a Python dict."""
    teacher, student = torchdistill_models(method, widths)
    return {
        "num_epochs": epochs,
        "teacher": teacher,
        "student": student,
        "criterion": torchdistill_criterion(method),
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": WEIGHT_DECAY},
                      "max_grad_norm": MAX_GRAD_NORM},
        "scheduler": {"key": "LambdaLR", "kwargs": {"lr_lambda": warmup_cosine(steps)}, "scheduling_step": 1},
    }


def train_torchdistill(td: types.SimpleNamespace, method: str, loader: SeededLoader, epochs: int,
                       seed: int) -> nn.Module:
    """Distil with torchdistill's DistillationBox and the epoch loop of its example scripts."""
    teacher, student = load_teacher(), make_student(seed)
    widths = feature_widths(td, student, teacher, loader.dataset.batch(range(2))["inputs"]["x"])
    config = torchdistill_config(method, widths, epochs, epochs * len(loader))
    box = td.DistillationBox(teacher, student, {}, config, DEVICE, None, False, 1)
    torch.manual_seed(seed)  # dropout
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        box.pre_epoch_process(epoch=epoch)
        for x, y in loader:
            loss = box.forward_process(x, y)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
    box.clean_modules()
    return student


# ---------------------------------------------------------------- running and reporting


def run_one(tool: str, method: str, seed: int, td: types.SimpleNamespace, task: ClassificationTask,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train one (tool, method) pair; returns its timings and test accuracy."""
    with EpochClock() as clock:
        loader = SeededLoader(task.train, BATCH_SIZE, seed, clock)
        if tool == "distill":
            student = train_distill(method, loader, args.epochs, seed)
        else:
            student = train_torchdistill(td, method, loader, args.epochs, seed)
    seconds = clock.seconds()
    return {"tool": tool, "method": method, "seed": seed, "epochs": args.epochs,
            "train_examples": len(task.train), "steps_per_epoch": len(loader),
            "epoch_seconds": [round(s, 3) for s in seconds],
            "median_epoch_seconds": round(statistics.median(seconds), 3),
            "accuracy": accuracy(student, task.splits["test"])}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table per (tool, method): epoch time, accuracy per seed and mean, and distill's
    time over torchdistill's (median of the per-seed ratios)."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["tool"], r["method"], r["seed"]): r for r in rows}
    lines = ["| tool | method | time/epoch (s) median | " + " | ".join(f"accuracy seed {s}" for s in seeds)
             + " | accuracy mean ± std | our time / their time |", "|" + "---|" * (len(seeds) + 5)]
    for tool, method in dict.fromkeys((r["tool"], r["method"]) for r in rows):
        mine = [by[(tool, method, s)] for s in seeds if (tool, method, s) in by]
        seconds = statistics.median(t for r in mine for t in r["epoch_seconds"])
        accs = [r["accuracy"] for r in mine]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = "-"
        if tool == "distill":
            ratios = [statistics.median(by[("distill", method, s)]["epoch_seconds"])
                      / statistics.median(by[("torchdistill", method, s)]["epoch_seconds"])
                      for s in seeds if ("torchdistill", method, s) in by and ("distill", method, s) in by]
            ratio = f"{statistics.median(ratios):.3f}" if ratios else "-"
        cells = [tool, method, f"{seconds:.2f}"]
        cells += [f"{by[(tool, method, s)]['accuracy']:.2f}" if (tool, method, s) in by else "-" for s in seeds]
        cells += [f"{statistics.mean(accs):.2f} ± {spread:.2f}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows_from(path: Path) -> list[dict[str, Any]]:
    """The result lines an earlier run printed (its stdout, saved to a file)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"tool"')]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="an earlier run's saved output: its results join the table (other seeds)")
    parser.add_argument("--methods", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument("--limit", type=int, help="train on only the first N training examples (quick checks)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the Fashion-MNIST IDX files")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not (TEACHER / "model.safetensors").is_file():
        print(f"teacher not found at {TEACHER}: train it first with\n"
              "    .venv/bin/distill run recipes/fashion-mnist-teacher.yaml", file=sys.stderr)
        sys.exit(2)
    try:
        td = import_torchdistill()
    except ImportError as exc:
        print(f"cannot import torchdistill ({exc}): install it with\n"
              "    .venv/bin/pip install --no-deps torchdistill", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(THREADS)
    task = ClassificationTask(DataSpec(format="fashion-mnist", path=args.data, train_limit=args.limit))
    print(json.dumps({"torch": torch.__version__, "torchdistill": td.version, "threads": torch.get_num_threads(),
                      "teacher_accuracy": accuracy(load_teacher(), task.splits["test"])}), flush=True)
    rows = [row for path in args.add for row in _rows_from(path)]
    for seed in args.seeds:
        # Odd seeds run torchdistill first, so that neither tool always goes first.
        tools = ("distill", "torchdistill") if seed % 2 == 0 else ("torchdistill", "distill")
        for method in args.methods:
            for tool in tools:
                rows.append(run_one(tool, method, seed, td, task, args))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()

"""Several processes: started by torch's own launcher, and what each one knows of the others.

``distill run RECIPE --nproc N`` hands the same command, without ``--nproc``, to
``torch.distributed.run`` (the launcher behind ``torchrun``), which starts N processes on this
machine with a rendezvous on a free port. ``torchrun --nproc_per_node N -m distill.cli run
RECIPE`` and ``accelerate launch -m distill.cli run RECIPE`` start the same processes, on one
machine or several (then the run folder and ``cache.dir`` must be on a file system they share).
Each process finds its rank and the process count in the environment the launcher set, through
Accelerate; on CPU they talk over ``gloo``, on GPU over ``nccl``.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import PartialState
from torch import nn

from distill.config import TrainSpec
from distill.errors import DistillError, RecipeError

__all__ = ["launch", "launched", "process_state", "shard_frozen", "sharded_teacher", "sync_batchnorm", "use_cpu"]

log = logging.getLogger(__name__)


def use_cpu(spec: TrainSpec) -> bool:
    """Whether ``train.device`` puts the run on the CPU; a device the recipe names must exist."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: 'cuda', but PyTorch sees no CUDA device here (use 'auto' or 'cpu')")
    if spec.device == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("train.device: 'mps', but PyTorch sees no Apple GPU here (use 'auto' or 'cpu')")
    return spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available())


def launched() -> bool:
    """Whether this process was started by a distributed launcher (``torchrun``, ``accelerate launch``)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(argv: list[str], nproc: int) -> int:
    """Run ``distill ARGV`` in ``nproc`` processes on this machine; return the exit status.

    Each process gets ``cores / nproc`` CPU threads unless ``OMP_NUM_THREADS`` says otherwise.
    When a process fails, the launcher stops the others; the status is the first failure's
    (128 + N for a process killed by signal N).
    """
    if nproc < 1:
        raise DistillError(f"--nproc: {nproc}; give 1 or more processes")
    if launched():
        raise DistillError(f"--nproc: this process is already one of {os.environ['WORLD_SIZE']} started by a "
                           "launcher; leave --nproc out under torchrun or accelerate launch")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    parser = get_args_parser()
    # distill's own options follow the module name; without abbreviations none of them can pass
    # for one of the launcher's (``--n`` would read as ``--nnodes``/``--nproc-per-node``).
    parser.allow_abbrev = False
    args = parser.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "distill.cli", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        code = next((c for c in codes if c), 1)
        return 128 - code if code < 0 else code
    return 0


def process_state(spec: TrainSpec) -> PartialState:
    """This process's place among the run's processes (``process_index``, ``num_processes``,
    ``device``, ``wait_for_everyone``): one process unless a launcher started several.

    Made once per process, for the recipe's device (it joins the other processes then); the
    recipe's ``train.threads`` is applied first.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return PartialState(cpu=use_cpu(spec))


def sharded_teacher(spec: TrainSpec, processes: int) -> bool:
    """Whether a run shards its frozen teacher between its processes (``train.shard_teacher`` with
    more than one process): the teacher then runs online, whole nowhere."""
    return spec.shard_teacher and processes > 1


def sync_batchnorm(module: nn.Module, state: PartialState) -> nn.Module:
    """With several GPU processes, batch-norm layers normalise over the global batch (their
    statistics are reduced across processes), as they would in one process.

    PyTorch's synchronised batch norm runs on GPUs only: on CPU each process normalises its own
    share of the batch (a warning says so).
    """
    if state.num_processes == 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    if state.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if state.is_main_process:
        log.warning("the student's batch-norm layers see each process's share of the batch, not the global batch: "
                    "synchronised batch norm needs GPUs, so %d CPU processes train it slightly differently from one",
                    state.num_processes)
    return module


def shard_frozen(module: nn.Module, device: torch.device, processes: int) -> tuple[int, int]:
    """Shard a frozen model's weights across the ``processes`` processes with FSDP
    (``fully_shard``), in place, onto ``device``.

    Each transformer block (the classes a ``transformers`` model lists in ``_no_split_modules``)
    is one unit and the rest of the model another: a forward pass gathers one unit's weights at
    a time and frees them after, so a process holds its 1/N share plus one unit. Every process
    must then call the model together (the same number of forward passes, in the same order).
    Outputs that are weights (an output head) come back as ``DTensor`` and are gathered by the
    caller (``DTensor.full_tensor``).

    Returns:
        The parameters this process keeps and the model's total.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (processes,))
    blocks = set(getattr(module, "_no_split_modules", None) or ())
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
    total = sum(p.numel() for p in module.parameters())
    return local, total

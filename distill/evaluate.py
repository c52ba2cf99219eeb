"""Measure a model: quality, parameters, size on disk, CPU latency and throughput."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill.config import EvalSpec
from distill.models.adapters import Adapter
from distill.models.derive import count_parameters

__all__ = ["folder_size", "measure", "time_forward"]


def folder_size(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


@torch.inference_mode()
def time_forward(model: Adapter, inputs: list[dict[str, Any]], repeats: int, warmup: int) -> list[float]:
    """Seconds per forward pass (inputs included: tokenisation is part of serving a text model)."""
    for i in range(warmup):
        model(inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        model(inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    return times


def _split(inputs: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def measure(model: Adapter, task: Any, spec: EvalSpec, saved: Path | None = None) -> dict[str, Any]:
    """All figures of one model, on the CPU it runs on now.

    Args:
        model: The adapter to measure.
        task: Supplies the test split and real inputs for timing.
        spec: Repeats, warm-up and batch size.
        saved: The model's saved folder; when ``None`` the model is saved to a temporary folder
            the same way, so sizes are comparable.
    """
    model.module.eval()
    quality = task.evaluate(model, "test")
    if saved is None:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp))
            size = folder_size(Path(tmp))
    else:
        size = folder_size(saved)
    sample = task.sample_inputs(max(spec.batch_size, 16))
    singles = [_split(sample, i) for i in range(16)]
    latency = time_forward(model, singles, spec.latency_repeats, spec.warmup)
    batch = {k: v[: spec.batch_size] for k, v in sample.items()}
    batch_times = time_forward(model, [batch], spec.throughput_repeats, spec.warmup)
    n = len(next(iter(batch.values())))
    return {
        task.metric: quality,
        "parameters": count_parameters(model.module),
        "size_bytes": size,
        "latency_ms": 1000 * statistics.median(latency),
        "latency_ms_spread": 1000 * (max(latency) - min(latency)),
        "throughput": n / statistics.median(batch_times),
        "threads": torch.get_num_threads(),
    }

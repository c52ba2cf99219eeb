"""Memory layout of a frozen teacher, which only ever runs forward passes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["channels_last_for_inference"]


def channels_last_for_inference(module: nn.Module) -> bool:
    """Store the weights of a model with 2-D convolutions in channels-last order, in place.

    A convolution whose weight is channels-last writes channels-last outputs, which the CPU
    (oneDNN) and GPU (cuDNN) kernels run faster than the default layout (measured with
    ``bench/torchdistill_compare.py``, whose teacher is a ConvNet). Values agree with
    the default layout to float rounding; shapes and layer names do not change, so hooks on
    named layers still work. Training a student this way is left alone: its checkpoints and
    saved weights keep the default layout.

    Returns:
        Whether the model has 2-D convolutions (and was changed).
    """
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return False
    module.to(memory_format=torch.channels_last)
    return True

"""GGUF files as teachers: how ``transformers`` is asked to read one, and how such a model is saved.

``transformers`` reads a ``.gguf`` file (llama.cpp's format) given its folder and file name and
dequantises the weights to the requested dtype. The model it returns carries a GGUF
quantisation entry in its config and refuses ``save_pretrained``; :func:`plain_model` gives
the same weights in a model that saves like any other.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import ModelError

__all__ = ["from_pretrained_args", "is_gguf", "plain_config", "plain_model"]


def is_gguf(source: str) -> bool:
    """Whether a model source names a GGUF file."""
    return source.lower().endswith(".gguf")


def from_pretrained_args(source: str) -> tuple[str, dict[str, Any]]:
    """``(folder, {"gguf_file": name})`` for a ``.gguf`` file, ``(source, {})`` for anything else.

    Raises:
        ModelError: The source is a GGUF file and the ``gguf`` package is not installed.
    """
    if not is_gguf(source):
        return source, {}
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model source {source}: reading a GGUF file needs the 'gguf' package: pip install gguf")
    path = Path(source)
    return str(path.parent), {"gguf_file": path.name}


def plain_config(config: Any) -> Any:
    """A copy of ``config`` without a GGUF quantisation entry (the weights are already dequantised)."""
    config = copy.deepcopy(config)
    quant = getattr(config, "quantization_config", None)
    if quant is not None and _method(quant) == "gguf":
        del config.quantization_config
    return config


def plain_model(module: nn.Module) -> nn.Module:
    """``module`` itself, or, for a model read from a GGUF file, the same class and weights
    built from :func:`plain_config`, which ``save_pretrained`` accepts."""
    quant = getattr(getattr(module, "config", None), "quantization_config", None)
    if quant is None or _method(quant) != "gguf":
        return module
    plain = type(module)(plain_config(module.config))
    plain.load_state_dict(module.state_dict())
    return plain.to(next(module.parameters()).dtype)


def _method(quant: Any) -> str:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower()

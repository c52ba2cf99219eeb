"""Adapters turn a model into named output tensors and save it in the format it came in.

An adapter is what the engine, the cache and the evaluator see of a model: call it on a batch
of inputs, get ``{"logits": ...}`` or ``{"embedding": ...}`` (text models add ``token_mask``,
``(N, T)``, 1 for real tokens). Intermediate layers are added under their own names by
:class:`distill.features.TappedAdapter`, through forward hooks, without changing the callers.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.errors import ModelError
from distill.models.hf import HFTextAdapter, device_of, pool, unwrap
from distill.models.zoo import ARCHITECTURES
from distill.registry import suggest

__all__ = [
    "Adapter",
    "HFClassifierAdapter",
    "HFEmbeddingAdapter",
    "TorchClassifierAdapter",
    "data_arch_args",
    "load_torch_classifier",
    "require_transformers",
]


class Adapter(Protocol):
    """What distill needs from a model."""

    module: nn.Module
    """The underlying ``nn.Module`` (the engine may replace it with a wrapped version)."""

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """Run the model on a batch of raw inputs and return its named outputs."""
        ...

    def save(self, folder: Path) -> None:
        """Write the model to ``folder`` in a format loadable without distill."""
        ...


def require_transformers() -> Any:
    """Import ``transformers`` or explain which extra to install."""
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "Hugging Face models need the 'hf' extra: pip install 'distill[hf]'"
        ) from None
    return transformers


class TorchClassifierAdapter:
    """A plain PyTorch classifier taking ``inputs["x"]`` and returning ``logits``.

    Args:
        module: The classifier.
        arch: Registry name of its architecture, written next to the weights.
        arch_args: Keyword arguments that rebuild the architecture.
    """

    outputs = ("logits",)

    def __init__(self, module: nn.Module, arch: str, arch_args: dict[str, Any],
                 preprocessing: dict[str, Any] | None = None) -> None:
        self.module = module
        self.arch = arch
        self.arch_args = dict(arch_args)
        self.preprocessing = preprocessing
        """What its inputs are (channels, size, per-channel mean and std, class names), written
        beside the weights for the model card; ``None`` when unknown."""

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        return {"logits": self.module(inputs["x"].to(device_of(self.module)))}

    def save(self, folder: Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (architecture and its arguments)."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(self.module).state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"arch": self.arch})
        config = {"arch": self.arch, "arch_args": self.arch_args}
        if self.preprocessing is not None:
            config["preprocessing"] = self.preprocessing
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def data_arch_args(arch: str | None, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``given`` completed with the arguments of ``defaults`` (what the data decides: classes,
    channels) that the architecture takes and the recipe leaves out."""
    if arch is None:
        return dict(given)
    accepted = inspect.signature(ARCHITECTURES.get(arch)).parameters
    return {**{k: v for k, v in defaults.items() if k in accepted}, **given}


def load_torch_classifier(arch: str | None, arch_args: dict[str, Any], source: str | None) -> TorchClassifierAdapter:
    """Build a registry architecture, loading weights from ``source`` when given.

    ``source`` may be a ``.safetensors`` file or a folder that distill saved (with
    ``config.json``, whose architecture is used when ``arch`` is not given).
    """
    path = Path(source).expanduser() if source else None
    preprocessing = None
    if path is not None and path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{config_file} is damaged (not JSON: {exc}); save the model again") from None
            arch = arch or config.get("arch")
            arch_args = {**config.get("arch_args", {}), **arch_args}
            preprocessing = config.get("preprocessing")
        path = path / "model.safetensors"
    if arch is None:
        raise ModelError("torch model: give arch (an architecture name) or a folder distill saved")
    cls = ARCHITECTURES.get(arch)
    try:
        module = cls(**arch_args)
    except TypeError:
        allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
        bad = [k for k in arch_args if k not in allowed]
        hint = suggest(bad[0], allowed) if bad else ""
        raise ModelError(f"arch_args of '{arch}': {bad or arch_args} not accepted;{hint} it takes "
                         f"{', '.join(allowed)}") from None
    if path is not None:
        if not path.is_file():
            raise ModelError(f"torch model: weights file not found: {path}")
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ModelError(f"torch model: cannot read {path}: {exc}") from None
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"torch model: {path} does not fit architecture '{arch}' {arch_args}: "
                f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
            )
    return TorchClassifierAdapter(module, arch, arch_args, preprocessing)


class HFEmbeddingAdapter(HFTextAdapter):
    """A ``transformers`` encoder pooled into sentence embeddings: ``inputs["text"]`` -> ``embedding``.

    Args:
        module: An ``AutoModel`` encoder.
        tokenizer: Its tokenizer.
        pooling: ``mean`` over non-padding tokens, or the ``cls`` token.
        normalize: L2-normalise the pooled vector.
        max_length: Truncation length in tokens.
    """

    outputs = ("embedding",)

    def __init__(self, module: nn.Module, tokenizer: Any, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 128) -> None:
        super().__init__(module, tokenizer, max_length)
        self.pooling = pooling
        self.normalize = normalize

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        enc = self.tokenize(inputs["text"])
        hidden = self.module(**enc).last_hidden_state
        pooled = pool(hidden, enc["attention_mask"], self.pooling, self.normalize)
        return {"embedding": pooled, "token_mask": enc["attention_mask"]}

    def save(self, folder: Path) -> None:
        """Hugging Face folder (safetensors, tokenizer) plus sentence-transformers module files."""
        self.save_hf(folder)
        dim = unwrap(self.module).config.hidden_size
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2) + "\n"
        )
        pooling = {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        if self.normalize:
            (folder / "2_Normalize").mkdir(exist_ok=True)


class HFClassifierAdapter(HFTextAdapter):
    """A ``transformers`` sequence classifier: ``inputs["text"]`` (and ``inputs["text_pair"]``, the
    second texts of pairs) -> ``logits``."""

    outputs = ("logits",)
    untrained: list[str] = []
    """Weights that were not in the folder it was loaded from and start random (a head added to
    a plain encoder)."""

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        enc = self.tokenize(inputs["text"], pairs=inputs.get("text_pair"))
        return {"logits": self.module(**enc).logits, "token_mask": enc["attention_mask"]}

    def save(self, folder: Path) -> None:
        """Hugging Face folder: config, safetensors weights and tokenizer."""
        self.save_hf(folder)

"""The local teacher: a Hugging Face causal LM run in this process."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from distill.errors import DistillError, ModelError
from distill.generate.prompts import PromptRow
from distill.generate.settings import Sampling
from distill.models.sources import resolve_source

__all__ = ["DTYPES", "LocalTeacher"]

# Every module of the package logs as "distill.generate", the name its lines have always carried.
log = logging.getLogger(__package__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What ``--dtype`` accepts."""


class LocalTeacher:
    """A Hugging Face causal LM run here (loaded on the first prompt).

    Args:
        source: A local folder, ``pkg://`` path or Hub id (see :func:`distill.models.sources.resolve_source`).
        sampling: How to sample.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: Weights' dtype; ``auto`` is bfloat16 on CUDA, float32 elsewhere.
        trust_remote_code: Let ``transformers`` run the model repository's own code.
    """

    def __init__(self, source: str, sampling: Sampling, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False) -> None:
        if dtype not in DTYPES:
            raise DistillError(f"--dtype: unknown dtype '{dtype}'; known: {', '.join(DTYPES)}")
        self.source = resolve_source(source)
        self.sampling = sampling
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self._loaded: tuple[Any, Any, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """The source, and for a local folder a hash of its ``config.json``."""
        ident: dict[str, Any] = {"kind": "hf-causal-lm", "source": self.source}
        config = Path(self.source) / "config.json"
        if config.is_file():
            ident["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        return ident

    def _load(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            import torch

            from distill.models.adapters import require_transformers

            transformers = require_transformers()
            # Under --nproc, process i takes GPU i.
            gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            device = (gpu if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ModelError(f"--device {device}: this machine's torch sees no CUDA GPU; use --device cpu or auto")
            dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.source, trust_remote_code=self.trust_remote_code)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.source, dtype=getattr(torch, dtype), trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load teacher '{self.source}': {exc}") from None
            model.to(device).eval()
            log.info("teacher %s on %s (%s)", self.source, device, dtype)
            self._loaded = (torch, model, tokenizer)
        return self._loaded

    def complete(self, row: PromptRow, count: int, seed: int) -> list[str]:
        """Sample ``count`` completions; greedy decoding (temperature 0) runs once and repeats it.

        Raises:
            ModelError: A chat row, and the tokenizer has no chat template.
        """
        torch, model, tokenizer = self._load()
        if row.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise ModelError(f"teacher '{self.source}': its tokenizer has no chat template, so it cannot "
                                 f"answer 'messages' rows (row id {row.id!r}); give 'prompt' rows instead")
            text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tokenizer(row.prompt, return_tensors="pt")
        # Ids and mask only: a tokenizer may add token_type_ids, which most causal LMs do not take.
        enc = {k: enc[k].to(model.device) for k in ("input_ids", "attention_mask") if k in enc}
        s = self.sampling
        greedy = s.temperature == 0
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": not greedy,
                                  "num_return_sequences": 1 if greedy else count,
                                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id}
        if not greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        if s.stop:  # stops early; the text is still cut exactly by cut_at_stop
            kwargs.update(stop_strings=list(s.stop), tokenizer=tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts * count if greedy else texts

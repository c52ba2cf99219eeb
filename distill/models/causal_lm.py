"""Causal language models from ``transformers``: the adapter that token-level losses read.

The adapter never computes the ``(batch, tokens, vocab)`` logits. It returns the final hidden
state of every position that predicts a next token and the output head, and the losses
(:func:`distill.losses.tokens.chunked_token_loss`, :func:`~distill.losses.tokens.chunked_cross_entropy`)
turn them into logits one chunk of tokens at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.models.adapters import _HFTextAdapter, _unwrap

__all__ = ["HFCausalLMAdapter"]


class HFCausalLMAdapter(_HFTextAdapter):
    """A ``transformers`` ``AutoModelForCausalLM``: ``inputs["text"]`` -> next-token states.

    Outputs, for a batch padded to ``T`` tokens:

    ``hidden``      ``(B, T-1, H)`` the final (normalised) hidden state at positions ``0..T-2``,
                    each of which predicts the token after it;
    ``targets``     ``(B, T-1)`` those next tokens;
    ``token_mask``  ``(B, T-1)`` 1 where the next token is real text (not padding);
    ``head``        ``(V, H)`` the output head's weight (``head_bias`` too, when it has one).

    Args:
        module: The causal LM.
        tokenizer: Its tokenizer; one without a padding token pads with its end-of-text token
            (padded positions are masked out, so the choice does not matter).
        max_length: Truncation length in tokens.
    """

    outputs = ("hidden",)

    def __init__(self, module: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        super().__init__(module, tokenizer, max_length)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        enc = self.tokenize(inputs["text"])
        model = _unwrap(self.module)
        # The body alone (embeddings, blocks, final norm): the head is applied by the loss, in chunks.
        hidden = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        head = model.get_output_embeddings()
        out = {
            "hidden": hidden[:, :-1],
            "targets": enc["input_ids"][:, 1:],
            "token_mask": enc["attention_mask"][:, 1:],
            "head": head.weight,
        }
        if getattr(head, "bias", None) is not None:
            out["head_bias"] = head.bias
        return out

    def save(self, folder: Path) -> None:
        """Hugging Face folder: config, safetensors weights and tokenizer."""
        self._save_hf(folder)

"""Causal language models from ``transformers``: the adapter that token-level losses read.

The adapter never computes the ``(batch, tokens, vocab)`` logits. It returns the final hidden
state of every position that predicts a next token and the output head, and the losses
(:func:`distill.losses.tokens.chunked_token_loss`, :func:`~distill.losses.tokens.chunked_cross_entropy`)
turn them into logits one chunk of tokens at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import DataError
from distill.models.hf import HFTextAdapter, device_of, unwrap

__all__ = ["HFCausalLMAdapter", "byte_level_bpe", "token_pieces"]


def byte_level_bpe(text: str, vocab_size: int, eos_token: str = "<|endoftext|>") -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``text``, for a causal LM trained from
    scratch: any string encodes, and ``eos_token`` is its end-of-text token (id 0).

    Returns a ``transformers`` ``PreTrainedTokenizerFast`` (``save_pretrained`` writes it beside a model).
    """
    import tokenizers
    import transformers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos_token)


class HFCausalLMAdapter(HFTextAdapter):
    """A ``transformers`` ``AutoModelForCausalLM``: text, prompt/completion or chat -> next-token states.

    Outputs, for a batch padded to ``T`` tokens:

    ``hidden``      ``(B, T-1, H)`` the final (normalised) hidden state at positions ``0..T-2``,
                    each of which predicts the token after it;
    ``targets``     ``(B, T-1)`` those next tokens;
    ``token_mask``  ``(B, T-1)`` 1 where the next token is one to learn: real text, not padding,
                    and not part of a prompt (see :meth:`encode`);
    ``head``        ``(V, H)`` the output head's weight (``head_bias`` too, when it has one);
    ``token_ends``  ``(B, T-1)`` with :attr:`with_token_ends`, on text batches: the character of the
                    text at which each position's token ends (``-1`` for padding), which pairs
                    positions with a model of another tokenizer (the ``cross_vocab_kd`` loss).

    Args:
        module: The causal LM.
        tokenizer: Its tokenizer; one without a padding token pads with its end-of-text token
            (padded positions are masked out, so the choice does not matter).
        max_length: Truncation length in tokens.
    """

    outputs = ("hidden",)
    with_token_ends: bool = False
    """Also return ``token_ends`` (set by the pairing when a loss compares across tokenizers)."""

    def __init__(self, module: nn.Module, tokenizer: Any, max_length: int = 256) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        super().__init__(module, tokenizer, max_length)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        enc = self.encode(inputs)
        model = unwrap(self.module)
        # Through the (possibly distributed) wrapper, so that its gradient synchronisation runs,
        # with logits for the last position only: the loss applies the head itself, in chunks.
        # The last hidden state is the body's output after its final norm.
        hidden = self.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        head = model.get_output_embeddings()
        out = {
            "hidden": hidden[:, :-1],
            "targets": enc["input_ids"][:, 1:],
            "token_mask": enc["loss_mask"][:, 1:],
            "head": head.weight,
        }
        if getattr(head, "bias", None) is not None:
            out["head_bias"] = head.bias
        if "offset_mapping" in enc:
            ends = enc["offset_mapping"][..., 1].masked_fill(enc["attention_mask"] == 0, -1)
            out["token_ends"] = ends[:, :-1]
        return out

    def encode(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """Token ids, attention mask and loss mask of a batch of ``text``, ``prompt`` +
        ``completion`` or chat ``messages``.

        ``loss_mask`` is 1 on the tokens the model must learn to produce: every real token of a
        text; only the completion's tokens (and the end-of-text token after it) for a prompt and
        completion; only the last assistant turn of a chat, as the chat template renders it.
        """
        if "text" in inputs:
            enc = self.tokenize(inputs["text"], offsets=self.with_token_ends and self.tokenizer.is_fast)
            return {**enc, "loss_mask": enc["attention_mask"]}
        if "prompt_ids" in inputs:  # already token ids (continuations written by a model, see continue_prompts)
            return self._join(inputs["prompt_ids"], inputs["completion_ids"])
        prompts, completions = self._prompt_parts(inputs)
        return self._join(prompts, completions)

    def _prompt_parts(self, inputs: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of the prompts and completions of prompt/completion or chat records."""
        if "messages" in inputs:
            pairs = [self._chat_parts(m) for m in inputs["messages"]]
            prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
            completions = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in pairs]
        else:
            prompts = self.tokenizer(list(inputs["prompt"]))["input_ids"]
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            completions = [ids + eos for ids in
                           self.tokenizer(list(inputs["completion"]), add_special_tokens=False)["input_ids"]]
        return prompts, completions

    @torch.no_grad()
    def continue_prompts(self, inputs: dict[str, Any], *, max_new_tokens: int, temperature: float = 1.0,
                         top_p: float = 1.0, prompt_tokens: int | None = None) -> dict[str, Any]:
        """This model's own sampled continuations of a batch's prompts, as token ids.

        The prompts are those of prompt/completion or chat records, or for plain text the first
        ``prompt_tokens`` tokens of each text (default: its first half). Returns inputs that
        :meth:`encode` (of this model or of another with the same vocabulary) reads:
        ``prompt_ids`` and ``completion_ids``, a completion ending at the model's end-of-text
        token if it wrote one. The model is sampled in eval mode, its training mode restored after.
        """
        if "text" in inputs:
            ids = self.tokenizer(list(inputs["text"]), truncation=True, max_length=self.max_length)["input_ids"]
            prompts = [row[: max(1, min(prompt_tokens or len(row) // 2, len(row) - 1))] for row in ids]
        elif "prompt_ids" in inputs:
            prompts = [list(p) for p in inputs["prompt_ids"]]
        else:
            prompts = self._prompt_parts(inputs)[0]
        prompts = [p[: self.max_length - 1] for p in prompts]
        width = max(len(p) for p in prompts)
        new_tokens = min(max_new_tokens, self.max_length - min(len(p) for p in prompts))
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        # Left-padded: every row's next token comes right after its prompt.
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(p)
            attention[i, width - len(p):] = 1
        model = unwrap(self.module)
        device = device_of(model)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(  # type: ignore[operator]  # a transformers model, not a plain Module
                input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=True,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=new_tokens,
                pad_token_id=pad, eos_token_id=eos)
        finally:
            model.train(was_training)
        completions = []
        for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            completions.append(row[: self.max_length - len(prompt)])
        return {"prompt_ids": prompts, "completion_ids": completions}

    def _chat_parts(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """A chat rendered by the tokenizer's template, split before the last (assistant) turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("chat records need a tokenizer with a chat template; this model's tokenizer has none "
                            "(give prompt/completion records instead)")
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the conversation differently with and without its last turn, "
                            "so the assistant's answer cannot be told apart from the prompt")
        return prompt, full[len(prompt):]

    def _join(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, Tensor]:
        rows = [(p + c)[: self.max_length] for p, c in zip(prompts, completions, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        loss = torch.zeros_like(ids)
        for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
            ids[i, : len(row)] = torch.as_tensor(row)
            attention[i, : len(row)] = 1
            loss[i, len(prompt) : len(row)] = 1
        device = device_of(self.module)
        return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "loss_mask": loss.to(device)}

    def save(self, folder: Path) -> None:
        """Hugging Face folder: config, safetensors weights and tokenizer."""
        self.save_hf(folder)


def _surface_forms(tokenizer: Any) -> list[str | None]:
    """Each token's text by id (a leading space kept); ``None`` for special tokens and for byte
    pieces of a character, which have no text of their own."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    sentencepiece = any(token.startswith("\u2581") for token in vocab)
    forms: list[str | None] = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in special:
            continue
        text = token.replace("\u2581", " ") if sentencepiece else tokenizer.convert_tokens_to_string([token])
        if text and "\ufffd" not in text and not (sentencepiece and text.startswith("<0x")):
            forms[i] = text
    return forms


def token_pieces(student_tokenizer: Any, teacher_tokenizer: Any) -> list[list[int]]:
    """For each teacher token id, the student's tokens for the same text (empty where the
    teacher token has no text of its own: special tokens, byte pieces of a character). The
    ``cross_vocab_kd`` loss carries the teacher's next-token probabilities along them."""
    forms = _surface_forms(teacher_tokenizer)
    known = [i for i, text in enumerate(forms) if text is not None]
    pieces: list[list[int]] = [[] for _ in forms]
    if known:
        encoded = student_tokenizer([forms[i] for i in known], add_special_tokens=False)["input_ids"]
        for i, ids in zip(known, encoded, strict=True):
            pieces[i] = list(ids)
    return pieces

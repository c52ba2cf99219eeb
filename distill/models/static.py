"""Static token-embedding students and vocabulary pruning.

The smallest and fastest student of a sentence encoder has no transformer layers at all: a
sentence's embedding is the mean of one learned vector per token (as in Model2Vec). distill
initialises each token's vector from the teacher (the teacher's embedding of that token alone,
reduced to the student's width by PCA over the vocabulary) and then trains the table to
reproduce the teacher's sentence embeddings on the user's data.

Vocabulary pruning keeps only the tokens the training data uses (plus every single-character
piece, so any word still splits into known pieces instead of becoming unknown) and rewrites the
tokenizer and the embedding table to match; for small students the embedding table is most of
the file.

The saved folder follows Model2Vec's layout (``model.safetensors`` with one ``embeddings``
tensor, ``tokenizer.json``, ``config.json``), so it loads without distill.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.errors import ModelError
from distill.models.adapters import require_transformers

__all__ = ["StaticEmbedding", "StaticEmbeddingAdapter", "derive_static", "load_static", "prune_vocabulary",
           "vocabulary_of"]


class StaticEmbedding(nn.Module):
    """Mean of token vectors: ``(ids, offsets)`` of a batch of token-id lists to ``(N, D)``.

    Args:
        vocab_size: Rows of the table.
        dim: Width of each vector.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embeddings = nn.EmbeddingBag(vocab_size, dim, mode="mean")

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        return self.embeddings(ids, offsets)


class StaticEmbeddingAdapter:
    """``inputs["text"]`` -> ``embedding``, the (normalised) mean of the texts' token vectors.

    Args:
        module: The :class:`StaticEmbedding`.
        tokenizer: A ``transformers`` fast tokenizer; special tokens are not added.
        normalize: L2-normalise the embeddings.
        max_length: Tokens per text; longer texts are truncated.
    """

    outputs = ("embedding",)

    def __init__(self, module: StaticEmbedding, tokenizer: Any, normalize: bool = True, max_length: int = 512) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.max_length = max_length
        self.teacher_basis: Tensor | None = None
        """``(D_t, dim)``: for a student derived from a teacher (:func:`derive_static`), the
        teacher's axes its table is expressed in; a fixed map of the teacher's outputs onto the
        same axes (``projector: pca``) then trains the student from where it starts."""
        # The Rust tokenizer called directly, without padding or truncation state: for a model
        # this cheap, tokenisation is most of the time, and the Python wrapper doubles it.
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()

    def token_ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Flat token ids and the offset where each text starts."""
        # encode_batch_fast skips the character offsets that a bag of tokens never reads
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        ids = [enc.ids[: self.max_length] for enc in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(flat), torch.from_numpy(np.cumsum(lengths) - lengths)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        flat, offsets = self.token_ids(inputs["text"])
        device = self.module.embeddings.weight.device
        out = self.module(flat.to(device), offsets.to(device))
        return {"embedding": F.normalize(out, dim=-1) if self.normalize else out}

    def save(self, folder: Path) -> None:
        """Model2Vec layout: ``model.safetensors`` (``embeddings``), tokenizer files, ``config.json``.

        The table is stored in float16, half the bytes of float32 (as Model2Vec stores its own);
        :func:`load_static` computes in float32 again. The rounding moves cosine similarities by
        about 1e-4, far below what the STS metric resolves.
        """
        folder.mkdir(parents=True, exist_ok=True)
        module = getattr(self.module, "module", self.module)
        weight = module.embeddings.weight.detach().cpu().to(torch.float16).contiguous()
        save_file({"embeddings": weight}, str(folder / "model.safetensors"))
        self.tokenizer.save_pretrained(str(folder))
        config = {"model_type": "model2vec", "architectures": ["StaticModel"], "hidden_dim": weight.shape[1],
                  "normalize": self.normalize, "seq_length": self.max_length, "distill_kind": "static-embedding"}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_static(source: str, normalize: bool | None = None, max_length: int | None = None) -> StaticEmbeddingAdapter:
    """Load a static embedding model saved by distill (or by Model2Vec) from a local folder."""
    folder = Path(source)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"static embedding model: {weights} not found")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    table = load_file(str(weights))
    key = "embeddings" if "embeddings" in table else next(iter(table))
    module = StaticEmbedding(*table[key].shape)
    module.embeddings.weight.data.copy_(table[key].float())
    transformers = require_transformers()
    # A blank config: the folder's config.json describes a Model2Vec model, not a transformers
    # architecture, and the tokenizer class is named in tokenizer_config.json anyway.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), config=transformers.PretrainedConfig())
    return StaticEmbeddingAdapter(module, tokenizer, config.get("normalize", True) if normalize is None else normalize,
                                  max_length or config.get("seq_length", 512))


def vocabulary_of(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    """Token ids a tokenizer needs for ``texts``, plus its special tokens and every piece of one
    character (so unseen words still split into known pieces), sorted."""
    keep = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if len(token.removeprefix("##")) == 1:
            keep.add(idx)
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 1024:
            keep.update(t for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] for t in ids)
            batch = []
    if batch:
        keep.update(t for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] for t in ids)
    return sorted(keep)


def prune_vocabulary(tokenizer: Any, keep: list[int]) -> Any:
    """A copy of a WordPiece fast tokenizer that knows only the tokens ``keep`` (renumbered in order).

    Tokens outside ``keep`` become the unknown token, as words the original vocabulary lacked.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "WordPiece":
        raise ModelError(f"vocabulary pruning supports WordPiece tokenizers (BERT family), not {model.get('type')}")
    old = {idx: token for token, idx in model["vocab"].items()}
    model["vocab"] = {old[idx]: new for new, idx in enumerate(keep)}
    remap = {idx: new for new, idx in enumerate(keep)}
    for added in state.get("added_tokens", []):
        added["id"] = remap[added["id"]]
    post = state.get("post_processor") or {}
    for spec in post.get("special_tokens", {}).values():
        spec["ids"] = [remap[i] for i in spec["ids"]]
    for key in ("sep", "cls"):
        if key in post:
            post[key] = [post[key][0], remap[post[key][1]]]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(state))
    fast = require_transformers().PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        model_max_length=tokenizer.model_max_length)
    return fast


@torch.no_grad()
def derive_static(teacher: Any, dim: int, keep: list[int] | None = None, texts: Iterable[str] | None = None,
                  sif: float | None = 1e-3, batch_size: int = 512) -> StaticEmbeddingAdapter:
    """A static student initialised from the teacher's embedding of each token alone, PCA-reduced to ``dim``.

    With ``texts``, each token's vector is scaled by its smooth-inverse-frequency weight
    ``sif / (sif + p(token))`` (Arora et al., 2017), ``p`` its frequency in the texts: in a mean of
    token vectors, frequent tokens ("the", "a") then count for little.

    Args:
        teacher: An :class:`~distill.models.adapters.HFEmbeddingAdapter`.
        dim: Width of the student's vectors (at most the teacher's).
        keep: Token ids to keep (vocabulary pruning); ``None`` keeps the whole vocabulary.
        texts: Texts whose token frequencies weight the vectors (the training texts).
        sif: The SIF constant; ``None`` leaves the vectors unweighted.
        batch_size: Tokens per teacher forward pass.
    """
    tokenizer = teacher.tokenizer
    ids = keep if keep is not None else sorted(tokenizer.get_vocab().values())
    vectors = _token_vectors(teacher, ids, batch_size)
    if not 0 < dim <= vectors.shape[1]:
        raise ModelError(f"static student width {dim} must be in 1..{vectors.shape[1]} (the teacher's)")
    centered = vectors - vectors.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    table = centered @ v[:dim].T
    if texts is not None and sif is not None:
        counts = torch.zeros(max(ids) + 1)
        for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(row, dtype=torch.long), minlength=len(counts))[: len(counts)]
        freq = counts[torch.tensor(ids)] / counts.sum().clamp(min=1)
        table = table * (sif / (sif + freq))[:, None]
    student_tokenizer = prune_vocabulary(tokenizer, ids) if keep is not None else tokenizer
    module = StaticEmbedding(len(ids), dim)
    module.embeddings.weight.copy_(table)
    device = next(teacher.module.parameters()).device
    student = StaticEmbeddingAdapter(module.to(device), student_tokenizer, teacher.normalize, teacher.max_length)
    student.teacher_basis = v[:dim].T.contiguous()
    return student


#: The last teacher token vectors computed, by (model identity, token ids): static students of
#: several widths derived in turn from one teacher share them.
_LAST: dict[tuple[int, float, int], Tensor] = {}


def _token_vectors(teacher: Any, ids: list[int], batch_size: int) -> Tensor:
    """The teacher's pooled embedding of each token alone (between its start and end tokens)."""
    weights = teacher.module.get_input_embeddings().weight
    key = (id(teacher.module), float(weights.detach().float().sum()), hash(tuple(ids)))
    if key in _LAST:
        return _LAST[key]
    tokenizer = teacher.tokenizer
    model = teacher.module
    device = next(model.parameters()).device
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    rows = []
    for start in range(0, len(ids), batch_size):
        chunk = torch.tensor(ids[start : start + batch_size], device=device)
        parts = [chunk[:, None]]
        if cls_id is not None:
            parts.insert(0, torch.full_like(chunk[:, None], cls_id))
        if sep_id is not None:
            parts.append(torch.full_like(chunk[:, None], sep_id))
        input_ids = torch.cat(parts, 1)
        hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
        rows.append((hidden[:, 0] if teacher.pooling == "cls" else hidden.mean(1)).float().cpu())
    _LAST.clear()
    _LAST[key] = torch.cat(rows)
    return _LAST[key]

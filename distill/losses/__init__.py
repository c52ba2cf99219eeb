"""Distillation losses, all three families, behind one registry.

Every loss is a pure ``nn.Module``: ``forward(student_out, teacher_out, labels=None)`` takes
tensors and returns a scalar. Nothing here reads a config or touches a model; the runner
decides which named outputs each loss compares. A loss class may declare, as class
attributes, what the runner should give it:

``output``
    The model output it compares by default (``"logits"`` for logit losses); otherwise the
    task's output (``embedding`` or ``logits``) or the layers the recipe names.
``projector``
    ``"if_needed"`` (a learned projector where widths differ), ``"always"`` or ``"never"``
    (relation losses compare ``N x N`` structures, so widths may differ).
``tap``
    ``"output"`` (a module's output) or ``"qkv"`` (a transformer block's stacked queries,
    keys and values) for losses on named layers.
``uses_mask``
    ``True`` to receive ``mask=`` (``(N, T)``, 1 for real tokens) on text models.
``uses_index``
    ``True`` to receive ``index=`` (the batch's example indices in the training set).
``uses_head``
    ``True`` to receive the models' output heads (``student_head=``, ``teacher_head=`` and
    their ``*_head_bias``) with their hidden states (token-level losses of causal LMs).
``trainable``
    ``True`` when the loss has parameters or state (heads, memory banks) that train and are
    checkpointed with the student, and are never saved with it.
"""

from __future__ import annotations

from torch import nn

from distill.losses.attention import AttentionKLLoss, AttentionRelationLoss
from distill.losses.feature import AttentionTransferLoss, CosineLoss, HintLoss, MSELoss
from distill.losses.relation import CRDLoss, RKDAngleLoss, RKDDistanceLoss, SimilarityLoss, SimilarityPreservingLoss
from distill.losses.response import DKDLoss, JSDLoss, KDLoss, ReverseKLLoss, TVDLoss, kl_divergence
from distill.losses.tokens import TokenKDLoss
from distill.registry import Registry

__all__ = [
    "FAMILIES",
    "LOGIT_LOSSES",
    "LOSSES",
    "RELATION_LOSSES",
    "AttentionKLLoss",
    "AttentionRelationLoss",
    "AttentionTransferLoss",
    "CRDLoss",
    "CosineLoss",
    "DKDLoss",
    "HintLoss",
    "JSDLoss",
    "KDLoss",
    "MSELoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "ReverseKLLoss",
    "SimilarityLoss",
    "SimilarityPreservingLoss",
    "TVDLoss",
    "TokenKDLoss",
    "kl_divergence",
]

LOSSES: Registry[type[nn.Module]] = Registry("loss")
#: Family of each built-in loss (``distill losses`` prints it).
FAMILIES: dict[str, str] = {}
for _family, _entries in (
    ("response", (("kd", KDLoss), ("reverse_kl", ReverseKLLoss), ("jsd", JSDLoss), ("tvd", TVDLoss),
                  ("dkd", DKDLoss), ("token_kd", TokenKDLoss))),
    ("feature", (("mse", MSELoss), ("cosine", CosineLoss), ("hint", HintLoss),
                 ("attention_transfer", AttentionTransferLoss), ("attention_kl", AttentionKLLoss),
                 ("attention_relation", AttentionRelationLoss))),
    ("relation", (("similarity", SimilarityLoss), ("sp", SimilarityPreservingLoss),
                  ("rkd_distance", RKDDistanceLoss), ("rkd_angle", RKDAngleLoss), ("crd", CRDLoss))),
):
    for _name, _cls in _entries:
        LOSSES.add(_name, _cls)
        FAMILIES[_name] = _family

#: Losses that compare class logits unless told otherwise.
LOGIT_LOSSES = frozenset(n for n in LOSSES.names() if getattr(LOSSES.get(n), "output", None) == "logits")
#: Losses that never need a projector: student and teacher widths may differ.
RELATION_LOSSES = frozenset(n for n in LOSSES.names() if getattr(LOSSES.get(n), "projector", None) == "never")

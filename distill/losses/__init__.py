"""Distillation losses, all three families, behind one registry.

Every loss is a pure ``nn.Module``: ``forward(student_out, teacher_out, labels=None)`` takes
tensors and returns a scalar. Nothing here reads a config or touches a model; the runner
decides which named outputs each loss compares. Each loss class declares what it needs from
the runner (its default output, projector, mask, example indices, output heads) in one typed
``traits`` attribute, a :class:`~distill.losses.traits.LossTraits`.

The divergences behind the response-based losses live once, in :mod:`distill.losses.divergence`.
"""

from __future__ import annotations

from distill.losses.attention import AttentionKLLoss, AttentionRelationLoss
from distill.losses.cross_vocab import CrossVocabKDLoss
from distill.losses.feature import AttentionTransferLoss, CosineLoss, HintLoss, MSELoss
from distill.losses.relation import (
    ContrastiveLoss,
    CRDLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityLoss,
    SimilarityPreservingLoss,
)
from distill.losses.response import DKDLoss, JSDLoss, KDLoss, ReverseKLLoss, TVDLoss, kl_divergence
from distill.losses.tokens import TokenKDLoss
from distill.losses.traits import DistillationLoss, LossTraits
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
    "ContrastiveLoss",
    "CosineLoss",
    "CrossVocabKDLoss",
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
    "DistillationLoss",
    "LossTraits",
    "kl_divergence",
]

LOSSES: Registry[type[DistillationLoss]] = Registry("loss")
#: Family of each built-in loss (``distill losses`` prints it).
FAMILIES: dict[str, str] = {}
for _family, _entries in (
    ("response", (("kd", KDLoss), ("reverse_kl", ReverseKLLoss), ("jsd", JSDLoss), ("tvd", TVDLoss),
                  ("dkd", DKDLoss), ("token_kd", TokenKDLoss),
                  ("cross_vocab_kd", CrossVocabKDLoss))),
    ("feature", (("mse", MSELoss), ("cosine", CosineLoss), ("hint", HintLoss),
                 ("attention_transfer", AttentionTransferLoss), ("attention_kl", AttentionKLLoss),
                 ("attention_relation", AttentionRelationLoss))),
    ("relation", (("similarity", SimilarityLoss), ("sp", SimilarityPreservingLoss),
                  ("rkd_distance", RKDDistanceLoss), ("rkd_angle", RKDAngleLoss), ("crd", CRDLoss),
                 ("contrastive", ContrastiveLoss))),
):
    for _name, _cls in _entries:
        LOSSES.add(_name, _cls)
        FAMILIES[_name] = _family

#: Losses that compare class logits unless told otherwise.
LOGIT_LOSSES = frozenset(n for n in LOSSES.names() if LOSSES.get(n).traits.output == "logits")
#: Losses that never need a projector: student and teacher widths may differ.
RELATION_LOSSES = frozenset(n for n in LOSSES.names() if LOSSES.get(n).traits.projector == "never")

"""Properties of the feature-based and relation-based losses."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    AttentionKLLoss,
    AttentionRelationLoss,
    AttentionTransferLoss,
    CRDLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityPreservingLoss,
)
from distill.losses.attention import relation_log_probs

torch.manual_seed(0)
X = torch.randn(8, 6, dtype=torch.float64)
Y = torch.randn(8, 6, dtype=torch.float64)


def rotation(d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q


def test_rkd_distance_is_invariant_to_scale_and_rotation_and_width():
    loss = RKDDistanceLoss()
    assert float(loss(5.0 * X @ rotation(6), X)) == pytest.approx(0.0, abs=1e-12)
    wide = torch.cat([X, torch.zeros(8, 10, dtype=torch.float64)], 1)
    assert float(loss(X, 0.1 * wide)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(X, Y)) > 1e-3


def test_rkd_angle_is_invariant_to_scale_translation_rotation():
    loss = RKDAngleLoss()
    moved = 3.0 * X @ rotation(6) + torch.randn(1, 6, dtype=torch.float64)
    assert float(loss(moved, X)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(X, Y)) > 1e-3


def test_rkd_distance_matches_a_direct_computation():
    def direct(a):
        n = a.shape[0]
        d = torch.stack([torch.stack([(a[i] - a[j]).norm() for j in range(n)]) for i in range(n)])
        return d / d[~torch.eye(n, dtype=torch.bool)].mean()

    expected = F.smooth_l1_loss(direct(X), direct(Y))
    assert float(RKDDistanceLoss()(X, Y)) == pytest.approx(float(expected), rel=1e-10)


def test_sp_compares_batch_similarities_across_widths_and_scales():
    loss = SimilarityPreservingLoss()
    wide = torch.cat([X, torch.zeros(8, 3, dtype=torch.float64)], 1) @ rotation(9)
    assert float(loss(X, 4.0 * wide)) == pytest.approx(0.0, abs=1e-12)
    # Feature maps are flattened per example.
    assert float(loss(X.reshape(8, 6, 1, 1), X.reshape(8, 1, 2, 3))) == pytest.approx(0.0, abs=1e-12)
    g = F.normalize(X @ X.T, dim=1) - F.normalize(Y @ Y.T, dim=1)
    assert float(loss(X, Y)) == pytest.approx(float(g.pow(2).sum() / 64), rel=1e-10)


def test_attention_transfer_ignores_channels_and_scale_and_pools_resolution():
    loss = AttentionTransferLoss()
    f = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    # More channels carrying the same per-position energy and a different scale: same map.
    doubled = torch.cat([f, f], 1) * 7.0
    assert float(loss(f, doubled)) == pytest.approx(0.0, abs=1e-12)
    # A teacher map at twice the resolution (each value repeated 2x2) pools back to the student's.
    upsampled = f.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert float(loss(f.abs(), upsampled.abs())) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(f, torch.randn(4, 5, 8, 8, dtype=torch.float64))) > 0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        loss(torch.randn(4, 3), torch.randn(4, 3))


def test_relation_probs_are_masked_softmaxes():
    qkv = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    log_p = relation_log_probs(qkv, qkv, heads=2, mask=mask)
    assert log_p.shape == (2, 2, 5, 5)
    p = log_p.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    assert float(p[0, :, :, 3:].abs().max()) == 0.0  # no probability on padding keys
    head0 = qkv[0, :3, :4]
    direct = torch.softmax(head0 @ head0.T / 2.0, -1)
    assert torch.allclose(p[0, 0, :3, :3], direct)


def test_attention_relation_works_across_widths_and_ignores_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    student = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    teacher = torch.randn(3, 2, 5, 12, dtype=torch.float64)
    loss = AttentionRelationLoss(heads=4)
    value = float(loss(student, teacher, mask=mask))
    assert value > 0
    # What sits at padded positions does not count.
    noisy = student.clone()
    noisy[:, 0, 4] = 100.0
    noisy[:, 1, 3:] = -50.0
    assert float(loss(noisy, teacher, mask=mask)) == pytest.approx(value, rel=1e-10)
    # Rotating each relation head's coordinates keeps every relation.
    heads = student.reshape(3, 2, 5, 4, 2)
    rotated = torch.einsum("...hd,de->...he", heads, rotation(2)).reshape(3, 2, 5, 8)
    assert float(loss(rotated, student, mask=mask)) == pytest.approx(0.0, abs=1e-10)


def test_attention_relation_value_relations_only():
    s = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    t = s.clone()
    t[2] = torch.randn(2, 4, 8, dtype=torch.float64)  # only the values differ
    assert float(AttentionRelationLoss(2, ["qq", "kk"])(s, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(AttentionRelationLoss(2, ["vv"])(s, t)) > 0
    with pytest.raises(ValueError, match="relations"):
        AttentionRelationLoss(2, ["qv"])


def test_attention_kl_compares_attention_maps_head_by_head():
    s = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    t = s.clone()
    t[2] = torch.randn(2, 4, 8, dtype=torch.float64)  # values do not change attention maps
    assert float(AttentionKLLoss(heads=2)(s, t)) == pytest.approx(0.0, abs=1e-12)
    t[0] = torch.randn(2, 4, 8, dtype=torch.float64)
    assert float(AttentionKLLoss(heads=2)(s, t)) > 0
    with pytest.raises(ValueError, match="attention_relation"):
        AttentionKLLoss(heads=12, student_heads=8)


def test_crd_prefers_the_matching_teacher_and_updates_its_memory_only_in_training():
    torch.manual_seed(0)
    loss = CRDLoss(student_dim=6, teacher_dim=6, num_examples=50, dim=6, negatives=20).double()
    loss.embed_t.load_state_dict(loss.embed_s.state_dict())  # one shared map: aligned inputs align
    index = torch.arange(8)
    before = loss.memory_t.clone()
    loss.eval()
    with torch.no_grad():
        aligned = float(loss(X, X, index=index))
        shuffled = float(loss(X[torch.randperm(8)], X, index=index))
    assert torch.equal(loss.memory_t, before)  # eval: no memory update
    assert aligned < shuffled
    loss.train()
    loss(X, Y, index=index)
    changed = (loss.memory_t != before).any(1)
    assert changed[:8].all() and not changed[8:].any()
    assert torch.allclose(loss.memory_t.norm(dim=1), torch.ones(50, dtype=torch.float64))


def test_crd_gradients_and_errors():
    torch.manual_seed(0)
    loss = CRDLoss(student_dim=6, teacher_dim=4, num_examples=30, dim=5, negatives=7).double().eval()
    s = X.clone().requires_grad_(True)

    def fn(x):
        torch.manual_seed(1)  # same negatives on every call
        return loss(x, Y[:, :4], index=torch.arange(8))

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)
    loss.zero_grad()
    torch.manual_seed(1)
    loss(X, Y[:, :4], index=torch.arange(8)).backward()
    assert loss.embed_s.weight.grad.abs().sum() > 0 and loss.embed_t.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="index"):
        loss(X, Y[:, :4])
    with pytest.raises(ValueError, match="negatives"):
        CRDLoss(6, 6, num_examples=1)

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    FAMILIES,
    LOSSES,
    RELATION_LOSSES,
    ContrastiveLoss,
    DKDLoss,
    JSDLoss,
    KDLoss,
    ReverseKLLoss,
    SimilarityLoss,
    TVDLoss,
)

torch.manual_seed(0)
S = torch.randn(6, 10, dtype=torch.float64)
T = torch.randn(6, 10, dtype=torch.float64)
# Feature maps (N, C, H, W) and stacked transformer queries/keys/values (3, N, T, D).
MAPS_S, MAPS_T = torch.randn(2, 6, 3, 8, 8, dtype=torch.float64)
QKV_S, QKV_T = torch.randn(2, 3, 4, 5, 8, dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
LABELS = torch.randint(0, 10, (6,))
#: Contrastive: never zero, needs example indices; tested in test_feature_losses.
STATEFUL = {"crd"}
#: InfoNCE is not zero for identical inputs (the softmax keeps mass on the other examples).
NOT_ZERO = STATEFUL | {"contrastive"}
KWARGS = {"attention_kl": {"heads": 2}, "attention_relation": {"heads": 2}}


def inputs(name):
    """A (student, teacher) pair of inputs the loss accepts, differing in value."""
    if name == "attention_transfer":
        return MAPS_S, MAPS_T
    if name.startswith("attention_"):
        return QKV_S, QKV_T
    return S, T


#: Output heads for token_kd, which reads (tokens, width) hidden states: a 7-token vocabulary.
HEAD = torch.randn(7, 10, dtype=torch.float64)


def call(name, s, t):
    loss = LOSSES.get(name)(**KWARGS.get(name, {}))
    extra = {"mask": MASK} if name.startswith("attention_") and name != "attention_transfer" else {}
    if name == "token_kd":
        extra = {"student_head": HEAD, "teacher_head": HEAD}
    if name == "cross_vocab_kd":  # one tokenizer on both sides: every position pairs with itself
        loss.set_pieces([[i] for i in range(len(HEAD))])
        ends = torch.arange(1, len(s) + 1)[None]
        extra = {"student_head": HEAD, "teacher_head": HEAD, "mask": torch.ones_like(ends), "student_ends": ends,
                 "teacher_ends": ends, "teacher_mask": torch.ones_like(ends), "student_next": torch.zeros_like(ends)}
        return loss(s[None], t[None], LABELS, **extra)
    return loss(s, t, LABELS, **extra)


def naive_kl(p_logits, q_logits, t=1.0):
    p = F.softmax(p_logits / t, -1)
    return (p * (torch.log(p) - torch.log(F.softmax(q_logits / t, -1)))).sum(-1).mean()


def test_every_loss_has_a_family():
    assert set(FAMILIES) == set(LOSSES.names())
    assert set(FAMILIES.values()) == {"response", "feature", "relation"}


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - NOT_ZERO))
def test_zero_for_identical_inputs(name):
    s, _ = inputs(name)
    assert float(call(name, s, s.clone())) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - STATEFUL))
def test_positive_for_different_inputs(name):
    assert float(call(name, *inputs(name))) > 0


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - STATEFUL))
def test_gradients_match_finite_differences(name):
    s, t = inputs(name)
    s = s[..., :4, :].clone() if s.dim() > 2 else s.clone()
    t = t[..., :4, :].clone() if t.dim() > 2 else t.clone()
    if name.startswith("attention_") and name != "attention_transfer":
        s, t = QKV_S.clone(), QKV_T.clone()
    s.requires_grad_(True)
    fn = (lambda x: call(name, x, t)) if name != "rkd_angle" else (lambda x: call(name, x[:4], t[:4]))
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - RELATION_LOSSES))
def test_shape_mismatch_is_an_error(name):
    with pytest.raises(ValueError, match="differ in shape"):
        LOSSES.get(name)()(S, T[:, :5], torch.zeros(6, dtype=torch.long))


def test_similarity_compares_relations_across_widths():
    loss = SimilarityLoss()
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    # A rotation and a rescaling keep every cosine between examples: zero loss.
    assert float(loss(3 * S @ q, S)) == pytest.approx(0.0, abs=1e-12)
    # Widths may differ: an orthogonal embedding into more dimensions also keeps them.
    wide = torch.cat([S, torch.zeros(6, 4, dtype=torch.float64)], -1)
    assert float(loss(S, wide)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(S, T)) > 0
    with pytest.raises(ValueError, match="batch size"):
        loss(S, T[:4])


def test_contrastive_rewards_each_student_row_for_finding_its_own_teacher_row():
    loss = ContrastiveLoss(temperature=0.05)
    # Aligned rows: each student row is nearest its own teacher row, far below the shuffled pairing.
    aligned, shuffled = float(loss(S + 0.01 * T, S)), float(loss(S, S.roll(1, 0)))
    assert aligned < 0.05 < shuffled
    # A scale on either side changes nothing (cosines); the symmetric form equals its mirror.
    assert float(loss(3 * S, T)) == pytest.approx(float(loss(S, T)))
    assert float(loss(S, T)) == pytest.approx(float(loss(T, S)))
    # Uniform similarities: the loss is log N, whatever the temperature.
    same = torch.ones(6, 4, dtype=torch.float64)
    assert float(loss(same, same)) == pytest.approx(float(torch.log(torch.tensor(6.0))))
    with pytest.raises(ValueError, match="temperature > 0"):
        ContrastiveLoss(temperature=0)


def test_kd_is_t_squared_kl_teacher_to_student():
    assert float(KDLoss(4.0)(S, T)) == pytest.approx(16 * float(naive_kl(T, S, 4.0)), rel=1e-10)
    assert float(ReverseKLLoss(2.0)(S, T)) == pytest.approx(4 * float(naive_kl(S, T, 2.0)), rel=1e-10)


def test_jsd_limits_are_forward_and_reverse_kl():
    forward, reverse = float(naive_kl(T, S)), float(naive_kl(S, T))
    assert float(JSDLoss(beta=0.0)(S, T)) == pytest.approx(forward, rel=1e-10)
    assert float(JSDLoss(beta=1.0)(S, T)) == pytest.approx(reverse, rel=1e-10)
    eps = 1e-5
    assert float(JSDLoss(beta=eps)(S, T)) / eps == pytest.approx(forward, rel=1e-3)
    assert float(JSDLoss(beta=1 - eps)(S, T)) / eps == pytest.approx(reverse, rel=1e-3)


def test_jsd_half_is_symmetric_and_bounded():
    a, b = float(JSDLoss(0.5)(S, T)), float(JSDLoss(0.5)(T, S))
    assert a == pytest.approx(b, rel=1e-10)
    assert 0 < a <= torch.log(torch.tensor(2.0)).item()


def test_tvd_is_half_l1_and_bounded():
    expected = 0.5 * (F.softmax(S, -1) - F.softmax(T, -1)).abs().sum(-1).mean()
    assert float(TVDLoss()(S, T)) == pytest.approx(float(expected))
    far = torch.tensor([[100.0, 0.0]], dtype=torch.float64)
    assert float(TVDLoss()(far, far.flip(-1))) == pytest.approx(1.0, abs=1e-6)


def test_kd_gradient_matches_closed_form():
    s = S.clone().requires_grad_(True)
    t = 3.0
    KDLoss(t)(s, T).backward()
    expected = t * (F.softmax(S / t, -1) - F.softmax(T / t, -1)) / len(S)
    torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("loss", [JSDLoss(0.3, 2.0), TVDLoss(1.5), DKDLoss(1.0, 8.0, 4.0)])
def test_gradients_match_numerical(loss):
    labels = torch.randint(0, 10, (6,))
    assert torch.autograd.gradcheck(lambda s: loss(s, T, labels), (S.clone().requires_grad_(True),))


def test_dkd_decomposes_into_target_and_non_target_terms():
    labels = torch.randint(0, 10, (6,))
    t = 4.0
    ps, pt = F.softmax(S / t, -1), F.softmax(T / t, -1)
    mask = F.one_hot(labels, 10).bool()
    bs = torch.stack([ps[mask], 1 - ps[mask]], -1)
    bt = torch.stack([pt[mask], 1 - pt[mask]], -1)
    tckd = (bt * (bt.log() - bs.log())).sum(-1).mean()
    nts = ps.masked_fill(mask, 0) / (1 - ps[mask])[:, None]
    ntt = pt.masked_fill(mask, 0) / (1 - pt[mask])[:, None]
    nckd = (ntt * ((ntt + 1e-30).log() - (nts + 1e-30).log())).sum(-1).mean()
    expected = t * t * (2.0 * tckd + 5.0 * nckd)
    assert float(DKDLoss(2.0, 5.0, t)(S, T, labels)) == pytest.approx(float(expected), rel=1e-6)


def test_dkd_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        DKDLoss()(S, T)


def test_logit_losses_accept_token_shaped_inputs():
    s3, t3 = S.reshape(2, 3, 10), T.reshape(2, 3, 10)
    assert float(KDLoss(2.0)(s3, t3)) == pytest.approx(float(KDLoss(2.0)(S, T)))


def test_embedding_losses():
    e = torch.randn(4, 8)
    assert float(LOSSES.get("cosine")()(e, 3 * e)) == pytest.approx(0.0, abs=1e-6)
    assert float(LOSSES.get("cosine")()(e, -e)) == pytest.approx(2.0, abs=1e-6)
    assert float(LOSSES.get("mse")()(e, e + 1)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"temperature": -1}])
def test_invalid_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(**bad)


def test_jsd_beta_range():
    with pytest.raises(ValueError, match="beta"):
        JSDLoss(beta=1.5)

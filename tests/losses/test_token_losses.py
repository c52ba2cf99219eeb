import pytest
import torch

from distill.losses import JSDLoss, KDLoss, ReverseKLLoss, TVDLoss
from distill.losses.chunked import chunked_cross_entropy, chunked_token_loss, token_loss
from distill.losses.divergence import DIVERGENCES, token_divergence

N, H_S, H_T, V = 37, 12, 20, 50


def problem(seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(N, H_S, generator=g, dtype=dtype, requires_grad=True)
    s_w = (torch.randn(V, H_S, generator=g, dtype=dtype) / 3).requires_grad_()
    t_h = torch.randn(N, H_T, generator=g, dtype=dtype)
    t_w = torch.randn(V, H_T, generator=g, dtype=dtype) / 3
    mask = (torch.rand(N, generator=g) > 0.3).to(dtype)
    s_b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return s_h, s_w, t_h, t_w, mask, s_b


def loss_and_grads(fn, s_h, s_w, t_h, t_w, mask, s_b, **kw):
    loss = fn(s_h, s_w, t_h, t_w, mask, student_bias=s_b, **kw)
    inputs = [x for x in (s_h, s_w, s_b) if x is not None]
    return loss, torch.autograd.grad(loss, inputs)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


OPTIONS = [
    {"kind": k} for k in DIVERGENCES
] + [
    {"kind": "forward_kl", "temperature": 2.0},
    {"kind": "jsd", "beta": 0.1, "temperature": 0.7},
    {"kind": "skew_kl", "alpha": 0.3},
    # The closed-form gradients at other temperatures and at the limits of beta and alpha.
    {"kind": "reverse_kl", "temperature": 2.0},
    {"kind": "skew_reverse_kl", "alpha": 0.3, "temperature": 1.5},
    {"kind": "tvd", "temperature": 2.0},
    {"kind": "jsd", "beta": 0.0},
    {"kind": "jsd", "beta": 1.0},
    {"kind": "skew_kl", "alpha": 0.0},
    {"kind": "skew_reverse_kl", "alpha": 0.0},
    {"kind": "forward_kl", "top_k": 5},
    {"kind": "reverse_kl", "top_k": 5},
    {"kind": "jsd", "top_p": 0.8},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("chunk", [1, 8, 64, None])
def test_chunked_equals_naive_loss_and_gradients(options, chunk):
    args = problem(bias=chunk == 8)
    naive, naive_grads = loss_and_grads(token_loss, *args, **options)
    chunked, chunked_grads = loss_and_grads(chunked_token_loss, *args, chunk_size=chunk, **options)
    assert naive.item() > 0
    assert rel_err(chunked, naive) <= 1e-5
    for a, b in zip(chunked_grads, naive_grads, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_closed_form_gradient_equals_autograd(kind):
    args = problem(seed=3, dtype=torch.float64, bias=True)
    closed = loss_and_grads(chunked_token_loss, *args, kind=kind, temperature=1.3, chunk_size=9)
    auto = loss_and_grads(chunked_token_loss, *args, kind=kind, temperature=1.3, chunk_size=9, closed_form=False)
    assert closed[0].item() == pytest.approx(auto[0].item(), rel=1e-12)
    for a, b in zip(closed[1], auto[1], strict=True):
        assert rel_err(a, b) <= 1e-10


def test_chunked_loss_scales_with_upstream_gradient_and_skips_a_frozen_head():
    s_h, s_w, t_h, t_w, mask, _ = problem()
    s_w.requires_grad_(False)
    (3.0 * chunked_token_loss(s_h, s_w, t_h, t_w, mask, chunk_size=5)).backward()
    expected = torch.autograd.grad(3.0 * token_loss(s_h, s_w, t_h, t_w, mask), s_h)[0]
    assert rel_err(s_h.grad, expected) <= 1e-5 and s_w.grad is None


def test_masked_tokens_do_not_count():
    s_h, s_w, t_h, t_w, mask, _ = problem()
    changed = s_h.detach().clone()
    changed[mask == 0] += 5.0
    a = chunked_token_loss(s_h, s_w, t_h, t_w, mask, chunk_size=4)
    b = chunked_token_loss(changed, s_w, t_h, t_w, mask, chunk_size=4)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_when_student_is_the_teacher(kind):
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    assert token_divergence(logits, logits, kind).abs().max() < 1e-6
    assert token_divergence(logits, logits, kind, top_k=3).abs().max() < 1e-6
    assert token_divergence(torch.randn(6, V), logits, kind).min() > 0


def test_agrees_with_the_classifier_losses():
    torch.manual_seed(0)
    s, t = torch.randn(9, V), torch.randn(9, V)
    for kind, module in (("forward_kl", KDLoss(2.0)), ("reverse_kl", ReverseKLLoss(2.0)), ("tvd", TVDLoss(2.0)),
                         ("jsd", JSDLoss(0.3, 2.0))):
        opts = {"beta": 0.3} if kind == "jsd" else {}
        torch.testing.assert_close(token_divergence(s, t, kind, temperature=2.0, **opts).mean(), module(s, t))


def test_jsd_beta_limits_and_skew_zero():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, V, generator=g, dtype=torch.float64), torch.randn(9, V, generator=g, dtype=torch.float64)
    forward, reverse = token_divergence(s, t, "forward_kl"), token_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), forward)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), reverse)
    # Near the ends, JSD_beta / beta and JSD_beta / (1 - beta) approach forward and reverse KL.
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1e-5) / 1e-5, forward, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1 - 1e-5) / 1e-5, reverse, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(token_divergence(s, t, "skew_kl", alpha=0.0), forward)
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", alpha=0.0), reverse)
    # Skewing towards the teacher bounds the divergence: KL(P || aP + (1-a)Q) <= -log(a).
    assert token_divergence(100 * s, t, "skew_kl", alpha=0.1).max() <= -torch.log(torch.tensor(0.1)) + 1e-5


def test_top_k_keeps_the_mass_outside_in_one_bucket():
    t = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    # Same top-2 probabilities and the same mass outside them, spread differently: invisible to
    # a top-2 comparison, visible to the full one.
    same = torch.log(torch.tensor([[0.5, 0.3, 0.02, 0.08, 0.1]]))
    assert token_divergence(same, t, top_k=2).item() < 1e-6 < token_divergence(same, t).item()
    # Top 2 in the teacher's proportions but too little mass on them: renormalising the top 2
    # would call this a match; pooling the rest does not.
    scaled = torch.log(torch.tensor([[0.25, 0.15, 0.2, 0.2, 0.2]]))
    assert token_divergence(scaled, t, top_k=2).item() > 0.1


def test_top_p_keeps_the_smallest_set_with_that_mass():
    t = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = torch.log(torch.tensor([[0.5, 0.3, 0.05, 0.15]]))
    assert token_divergence(s, t, top_p=0.8).item() < 1e-6  # {0, 1} + the rest
    assert token_divergence(s, t, top_p=0.9).item() > 1e-3  # {0, 1, 2} + the rest


def test_bad_arguments_are_named():
    s_h, s_w, t_h, t_w, mask, _ = problem()
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        chunked_token_loss(s_h, s_w, t_h, t_w, kind="kl")
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_token_loss(s_h, s_w, t_h, t_w[:-1])
    with pytest.raises(ValueError, match="beta"):
        chunked_token_loss(s_h, s_w, t_h, t_w, kind="jsd", beta=2.0)


def test_banned_teacher_tokens_do_not_make_nan():
    torch.manual_seed(0)
    s, t = torch.randn(4, V, requires_grad=True), torch.randn(4, V)
    t[:, :3] = float("-inf")  # a teacher that masks some tokens out entirely
    for kind in DIVERGENCES:
        value = token_divergence(s, t, kind, top_k=4 if kind == "jsd" else None).mean()
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), kind


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_equals_naive(chunk):
    s_h, s_w, _, _, mask, s_b = problem(bias=True)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    logits = s_h @ s_w.T + s_b
    naive = (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * mask).sum() / mask.sum()
    chunked = chunked_cross_entropy(s_h, s_w, targets, mask, chunk_size=chunk, bias=s_b)
    assert rel_err(chunked, naive) <= 1e-5
    for a, b in zip(torch.autograd.grad(chunked, (s_h, s_w, s_b)), torch.autograd.grad(naive, (s_h, s_w, s_b)),
                    strict=True):
        assert rel_err(a, b) <= 1e-5

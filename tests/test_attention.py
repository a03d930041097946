"""Attention math: reference vs a per-query loop, fast kernels vs reference, window edge, sink, GRAPE, TPA."""

import math

import pytest
import torch

from vpmoe.model.attention_math import (
    attention_local_blocked,
    attention_reference,
    attention_sdpa,
    softmax_with_sink,
    visible_keys,
)
from vpmoe.model.positional import GrapeM, alibi_slopes, grape_m_initial_theta, grape_m_rotate
from vpmoe.model.tpa import TPAProjection, tpa_reconstruct
from vpmoe.model.value_residual import ValueResidual


def loop_attention(q, k, v, sink, window, slopes):
    """One query, one head at a time: the most literal reading of contract section 3."""
    B, T, H, d = q.shape
    rep = H // k.shape[2]
    out = torch.zeros(B, T, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // rep
            for i in range(T):
                keys = [j for j in range(T) if j <= i and (window is None or i - j <= window - 1)]
                logits = []
                for j in keys:
                    l_ij = float(q[b, i, h].double() @ k[b, j, g].double()) / math.sqrt(d)
                    if slopes is not None:
                        l_ij -= float(slopes[h]) * (i - j)
                    logits.append(l_ij)
                denom = sum(math.exp(x) for x in logits) + (math.exp(float(sink[h])) if sink is not None else 0.0)
                for j, l_ij in zip(keys, logits, strict=True):
                    out[b, i, h] += math.exp(l_ij) / denom * v[b, j, g].double()
    return out


@pytest.mark.parametrize(("window", "use_alibi", "use_sink"),
                         [(5, False, True), (None, True, True), (None, False, False), (3, True, False)])
def test_reference_matches_loop(gen, window, use_alibi, use_sink):
    B, T, H, G, d = 2, 11, 4, 2, 8
    q, k, v = (torch.randn(B, T, n, d, generator=gen) for n in (H, G, G))
    sink = torch.randn(H, generator=gen) if use_sink else None
    slopes = alibi_slopes(H) if use_alibi else None
    out, probs = attention_reference(q, k, v, sink, window, slopes)
    torch.testing.assert_close(out.double(), loop_attention(q, k, v, sink, window, slopes), rtol=1e-5, atol=1e-6)
    assert probs.shape == (B, H, T, T)


@pytest.mark.parametrize("T", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("window", [1, 7, 32])
def test_blocked_local_matches_reference(gen, T, window):
    q, k, v = (torch.randn(2, T, n, 16, generator=gen) for n in (4, 2, 2))
    sink = torch.randn(4, generator=gen)
    ref, _ = attention_reference(q, k, v, sink, window, None)
    torch.testing.assert_close(attention_local_blocked(q, k, v, sink, window), ref, rtol=1e-5, atol=1e-5)


def test_blocked_local_gradients_match_reference(gen):
    q, k, v = (torch.randn(2, 45, n, 16, generator=gen, requires_grad=True) for n in (4, 2, 2))
    sink = torch.randn(4, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 45, 4, 16, generator=gen)
    g_ref = torch.autograd.grad((attention_reference(q, k, v, sink, 16, None)[0] * grad_out).sum(), (q, k, v, sink))
    g_fast = torch.autograd.grad((attention_local_blocked(q, k, v, sink, 16) * grad_out).sum(), (q, k, v, sink))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_sink", [True, False])
def test_sdpa_global_matches_reference(gen, use_sink):
    q, k, v = (torch.randn(2, 40, n, 16, generator=gen) for n in (8, 2, 2))
    sink = torch.randn(8, generator=gen) if use_sink else None
    ref, _ = attention_reference(q, k, v, sink, None, alibi_slopes(8))
    torch.testing.assert_close(attention_sdpa(q, k, v, sink, None, alibi_slopes(8)), ref, rtol=1e-5, atol=1e-5)


def test_window_edge_counts_the_query():
    """Trap 6: with W = 128, query i sees key i - 127 and not key i - 128."""
    mask = visible_keys(300, 128)
    i = 250
    assert mask[i, i] and mask[i, i - 127] and not mask[i, i - 128] and not mask[i, i + 1]
    assert int(mask[i].sum()) == 128


def test_window_edge_in_the_fast_kernel(gen):
    """Changing key i-128's value moves nothing at query i; changing key i-127's does."""
    T, W = 300, 128
    q, k, v = (torch.randn(1, T, n, 8, generator=gen) for n in (2, 1, 1))
    base = attention_local_blocked(q, k, v, None, W)
    for offset, should_change in ((128, False), (127, True)):
        v2 = v.clone()
        v2[0, 250 - offset] += 10.0
        changed = not torch.allclose(attention_local_blocked(q, k, v2, None, W)[0, 250], base[0, 250])
        assert changed == should_change


def test_sink_is_one_unscaled_column_in_the_denominator(gen):
    """Trap 7: GPT-OSS oracle (concat sink column, softmax, drop it) vs the closed form."""
    logits = torch.randn(2, 3, 5, 7, generator=gen)
    logits[..., 5:] = float("-inf")
    sink = torch.randn(3, generator=gen)
    p = softmax_with_sink(logits, sink)
    expected = torch.exp(logits) / (torch.exp(sink).view(1, 3, 1, 1) + torch.exp(logits).sum(-1, keepdim=True))
    torch.testing.assert_close(p, expected)
    assert (p.sum(-1) < 1).all()


def test_alibi_slopes_of_the_locked_heads():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]))


def test_grape_m_storage_and_init_are_exact_rope():
    """Trap 9: one 64-vector stored as theta = 16 ln(omega), omega_i = 10000^(-i/64) at init."""
    grape = GrapeM(128, 10000.0, 16.0)
    assert grape.theta.shape == (64,)
    expected = torch.tensor([10000.0 ** (-i / 64) for i in range(64)])
    torch.testing.assert_close(grape.omega, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grape.theta, 16 * torch.log(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grape_m_initial_theta(64, 10000.0, 16.0), grape.theta.detach())


def test_grape_m_rotation_formula_and_relative_law(gen):
    """y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin on planes (i, i+d/2); <R(a)q, R(b)k> depends on a-b only."""
    grape = GrapeM(16, 10000.0, 16.0)
    with torch.no_grad():
        grape.theta.add_(torch.randn(8, generator=gen))  # learned frequencies, not just RoPE
    with torch.no_grad():
        cos, sin = grape(40)
    x = torch.randn(1, 40, 1, 16, generator=gen)
    y = grape_m_rotate(x, cos, sin)
    for t in (0, 7, 39):
        for i in range(8):
            a = t * grape.omega[i]
            x1, x2 = x[0, t, 0, i], x[0, t, 0, i + 8]
            torch.testing.assert_close(y[0, t, 0, i], x1 * torch.cos(a) - x2 * torch.sin(a), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y[0, t, 0, i + 8], x2 * torch.cos(a) + x1 * torch.sin(a), rtol=1e-5, atol=1e-5)
    q = torch.randn(16, generator=gen).expand(1, 40, 1, 16)
    k = torch.randn(16, generator=gen).expand(1, 40, 1, 16)
    rq, rk = grape_m_rotate(q, cos, sin), grape_m_rotate(k, cos, sin)
    dots = {(a, b): float(rq[0, a, 0] @ rk[0, b, 0]) for a, b in [(10, 3), (17, 10), (39, 32), (5, 5), (20, 20)]}
    assert dots[(10, 3)] == pytest.approx(dots[(17, 10)], abs=1e-4) == pytest.approx(dots[(39, 32)], abs=1e-4)
    assert dots[(5, 5)] == pytest.approx(dots[(20, 20)], abs=1e-4)


def test_tpa_reconstruction_against_a_loop(gen):
    """Trap 10: q[h] = (1/4) sum_r A_Q[h,r] B_Q[r]; K/V factors per KV group; bias after reconstruction."""
    D, H, G, d = 24, 4, 2, 8
    tpa = TPAProjection(D, H, G, d, q_rank=4, kv_rank=2, init_std=0.5)
    with torch.no_grad():
        tpa.qkv_bias.copy_(torch.randn_like(tpa.qkv_bias))
    x = torch.randn(2, 5, D, generator=gen)
    q, k, v = tpa(x)
    assert q.shape == (2, 5, H, d) and k.shape == v.shape == (2, 5, G, d)
    assert tpa.a_k.weight.shape == (G * 2, D) and tpa.b_k.weight.shape == (2 * d, D)
    bq, bk, bv = tpa.qkv_bias.split([H * d, G * d, G * d])
    for b in range(2):
        for t in range(5):
            xt = x[b, t]
            A_Q = (tpa.a_q.weight @ xt).view(H, 4)
            B_Q = (tpa.b_q.weight @ xt).view(4, d)
            A_K = (tpa.a_k.weight @ xt).view(G, 2)
            B_K = (tpa.b_k.weight @ xt).view(2, d)
            A_V = (tpa.a_v.weight @ xt).view(G, 2)
            B_V = (tpa.b_v.weight @ xt).view(2, d)
            for h in range(H):
                expect = sum(A_Q[h, r] * B_Q[r] for r in range(4)) / 4 + bq.view(H, d)[h]
                torch.testing.assert_close(q[b, t, h], expect, rtol=1e-5, atol=1e-5)
            for g in range(G):
                torch.testing.assert_close(k[b, t, g], sum(A_K[g, r] * B_K[r] for r in range(2)) / 2
                                           + bk.view(G, d)[g], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v[b, t, g], sum(A_V[g, r] * B_V[r] for r in range(2)) / 2
                                           + bv.view(G, d)[g], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tpa_reconstruct(torch.ones(1, 2, 2), torch.ones(1, 2, 3)), torch.ones(1, 2, 3))


def test_value_residual_lambda_weighs_the_current_layer(gen):
    """Trap 11: v <- lambda v + (1 - lambda) v1, lambda = sigmoid(logit), init 0.9999."""
    vr = ValueResidual(0.9999)
    assert vr.lam.item() == pytest.approx(0.9999, abs=1e-7)
    with torch.no_grad():
        vr.logit.fill_(math.log(0.3 / 0.7))
    v, v1 = torch.randn(2, 3, 2, 4, generator=gen), torch.randn(2, 3, 2, 4, generator=gen)
    torch.testing.assert_close(vr(v, v1), 0.3 * v + 0.7 * v1)

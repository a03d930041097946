"""Routed experts: grouped GEMM path vs the per-expert loop vs a dense all-experts oracle."""

import pytest
import torch

from vpmoe.model.experts import experts_grouped, experts_reference
from vpmoe.model.mlp import relu_squared


def dense_all_experts(x, idx, weights, fc1_w, fc1_b, fc2_w, fc2_b):
    """Every expert on every token, then keep the chosen ones: obviously right, E times the work."""
    h = relu_squared(torch.einsum("nd,efd->nef", x, fc1_w) + fc1_b)  # [N, E, F]
    out = torch.einsum("nef,edf->ned", h, fc2_w) + fc2_b  # [N, E, D]
    gate = torch.zeros(x.shape[0], fc1_w.shape[0]).scatter(1, idx, weights)
    return torch.einsum("ne,ned->nd", gate, out)


def _weights(gen, E, D, F):
    return (torch.randn(E, F, D, generator=gen) * 0.2, torch.randn(E, F, generator=gen) * 0.1,
            torch.randn(E, D, F, generator=gen) * 0.2, torch.randn(E, D, generator=gen) * 0.1)


@pytest.mark.parametrize(("N", "E", "K"), [(50, 16, 4), (7, 32, 4), (64, 8, 2)])
def test_grouped_and_loop_match_dense(gen, N, E, K):
    D, F = 16, 8
    x = torch.randn(N, D, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=gen)
    params = _weights(gen, E, D, F)
    dense = dense_all_experts(x, idx, weights, *params)
    torch.testing.assert_close(experts_reference(x, idx, weights, *params), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts_grouped(x, idx, weights, *params), dense, rtol=1e-5, atol=1e-5)


def test_grouped_gradients_match_loop(gen):
    N, E, K, D, F = 40, 8, 2, 16, 8
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    idx[:, 0] = 0  # expert 0 busy; some experts may be empty
    weights = torch.rand(N, K, generator=gen, requires_grad=True)
    params = [p.requires_grad_() for p in _weights(gen, E, D, F)]
    grad_out = torch.randn(N, D, generator=gen)
    inputs = (x, weights, *params)
    g_loop = torch.autograd.grad((experts_reference(x, idx, weights, *params) * grad_out).sum(), inputs)
    g_grouped = torch.autograd.grad((experts_grouped(x, idx, weights, *params) * grad_out).sum(), inputs)
    for a, b in zip(g_grouped, g_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_bf16_close_to_fp32(gen):
    N, E, K, D, F = 64, 16, 4, 32, 16
    x = torch.randn(N, D, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=gen)
    params = _weights(gen, E, D, F)
    ref = experts_reference(x, idx, weights, *params)
    out = experts_grouped(x.bfloat16(), idx, weights, *(p.bfloat16() for p in params))
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_grouped_computes_only_routed_tokens(gen, monkeypatch):
    """Each grouped GEMM multiplies exactly the N*K routed (token, expert) rows, never all N*E."""
    N, E, K, D, F = 128, 64, 4, 32, 16
    x = torch.randn(N, D, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=gen)
    params = _weights(gen, E, D, F)
    calls = []
    real = torch._grouped_mm

    def recording(a, b, offs=None, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape), offs.clone()))
        return real(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    experts_grouped(x, idx, weights, *params)
    assert [(a, b) for a, b, _ in calls] == [((N * K, D), (E, D, F)), ((N * K, F), (E, F, D))]
    expected_ends = torch.cumsum(torch.bincount(idx.flatten(), minlength=E), 0)
    assert torch.equal(calls[0][2].long(), expected_ends)

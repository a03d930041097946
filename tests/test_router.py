"""Router, aux loss and expert-bias update against Megatron-Core 0.16.1 (fused=False, CPU) and loops."""

import pytest
import torch

from vpmoe.model.router import (
    DeepSeekV3Router,
    aux_loss_routing,
    expert_bias_update,
    group_limited_topk,
    seq_aux_loss,
    sigmoid_topk_routing,
)

mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

SETTINGS = [  # (experts, topk, groups, group_topk)
    (256, 4, 8, 4),  # locked
    (16, 4, 4, 2),  # tiny: groups score by their top-2
    (32, 6, 8, 3),
    (64, 8, 1, 1),
]


def _dense(idx: torch.Tensor, values: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], num_experts, dtype=values.dtype).scatter(1, idx, values)


@pytest.mark.parametrize(("E", "K", "groups", "gtopk"), SETTINGS)
def test_routing_matches_megatron(gen, E, K, groups, gtopk):
    logits = torch.randn(300, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.3
    ref_probs, ref_map = mu.topk_routing_with_score_function(
        logits, K, num_groups=groups if groups > 1 else None, group_topk=gtopk if groups > 1 else None,
        scaling_factor=2.5, score_function="sigmoid", expert_bias=bias, fused=False)
    scores, idx, weights = sigmoid_topk_routing(logits, bias, K, groups, gtopk, 2.5)
    routing_map = _dense(idx, torch.ones_like(weights, dtype=torch.bool), E)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(_dense(idx, weights, E), ref_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores, torch.sigmoid(logits))


@pytest.mark.parametrize(("E", "K", "groups", "gtopk"), [s for s in SETTINGS if s[2] > 1])
def test_group_limited_topk_matches_megatron(gen, E, K, groups, gtopk):
    scores = torch.rand(200, E, generator=gen)
    _, ref_idx = mu.group_limited_topk(scores, K, 200, E, groups, gtopk)
    assert torch.equal(group_limited_topk(scores, K, groups, gtopk).sort(dim=1).values, ref_idx.sort(dim=1).values)


def test_group_score_is_sum_of_top_topk_over_group_topk_on_biased_scores():
    """Trap 2, by a hand-made case: groups score by their top K // group_topk biased scores."""
    # 4 groups of 4 experts, topk 4, group_topk 2: a group scores by the sum of its top 2.
    s = torch.tensor([[0.90, 0.10, 0.10, 0.10,   # group 0: best single expert, sum of top-2 = 1.00
                       0.60, 0.60, 0.10, 0.10,   # group 1: top-2 sum 1.20
                       0.55, 0.55, 0.10, 0.10,   # group 2: top-2 sum 1.10
                       0.50, 0.50, 0.50, 0.50]])  # group 3: top-2 sum 1.00
    chosen = set(group_limited_topk(s, 4, 4, 2)[0].tolist())
    assert chosen == {4, 5, 8, 9}, "expert 0 (best single) is dropped with its group"
    bias = torch.zeros(16)
    bias[0] = bias[1] = 0.3  # lifts group 0 to 1.6 by the BIASED scores
    _, idx, _ = sigmoid_topk_routing(torch.logit(s), bias, 4, 4, 2, 2.5)
    assert {0, 1} <= set(idx[0].tolist())


def test_locked_group_limit_never_changes_the_choice(gen):
    """With 8 groups, group_topk 4, topk 4 a group scores by its best expert, so limiting is a no-op."""
    scores = torch.rand(500, 256, generator=gen)
    limited = group_limited_topk(scores, 4, 8, 4).sort(dim=1).values
    assert torch.equal(limited, scores.topk(4, dim=1).indices.sort(dim=1).values)


def test_tiny_group_limit_changes_choices(gen, tiny_cfg):
    moe = tiny_cfg.moe
    scores = torch.rand(2000, moe.num_experts, generator=gen)
    limited = group_limited_topk(scores, moe.topk, moe.router_num_groups, moe.router_group_topk).sort(1).values
    plain = scores.topk(moe.topk, dim=1).indices.sort(1).values
    changed = (limited != plain).any(dim=1).float().mean().item()
    assert changed > 0.1


def test_gates_sum_to_scaling_factor_and_use_unbiased_scores(gen):
    """Trap 3: the bias chooses, never weighs; gates = 2.5 * s_i / sum_K s_j over unbiased scores."""
    logits = torch.randn(400, 64, generator=gen)
    bias = torch.randn(64, generator=gen)
    _, idx, weights = sigmoid_topk_routing(logits, bias, 4, 8, 4, 2.5)
    torch.testing.assert_close(weights.sum(dim=1), torch.full((400,), 2.5))
    chosen = torch.sigmoid(logits).gather(1, idx)
    torch.testing.assert_close(weights, 2.5 * chosen / chosen.sum(dim=1, keepdim=True))
    _, idx_nobias, _ = sigmoid_topk_routing(logits, None, 4, 8, 4, 2.5)
    assert not torch.equal(idx.sort(1).values, idx_nobias.sort(1).values), "the bias must change selection"


def test_aux_loss_routing_matches_megatron(gen):
    logits = torch.randn(256, 32, generator=gen)
    ref_map, ref_scores = mu.compute_routing_scores_for_aux_loss(logits, 4, "sigmoid", fused=False)
    routing_map, scores = aux_loss_routing(logits, 4)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(scores, ref_scores)


@pytest.mark.parametrize(("B", "T", "E", "K"), [(3, 50, 32, 4), (1, 64, 256, 4), (4, 16, 16, 4)])
def test_seq_aux_loss_matches_megatron_and_its_gradient(gen, B, T, E, K):
    """Trap 4: plain top-K over all-expert-normalised scores, per packed row; gradient through P only."""
    logits = (torch.randn(B * T, E, generator=gen) * 2).requires_grad_()
    ours = seq_aux_loss(logits, B, K, 1e-4)
    (g_ours,) = torch.autograd.grad(ours, logits)

    ref_logits = logits.detach().clone().requires_grad_()
    # Megatron's layout is sequence-major [T, B]: reorder our batch-major rows, then each (row, expert)
    # pair becomes one column of length T.
    seq_major = ref_logits.view(B, T, E).transpose(0, 1).reshape(T * B, E)
    routing_map, scores = mu.compute_routing_scores_for_aux_loss(seq_major, K, "sigmoid", fused=False)
    ref = mu.switch_load_balancing_loss_func(
        scores.reshape(T, -1), routing_map.reshape(T, -1).sum(dim=0), T, K, E, 1e-4, fused=False) / B
    (g_ref,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-12)


def test_seq_aux_loss_equals_alpha_at_perfect_balance():
    """With equal scores and each expert taking exactly its share of every row, L = alpha."""
    E, K, T = 8, 2, 8
    # Token t prefers experts 2t%8 and 2t%8+1 by a hair, so counts are exactly T*K/E per expert.
    logits = torch.zeros(T, E)
    for t in range(T):
        logits[t, (2 * t) % E] = logits[t, (2 * t + 1) % E] = 1e-4
    loss = seq_aux_loss(logits, 1, K, 0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5), rtol=1e-3, atol=0)


def test_seq_aux_loss_against_a_loop(gen):
    B, T, E, K, alpha = 2, 20, 12, 3, 0.01
    logits = torch.randn(B * T, E, generator=gen)
    s = torch.sigmoid(logits)
    s_hat = s / s.sum(dim=1, keepdim=True)
    total = 0.0
    for b in range(B):
        rows = s_hat[b * T:(b + 1) * T]
        top = rows.topk(K, dim=1).indices
        for i in range(E):
            f = E / (K * T) * sum(int(i in top[t].tolist()) for t in range(T))
            P = rows[:, i].mean().item()
            total += f * P
    torch.testing.assert_close(seq_aux_loss(logits, B, K, alpha).item(), alpha / B * total, rtol=1e-5, atol=0)


def test_expert_bias_update_sign_rule(gen):
    bias = torch.randn(16, generator=gen) * 0.01
    counts = torch.randint(0, 40, (16,), generator=gen).float()
    new = expert_bias_update(bias, counts, 1e-3)
    mean = counts.mean().item()
    for i in range(16):
        step = 0.0 if counts[i] == mean else (1e-3 if counts[i] < mean else -1e-3)
        assert new[i].item() == pytest.approx(bias[i].item() + step, abs=1e-9)


def test_router_counts_only_under_grad_and_update_resets(gen):
    """Trap 5 (module side): counts accumulate over micro-batches with grad enabled, none under no_grad."""
    router = DeepSeekV3Router(32, 16, 4, 4, 2, 2.5, True, 1e-3, 0.02)
    x1, x2 = torch.randn(40, 32, generator=gen), torch.randn(24, 32, generator=gen)
    out1 = router(x1)
    out2 = router(x2)
    with torch.no_grad():
        router(torch.randn(100, 32, generator=gen))
    expected = torch.bincount(torch.cat([out1.topk_idx.flatten(), out2.topk_idx.flatten()]), minlength=16)
    assert torch.equal(router.expert_counts, expected.float())
    before = router.expert_bias.clone()
    router.apply_bias_update()
    torch.testing.assert_close(router.expert_bias, expert_bias_update(before, expected.float(), 1e-3))
    assert router.expert_counts.sum() == 0
    assert "expert_bias" in router.state_dict() and "expert_counts" not in router.state_dict()
    assert "expert_bias" not in dict(router.named_parameters())


def test_router_is_fp32_under_bf16(gen):
    router = DeepSeekV3Router(32, 16, 4, 4, 2, 2.5, True, 1e-3, 0.02).to(torch.bfloat16)
    assert router.weight.dtype == router.expert_bias.dtype == router.bias.dtype == torch.float32
    out = router(torch.randn(8, 32, generator=gen).bfloat16())
    assert out.logits.dtype == out.scores.dtype == out.topk_weights.dtype == torch.float32

"""The whole model: outputs, hook points, kernel parity, bf16, bad input, init, parameter counts."""

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vpmoe import VpMoE, load_config
from vpmoe.cli import main
from vpmoe.config import ConfigError
from vpmoe.model.hooks import HookPoint
from vpmoe.model.lm_head import lm_loss_chunked, lm_loss_reference
from vpmoe.model.mlp import ReluSquaredFFN
from vpmoe.model.moe import MoEFFN
from vpmoe.model.positional import grape_m_rotate
from vpmoe.params import budget_counts, build_on_meta, formula_counts, instantiated_counts


def _with_runtime(cfg, **runtime):
    return cfg.replace(runtime=dataclasses.replace(cfg.runtime, **runtime))


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return VpMoE(tiny_cfg)


def _tokens(gen, B=2, T=70, vocab=201088):
    return torch.randint(0, vocab, (B, T), generator=gen)


def test_forward_shapes_and_backward(tiny_model, gen):
    tokens = _tokens(gen)
    out = tiny_model(tokens, labels=tokens)
    assert out.logits.shape == (2, 70, 201088)
    assert out.aux_losses.shape == (7,) and out.aux_loss.shape == ()
    torch.testing.assert_close(out.aux_loss, out.aux_losses.sum())
    assert out.lm_loss.item() == pytest.approx(math.log(201088), rel=0.02)
    out.loss.backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["blocks.3.attn.value_residual.logit"].abs() > 0
    assert grads["grape_m.theta"].abs().sum() > 0
    tiny_model.zero_grad()


def test_chunked_loss_matches_logits_loss(tiny_model, gen):
    tokens = _tokens(gen)
    full = tiny_model(tokens, labels=tokens)
    chunked = tiny_model(tokens, labels=tokens, return_logits=False)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_value_and_gradients(gen):
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (37,), generator=gen)
    labels[5] = -100
    ref = lm_loss_reference(hidden, weight, labels)
    g_ref = torch.autograd.grad(ref * 3.0, (hidden, weight))
    ours = lm_loss_chunked(hidden, weight, labels, chunk=8)
    g_ours = torch.autograd.grad(ours * 3.0, (hidden, weight))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss_chunked(hidden, weight, labels, chunk=8), ref)


def test_every_hook_point_fires_once_with_its_shape(tiny_cfg, gen):
    cfg = _with_runtime(tiny_cfg, attention_kernel="reference")
    torch.manual_seed(0)
    model = VpMoE(cfg)
    B, T = 2, 40
    m, moe = cfg.model, cfg.moe
    H, G, d, E, K, N = m.num_attention_heads, m.num_query_groups, m.head_dim, moe.num_experts, moe.topk, B * T
    seen: Counter[str] = Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            def record(mod, args, out, name=name):
                seen[name] += 1
                shapes[name] = tuple(out.shape)
            hooks.append(module.register_forward_hook(record))
    model(_tokens(gen, B, T))
    for h in hooks:
        h.remove()
    expected = {}
    for layer, block in enumerate(model.blocks):
        expected |= {f"blocks.{layer}.attn.q": (B, T, H, d), f"blocks.{layer}.attn.k": (B, T, G, d),
                     f"blocks.{layer}.attn.v": (B, T, G, d), f"blocks.{layer}.attn.probs": (B, H, T, T)}
        if isinstance(block.ffn, MoEFFN):
            r = f"blocks.{layer}.ffn.router"
            expected |= {f"{r}.logits": (N, E), f"{r}.scores": (N, E), f"{r}.topk_idx": (N, K),
                         f"{r}.topk_weights": (N, K)}
    assert shapes == expected
    assert set(seen.values()) == {1}


def test_fast_kernels_fire_all_hooks_but_probs(tiny_model, gen):
    fired = set()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: fired.add(n))
             for n, m in tiny_model.named_modules() if isinstance(m, HookPoint)]
    tiny_model(_tokens(gen, 1, 20))
    for h in hooks:
        h.remove()
    all_points = {n for n, m in tiny_model.named_modules() if isinstance(m, HookPoint)}
    assert all_points - fired == {n for n in all_points if n.endswith("attn.probs")}


def test_q_and_k_hooks_see_normed_and_rotated_values(tiny_cfg, gen):
    """Trap 8: the q hook sees QKV + bias -> QK-norm -> GRAPE-M; global layers are not rotated."""
    torch.manual_seed(0)
    model = VpMoE(tiny_cfg)
    captured = {}
    attn_local, attn_global = model.blocks[1].attn, model.blocks[3].attn
    assert (attn_local.kind, attn_global.kind) == ("local", "global")
    hooks = [attn_local.q.register_forward_hook(lambda m, a, o: captured.__setitem__("local", o)),
             attn_global.q.register_forward_hook(lambda m, a, o: captured.__setitem__("global", o)),
             attn_local.qkv.register_forward_hook(lambda m, a, o: captured.__setitem__("local_raw", o[0])),
             attn_global.qkv.register_forward_hook(lambda m, a, o: captured.__setitem__("global_raw", o[0]))]
    with torch.no_grad():
        model(_tokens(gen, 1, 30))
    for h in hooks:
        h.remove()
    cos, sin = model.grape_m(30)
    normed_local = attn_local.q_norm(captured["local_raw"])
    torch.testing.assert_close(captured["local"], grape_m_rotate(normed_local, cos, sin))
    torch.testing.assert_close(captured["global"], attn_global.q_norm(captured["global_raw"]))


def test_kernel_paths_agree_on_the_whole_model(tiny_cfg, gen):
    tokens = _tokens(gen, 2, 100)
    outs = {}
    for attention, experts in [("reference", "reference"), ("blocked", "grouped")]:
        torch.manual_seed(0)
        model = VpMoE(_with_runtime(tiny_cfg, attention_kernel=attention, expert_kernel=experts))
        assert model.kernels.as_dict() == {"attention": attention, "experts": experts}
        out = model(tokens, labels=tokens)
        out.loss.backward()
        outs[attention] = (out.logits, out.aux_loss, model.blocks[2].ffn.router.weight.grad.clone(),
                           model.blocks[5].attn.qkv.b_q.weight.grad.clone())
    for a, b in zip(outs["reference"], outs["blocked"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_on_cpu_keeps_fp32_state(tiny_cfg, gen):
    torch.manual_seed(0)
    model = VpMoE(tiny_cfg).to(torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    fp32 = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dtype == torch.float32}
    assert "grape_m.theta" in fp32 and "blocks.1.ffn.router.expert_bias" in fp32
    assert "blocks.1.ffn.router.weight" in fp32 and "blocks.2.attn.value_residual.logit" in fp32
    tokens = _tokens(gen, 2, 50)
    out = model(tokens, labels=tokens, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.lm_loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_bad_tokens_give_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"token id 201088 is outside the vocabulary: ids must be in \[0, 201088\)"):
        tiny_model(torch.tensor([[1, 201088]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer tensor"):
        tiny_model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        tiny_model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        tiny_model([[1, 2]])
    with pytest.raises(ValueError, match=r"max_sequence_length"):
        tiny_model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have the shape"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))


def test_explicit_grouped_kernel_that_cannot_run_fails_at_construction(tiny_cfg):
    cfg = tiny_cfg.replace(model=dataclasses.replace(tiny_cfg.model, ffn_hidden_size=30))
    with pytest.raises(ConfigError, match=r"\[runtime\].expert_kernel = \"grouped\" needs"):
        VpMoE(_with_runtime(cfg, expert_kernel="grouped"))
    assert VpMoE(cfg).kernels.experts == "reference"


def test_initialisation_follows_the_contract(locked_cfg):
    """Contract 7 on a 4-layer slice of the locked widths: N(0, 0.02), output side 0.02/sqrt(2L)."""
    torch.manual_seed(0)
    cfg = locked_cfg.replace(model=dataclasses.replace(locked_cfg.model, num_layers=4),
                             tokenizer=dataclasses.replace(locked_cfg.tokenizer, vocab_size=4096),
                             runtime=dataclasses.replace(locked_cfg.runtime, dtype="float32"))
    model = VpMoE(cfg)
    out_std = 0.02 / math.sqrt(2 * 4)
    p = dict(model.named_parameters())
    for name, std in [("embedding.weight", 0.02), ("lm_head.weight", 0.02), ("blocks.1.ffn.router.weight", 0.02),
                      ("blocks.1.ffn.experts.fc1_weight", 0.02), ("blocks.1.ffn.experts.fc2_weight", out_std),
                      ("blocks.1.attn.linear_proj.weight", out_std), ("blocks.3.attn.qkv.linear_qkv.weight", 0.02),
                      ("blocks.0.ffn.fc2.weight", out_std), ("blocks.1.ffn.shared_expert.fc2.weight", out_std)]:
        assert p[name].std().item() == pytest.approx(std, rel=0.05), name
        assert abs(p[name].mean().item()) < std / 10
    assert p["blocks.1.ffn.experts.fc1_bias"].abs().sum() == 0 and p["blocks.1.attn.linear_proj.bias"].abs().sum() == 0
    assert p["blocks.1.ffn.router.bias"].std().item() == pytest.approx(0.02, rel=0.2)
    assert p["blocks.1.attn.sinks"].abs().sum() > 0 and (p["blocks.1.input_norm.weight"] == 1).all()
    assert (model.blocks[1].ffn.router.expert_bias == 0).all()
    assert model.lm_head.bias is None and model.lm_head.weight.data_ptr() != model.embedding.weight.data_ptr()


def test_locked_model_layout_on_meta(locked_cfg):
    """Traps 1, 9, 10, 12 on the real 6B module tree without allocating it."""
    model = build_on_meta(locked_cfg)
    dense = model.blocks[0].ffn
    assert isinstance(dense, ReluSquaredFFN)
    assert dense.fc1.weight.shape == (128, 1024) and dense.fc2.weight.shape == (1024, 128)
    assert sum(isinstance(b.ffn, MoEFFN) for b in model.blocks) == 79
    assert [b.attn.kind for b in model.blocks].count("global") == 20
    tpa = model.blocks[0].attn.qkv
    assert (tpa.a_q.weight.shape, tpa.a_k.weight.shape, tpa.b_q.weight.shape, tpa.b_v.weight.shape) == \
        ((32, 1024), (4, 1024), (512, 1024), (256, 1024))
    assert model.blocks[3].attn.qkv.linear_qkv.weight.shape == (1536, 1024)
    assert model.grape_m.theta.shape == (64,) and sum("theta" in n for n, _ in model.named_parameters()) == 1
    assert sum(n.endswith("value_residual.logit") for n, _ in model.named_parameters()) == 79
    router = model.blocks[1].ffn.router
    assert router.weight.shape == (256, 1024) and router.bias.shape == (256,)
    experts = model.blocks[1].ffn.experts
    assert experts.fc1_weight.shape == (256, 128, 1024) and experts.fc2_bias.shape == (256, 1024)


def test_parameter_counts_of_the_locked_model(locked_cfg):
    budget = budget_counts(locked_cfg)
    assert (budget.total, budget.active, budget.active_non_embedding) == (6_021_692_480, 779_995_712, 368_167_488)
    built = instantiated_counts(build_on_meta(locked_cfg))
    assert (built.total, built.active) == (6_021_784_719, 780_087_951)
    assert built == formula_counts(locked_cfg)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 9), freq=st.integers(1, 4), value_residual=st.booleans(), qk_norm=st.booleans(),
       use_tpa=st.booleans(), shared=st.booleans(), dense_first=st.booleans(), sink=st.booleans())
def test_instantiated_counts_equal_the_formula(tiny_cfg, layers, freq, value_residual, qk_norm, use_tpa, shared,
                                               dense_first, sink):
    cfg = tiny_cfg.replace(
        model=dataclasses.replace(tiny_cfg.model, num_layers=layers, value_residual=value_residual,
                                  qk_layernorm=qk_norm, softmax_type="learnable" if sink else "vanilla"),
        attention=dataclasses.replace(tiny_cfg.attention, window_attn_skip_freq=freq),
        tpa=dataclasses.replace(tiny_cfg.tpa, use_tpa=use_tpa),
        moe=dataclasses.replace(tiny_cfg.moe, shared_expert=shared, first_layer_dense=dense_first))
    assert instantiated_counts(build_on_meta(cfg)) == formula_counts(cfg)


def test_params_cli_json(capsys):
    assert main(["params", "--config", "configs/vpmoe.toml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"budget": {"total": 6021692480, "active": 779995712, "active_non_embedding": 368167488},
                   "instantiated": {"total": 6021784719, "active": 780087951, "active_non_embedding": 368259727}}


def test_tiny_config_file_loads_and_runs(gen):
    cfg = load_config("configs/tiny.toml")
    torch.manual_seed(1)
    out = VpMoE(cfg)(_tokens(gen, 1, cfg.training.seq_length))
    assert torch.isfinite(out.logits).all()

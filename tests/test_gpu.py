"""CUDA only (skipped without a GPU): compiled FlexAttention forward and backward against the reference, the whole
model on the fused path, the compiled block, and FlexAttention's memory staying linear in the sequence length."""

import dataclasses

import pytest
import torch

from vpmoe import VpMoE
from vpmoe.model.attention_math import attention_reference
from vpmoe.model.flex_attention import FlexBlockMasks, attention_flex, flex_function
from vpmoe.model.kernels import resolve_kernels
from vpmoe.model.positional import alibi_slopes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
# Relative error of whole tensors (||a - b|| / ||b||): bf16 keeps about 3 significant digits.
RELATIVE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _with_runtime(cfg, **runtime):
    return cfg.replace(runtime=dataclasses.replace(cfg.runtime, **runtime))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["local", "global"])
def test_compiled_flex_matches_reference_forward_and_backward(kind, dtype):
    """Locked head shape (H=8, G=2, d=128, W=128), T not a multiple of the 128 block."""
    gen = torch.Generator(device=CUDA).manual_seed(0)
    T, H, G, d = 1000, 8, 2, 128
    q, k, v = (torch.randn(2, T, n, d, generator=gen, device=CUDA, dtype=dtype, requires_grad=True)
               for n in (H, G, G))
    sink = torch.randn(H, generator=gen, device=CUDA, requires_grad=True)
    window, slopes = (128, None) if kind == "local" else (None, alibi_slopes(H).to(CUDA))
    grad_out = torch.randn(2, T, H, d, generator=gen, device=CUDA, dtype=dtype)
    ref, _ = attention_reference(q, k, v, sink, window, slopes)
    g_ref = torch.autograd.grad((ref.float() * grad_out.float()).sum(), (q, k, v, sink))
    out = attention_flex(q, k, v, sink, FlexBlockMasks(128)(T, CUDA)[kind], slopes, flex_function("cuda"))
    g_flex = torch.autograd.grad((out.float() * grad_out.float()).sum(), (q, k, v, sink))
    assert out.dtype == dtype
    assert _relative_error(out, ref) < RELATIVE[dtype]
    for name, a, b in zip("qkvs", g_flex, g_ref, strict=True):
        assert _relative_error(a, b) < RELATIVE[dtype], name


def test_whole_model_fused_matches_reference_on_cuda(tiny_cfg):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 201088, (2, 100), generator=gen).to(CUDA)
    outs = {}
    for attention, experts in (("reference", "reference"), ("flex", "grouped")):
        torch.manual_seed(0)
        model = VpMoE(_with_runtime(tiny_cfg, device="cuda", attention_kernel=attention, expert_kernel=experts))
        model = model.to(CUDA)
        out = model(tokens, labels=tokens)
        out.loss.backward()
        outs[attention] = (out.logits, out.aux_loss, model.blocks[2].ffn.router.weight.grad,
                           model.blocks[3].attn.sinks.grad, model.blocks[5].attn.qkv.b_q.weight.grad)
    for a, b in zip(outs["flex"], outs["reference"], strict=True):
        assert _relative_error(a, b) < 1e-4


def test_compiled_model_with_flex_matches_eager_on_cuda(tiny_cfg):
    """Every block kind (layer 1, local with value residual, global) compiled with FlexAttention inside."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 201088, (2, 128), generator=gen).to(CUDA)
    grads, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = _with_runtime(tiny_cfg, device="cuda", attention_kernel="flex", compile=compiled)
        model = VpMoE(cfg).to(CUDA)
        out = model(tokens, labels=tokens, return_logits=False)
        out.loss.backward()
        losses[compiled] = out.loss.detach()
        grads[compiled] = [p.grad for p in model.parameters()]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[True], grads[False], strict=True):
        assert _relative_error(a, b) < 1e-4


def test_auto_picks_flex_on_cuda(tiny_cfg):
    assert resolve_kernels(_with_runtime(tiny_cfg, device="auto")).attention == "flex"


def test_flex_memory_stays_linear_in_sequence_length():
    """A [B, H, T, T] score matrix at T = 16384 would be 8.6 GB in fp32; the fused kernel never builds it."""
    T, H, G, d = 16384, 8, 2, 128
    q, k, v = (torch.randn(1, T, n, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for n in (H, G, G))
    sink = torch.zeros(H, device=CUDA, requires_grad=True)
    masks = FlexBlockMasks(128)(T, CUDA)
    flex = flex_function("cuda")
    attention_flex(q, k, v, sink, masks["local"], None, flex).sum().backward()  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    for kind, slopes in (("local", None), ("global", alibi_slopes(H).to(CUDA))):
        attention_flex(q, k, v, sink, masks[kind], slopes, flex).sum().backward()
    assert torch.cuda.max_memory_allocated() - start < 256 * 2**20

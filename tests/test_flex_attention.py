"""FlexAttention kernel: the sink from the log-sum-exp, masks, parity with the reference (CPU, forward only),
the whole model on the flex path, and how the kernel is chosen."""

import dataclasses
import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from vpmoe import VpMoE
from vpmoe.config import ConfigError
from vpmoe.model.attention_math import attention_reference, softmax_with_sink, visible_keys
from vpmoe.model.flex_attention import FlexBlockMasks, apply_sink, attention_flex, window_mask_mod
from vpmoe.model.hooks import HookPoint
from vpmoe.model.kernels import resolve_kernels
from vpmoe.model.positional import alibi_slopes

# CPU FlexAttention runs through an unfused eager path that warns once that it is not compiled; that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _with_runtime(cfg, **runtime):
    return cfg.replace(runtime=dataclasses.replace(cfg.runtime, **runtime))


def _qkv(gen, T, H=4, G=2, d=16, dtype=torch.float32, B=2):
    return tuple(torch.randn(B, T, n, d, generator=gen).to(dtype) for n in (H, G, G))


def test_sink_from_the_log_sum_exp_is_the_sink_softmax(gen):
    """o * sigmoid(lse - s_h) == sum_j p_j v_j with p_j = e^{l_j} / (e^{s_h} + sum_k e^{l_k}) (GPT-OSS oracle)."""
    logits = torch.randn(2, 3, 5, 7, generator=gen)
    logits[..., 4:] = float("-inf")
    values = torch.randn(2, 3, 7, 6, generator=gen)
    sink = torch.randn(3, generator=gen) * 3
    plain = torch.softmax(logits, dim=-1) @ values
    lse = torch.logsumexp(logits, dim=-1)
    expected = softmax_with_sink(logits, sink) @ values
    torch.testing.assert_close(apply_sink(plain, lse, sink), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, 7, 128])
def test_mask_mod_is_the_reference_mask(window):
    """Trap 6 on the flex side: with W = 128, query i sees key i - 127 and not key i - 128."""
    T = 300
    dense = create_mask(window_mask_mod(window), None, None, T, T, device="cpu")[0, 0]
    assert torch.equal(dense, visible_keys(T, window))


def test_block_masks_are_built_once_per_length_and_shared():
    masks = FlexBlockMasks(32)
    first = masks(100, CPU)
    assert masks(100, CPU) is first and set(first) == {"local", "global"}
    assert masks(101, CPU)["local"] is not first["local"]
    assert first["local"].shape[-2:] == (100, 100)


@pytest.mark.parametrize(("T", "window", "use_alibi", "use_sink"),
                         [(1, 32, False, True), (100, 32, False, True), (100, 32, False, False),
                          (130, None, True, True), (130, None, True, False), (37, None, False, True)])
def test_flex_matches_the_reference_fp32(gen, T, window, use_alibi, use_sink):
    q, k, v = _qkv(gen, T)
    sink = torch.randn(4, generator=gen) if use_sink else None
    slopes = alibi_slopes(4) if use_alibi else None
    mask = FlexBlockMasks(32)(T, CPU)["local" if window else "global"]
    ref, _ = attention_reference(q, k, v, sink, window, slopes)
    with torch.no_grad():
        out = attention_flex(q, k, v, sink, mask, slopes)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("kind", ["local", "global"])
def test_flex_matches_the_reference_bf16(gen, kind):
    q, k, v = _qkv(gen, 150, dtype=torch.bfloat16)
    sink = torch.randn(4, generator=gen)
    window, slopes = (32, None) if kind == "local" else (None, alibi_slopes(4))
    ref, _ = attention_reference(q, k, v, sink, window, slopes)
    with torch.no_grad():
        out = attention_flex(q, k, v, sink, FlexBlockMasks(32)(150, CPU)[kind], slopes)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[torch.bfloat16])


def test_window_edge_in_the_flex_kernel(gen):
    """Changing key i-128's value moves nothing at query i; changing key i-127's does."""
    T, W = 300, 128
    q, k, v = _qkv(gen, T, H=2, G=1, d=16, B=1)
    mask = FlexBlockMasks(W)(T, CPU)["local"]
    with torch.no_grad():
        base = attention_flex(q, k, v, None, mask, None)
        for offset, should_change in ((128, False), (127, True)):
            v2 = v.clone()
            v2[0, 250 - offset] += 10.0
            changed = not torch.allclose(attention_flex(q, k, v2, None, mask, None)[0, 250], base[0, 250])
            assert changed == should_change


def test_alibi_is_added_after_the_scale(gen):
    """Contract 4: l = q.k / sqrt(d) - m_h (i - j); a score_mod applied before the scale would differ by sqrt(d)."""
    q, k, v = _qkv(gen, 20, H=2, G=2, d=64, B=1)
    slopes = torch.tensor([0.5, 0.25])
    with torch.no_grad():
        out = attention_flex(q, k, v, None, FlexBlockMasks(8)(20, CPU)["global"], slopes)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(64)
    logits = logits - slopes[:, None, None] * (torch.arange(20)[:, None] - torch.arange(20)[None, :])
    probs = torch.softmax(logits.masked_fill(~visible_keys(20, None), float("-inf")), dim=-1)
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", probs, v), rtol=1e-5, atol=1e-5)


def test_flex_on_cpu_has_no_backward(gen):
    """Documented limit: PyTorch's CPU FlexAttention is forward only, so CPU training uses 'blocked'."""
    q, k, v = _qkv(gen, 16)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        attention_flex(q, k, v, None, FlexBlockMasks(8)(16, CPU)["local"], None)


def test_whole_model_flex_matches_reference(tiny_cfg, gen):
    tokens = torch.randint(0, 201088, (2, 100), generator=gen)
    outs = {}
    for kernel in ("reference", "flex"):
        torch.manual_seed(0)
        model = VpMoE(_with_runtime(tiny_cfg, attention_kernel=kernel))
        assert model.kernels.attention == kernel
        with torch.no_grad():
            outs[kernel] = model(tokens, labels=tokens)
    torch.testing.assert_close(outs["flex"].logits, outs["reference"].logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["flex"].lm_loss, outs["reference"].lm_loss, rtol=1e-5, atol=1e-6)


def test_whole_model_flex_bf16_loss_matches_reference(tiny_cfg, gen):
    """In bf16 a rounding can flip a routing choice, so the whole model is compared on its loss."""
    tokens = torch.randint(0, 201088, (2, 64), generator=gen)
    losses = {}
    for kernel in ("reference", "flex"):
        torch.manual_seed(0)
        model = VpMoE(_with_runtime(tiny_cfg, attention_kernel=kernel)).to(torch.bfloat16)
        with torch.no_grad():
            losses[kernel] = model(tokens, labels=tokens, return_logits=False).lm_loss
    torch.testing.assert_close(losses["flex"], losses["reference"], rtol=1e-3, atol=1e-3)


def test_flex_path_fires_every_hook_but_probs(tiny_cfg, gen):
    torch.manual_seed(0)
    model = VpMoE(_with_runtime(tiny_cfg, attention_kernel="flex"))
    fired = set()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: fired.add(n))
             for n, m in model.named_modules() if isinstance(m, HookPoint)]
    with torch.no_grad():
        model(torch.randint(0, 201088, (1, 20), generator=gen))
    for h in hooks:
        h.remove()
    all_points = {n for n, m in model.named_modules() if isinstance(m, HookPoint)}
    assert all_points - fired == {n for n in all_points if n.endswith("attn.probs")}


def test_kernel_choice(tiny_cfg):
    """auto: blocked on CPU, flex on CUDA unless dropout rules it out; explicit flex fails early with a reason."""
    assert resolve_kernels(tiny_cfg).attention == "blocked"
    assert resolve_kernels(_with_runtime(tiny_cfg, attention_kernel="flex")).attention == "flex"
    on_cuda = _with_runtime(tiny_cfg, device="cuda")
    assert resolve_kernels(on_cuda).attention == "flex"
    dropout = on_cuda.replace(attention=dataclasses.replace(tiny_cfg.attention, attention_dropout=0.1))
    assert resolve_kernels(dropout).attention == "blocked"
    with pytest.raises(ConfigError, match=r"\[runtime\].attention_kernel = \"flex\" cannot apply attention dropout"):
        VpMoE(_with_runtime(dropout, attention_kernel="flex"))
    with pytest.raises(ConfigError, match=r"compile = true on CPU: compiled FlexAttention on CPU is inference-only"):
        VpMoE(_with_runtime(tiny_cfg, attention_kernel="flex", compile=True))

"""Attention with a learnable sink: the dense reference and the faster kernels tested against it.

Shapes: q [B, T, H, d]; k, v [B, T, G, d] with query head h using KV group h // (H / G); sink [H] or
None; window counts the query itself (a query sees itself and window - 1 earlier keys).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_with_sink(logits: Tensor, sink: Tensor | None) -> Tensor:
    """p_ij = exp(l_ij) / (exp(s_h) + sum_k exp(l_ik)) in fp32. logits [B, H, Tq, Tk] (masked = -inf); sink [H].

    The sink is one unscaled logit column per head that is never masked and carries no value (GPT-OSS).
    """
    logits = logits.float()
    if sink is None:
        return torch.softmax(logits, dim=-1)
    column = sink.float().view(1, -1, *([1] * (logits.dim() - 2))).expand(*logits.shape[:-1], 1)
    return torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]


def visible_keys(seq_len: int, window: int | None, device: torch.device | None = None) -> Tensor:
    """Dense mask [T, T], True where query i sees key j: j <= i, and i - j <= window - 1 when windowed."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= (i - j) <= window - 1
    return mask


def alibi_bias(slopes: Tensor, seq_len: int) -> Tensor:
    """ALiBi bias -m_h * (i - j) as [H, T, T] fp32 (added after the 1/sqrt(d) scaling)."""
    pos = torch.arange(seq_len, device=slopes.device, dtype=torch.float32)
    distance = pos[:, None] - pos[None, :]  # [T, T], i - j
    return -slopes.float()[:, None, None] * distance


def attention_reference(q: Tensor, k: Tensor, v: Tensor, sink: Tensor | None, window: int | None,
                        slopes: Tensor | None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Dense fp32 attention: l = q.k / sqrt(d) (+ ALiBi), causal/window mask, sink softmax, o = p v.

    Returns (o [B, T, H, d] in q's dtype, p [B, H, T, T] fp32). Builds T x T tensors: the oracle only.
    """
    T, H, d = q.shape[1:]
    rep = H // k.shape[2]
    k_h = k.repeat_interleave(rep, dim=2)  # [B, T, H, d]: head h reads group h // rep
    v_h = v.repeat_interleave(rep, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q.float(), k_h.float()) / math.sqrt(d)
    if slopes is not None:
        logits = logits + alibi_bias(slopes, T)[None]
    logits = logits.masked_fill(~visible_keys(T, window, q.device), float("-inf"))
    probs = softmax_with_sink(logits, sink)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, v_h.float())
    return out.to(q.dtype), probs


def attention_local_blocked(q: Tensor, k: Tensor, v: Tensor, sink: Tensor | None, window: int,
                            dropout_p: float = 0.0) -> Tensor:
    """Sliding-window attention in blocks of `window` queries against the previous and current key block.

    Cost and memory grow linearly in T (each query scores 2*window keys, never a T x T matrix); GQA
    without repeating K and V. Same result as `attention_reference(..., window, slopes=None)`.
    """
    B, T, H, d = q.shape
    G = k.shape[2]
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    # Queries in blocks of W: [B, nb, W, G, H/G, d].
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nb, W, G, H // G, d)
    # Keys of block c are positions [(c-1)W, (c+1)W): a zero block in front, then pairs of blocks.
    kp = F.pad(k, (0, 0, 0, 0, W, pad)).view(B, nb + 1, W, G, d)
    vp = F.pad(v, (0, 0, 0, 0, W, pad)).view(B, nb + 1, W, G, d)
    kb = torch.cat([kp[:, :-1], kp[:, 1:]], dim=2)  # [B, nb, 2W, G, d]
    vb = torch.cat([vp[:, :-1], vp[:, 1:]], dim=2)
    logits = torch.einsum("bcqgrd,bckgd->bcgrqk", qb, kb).float() / math.sqrt(d)  # [B, nb, G, H/G, W, 2W]
    # Query a of block c is position cW + a; key b is (c-1)W + b; visible iff 0 <= i - j <= W - 1.
    a = torch.arange(W, device=q.device)[:, None]
    b = torch.arange(2 * W, device=q.device)[None, :]
    rel = W + a - b
    visible = ((rel >= 0) & (rel <= W - 1)).expand(nb, W, 2 * W).clone()
    visible[0, :, :W] = False  # block 0 has no previous block: those keys are padding
    logits = logits.masked_fill(~visible[None, :, None, None], float("-inf"))
    flat = logits.reshape(B, nb, H, W, 2 * W)  # head index = g * (H/G) + r, as in the reference
    probs = softmax_with_sink(flat.permute(0, 2, 1, 3, 4), sink).permute(0, 2, 1, 3, 4)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    probs = probs.reshape(B, nb, G, H // G, W, 2 * W).to(v.dtype)
    out = torch.einsum("bcgrqk,bckgd->bcqgrd", probs, vb)  # [B, nb, W, G, H/G, d]
    return out.reshape(B, nb * W, H, d)[:, :T]


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, sink: Tensor | None, window: int | None,
                   slopes: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Attention through `scaled_dot_product_attention`, the sink as an extra zero key whose bias is s_h.

    Builds a [H, T, T+1] additive mask (ALiBi, causal/window, sink column); used for global layers.
    """
    B, T, H, d = q.shape
    bias = torch.zeros(H, T, T, device=q.device, dtype=torch.float32)
    if slopes is not None:
        bias = bias + alibi_bias(slopes, T)
    bias = bias.masked_fill(~visible_keys(T, window, q.device), float("-inf"))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
    if sink is not None:
        bias = torch.cat([bias, sink.float().view(H, 1, 1).expand(H, T, 1)], dim=-1)  # [H, T, T+1]
        zero = kt.new_zeros(B, kt.shape[1], 1, d)
        kt = torch.cat([kt, zero], dim=2)
        vt = torch.cat([vt, zero], dim=2)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias.to(q.dtype)[None], dropout_p=dropout_p,
                                         enable_gqa=True)
    return out.transpose(1, 2)

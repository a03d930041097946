"""FlexAttention (`torch.nn.attention.flex_attention`) for both attention kinds, tested against the reference.

Local layers use a block mask that is causal and windowed, `q_idx - kv_idx <= window - 1` (the window counts the
query); global layers a causal block mask and ALiBi as a `score_mod`. FlexAttention has no sink, so the sink comes
from the log-sum-exp it returns: it gives o = sum_j e^{l_j} v_j / Z and lse = ln Z with Z = sum_j e^{l_j}, and the
sink only adds e^{s_h} to the denominator, so o_sink = o Z / (Z + e^{s_h}) = o * sigmoid(lse - s_h).

On CUDA the call is compiled (fused Triton kernels, forward and backward). On CPU it runs eagerly and forward only:
PyTorch's CPU FlexAttention materialises the scores, has no backward, and its compiled form cannot return the
log-sum-exp, so on CPU this path is checked against the reference, never used for speed.
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

FlexMasks = dict[str, BlockMask]  # attention kind ("local" or "global") -> its block mask for one sequence length
FlexFunction = Callable[..., tuple[Tensor, object]]
BLOCK_SIZE = 128  # FlexAttention's tile; the locked window (128) then spans at most two key blocks per query block


def window_mask_mod(window: int | None) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """mask(b, h, i, j) = j <= i, and i - j <= window - 1 when windowed (a query sees itself and window - 1 keys)."""
    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    def windowed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window - 1)

    return causal if window is None else windowed


def alibi_score_mod(slopes: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    """score_mod(l, b, h, i, j) = l - m_h * (i - j): ALiBi added to the already 1/sqrt(d)-scaled logit."""
    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - slopes[h] * (q_idx - kv_idx)

    return alibi


def apply_sink(out: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """o_sink = o * sigmoid(lse - s_h) in fp32: out [B, H, T, d], lse [B, H, T] (natural log), sink [H]."""
    keep = torch.sigmoid(lse.float() - sink.float()[None, :, None])  # Z / (Z + e^{s_h}), mass not given to the sink
    return out.float() * keep[..., None]


class FlexBlockMasks:
    """The block masks of one model, built once per (sequence length, device) and shared by every layer.

    Called outside any compiled region (by the model's forward), so compiled blocks receive masks as inputs.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._cache: dict[tuple[int, str], FlexMasks] = {}

    def __call__(self, seq_len: int, device: torch.device) -> FlexMasks:
        """{"local": causal + window, "global": causal} block masks for `seq_len` queries and keys."""
        key = (seq_len, str(device))
        if key not in self._cache:
            self._cache[key] = {
                kind: create_block_mask(window_mask_mod(window), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len,
                                        device=device, BLOCK_SIZE=BLOCK_SIZE)
                for kind, window in (("local", self.window), ("global", None))}
        return self._cache[key]


@functools.cache
def _compiled_flex_attention() -> FlexFunction:
    # One compiled callable for every layer, so they share its compiled kernels.
    return torch.compile(flex_attention)


def flex_function(device_type: str) -> FlexFunction:
    """The FlexAttention callable for a run on `device_type`: compiled on CUDA, eager (forward only) on CPU."""
    return _compiled_flex_attention() if device_type == "cuda" else flex_attention


def attention_flex(q: Tensor, k: Tensor, v: Tensor, sink: Tensor | None, block_mask: BlockMask,
                   slopes: Tensor | None, flex: FlexFunction = flex_attention) -> Tensor:
    """Same result as `attention_reference(q, k, v, sink, window, slopes)[0]` with the window in `block_mask`.

    q [B, T, H, d]; k, v [B, T, G, d] read by query head h as group h // (H / G) without being repeated.
    """
    d = q.shape[-1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d], FlexAttention's layout
    score_mod = alibi_score_mod(slopes) if slopes is not None else None
    out, aux = flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=1.0 / math.sqrt(d),
                    enable_gqa=True, return_aux=AuxRequest(lse=sink is not None))
    if sink is not None:
        out = apply_sink(out, aux.lse, sink)
    return out.transpose(1, 2).to(q.dtype)

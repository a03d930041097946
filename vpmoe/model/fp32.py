"""Keep selected parameters and buffers in fp32 when the rest of a module is cast (bf16 runs)."""

import torch
from torch import nn


class KeepsFP32(nn.Module):
    """A module whose attributes named in `fp32_names` stay float32 through `.to(dtype)` and `.half()`.

    The contract keeps router weights, expert bias, GRAPE-M frequencies and value-residual logits fp32.
    """

    fp32_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name in self.fp32_names:
            tensor = getattr(self, name)
            if tensor is not None and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self

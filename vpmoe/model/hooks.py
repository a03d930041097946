"""Named identity modules that give tensors between operations a stable path for probes."""

from torch import Tensor, nn


class HookPoint(nn.Identity):
    """Identity whose module path (e.g. `blocks.7.ffn.router.topk_idx`) names the tensor passing through.

    The model never reads what a hook point sees; analysis code attaches to it from outside (nnsight).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Return `x` unchanged."""
        return x

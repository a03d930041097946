"""Reading vpMoE from outside with nnsight: probes, metrics, the store, queries and audits."""

from typing import Any

__all__ = ["Probe"]


def __getattr__(name: str) -> Any:
    """`from analysis import Probe` loads torch and the model only when asked, so the dashboard stays light."""
    if name == "Probe":
        from analysis.probing import Probe

        return Probe
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")

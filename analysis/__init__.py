"""Reading vpMoE from outside with nnsight: probes, metrics, the store, queries and audits."""

from analysis.probing import Probe

__all__ = ["Probe"]

"""Reading vpMoE from outside with nnsight: probes, metrics, the store, queries and audits."""

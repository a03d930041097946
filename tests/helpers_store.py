"""Synthetic recordings for the store tests, and a recorder process the reliability tests kill.

Run as a script it records synthetic tiny-shape steps into a store and prints each step once its
flush returned (the acknowledgement point):
    python tests/helpers_store.py STORE RUN_ID STEPS FLUSH_EVERY_STEPS COMPACT_EVERY_FLUSHES
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from analysis.store import RunWriter, Store


@dataclass(frozen=True)
class Shape:
    """The recorded shape of a model: layer 1 dense, the rest MoE; every `global_every`-th layer global."""

    layers: int
    experts: int
    heads: int
    topk: int = 4
    global_every: int = 4

    @property
    def moe_layers(self) -> np.ndarray:
        """1-based numbers of the MoE layers."""
        return np.arange(2, self.layers + 1, dtype=np.int16)

    def rows_per_step(self) -> dict[str, int]:
        """Rows each per-step table gets for one complete step."""
        loads = len(self.moe_layers) * self.experts
        return {"steps": 1, "router_load": loads, "expert_bias": loads, "layer_stats": self.layers,
                "attention_stats": self.layers * self.heads, "load_rollup": len(self.moe_layers), "load_summary": 1}


TINY = Shape(layers=8, experts=16, heads=4)
PROBE_PROMPTS = {0: ("code", ["def", " f", "(", "x", ")", ":", " return", " x"]),
                 1: ("prose", ["The", " cat", " sat", " on", " the", " mat", ".", " It"])}


def step_rows(shape: Shape, step: int, rng: np.random.Generator) -> dict[str, dict[str, object]]:
    """Columns of every per-step table for one synthetic step."""
    moe = shape.moe_layers
    layer = np.repeat(moe, shape.experts)
    expert = np.tile(np.arange(shape.experts, dtype=np.int16), len(moe))
    tokens_per_layer = 512 * shape.topk
    loads = rng.multinomial(tokens_per_layer, rng.dirichlet(np.ones(shape.experts)), size=len(moe)).ravel()
    all_layers = np.arange(1, shape.layers + 1, dtype=np.int16)
    dense = all_layers == 1
    router_stat = np.where(dense, np.nan, rng.random(shape.layers))
    head_layer = np.repeat(all_layers, shape.heads)
    kind = np.where(head_layer % shape.global_every == 0, "global", "local")
    return {
        "steps": {"step": step, "lm_loss": 10.0 / (1 + step), "aux_loss": 0.01, "eval_loss": None, "lr": 1e-3,
                  "tokens_per_s": 1e4, "tokens": (step + 1) * 512, "step_time_s": 0.05, "wall_time": time.time()},
        "router_load": {"step": step, "layer": layer, "expert": expert, "tokens": loads},
        "expert_bias": {"step": step, "layer": layer, "expert": expert,
                        "bias": rng.normal(scale=1e-3 * (step + 1), size=len(layer))},
        "layer_stats": {"step": step, "layer": all_layers,
                        "aux_loss": [None if d else v for d, v in zip(dense, router_stat, strict=True)],
                        "bias_override_rate": [None if d else v for d, v in zip(dense, router_stat, strict=True)],
                        "aux_map_disagreement": [None if d else v for d, v in zip(dense, router_stat, strict=True)],
                        "value_residual_lambda": [None if d else 0.5 for d in dense]},
        "attention_stats": {"step": step, "layer": head_layer, "head": np.tile(np.arange(shape.heads), shape.layers),
                            "kind": kind, "entropy": rng.random(len(head_layer)),
                            "sink_mass": rng.random(len(head_layer)), "mean_distance": rng.random(len(head_layer)),
                            "window_mass": rng.random(len(head_layer))},
    }


def probe_rows(shape: Shape, step: int, rng: np.random.Generator) -> dict[str, dict[str, object]]:
    """probe_routing and attention_maps columns for the two probe prompts at one step."""
    routing: dict[str, list] = {key: [] for key in ("prompt_id", "position", "token_id", "token_text", "domain",
                                                     "layer", "rank", "expert", "gate")}
    maps: dict[str, list] = {key: [] for key in ("prompt_id", "layer", "head", "query_pos", "key_pos", "prob")}
    for prompt_id, (domain, texts) in PROBE_PROMPTS.items():
        for position, text in enumerate(texts):
            for layer in shape.moe_layers:
                chosen = rng.choice(shape.experts, size=shape.topk, replace=False)
                for rank, expert in enumerate(chosen):
                    for key, value in zip(routing, (prompt_id, position, 1000 + len(text), text, domain, layer, rank,
                                                    expert, 1.0 / (rank + 1)), strict=True):
                        routing[key].append(value)
        for layer in range(1, shape.layers + 1):
            for head in range(shape.heads):
                for query in range(len(texts)):
                    for key_pos in range(query + 1):
                        for key, value in zip(maps, (prompt_id, layer, head, query, key_pos, 1.0 / (query + 1)),
                                              strict=True):
                            maps[key].append(value)
    return {"probe_routing": {"step": step, **routing}, "attention_maps": {"step": step, **maps}}


def record_step(writer: RunWriter, shape: Shape, step: int, rng: np.random.Generator, *, probes: bool = False) -> None:
    """Append one complete synthetic step (and the probe tables if asked) to a run."""
    tables = step_rows(shape, step, rng)
    if probes:
        tables.update(probe_rows(shape, step, rng))
    for table, columns in tables.items():
        writer.append(table, columns)


def record_run(store: Store, run_id: str, steps: int, *, seed: int = 0, probe_every: int = 10,
               **writer_options: object) -> None:
    """A complete synthetic tiny-shape run of `steps` steps."""
    rng = np.random.default_rng(seed)
    with store.create_run(run_id, {"config": {"shape": "tiny", "seed": seed}}, **writer_options) as writer:
        for step in range(steps):
            record_step(writer, TINY, step, rng, probes=step % probe_every == 0)


def rows_per_step(store: Store, run_id: str, table: str) -> dict[int, int]:
    """{step: row count} of one table of one run."""
    frame = store.sql(f"select step, count(*) as n from {table} where run_id = $run group by step",
                      {"run": run_id}, run=run_id)
    return dict(zip(frame.step.tolist(), frame.n.tolist(), strict=True))


def assert_steps_whole(store: Store, run_id: str, acknowledged: list[int]) -> None:
    """Every acknowledged step is recorded, and every step any table holds has all of that table's rows."""
    recorded = set(rows_per_step(store, run_id, "steps"))
    assert set(acknowledged) <= recorded
    for table, expected in TINY.rows_per_step().items():
        counts = rows_per_step(store, run_id, table)
        assert set(counts.values()) <= {expected}, (table, counts)
        assert recorded <= set(counts), (table, sorted(recorded - set(counts)))


def main(argv: list[str]) -> None:
    """Record steps forever-ish, printing each step after the flush that acknowledged it."""
    root, run_id, steps, flush_every, compact_every = argv
    store = Store(root)
    writer = store.create_run(run_id, {"config": {"shape": "tiny"}}, flush_every_steps=10**9, flush_every_s=1e9,
                              compact_every_flushes=int(compact_every))
    rng = np.random.default_rng(0)
    pending = []
    for step in range(int(steps)):
        record_step(writer, TINY, step, rng, probes=step % 7 == 0)
        pending.append(step)
        if len(pending) == int(flush_every):
            writer.flush()
            print(" ".join(map(str, pending)), flush=True)
            pending = []
    writer.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

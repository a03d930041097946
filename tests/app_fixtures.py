"""Synthetic runs for the dashboard tests, screenshots and benchmark, written with the real RunWriter.

The numbers have the trends a real run shows: loss falling, routing starting skewed and balanced by
the sign-updated bias (some experts drift, balanced ones dither), one expert of one layer dead,
value-residual lambdas leaving their init, local heads attending within the window and global heads
to the first token, probe tokens of each domain preferring their own experts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.store import RunWriter, Store

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """What a run records: layer 1 dense, the rest MoE; every `global_every`-th layer global attention."""

    layers: int
    experts: int
    heads: int
    topk: int = 4
    window: int = 32
    global_every: int = 4
    tokens_per_step: int = 4096
    bias_rate: float = 1e-3

    @property
    def moe_layers(self) -> np.ndarray:
        """1-based numbers of the MoE layers."""
        return np.arange(2, self.layers + 1, dtype=np.int16)


TINY = Shape(layers=8, experts=16, heads=4, window=8)
LOCKED = Shape(layers=80, experts=256, heads=8, window=128, tokens_per_step=16384)


@dataclass(frozen=True)
class Prompt:
    """A probe prompt: its domain label and its token texts."""

    domain: str
    tokens: tuple[str, ...]


PROMPTS = (
    Prompt("code", ("def", " add", "(", "a", ",", " b", "):", "\n   ", " return", " a", " +", " b")),
    Prompt("prose", ("The", " router", " sends", " each", " token", " to", " four", " of", " its", " experts", ".")),
    Prompt("math", ("Let", " x", " =", " 3", ";", " then", " x", "^", "2", " =", " 9", ".")),
)


def config(shape: Shape) -> dict[str, Any]:
    """The parts of a run config the dashboard reads, in the TOML's table layout."""
    return {"model": {"num_layers": shape.layers, "num_attention_heads": shape.heads},
            "attention": {"window_size": shape.window, "window_attn_skip_freq": shape.global_every},
            "moe": {"num_experts": shape.experts, "topk": shape.topk, "router_bias_update_rate": shape.bias_rate}}


class SyntheticRun:
    """Per-step rows with trends, and probe rows, for one shape (deterministic for a seed)."""

    def __init__(self, shape: Shape, seed: int = 0, prompts: Sequence[Prompt] = PROMPTS) -> None:
        """Draw the run's fixed character: initial routing skew, lambda targets, head styles."""
        self.shape, self.prompts = shape, tuple(prompts)
        self.rng = np.random.default_rng(seed)
        moe = len(shape.moe_layers)
        self.skew = self.rng.normal(scale=1.2, size=(moe, shape.experts))
        self.skew[moe // 2, 3] = -40.0  # one expert nobody picks: a dead expert to find
        self.bias = np.zeros((moe, shape.experts))
        self.lambda_target = np.linspace(0.35, 0.9, shape.layers)
        self.sink_style = self.rng.random((shape.layers, shape.heads))
        self.layer = np.repeat(shape.moe_layers, shape.experts)
        self.expert = np.tile(np.arange(shape.experts, dtype=np.int16), moe)

    def step_tables(self, step: int) -> dict[str, dict[str, Any]]:
        """Columns of every per-step table for one step; the bias moves by +-u after the loads are drawn."""
        shape, rng = self.shape, self.rng
        logits = self.skew + self.bias / shape.bias_rate * 0.02
        preference = np.exp(logits - logits.max(axis=1, keepdims=True))
        preference /= preference.sum(axis=1, keepdims=True)
        loads = rng.multinomial(shape.topk * shape.tokens_per_step, preference)
        self.bias -= shape.bias_rate * np.sign(loads - loads.mean(axis=1, keepdims=True))
        layers = np.arange(1, shape.layers + 1, dtype=np.int16)
        dense = layers == 1
        imbalance = loads.std(axis=1) / loads.mean(axis=1)
        router = np.concatenate([[np.nan], 0.01 * (1 + imbalance)])
        override = np.concatenate([[np.nan], np.clip(0.3 * np.exp(-step / 60) + rng.normal(0.04, 0.01, len(loads)),
                                                     0, 1)])
        disagreement = np.concatenate([[np.nan], np.clip(override[1:] * 0.6 + rng.normal(0.02, 0.005, len(loads)),
                                                         0, 1)])
        lam = 1 - (1 - self.lambda_target) * (1 - np.exp(-step / 40)) + rng.normal(0, 0.003, shape.layers)
        lm_loss = 2.6 + 8.4 * np.exp(-step / 45) + rng.normal(0, 0.05)
        return {
            "steps": {"step": step, "lm_loss": lm_loss, "aux_loss": float(np.nansum(router)),
                      "eval_loss": lm_loss + 0.08 if step % 10 == 9 else None, "lr": 3e-4 * min(1.0, (step + 1) / 20),
                      "tokens_per_s": 12_000 + rng.normal(0, 400), "tokens": (step + 1) * shape.tokens_per_step,
                      "step_time_s": 0.34, "wall_time": time.time()},
            "router_load": {"step": step, "layer": self.layer, "expert": self.expert, "tokens": loads.ravel()},
            "expert_bias": {"step": step, "layer": self.layer, "expert": self.expert,
                            "bias": self.bias.ravel().astype(np.float32)},
            "layer_stats": {"step": step, "layer": layers, "aux_loss": _nullable(router, dense),
                            "bias_override_rate": _nullable(override, dense),
                            "aux_map_disagreement": _nullable(disagreement, dense),
                            "value_residual_lambda": _nullable(lam, dense)},
            "attention_stats": self._attention_stats(step),
        }

    def _attention_stats(self, step: int) -> dict[str, Any]:
        """Per (layer, head) summaries: local heads sharp and near, global heads broad and far."""
        shape, rng = self.shape, self.rng
        layer = np.repeat(np.arange(1, shape.layers + 1, dtype=np.int16), shape.heads)
        is_global = layer % shape.global_every == 0
        style = self.sink_style.ravel()
        settle = 1 - np.exp(-step / 50)
        noise = rng.normal(0, 0.02, len(layer))
        return {"step": step, "layer": layer, "head": np.tile(np.arange(shape.heads, dtype=np.int16), shape.layers),
                "kind": np.where(is_global, "global", "local"),
                "entropy": np.where(is_global, 3.2, 1.8) - settle * style + noise,
                "sink_mass": np.clip(settle * style * 0.6 + noise, 0, 1),
                "mean_distance": np.where(is_global, 40.0, shape.window / 3) * (1 + style) + noise,
                "window_mass": np.clip(np.where(is_global, 0.3, 0.1) * (1 - style) + noise, 0, 1)}

    def probe_tables(self, step: int) -> dict[str, dict[str, Any]]:
        """probe_routing and attention_maps for the probe prompts: domain d prefers experts e = d (mod D)."""
        shape, rng = self.shape, self.rng
        moe = shape.moe_layers
        routing: dict[str, list[np.ndarray]] = {key: [] for key in ("prompt_id", "position", "token_id", "token_text",
                                                                     "domain", "layer", "rank", "expert", "gate")}
        maps: dict[str, list[np.ndarray]] = {key: [] for key in ("prompt_id", "layer", "head", "query_pos", "key_pos",
                                                                  "prob")}
        domains = sorted({prompt.domain for prompt in self.prompts})
        for prompt_id, prompt in enumerate(self.prompts):
            length = len(prompt.tokens)
            home = np.arange(shape.experts) % len(domains) == domains.index(prompt.domain)
            weights = np.where(home, 2.0, 1.0) * rng.random((length * len(moe), shape.experts))
            chosen = np.argsort(-weights, axis=1)[:, : shape.topk]
            rows = chosen.size
            position = np.repeat(np.arange(length), len(moe) * shape.topk)
            routing["prompt_id"].append(np.full(rows, prompt_id))
            routing["position"].append(position)
            routing["token_id"].append(np.array([_token_id(prompt.tokens[p]) for p in position]))
            routing["token_text"].append(np.array(prompt.tokens, dtype=object)[position])
            routing["domain"].append(np.full(rows, prompt.domain, dtype=object))
            routing["layer"].append(np.tile(np.repeat(moe, shape.topk), length))
            routing["rank"].append(np.tile(np.arange(shape.topk), length * len(moe)))
            routing["expert"].append(chosen.ravel())
            routing["gate"].append(np.tile(1.0 / np.arange(1, shape.topk + 1), length * len(moe)))
            query, key = np.tril_indices(length)
            for layer in range(1, shape.layers + 1):
                for head in range(shape.heads):
                    prob = self._pattern(query, key, layer, head)
                    for column, values in zip(maps, (prompt_id, layer, head, query, key, prob), strict=True):
                        maps[column].append(np.broadcast_to(values, query.shape))
        return {"probe_routing": {"step": step, **{k: np.concatenate(v) for k, v in routing.items()}},
                "attention_maps": {"step": step, **{k: np.concatenate(v) for k, v in maps.items()}}}

    def _pattern(self, query: np.ndarray, key: np.ndarray, layer: int, head: int) -> np.ndarray:
        """Attention rows over keys 0..query: recent keys for local heads (inside the window), the first key
        and a broad spread for global heads; each row sums to 1 - sink mass."""
        distance = query - key
        if layer % self.shape.global_every == 0:
            score = np.where(key == 0, 3.0, 0.0) - 0.02 * distance
        else:
            score = np.where(distance < self.shape.window, -0.5 * distance * (1 + head), -np.inf)
        weight = np.exp(score - score.max())
        totals = np.bincount(query, weights=weight)
        return weight / totals[query] * (1 - 0.3 * self.sink_style[layer - 1, head])


def _nullable(values: np.ndarray, missing: np.ndarray) -> list[float | None]:
    """A column with None where `missing` is set (dense layer 1 has no router and no lambda)."""
    return [None if gone else float(value) for value, gone in zip(values, missing, strict=True)]


def _token_id(text: str) -> int:
    """A stable fake token id for a token text."""
    return sum(ord(char) * 31**index for index, char in enumerate(text)) % 199_998


def record(writer: RunWriter, run: SyntheticRun, steps: range, probe_every: int = 10) -> None:
    """Append steps (and probe rows every `probe_every` steps and at the last one) to a run."""
    for step in steps:
        tables = run.step_tables(step)
        if probe_every and (step % probe_every == 0 or step == steps[-1]):
            tables.update(run.probe_tables(step))
        for table, columns in tables.items():
            writer.append(table, columns)


def build_run(store: Store, run_id: str, steps: int, *, shape: Shape = TINY, seed: int = 0, probe_every: int = 10,
              prompts: Sequence[Prompt] = PROMPTS, close: bool = True, **manifest: Any) -> RunWriter:
    """A synthetic run of `steps` steps; closed as complete unless `close` is False (then still running).
    Extra keyword arguments go into the manifest (name, description, ...)."""
    recorded = {"config": config(shape), "shape": {"bias_update_rate": shape.bias_rate}, **manifest}
    writer = store.create_run(run_id, recorded, flush_every_steps=10)
    record(writer, SyntheticRun(shape, seed, prompts), range(steps), probe_every)
    if close:
        writer.close()
    else:
        writer.flush()
    return writer


KILLED_RECORDER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from analysis.store import Store
    from app_fixtures import SyntheticRun, TINY, config, record
    store = Store({root!r})
    writer = store.create_run({run_id!r}, {{"config": config(TINY)}}, flush_every_steps=1)
    record(writer, SyntheticRun(TINY, 3), range({steps}), probe_every=0)
    writer.flush()
    os._exit(0)
""")


def build_killed_run(root: Path, run_id: str, steps: int) -> None:
    """A run whose recorder process died without closing it: the store reports it incomplete."""
    script = KILLED_RECORDER.format(tests=str(ROOT / "tests"), root=str(root), run_id=run_id, steps=steps)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)

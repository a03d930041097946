"""Notebook probing of a checkpoint through nnsight: routing and attention as DataFrames, and interventions on
the router (ablate, force, rescale an expert) with their effect on the LM loss.

Every run is in eval mode under no_grad, so probing never counts tokens for the expert-bias update. Layers are
1-based (layer 1 is dense and has no router); experts, heads, positions and ranks are 0-based. Attention is
computed from the `q` and `k` hook points, so it works on every attention kernel, not only the reference one.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import numpy as np
import pandas as pd
import torch
from nnsight import NNsight
from torch import Tensor

from analysis import metrics
from vpmoe.model.attention_math import alibi_bias, softmax_with_sink, visible_keys
from vpmoe.model.transformer import VpMoE
from vpmoe.tokenizer import get_tokenizer
from vpmoe.training.checkpoint import Checkpoint, load_model
from vpmoe.training.data import PackedDataset


@dataclass(frozen=True)
class Intervention:
    """A change to one MoE layer's routing, applied between the router's hook points and the experts."""

    layer: int

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be a 1-based layer number, got {self.layer!r}")

    def select(self, idx: Tensor, scores: Tensor, positions: Tensor) -> Tensor:
        """The chosen experts [N, K] after this intervention; `positions` [N] is each token's position in its row."""
        return idx

    def reweigh(self, weights: Tensor, idx: Tensor) -> Tensor:
        """The gates [N, K] after this intervention, for the final choice `idx` [N, K]."""
        return weights


def _check_expert(expert: object) -> None:
    if isinstance(expert, bool) or not isinstance(expert, int) or expert < 0:
        raise ValueError(f"expert must be a non-negative expert index, got {expert!r}")


@dataclass(frozen=True)
class Ablate(Intervention):
    """Remove one expert's term: its gate becomes 0 wherever it was chosen. The other gates keep their values
    (they are not renormalised), so each token routed to it loses exactly g_e * Expert_e(x) and nothing else."""

    expert: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_expert(self.expert)

    def reweigh(self, weights: Tensor, idx: Tensor) -> Tensor:
        """Gates with this expert's entries set to 0."""
        return weights.masked_fill(idx == self.expert, 0.0)


@dataclass(frozen=True)
class Scale(Intervention):
    """Multiply one expert's gate by `factor` wherever it was chosen; the other gates keep their values."""

    expert: int
    factor: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_expert(self.expert)
        if not math.isfinite(self.factor):
            raise ValueError(f"factor must be finite, got {self.factor!r}")

    def reweigh(self, weights: Tensor, idx: Tensor) -> Tensor:
        """Gates with this expert's entries multiplied by the factor."""
        return torch.where(idx == self.expert, weights * self.factor, weights)


@dataclass(frozen=True)
class Force(Intervention):
    """Route the tokens at `positions` to `expert`. Where it is not chosen already, it takes the slot of the
    chosen expert with the lowest score (the smallest gate, rank K-1); those tokens' gates are then recomputed
    by the router's own rule g_i = scale * s_i / sum_K s_j over the new set, so they still sum to the scale.
    Tokens that already chose the expert are left as they are; positions past a sequence's end are ignored."""

    positions: tuple[int, ...]
    expert: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_expert(self.expert)
        positions = tuple(self.positions)
        if not positions or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
            raise ValueError(f"positions must be a non-empty list of non-negative token positions, got {positions!r}")
        object.__setattr__(self, "positions", positions)

    def select(self, idx: Tensor, scores: Tensor, positions: Tensor) -> Tensor:
        """The choice with the weakest slot of each forced token replaced by the expert."""
        wanted = torch.isin(positions, torch.tensor(self.positions, device=positions.device))
        rows = (wanted & ~(idx == self.expert).any(dim=-1)).nonzero(as_tuple=True)[0]
        weakest = scores.gather(1, idx).argmin(dim=-1)
        forced = idx.clone()
        forced[rows, weakest[rows]] = self.expert
        return forced


def router_gates(scores: Tensor, idx: Tensor, scaling_factor: float) -> Tensor:
    """g_i = scale * s_i / (sum_{j in K} s_j + 1e-20) from the unbiased scores [N, E] of the chosen experts [N, K]."""
    chosen = scores.gather(1, idx)
    return chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * scaling_factor


Interventions: TypeAlias = Intervention | Sequence[Intervention] | None
EvalData: TypeAlias = "str | Sequence[str] | PackedDataset | int"


@dataclass(frozen=True)
class LossDelta:
    """Mean LM loss (nats/token) on the same tokens without and with an intervention."""

    baseline: float
    intervened: float
    tokens: int

    @property
    def delta(self) -> float:
        """intervened - baseline: positive when the intervention hurts the model."""
        return self.intervened - self.baseline


@dataclass
class _Routing:
    """One MoE layer's routing as the experts received it: scores [N, E], experts [N, K], gates [N, K]."""

    scores: Tensor
    idx: Tensor
    weights: Tensor


@dataclass
class _TraceResult:
    """What one traced forward collected."""

    routing: dict[int, _Routing] = field(default_factory=dict)
    q: Tensor | None = None
    k: Tensor | None = None
    lm_loss: float | None = None


class Probe:
    """A checkpoint's model wrapped for probing: routing, attention, interventions and their loss effects."""

    def __init__(self, model: VpMoE, checkpoint: Checkpoint | None = None) -> None:
        """Wrap a built model (put in eval mode); `checkpoint` is kept for provenance."""
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.cfg = model.cfg
        self.tokenizer = get_tokenizer()
        self.device = next(model.parameters()).device
        self.moe_layers: tuple[int, ...] = tuple(block.layer for block in model.blocks if block.is_moe)
        self.num_experts = self.cfg.moe.num_experts
        self._traced = NNsight(model)
        # One trace at a time: a dashboard may share one Probe between sessions.
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Probe:
        """Load a checkpoint folder (checkpoint-NNNNNN/) onto `device`; CheckpointError names a bad file."""
        model, checkpoint = load_model(path, device)
        return cls(model, checkpoint)

    # --- interventions ---------------------------------------------------------------------------------

    def ablate(self, layer: int, expert: int) -> Ablate:
        """Zero `expert`'s gate in `layer` (not renormalised: exactly its term is removed)."""
        return self._checked(Ablate(layer, expert))

    def force(self, layer: int, token_positions: Iterable[int], expert: int) -> Force:
        """Route the tokens at `token_positions` to `expert` in `layer` (see Force for the gate rule)."""
        return self._checked(Force(layer, tuple(token_positions), expert))

    def scale(self, layer: int, expert: int, factor: float) -> Scale:
        """Multiply `expert`'s gate in `layer` by `factor`."""
        return self._checked(Scale(layer, expert, float(factor)))

    # --- reading ---------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> Tensor:
        """The prompt's token ids as a [1, T] tensor on the model's device (markup is plain text)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        limit = self.cfg.attention.max_sequence_length
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_sequence_length = {limit}")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def routing(self, prompt: str, intervention: Interventions = None) -> pd.DataFrame:
        """Top-k routing of every token in every MoE layer. One row per (position, layer, rank); columns
        token, token_id, position, layer, expert, rank (0 = largest gate), gate, score (unbiased sigmoid)."""
        tokens = self.encode(prompt)
        found = self._run(tokens, interventions=self._as_list(intervention), record=set(self.moe_layers))
        ids = tokens[0].tolist()
        texts = [self.tokenizer.token_text(i) for i in ids]
        frames = [self._routing_frame(layer, found.routing[layer], ids, texts) for layer in self.moe_layers]
        frame = pd.concat(frames, ignore_index=True)
        return frame.sort_values(["position", "layer", "rank"], ignore_index=True)

    def attention(self, prompt: str, layer: int, head: int, intervention: Interventions = None) -> pd.DataFrame:
        """Attention of one head for every causal (query, key) pair. Columns query_pos, key_pos, query_token,
        key_token, prob (sink excluded), sink_mass (of the query: the probability the sink took).
        `attrs` holds layer, head, kind ('local' or 'global') and window (None for global layers)."""
        self._check_layer(layer, moe_only=False)
        heads = self.cfg.model.num_attention_heads
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
            raise ValueError(f"head must be in 0..{heads - 1}, got {head!r}")
        tokens = self.encode(prompt)
        found = self._run(tokens, interventions=self._as_list(intervention), attention_layer=layer)
        probs, sink = self._head_attention(found.q, found.k, layer, head)
        T = tokens.shape[1]
        query, key = np.tril_indices(T)
        texts = np.array([self.tokenizer.token_text(i) for i in tokens[0].tolist()], dtype=object)
        frame = pd.DataFrame({
            "query_pos": query, "key_pos": key, "query_token": texts[query], "key_token": texts[key],
            "prob": probs[query, key], "sink_mass": sink[query],
        })
        attn = self.model.blocks[layer - 1].attn
        frame.attrs.update(layer=layer, head=head, kind=attn.kind, window=attn.window)
        return frame

    # --- loss effects ----------------------------------------------------------------------------------

    def loss(self, data: EvalData, intervention: Interventions = None, rows: int = 8) -> float:
        """Mean LM loss (nats/token) on `data` (see `loss_delta`), with the interventions applied."""
        batches = list(self._eval_batches(data, rows))
        return self._mean_loss(batches, self._as_list(intervention))[0]

    def loss_delta(self, data: EvalData, intervention: Interventions, rows: int = 8) -> LossDelta:
        """Mean LM loss on `data` without and with `intervention`. `data` is a text or list of texts (each its
        own row), a PackedDataset (its first `rows` rows) or a number of rows of the built-in held-out split."""
        batches = list(self._eval_batches(data, rows))
        baseline, tokens, _ = self._mean_loss(batches, [])
        intervened, _, _ = self._mean_loss(batches, self._as_list(intervention))
        return LossDelta(baseline=baseline, intervened=intervened, tokens=tokens)

    def expert_importance(self, layer: int, data: EvalData, rows: int = 8) -> pd.DataFrame:
        """Each expert of `layer` ablated in turn on the same evaluation set, beside its load there. Columns
        expert, load (tokens routed to it), load_fraction (c_i / K T), relative_load (c_i / fair share),
        mean_gate (mean gate where chosen; NaN if never), loss_delta (ablated minus baseline mean LM loss).
        `attrs` holds layer, baseline_loss and tokens. Load alone does not say which experts matter."""
        self._check_layer(layer, moe_only=True)
        batches = list(self._eval_batches(data, rows))
        baseline, tokens, routed = self._mean_loss(batches, [], record={layer})
        idx = torch.cat([r.idx for r in routed]).flatten().cpu()
        gates = torch.cat([r.weights for r in routed]).flatten().double().cpu()
        load = torch.bincount(idx, minlength=self.num_experts).numpy()
        gate_sum = torch.zeros(self.num_experts, dtype=torch.float64).index_add_(0, idx, gates).numpy()
        deltas = [self._mean_loss(batches, [Ablate(layer, e)])[0] - baseline for e in range(self.num_experts)]
        frame = pd.DataFrame({
            "expert": np.arange(self.num_experts), "load": load, "load_fraction": metrics.load_fraction(load),
            "relative_load": metrics.relative_load(load),
            "mean_gate": np.where(load > 0, gate_sum / np.maximum(load, 1), np.nan), "loss_delta": deltas,
        })
        frame.attrs.update(layer=layer, baseline_loss=baseline, tokens=tokens)
        return frame

    def expert_counts(self, batches: Iterable[Tensor]) -> tuple[np.ndarray, int]:
        """Tokens per expert [MoE layers, E] of the real routing over token batches [B, T], and the token count."""
        counts = np.zeros((len(self.moe_layers), self.num_experts), dtype=np.int64)
        tokens = 0
        for batch in batches:
            found = self._run(batch.to(self.device), interventions=[], record=set(self.moe_layers))
            for row, layer in enumerate(self.moe_layers):
                idx = found.routing[layer].idx.flatten().cpu()
                counts[row] += torch.bincount(idx, minlength=self.num_experts).numpy()
            tokens += batch.numel()
        return counts, tokens

    # --- internals -------------------------------------------------------------------------------------

    def _check_layer(self, layer: object, *, moe_only: bool) -> None:
        layers = self.moe_layers if moe_only else tuple(range(1, len(self.model.blocks) + 1))
        if layer not in layers or isinstance(layer, bool):
            what = f"an MoE layer ({', '.join(map(str, layers))})" if moe_only else f"in 1..{len(layers)}"
            raise ValueError(f"layer must be {what}, got {layer!r}")

    def _checked(self, intervention: Intervention) -> Intervention:
        """The intervention, after checking its layer and expert exist in this model."""
        self._check_layer(intervention.layer, moe_only=True)
        expert = getattr(intervention, "expert", 0)
        if expert >= self.num_experts:
            raise ValueError(f"expert must be in 0..{self.num_experts - 1}, got {expert}")
        return intervention

    def _as_list(self, intervention: Interventions) -> list[Intervention]:
        items = [] if intervention is None else [intervention] if isinstance(intervention, Intervention) else list(
            intervention)
        for item in items:
            if not isinstance(item, Intervention):
                raise TypeError(f"expected an Intervention (from ablate, force or scale), got {type(item).__name__}")
            self._checked(item)
        return items

    def _run(self, tokens: Tensor, labels: Tensor | None = None, *, interventions: list[Intervention],
             record: Collection[int] = (), attention_layer: int | None = None) -> _TraceResult:
        """One traced forward: apply the interventions, collect routing of `record` layers, q and k of
        `attention_layer`, and the LM loss when labels are given (otherwise stop after the last layer needed)."""
        with self._lock:
            return self._trace(tokens, labels, interventions, record, attention_layer)

    @torch.no_grad()
    def _trace(self, tokens: Tensor, labels: Tensor | None, interventions: list[Intervention],
               record: Collection[int], attention_layer: int | None) -> _TraceResult:
        """The body of `_run`, under no_grad so that no tokens are counted for the expert-bias update."""
        edits: dict[int, list[Intervention]] = {}
        for intervention in interventions:
            edits.setdefault(intervention.layer, []).append(intervention)
        routed = set(record) | set(edits)
        last = max([*routed, attention_layer or 0])
        scaling = {layer: self.model.blocks[layer - 1].ffn.router.scaling_factor for layer in routed}
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).repeat(B)  # flat tokens are batch-major
        found = _TraceResult()
        with self._traced.trace(tokens, labels=labels, return_logits=False) as tracer:
            for layer in range(1, last + 1):
                block = self._traced.blocks[layer - 1]
                if layer == attention_layer:
                    found.q, found.k = block.attn.q.output, block.attn.k.output
                if layer in routed:
                    router = block.ffn.router
                    scores = router.scores.output
                    original = router.topk_idx.output
                    idx = original
                    for intervention in edits.get(layer, ()):
                        idx = intervention.select(idx, scores, positions)
                    if layer in edits:
                        router.topk_idx.output = idx
                    weights = router.topk_weights.output
                    changed = (idx != original).any(dim=-1, keepdim=True)
                    if bool(changed.any()):
                        weights = torch.where(changed, router_gates(scores, idx, scaling[layer]), weights)
                    for intervention in edits.get(layer, ()):
                        weights = intervention.reweigh(weights, idx)
                    if layer in edits:
                        router.topk_weights.output = weights
                    found.routing[layer] = _Routing(scores=scores, idx=idx, weights=weights)
            if labels is None:
                tracer.stop()
            else:
                found.lm_loss = float(self._traced.output.lm_loss)
        return found

    def _mean_loss(self, batches: list[tuple[Tensor, Tensor]], interventions: list[Intervention],
                   record: Collection[int] = ()) -> tuple[float, int, list[_Routing]]:
        """Token-weighted mean LM loss over the batches, the token count, and the routing of `record` layers."""
        total, tokens, routed = 0.0, 0, []
        for inputs, labels in batches:
            found = self._run(inputs, labels, interventions=interventions, record=record)
            total += found.lm_loss * labels.numel()
            tokens += labels.numel()
            routed.extend(found.routing[layer] for layer in record)
        return total / tokens, tokens, routed

    def _eval_batches(self, data: EvalData, rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(tokens, labels) batches of the evaluation data on the model's device."""
        if isinstance(data, str):
            data = [data]
        if isinstance(data, int) and not isinstance(data, bool):
            rows, data = data, PackedDataset(None, split="heldout", seq_length=self.cfg.training.seq_length,
                                             seed=self.cfg.training.seed)
        if isinstance(data, PackedDataset):
            if rows < 1:
                raise ValueError(f"rows must be at least 1, got {rows}")
            table = np.stack([tokens for tokens, _ in itertools.islice(data.rows(), rows)])
            size = self.cfg.training.micro_batch_size
            for start in range(0, len(table), size):
                chunk = torch.from_numpy(table[start:start + size]).to(self.device)
                yield chunk[:, :-1], chunk[:, 1:]
            return
        if not isinstance(data, Sequence) or not data or not all(isinstance(text, str) for text in data):
            raise TypeError("data must be a text, a non-empty list of texts, a PackedDataset or a number of rows")
        limit = self.cfg.attention.max_sequence_length
        for number, text in enumerate(data):
            ids = self.tokenizer.encode(text)[:limit + 1]
            if len(ids) < 2:
                raise ValueError(f"text {number} has {len(ids)} token(s); a loss needs at least 2")
            row = torch.tensor([ids], dtype=torch.long, device=self.device)
            yield row[:, :-1], row[:, 1:]

    def _routing_frame(self, layer: int, routing: _Routing, ids: list[int], texts: list[str]) -> pd.DataFrame:
        """Rows (position, rank) of one layer, ranks by gate, largest first (ties keep the router's slot order)."""
        weights = routing.weights.float().cpu()
        order = torch.argsort(-weights, dim=-1, stable=True)
        experts = routing.idx.cpu().gather(1, order)
        gates = weights.gather(1, order)
        scores = routing.scores.float().cpu().gather(1, experts)
        T, K = experts.shape
        position = np.repeat(np.arange(T), K)
        return pd.DataFrame({
            "token": np.array(texts, dtype=object)[position], "token_id": np.array(ids)[position],
            "position": position, "layer": layer, "expert": experts.flatten().numpy(),
            "rank": np.tile(np.arange(K), T), "gate": gates.flatten().numpy(), "score": scores.flatten().numpy(),
        })

    def _head_attention(self, q: Tensor, k: Tensor, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [T, T] with the sink excluded, sink mass [T]) of one head of row 0, from q and k."""
        attn = self.model.blocks[layer - 1].attn
        T, H, d = q.shape[1:]
        group = head // (H // k.shape[2])
        logits = q[0, :, head].float() @ k[0, :, group].float().T / math.sqrt(d)  # [T, T]
        if attn.alibi_slopes is not None:
            logits = logits + alibi_bias(attn.alibi_slopes[head:head + 1], T)[0]
        logits = logits.masked_fill(~visible_keys(T, attn.window, logits.device), float("-inf"))
        sink = None if attn.sinks is None else attn.sinks.detach()[head:head + 1].float()
        probs = softmax_with_sink(logits[None, None], sink)[0, 0]
        sink_mass = (np.zeros(T) if sink is None
                     else metrics.sink_mass(logits[None].cpu(), sink.cpu())[0])
        return probs.cpu().numpy(), sink_mass

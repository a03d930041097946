"""Recording what vpMoE does, read from outside through nnsight over the model's hook points.

One trace per recorded micro-batch reads every layer in forward order; per-layer statistics are
computed on the device, stacked, and saved once, so the host syncs once per step, not once per layer.
The model is never edited: `NNsight(model)` attaches to its `HookPoint`s.
"""

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nnsight import NNsight
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.attention_math import softmax_with_sink
from vpmoe.model.moe import MoEFFN
from vpmoe.model.positional import alibi_slopes
from vpmoe.model.router import aux_loss_routing, seq_aux_loss, sigmoid_topk_routing
from vpmoe.model.transformer import VpMoE, VpMoEOutput
from vpmoe.tokenizer import get_tokenizer
from vpmoe.training.data import Batch, PackedDataset
from vpmoe.training.distributed import all_reduce_sum

ATTENTION_STATS = ("entropy", "sink_mass", "mean_distance", "window_mass")


def choice_overlap(a: Tensor, b: Tensor, num_experts: int) -> Tensor:
    """Share of the (token, expert) choices in `a` [N, K] that `b` [N, K] also made: |A ∩ B| / (N K)."""
    in_a = torch.zeros(a.shape[0], num_experts, dtype=torch.bool, device=a.device).scatter_(1, a, True)
    in_b = torch.zeros_like(in_a).scatter_(1, b, True)
    return (in_a & in_b).sum() / a.numel()


def routing_summary(logits: Tensor, topk_idx: Tensor, router: nn.Module, batch_size: int) -> Tensor:
    """Per MoE layer: [tokens per expert (E), bias override rate, aux-map disagreement, aux loss] as fp32.

    Override rate: share of dispatched choices the expert bias changed (same group rule, bias removed).
    Disagreement: share of dispatched choices that the aux loss's plain top-k map does not make.
    """
    E = logits.shape[1]
    loads = torch.bincount(topk_idx.flatten(), minlength=E).float()
    _, unbiased, _ = sigmoid_topk_routing(logits, None, router.topk, router.num_groups, router.group_topk,
                                          router.scaling_factor)
    aux_map, _ = aux_loss_routing(logits, router.topk)
    aux_idx = aux_map.float().topk(router.topk, dim=1).indices
    override = 1 - choice_overlap(topk_idx, unbiased, E)
    disagreement = 1 - choice_overlap(topk_idx, aux_idx, E)
    aux = seq_aux_loss(logits.detach(), batch_size, router.topk, 1.0)  # coefficient applied by the caller
    return torch.cat([loads, torch.stack([override, disagreement, aux]).float()])


def attention_probabilities(q: Tensor, k: Tensor, sink: Tensor | None, window: int | None, slopes: Tensor | None,
                            queries: Tensor) -> Tensor:
    """p [H, Q, T] of the chosen query positions of one sequence: q [T, H, d], k [T, G, d], fp32.

    The same formula as the reference kernel (scaled logits, ALiBi, causal/window mask, sink softmax),
    computed from the q and k hook points so no kernel has to materialise probabilities.
    """
    T, H, d = q.shape
    k_h = k.repeat_interleave(H // k.shape[1], dim=1)  # [T, H, d]
    logits = torch.einsum("qhd,khd->hqk", q[queries].float(), k_h.float()) / math.sqrt(d)  # [H, Q, T]
    distance = queries[:, None] - torch.arange(T, device=q.device)[None, :]  # [Q, T], i - j
    if slopes is not None:
        logits = logits - slopes.float()[:, None, None] * distance
    visible = distance >= 0
    if window is not None:
        visible &= distance <= window - 1
    return softmax_with_sink(logits.masked_fill(~visible, float("-inf"))[None], sink)[0]


def attention_summary(probs: Tensor, queries: Tensor, window: int, local: bool) -> Tensor:
    """[H, 4] per head: entropy, sink mass, mean distance, window mass (local: the oldest eighth of the
    window, i - j in [W - W/8, W - 1]; global: beyond the window, i - j >= W), averaged over queries."""
    T = probs.shape[-1]
    distance = (queries[:, None] - torch.arange(T, device=probs.device)[None, :]).float()  # [Q, T]
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    sink = 1 - probs.sum(-1)
    mean_distance = (probs * distance.clamp_min(0)).sum(-1)
    if local:
        edge = max(1, window // 8)
        band = (distance >= window - edge) & (distance <= window - 1)
    else:
        band = distance >= window
    window_mass = (probs * band).sum(-1)
    return torch.stack([entropy, sink, mean_distance, window_mass], dim=-1).mean(dim=1)  # [H, 4]


def sample_queries(seq_len: int, count: int, device: torch.device) -> Tensor:
    """Evenly spaced query positions (always including the last), at most `count` of them."""
    if count >= seq_len:
        return torch.arange(seq_len, device=device)
    return torch.linspace(seq_len - 1, 0, count, device=device).round().long().flip(0).unique()


@dataclass
class ProbePrompt:
    """One fixed prompt of the probe set."""

    prompt_id: int
    tokens: list[int]
    domain: str


def probe_prompts(dataset: PackedDataset, tokens: int, per_domain: int = 1) -> list[ProbePrompt]:
    """The first `per_domain` held-out documents of each domain, cut to `tokens` tokens: a fixed probe set."""
    tok = get_tokenizer()
    chosen: list[ProbePrompt] = []
    counts = dict.fromkeys(dataset.domains, 0)
    for document in dataset.documents(0):
        if counts[document.domain] >= per_domain:
            continue
        ids = tok.encode(document.text)[:tokens]
        if len(ids) < 8:
            continue
        chosen.append(ProbePrompt(prompt_id=len(chosen), tokens=ids, domain=document.domain))
        counts[document.domain] += 1
        if all(c >= per_domain for c in counts.values()):
            break
    return chosen


class _Accumulator:
    """Sums the per-micro-batch statistics of one step before they are written."""

    def __init__(self) -> None:
        self.routing: Tensor | None = None  # [MoE layers, E + 3]
        self.attention: Tensor | None = None  # [layers, H, 4]
        self.micro = 0

    def add(self, routing: Tensor, attention: Tensor | None) -> None:
        self.routing = routing if self.routing is None else self.routing + routing
        if attention is not None:
            self.attention = attention if self.attention is None else self.attention + attention
        self.micro += 1

    def sum_over_ranks(self) -> None:
        """Add up every data-parallel rank's sums (a no-op alone): loads become the whole step's, and the
        per-micro-batch means are averaged over micro * ranks."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return
        all_reduce_sum(self.routing)
        if self.attention is not None:
            all_reduce_sum(self.attention)
        self.micro *= torch.distributed.get_world_size()


class Recorder:
    """Records a run into a store `RunWriter` through nnsight; usable as the training loop's observer.

    Every `every` steps: router loads, expert bias, bias override rate, aux-map disagreement, aux loss
    and value-residual lambda per layer; every `attention_every` steps attention statistics per head;
    every `probe_every` steps per-token routing and attention maps on a fixed probe set.

    Under data parallelism every rank runs a Recorder over its own micro-batches (traced through the
    DDP wrapper, so gradients still synchronise); the step's statistics are summed over ranks, and only
    the rank given a writer (None on the others) writes rows and runs the probe set.
    """

    def __init__(self, model: VpMoE, writer: Any | None, prompts: list[ProbePrompt]) -> None:
        self.model, self.writer, self.prompts = model, writer, prompts
        self.cfg: VpMoEConfig = model.cfg
        self.rec = self.cfg.recording
        self.traced = NNsight(model)
        self._traced_wrapper: tuple[nn.Module, Any] | None = None  # (DDP wrapper, its NNsight)
        self.moe_layers = [b.layer for b in model.blocks if isinstance(b.ffn, MoEFFN)]
        self._step_stats = _Accumulator()
        self._last_step_time = time.time()
        self.map_pairs = self._map_pairs()

    def _map_pairs(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose probe attention maps are stored: all, or an even sample of them."""
        pairs = [(b.layer, h) for b in self.model.blocks for h in range(self.cfg.model.num_attention_heads)]
        if len(pairs) <= self.rec.max_map_heads:
            return pairs
        picks = np.linspace(0, len(pairs) - 1, self.rec.max_map_heads).round().astype(int)
        return [pairs[i] for i in sorted(set(picks.tolist()))]

    def records(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) records loads and layer statistics."""
        return step % self.rec.every == 0

    def trace_statistics(self, tokens: Tensor, labels: Tensor | None, with_attention: bool, model: nn.Module
                         ) -> tuple[VpMoEOutput, Tensor, Tensor | None]:
        """Run `model` (the recorder's model, or a DDP wrapper of it) on a batch inside one nnsight trace;
        return its output and the stacked statistics."""
        traced, inner = self._traced(model)
        B, T = tokens.shape
        queries = sample_queries(T, self.rec.attention_queries, tokens.device)
        attention = None  # nnsight hands back only values assigned and saved inside the trace
        with traced.trace(tokens, labels=labels, return_logits=False):
            routing_rows, attention_rows = [], []
            for i, block in enumerate(self.model.blocks):
                envoy = inner.blocks[i]
                if with_attention:
                    attn = block.attn
                    q = envoy.attn.q.output[0].detach()  # statistics never join the training graph
                    k = envoy.attn.k.output[0].detach()
                    sinks = attn.sinks.detach() if attn.sinks is not None else None
                    probs = attention_probabilities(q, k, sinks, attn.window, attn.alibi_slopes, queries)
                    attention_rows.append(attention_summary(probs, queries, self.cfg.attention.window_size,
                                                            attn.kind == "local"))
                if isinstance(block.ffn, MoEFFN):
                    router = block.ffn.router
                    logits = envoy.ffn.router.logits.output
                    idx = envoy.ffn.router.topk_idx.output
                    routing_rows.append(routing_summary(logits.detach(), idx, router, B))
            routing = torch.stack(routing_rows).save()
            if with_attention:
                attention = torch.stack(attention_rows).save()
            output = traced.output.save()
        return output, routing, attention

    def _traced(self, model: nn.Module) -> tuple[Any, Any]:
        """(the NNsight object to trace, the envoy of the recorder's model inside it) for `model`."""
        if model is self.model:
            return self.traced, self.traced
        if getattr(model, "module", None) is not self.model:
            raise ValueError("the recorder traces the model it was built with, or a DistributedDataParallel "
                             f"wrapper of it; got a {type(model).__name__}")
        if self._traced_wrapper is None or self._traced_wrapper[0] is not model:
            self._traced_wrapper = (model, NNsight(model))
        traced = self._traced_wrapper[1]
        return traced, traced.module

    def forward(self, model: nn.Module, batch: Batch, step: int, micro: int) -> VpMoEOutput:
        """The training loop's micro-batch forward: traced when the coming step records, plain otherwise."""
        coming = step + 1
        if not self.records(coming):
            return model(batch.tokens, labels=batch.labels, return_logits=False)
        with_attention = coming % self.rec.attention_every == 0
        output, routing, attention = self.trace_statistics(batch.tokens, batch.labels, with_attention, model)
        self._step_stats.add(routing, attention)
        return output

    def on_step(self, info: Any, model: VpMoE) -> None:
        """Write the step's rows: the steps row always, the rest on recorded steps (on every rank: the
        statistics are summed over ranks here, then only the writing rank writes)."""
        stats, self._step_stats = self._step_stats, _Accumulator()
        if stats.routing is not None:
            stats.sum_over_ranks()
        if self.writer is None:
            return
        now = time.time()
        self.writer.append("steps", {
            "step": info.step, "lm_loss": info.lm_loss, "aux_loss": info.aux_loss, "eval_loss": info.eval_loss,
            "lr": info.lr, "tokens_per_s": info.tokens_per_s, "tokens": info.tokens,
            "step_time_s": info.step_time_s, "wall_time": now})
        if stats.routing is not None:
            self.write_layer_rows(info.step, stats)
        if info.step % self.rec.probe_every == 0:
            self.write_probe_rows(info.step)

    @torch.no_grad()
    def record_evaluation(self, batches: Iterator[Batch], step: int) -> dict[str, float]:
        """Record one step's worth of statistics for a saved checkpoint on evaluation batches (no training)."""
        was_training = self.model.training
        self.model.eval()
        stats, losses, tokens = _Accumulator(), [], 0
        start = time.perf_counter()
        for batch in batches:
            output, routing, attention = self.trace_statistics(batch.tokens, batch.labels, True, self.model)
            stats.add(routing, attention)
            losses.append(float(output.lm_loss))
            tokens += batch.tokens.numel()
        if not losses:
            raise ValueError("no evaluation batches to record")
        elapsed = time.perf_counter() - start
        self.model.train(was_training)
        aux = float(stats.routing[:, -1].sum()) * self.cfg.moe.aux_loss_coeff / stats.micro
        loss = sum(losses) / len(losses)
        self.writer.append("steps", {"step": step, "lm_loss": loss, "aux_loss": aux, "eval_loss": loss, "lr": 0.0,
                                     "tokens_per_s": tokens / elapsed, "tokens": tokens, "step_time_s": elapsed,
                                     "wall_time": time.time()})
        self.write_layer_rows(step, stats)
        self.write_probe_rows(step)
        return {"eval_loss": loss, "tokens": tokens, "seconds": elapsed}

    def write_layer_rows(self, step: int, stats: _Accumulator) -> None:
        """router_load, expert_bias, layer_stats and (if gathered) attention_stats rows for one step."""
        E = self.cfg.moe.num_experts
        routing = stats.routing.cpu().numpy()  # the one host read of the step's statistics
        loads = routing[:, :E].astype(np.int64)
        n_moe = len(self.moe_layers)
        layers = np.repeat(np.array(self.moe_layers, dtype=np.int16), E)
        experts = np.tile(np.arange(E, dtype=np.int16), n_moe)
        self.writer.append("router_load", {"step": step, "layer": layers, "expert": experts,
                                           "tokens": loads.reshape(-1)})
        bias = torch.stack([r.expert_bias for r in self.model.routers()]).cpu().numpy().astype(np.float32)
        self.writer.append("expert_bias", {"step": step, "layer": layers, "expert": experts, "bias": bias.reshape(-1)})
        micro = max(stats.micro, 1)
        per_layer = {b.layer: b for b in self.model.blocks}
        all_layers = sorted(per_layer)
        moe_row = {layer: i for i, layer in enumerate(self.moe_layers)}

        def moe_value(layer: int, column: int, scale: float = 1.0) -> float | None:
            return float(routing[moe_row[layer], E + column]) * scale / micro if layer in moe_row else None

        def lam(layer: int) -> float | None:
            vr = per_layer[layer].attn.value_residual
            return float(vr.lam.detach()) if vr is not None else None

        self.writer.append("layer_stats", {
            "step": step, "layer": np.array(all_layers, dtype=np.int16),
            "aux_loss": [moe_value(layer, 2, self.cfg.moe.aux_loss_coeff) for layer in all_layers],
            "bias_override_rate": [moe_value(layer, 0) for layer in all_layers],
            "aux_map_disagreement": [moe_value(layer, 1) for layer in all_layers],
            "value_residual_lambda": [lam(layer) for layer in all_layers]})
        if stats.attention is not None:
            att = stats.attention.cpu().numpy() / stats.micro  # [L, H, 4]
            L, H = att.shape[:2]
            kinds = [per_layer[layer].attn.kind for layer in all_layers]
            self.writer.append("attention_stats", {
                "step": step, "layer": np.repeat(np.array(all_layers, dtype=np.int16), H),
                "head": np.tile(np.arange(H, dtype=np.int16), L), "kind": np.repeat(kinds, H),
                **{name: att[:, :, i].reshape(-1).astype(np.float64) for i, name in enumerate(ATTENTION_STATS)}})

    @torch.no_grad()
    def write_probe_rows(self, step: int) -> None:
        """Per-token top-k experts and gates, and attention maps of the sampled heads, on the probe set."""
        was_training = self.model.training
        self.model.eval()
        tok = get_tokenizer()
        try:
            for prompt in self.prompts:
                self._write_one_probe(step, prompt, tok)
        finally:
            self.model.train(was_training)

    def _write_one_probe(self, step: int, prompt: ProbePrompt, tok: Any) -> None:
        device = self.model.embedding.weight.device
        tokens = torch.tensor([prompt.tokens], device=device)
        T = tokens.shape[1]
        queries = torch.arange(T, device=device)
        map_layers = {layer for layer, _ in self.map_pairs}
        map_stack = None
        with self.traced.trace(tokens):
            routes, maps = [], []
            for i, block in enumerate(self.model.blocks):
                envoy = self.traced.blocks[i]
                if block.layer in map_layers:
                    attn = block.attn
                    sinks = attn.sinks.detach() if attn.sinks is not None else None
                    probs = attention_probabilities(envoy.attn.q.output[0], envoy.attn.k.output[0], sinks,
                                                    attn.window, attn.alibi_slopes, queries)
                    maps.append(probs)
                if isinstance(block.ffn, MoEFFN):
                    routes.append(torch.stack([envoy.ffn.router.topk_idx.output.float(),
                                               envoy.ffn.router.topk_weights.output.float()]))
            route_stack = torch.stack(routes).save()  # [MoE layers, 2, T, K]
            if maps:
                map_stack = torch.stack(maps).save()  # [map layers, H, T, T]
        self._append_routing(step, prompt, route_stack.cpu().numpy(), tok)
        if map_stack is not None:
            self._append_maps(step, prompt, map_stack.cpu().numpy(), sorted(map_layers))

    def _append_routing(self, step: int, prompt: ProbePrompt, routes: np.ndarray, tok: Any) -> None:
        n_moe, _, T, K = routes.shape
        texts = [tok.token_text(t) for t in prompt.tokens]
        position = np.tile(np.repeat(np.arange(T, dtype=np.int32), K), n_moe)
        self.writer.append("probe_routing", {
            "step": step, "prompt_id": prompt.prompt_id, "position": position,
            "token_id": np.array(prompt.tokens, dtype=np.int32)[position],
            "token_text": [texts[p] for p in position], "domain": prompt.domain,
            "layer": np.repeat(np.array(self.moe_layers, dtype=np.int16), T * K),
            "rank": np.tile(np.arange(K, dtype=np.int16), n_moe * T),
            "expert": routes[:, 0].reshape(-1).astype(np.int16), "gate": routes[:, 1].reshape(-1).astype(np.float32)})

    def _append_maps(self, step: int, prompt: ProbePrompt, maps: np.ndarray, layers: list[int]) -> None:
        wanted = set(self.map_pairs)
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("layer", "head", "query_pos", "key_pos", "prob")}
        for li, layer in enumerate(layers):
            for head in range(maps.shape[1]):
                if (layer, head) not in wanted:
                    continue
                qpos, kpos = np.nonzero(maps[li, head] > 0)  # causal pairs inside the window
                columns["layer"].append(np.full(len(qpos), layer, dtype=np.int16))
                columns["head"].append(np.full(len(qpos), head, dtype=np.int16))
                columns["query_pos"].append(qpos.astype(np.int32))
                columns["key_pos"].append(kpos.astype(np.int32))
                columns["prob"].append(maps[li, head][qpos, kpos].astype(np.float32))
        if columns["layer"]:
            self.writer.append("attention_maps", {"step": step, "prompt_id": prompt.prompt_id,
                                                  **{k: np.concatenate(v) for k, v in columns.items()}})


def evaluation_batches(dataset: PackedDataset, batch_size: int, tokens: int) -> Iterator[Batch]:
    """Batches from the start of `dataset` until at least `tokens` tokens have been yielded."""
    seen = 0
    for batch in dataset.batches(batch_size):
        if seen >= tokens:
            return
        seen += batch.tokens.numel()
        yield batch


def run_manifest(cfg: VpMoEConfig, model: VpMoE, data: dict[str, Any], code_revision: str,
                 **extra: Any) -> dict[str, Any]:
    """The provenance a recorded run carries: config and its hash, kernels, data, code revision, shapes."""
    return {"config": cfg.to_dict(), "config_hash": cfg.architecture_hash(), "kernels": model.kernels.as_dict(),
            "data": data, "code_revision": code_revision,
            "shape": {"layers": cfg.model.num_layers, "moe_layers": [b.layer for b in model.blocks if b.is_moe],
                      "experts": cfg.moe.num_experts, "topk": cfg.moe.topk, "heads": cfg.model.num_attention_heads,
                      "bias_update_rate": cfg.moe.router_bias_update_rate,
                      "layer_kinds": list(cfg.layer_kinds), "window_size": cfg.attention.window_size,
                      "alibi_slopes": alibi_slopes(cfg.model.num_attention_heads).tolist()},
            **extra}

"""Expert-load audit: run a checkpoint on an audit set, judge each MoE layer against its noise floor, and
report PASS / WARN / FAIL with the rule that decided it (DESIGN section 9).

The core, `audit_counts`, is a pure function of routing counts, so synthetic routers can drive it. Every
threshold is read against what perfectly uniform routing (c_i ~ Binomial(T, K/E)) or a dithering bias
(a fair +-u coin per step) would show, so a balanced router passes at any token count:
- MaxVio: FAIL above floor + max_vio_margin, WARN above floor + max_vio_warn_margin, where the floor is the
  quantile 1 - (1 - max_vio_quantile) / L of uniform routing's MaxVio, so that a uniform router passes all
  L layers together with probability max_vio_quantile.
- Dead experts: FAIL when uniform routing would leave fewer than null_expected_max experts empty (E (1-K/E)^T),
  else WARN: the sample is too small to tell.
- Starved experts (0 < c_i < starved_fraction of the fair share): WARN when uniform routing would starve
  fewer than null_expected_max experts.
- Expert bias: |e_i| <= u * steps exactly; at bias_fail_fraction of that bound an expert's bias moved the same
  way on (nearly) every step, at bias_warn_fraction on most. Either is FAIL / WARN only when a dithering bias
  would get there for fewer than null_expected_max experts; otherwise WARN: too few steps to tell.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import math
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import metrics

VERDICTS = ("PASS", "WARN", "FAIL")
EXIT_CODES = {"PASS": 0, "WARN": 1, "FAIL": 2}
EXIT_CANNOT_AUDIT = 3
DEFAULT_TOKENS = 65_536
BATCH_TOKENS = 8192  # tokens per audit forward: few traces, and small next to any model's activations
JSON_REPORT, MARKDOWN_REPORT = "audit.json", "audit.md"
ROUTER_MODE = "eval (no_grad, no bias counting), expert bias {}"
PASS_RULE = "all checks within thresholds"
BIAS_BOUND_TOLERANCE = 1e-4  # fp32 sums of +-u drift from u * steps by far less than this fraction


class AuditError(ValueError):
    """The audit cannot run (bad thresholds, nothing to audit); the message names the file or key."""


@dataclass(frozen=True)
class Thresholds:
    """What turns evidence into a verdict; see the module docstring for the grounding of each default."""

    max_vio_quantile: float = 0.99
    max_vio_warn_margin: float = 0.1
    max_vio_margin: float = 0.5
    null_expected_max: float = 0.01
    starved_fraction: float = 0.1
    bias_warn_fraction: float = 0.9
    bias_fail_fraction: float = 0.99

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise AuditError(f"threshold {f.name} must be a finite number, got {value!r}")
        rules = {
            "max_vio_quantile": ("in (0, 1)", 0 < self.max_vio_quantile < 1),
            "max_vio_warn_margin": (">= 0", self.max_vio_warn_margin >= 0),
            "max_vio_margin": (">= max_vio_warn_margin", self.max_vio_warn_margin <= self.max_vio_margin),
            "null_expected_max": ("> 0", self.null_expected_max > 0),
            "starved_fraction": ("in (0, 1)", 0 < self.starved_fraction < 1),
            "bias_warn_fraction": ("in (0, bias_fail_fraction]",
                                   0 < self.bias_warn_fraction <= self.bias_fail_fraction),
            "bias_fail_fraction": ("at most 1", self.bias_fail_fraction <= 1),
        }
        for name, (rule, ok) in rules.items():
            if not ok:
                raise AuditError(f"threshold {name} must be {rule}, got {getattr(self, name)!r}")

    def describe(self, num_layers: int) -> str:
        """The rules in words, as printed before every audit."""
        quantile = layer_quantile(self.max_vio_quantile, num_layers)
        return (f"MaxVio: WARN > floor + {self.max_vio_warn_margin:g}, FAIL > floor + {self.max_vio_margin:g}; "
                f"floor = quantile {quantile:.6g} of uniform routing's MaxVio (uniform routing clears all "
                f"{num_layers} layers with p >= {self.max_vio_quantile:g}). Dead experts: FAIL when uniform routing "
                f"would leave < {self.null_expected_max:g} empty, else WARN. Starved (< {self.starved_fraction:g} "
                f"of fair share): WARN when uniform routing would starve < {self.null_expected_max:g}. Bias: WARN >= "
                f"{self.bias_warn_fraction:g}, FAIL >= {self.bias_fail_fraction:g} of its bound u*steps when a "
                f"dithering bias would get there for < {self.null_expected_max:g} experts, else WARN.")


def load_thresholds(path: str | Path, base: Thresholds = Thresholds()) -> Thresholds:
    """Thresholds from a TOML file of top-level keys (any of Thresholds' fields) over `base`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise AuditError(f"{path}: cannot read thresholds: {error}") from None
    known = [f.name for f in dataclasses.fields(Thresholds)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise AuditError(f"{path}: unknown threshold {unknown[0]!r}; known: {', '.join(known)}")
    try:
        return dataclasses.replace(base, **data)
    except AuditError as error:
        raise AuditError(f"{path}: {error}") from None


def layer_quantile(quantile: float, num_layers: int) -> float:
    """Per-layer quantile 1 - (1 - q) / L, so L independent uniform layers all stay below it with p >= q."""
    return 1.0 - (1.0 - quantile) / max(num_layers, 1)


# --- Null models beyond analysis.metrics ----------------------------------------------------------------


def _binomial_probability(trials: int, p: float, lo: int, hi: int) -> float:
    """P(lo <= X <= hi) for X ~ Binomial(trials, p), summed exactly in log space."""
    lo, hi = max(lo, 0), min(hi, trials)
    if lo > hi:
        return 0.0
    k = np.arange(lo, hi + 1, dtype=np.float64)
    lgamma = np.frompyfunc(math.lgamma, 1, 1)
    log_pmf = (math.lgamma(trials + 1) - lgamma(k + 1).astype(np.float64) - lgamma(trials - k + 1).astype(np.float64)
               + k * math.log(p) + (trials - k) * math.log1p(-p))
    return float(min(1.0, np.exp(np.logaddexp.reduce(log_pmf))))


def prob_starved_under_uniform(tokens: int, num_experts: int, topk: int, fraction: float) -> float:
    """P(c_i < fraction * K T / E) for c_i ~ Binomial(T, K/E): one expert starved by uniform routing's noise."""
    below = math.ceil(fraction * topk * tokens / num_experts) - 1
    return _binomial_probability(tokens, topk / num_experts, 0, below)


def prob_dithering_bias_reaches(steps: int, net_moves: int) -> float:
    """P(|S_n| >= m) for S_n a sum of n fair +-1 moves: a balanced expert's bias reaching m*u in n steps."""
    if net_moves <= 0:
        return 1.0
    heads = math.ceil((steps + net_moves) / 2)  # |2B - n| >= m with B ~ Binomial(n, 1/2)
    return min(1.0, 2 * _binomial_probability(steps, 0.5, heads, steps))


# --- The pure audit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One rule that fired: its level (WARN or FAIL) and the rule with its numbers."""

    level: str
    rule: str


@dataclass(frozen=True)
class LayerAudit:
    """The evidence for one MoE layer, each figure beside its noise floor, and its verdict."""

    layer: int
    tokens: int
    max_vio: float
    max_vio_floor: float  # the per-layer quantile of uniform routing's MaxVio
    max_vio_mean_floor: float  # its expectation
    cv: float
    cv_floor: float
    entropy: float  # normalised, H / ln E
    entropy_floor: float
    dead: list[int]
    expected_dead: float
    starved: list[int]  # 0 < c_i < starved_fraction * fair share
    expected_starved: float
    bias_max: float | None  # max_i |e_i|; None when the expert bias is off
    bias_bound: float | None  # u * steps
    bias_dither_expected: float | None  # experts a dithering bias would take as far, of E
    findings: list[Finding]
    verdict: str
    rule: str


def _verdict(findings: Sequence[Finding]) -> tuple[str, str]:
    """The worst level among the findings and the first rule at that level."""
    if not findings:
        return "PASS", PASS_RULE
    worst = max(findings, key=lambda f: VERDICTS.index(f.level))
    return worst.level, worst.rule


def _bias_findings(bias: np.ndarray, rate: float, steps: int, thresholds: Thresholds) -> tuple[list[Finding], float]:
    """Saturation findings of one layer's bias against u * steps, and the dithering experts expected there."""
    bound = rate * steps
    largest = float(np.abs(bias).max())
    if largest > bound * (1 + BIAS_BOUND_TOLERANCE) + 1e-12:
        rule = (f"bias max|e| = {largest:.4g} exceeds its bound u*steps = {bound:.4g}: the update rule cannot get "
                f"there from 0 (wrong step or rate, or edited weights)")
        return [Finding("FAIL", rule)], 0.0
    if bound == 0:
        return [], 0.0
    saturation = largest / bound
    net_moves = min(steps, round(largest / rate))
    expected = bias.size * prob_dithering_bias_reaches(steps, net_moves)
    moved = (f"bias max|e| = {largest:.4g} is {saturation:.0%} of its bound u*steps = {bound:.4g}: an expert's bias "
             f"moved the same way on {'every' if saturation >= 1 - BIAS_BOUND_TOLERANCE else 'nearly every'} step")
    if saturation < thresholds.bias_warn_fraction:
        return [], expected
    if expected >= thresholds.null_expected_max:
        return [Finding("WARN", f"{moved}, but after only {steps} steps a dithering bias gets as far for "
                                f"{expected:.2g} experts: too few steps to tell")], expected
    level = "FAIL" if saturation >= thresholds.bias_fail_fraction else "WARN"
    return [Finding(level, moved)], expected


def audit_layer(layer: int, counts: Sequence[int] | np.ndarray, tokens: int, topk: int, bias: np.ndarray | None,
                rate: float, steps: int, thresholds: Thresholds, num_layers: int) -> LayerAudit:
    """Judge one layer's counts c [E] of T tokens (sum c = K T), with its bias [E] (None when off)."""
    c = np.asarray(counts, dtype=np.int64)
    E = c.size
    if tokens < 1 or int(c.sum()) != topk * tokens:
        raise ValueError(f"layer {layer}: counts sum to {int(c.sum())}, expected K*T = {topk}*{tokens}")
    quantile = layer_quantile(thresholds.max_vio_quantile, num_layers)
    max_vio = float(metrics.max_vio(c))
    floor = metrics.noise_floor_max_vio(tokens, E, topk, quantile)
    dead = np.flatnonzero(c == 0).tolist()
    starved = np.flatnonzero(metrics.starved_experts(c, thresholds.starved_fraction) & (c > 0)).tolist()
    expected_dead = metrics.expected_dead_under_uniform(tokens, E, topk)
    expected_starved = E * prob_starved_under_uniform(tokens, E, topk, thresholds.starved_fraction)
    findings = []
    if max_vio > floor + thresholds.max_vio_margin:
        findings.append(Finding("FAIL", f"MaxVio {max_vio:.3f} > floor {floor:.3f} + margin "
                                        f"{thresholds.max_vio_margin:g}"))
    elif max_vio > floor + thresholds.max_vio_warn_margin:
        findings.append(Finding("WARN", f"MaxVio {max_vio:.3f} > floor {floor:.3f} + warn margin "
                                        f"{thresholds.max_vio_warn_margin:g}"))
    if dead:
        listed = f"{len(dead)} dead expert(s) ({', '.join(map(str, dead[:8]))}{', ...' if len(dead) > 8 else ''})"
        if expected_dead < thresholds.null_expected_max:
            findings.append(Finding("FAIL", f"{listed}; uniform routing would leave {expected_dead:.2g} empty"))
        else:
            findings.append(Finding("WARN", f"{listed}, but uniform routing would leave {expected_dead:.2g} empty at "
                                            f"{tokens} tokens: too few tokens to tell"))
    if starved and expected_starved < thresholds.null_expected_max:
        findings.append(Finding("WARN", f"{len(starved)} starved expert(s) below {thresholds.starved_fraction:g} of "
                                        f"the fair share; uniform routing would starve {expected_starved:.2g}"))
    bias_max = bias_bound = dither = None
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        bias_findings, dither = _bias_findings(bias, rate, steps, thresholds)
        findings += bias_findings
        bias_max, bias_bound = float(np.abs(bias).max()), rate * steps
    verdict, rule = _verdict(findings)
    return LayerAudit(
        layer=layer, tokens=tokens, max_vio=max_vio, max_vio_floor=floor,
        max_vio_mean_floor=metrics.noise_floor_max_vio(tokens, E, topk), cv=float(metrics.coefficient_of_variation(c)),
        cv_floor=metrics.noise_floor_cv(tokens, E, topk), entropy=float(metrics.normalized_entropy(c)),
        entropy_floor=metrics.noise_floor_entropy(tokens, E, topk), dead=dead, expected_dead=expected_dead,
        starved=starved, expected_starved=expected_starved, bias_max=bias_max, bias_bound=bias_bound,
        bias_dither_expected=dither, findings=findings, verdict=verdict, rule=rule)


@dataclass
class AuditReport:
    """Verdict, rule and per-layer evidence of one audit, with the provenance needed to trust it."""

    verdict: str
    rule: str
    layers: list[LayerAudit]
    tokens: int
    num_experts: int
    topk: int
    thresholds: Thresholds
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 PASS, 1 WARN, 2 FAIL."""
        return EXIT_CODES[self.verdict]

    def layers_frame(self) -> pd.DataFrame:
        """One row per layer with every LayerAudit field (dead and starved as lists of expert ids)."""
        return pd.DataFrame([dataclasses.asdict(layer) for layer in self.layers],
                            columns=[f.name for f in dataclasses.fields(LayerAudit)])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (no NaN: absent values are None)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditReport:
        """Rebuild a report from `to_dict` output (for example a store row's report_json)."""
        layers = [LayerAudit(**{**layer, "findings": [Finding(**f) for f in layer["findings"]]})
                  for layer in data["layers"]]
        return cls(verdict=data["verdict"], rule=data["rule"], layers=layers, tokens=data["tokens"],
                   num_experts=data["num_experts"], topk=data["topk"], thresholds=Thresholds(**data["thresholds"]),
                   provenance=dict(data.get("provenance", {})))


def audit_counts(counts: np.ndarray | Sequence[Sequence[int]], tokens: int, topk: int, bias: np.ndarray | None,
                 rate: float, steps: int, thresholds: Thresholds = Thresholds(),
                 layers: Sequence[int] | None = None) -> AuditReport:
    """Audit routing counts [L, E] of `tokens` tokens (each routed to `topk` experts), with expert bias [L, E]
    (None when off) after `steps` updates of size `rate`. `layers` numbers the rows (default 1..L)."""
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[0] == 0:
        raise AuditError(f"counts must be [MoE layers, experts] with at least one layer, got shape {c.shape}")
    numbers = list(layers) if layers is not None else list(range(1, c.shape[0] + 1))
    if len(numbers) != c.shape[0]:
        raise AuditError(f"{len(numbers)} layer numbers for {c.shape[0]} rows of counts")
    audited = [audit_layer(number, row, tokens, topk, None if bias is None else bias[i], rate, steps, thresholds,
                           c.shape[0]) for i, (number, row) in enumerate(zip(numbers, c, strict=True))]
    worst = max(audited, key=lambda a: VERDICTS.index(a.verdict))
    rule = PASS_RULE if worst.verdict == "PASS" else f"layer {worst.layer}: {worst.rule}"
    return AuditReport(verdict=worst.verdict, rule=rule, layers=audited, tokens=tokens, num_experts=c.shape[1],
                       topk=topk, thresholds=thresholds)


# --- Running a checkpoint -------------------------------------------------------------------------------


def non_finite_tensor(state: Mapping[str, torch.Tensor]) -> str | None:
    """A message naming the first tensor (by name) holding NaN or inf, or None when all are finite."""
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            return f"tensor '{name}' has {nan} NaN and {inf} inf value(s)"
    return None


def tool_version() -> str:
    """The vpmoe package version and the code revision that runs the audit."""
    from vpmoe.training.checkpoint import code_revision

    try:
        version = importlib.metadata.version("vpmoe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"vpmoe {version} ({code_revision()})"


def _audit_batches(dataset: Any, tokens: int) -> Iterator[torch.Tensor]:
    """Input rows [B, seq_length] of the audit set, enough whole rows to cover `tokens` tokens."""
    rows = math.ceil(tokens / dataset.seq_length)
    batch_rows = max(1, BATCH_TOKENS // dataset.seq_length)
    stream = (row[:-1] for row, _ in itertools.islice(dataset.rows(), rows))
    while chunk := list(itertools.islice(stream, batch_rows)):
        yield torch.from_numpy(np.stack(chunk))


def audit_checkpoint(path: str | Path, *, data: str | None = None, text_field: str = "text",
                     tokens: int = DEFAULT_TOKENS, thresholds: Thresholds = Thresholds(), config: str | None = None,
                     device: str = "cpu") -> AuditReport:
    """Audit a checkpoint folder on `tokens` tokens (rounded up to whole rows) of the held-out split of `data`
    (the built-in corpus by default). A checkpoint with NaN or inf weights gives a FAIL report without running.
    Raises CheckpointError, DataError, ConfigError or AuditError when it cannot audit."""
    from analysis.probing import Probe
    from vpmoe.config import load_config
    from vpmoe.model.transformer import VpMoE
    from vpmoe.training.checkpoint import MODEL_FILE, file_sha256, load_model_state, read_checkpoint
    from vpmoe.training.data import PackedDataset

    if tokens < 1:
        raise AuditError(f"--tokens must be at least 1, got {tokens}")
    path = Path(path)
    checkpoint = read_checkpoint(path, load_config(config) if config else None)
    cfg = checkpoint.config
    expert_bias = cfg.moe.router_enable_expert_bias
    provenance: dict[str, Any] = {
        "checkpoint": str(path.resolve()), "step": checkpoint.step,
        "checkpoint_sha256": checkpoint.meta.get("files", {}).get(MODEL_FILE) or file_sha256(path / MODEL_FILE),
        "router_mode": ROUTER_MODE.format("on" if expert_bias else "off (disabled in the config)"),
        "tool_version": tool_version(), "created_at": datetime.now(UTC).isoformat(),
    }
    broken = non_finite_tensor(checkpoint.model_state)
    if broken is not None:
        return AuditReport(verdict="FAIL", rule=f"non-finite weights: {broken}", layers=[], tokens=0,
                           num_experts=cfg.moe.num_experts, topk=cfg.moe.topk, thresholds=thresholds,
                           provenance={**provenance, "data": None})
    model = VpMoE(cfg)
    load_model_state(model, checkpoint)
    probe = Probe(model.to(device), checkpoint)
    if not probe.moe_layers:
        raise AuditError(f"{path}: the model has no MoE layers to audit")
    dataset = PackedDataset(data, split="heldout", seq_length=cfg.training.seq_length, seed=cfg.training.seed,
                            text_field=text_field)
    counts, seen = probe.expert_counts(_audit_batches(dataset, tokens))
    bias = np.stack([r.expert_bias.cpu().numpy() for r in model.routers()]) if expert_bias else None
    report = audit_counts(counts, seen, cfg.moe.topk, bias, cfg.moe.router_bias_update_rate, checkpoint.step,
                          thresholds, layers=probe.moe_layers)
    report.provenance = {**provenance, "data": {**dataset.describe(), "rows": seen // dataset.seq_length,
                                                "tokens": seen}}
    return report


# --- Reports --------------------------------------------------------------------------------------------


def _bias_cell(layer: LayerAudit) -> str:
    if layer.bias_max is None:
        return "off"
    share = f" ({layer.bias_max / layer.bias_bound:.0%})" if layer.bias_bound else ""
    return f"{layer.bias_max:.4f}/{layer.bias_bound:.4f}{share}"


def _layer_cells(layer: LayerAudit) -> list[str]:
    """One table row: each figure beside its uniform-routing floor in parentheses."""
    return [str(layer.layer), f"{layer.tokens:,}", f"{layer.max_vio:.3f} ({layer.max_vio_floor:.3f})",
            f"{layer.cv:.3f} ({layer.cv_floor:.3f})", f"{layer.entropy:.4f} ({layer.entropy_floor:.4f})",
            f"{len(layer.dead)} ({layer.expected_dead:.2g})", f"{len(layer.starved)} ({layer.expected_starved:.2g})",
            _bias_cell(layer), layer.verdict, layer.rule]


TABLE_HEADER = ["layer", "tokens", "MaxVio (floor)", "CV (floor)", "H/lnE (floor)", "dead (uniform)",
                "starved (uniform)", "max|e|/bound", "verdict", "rule"]


def format_table(report: AuditReport) -> str:
    """The per-layer table as aligned plain text, followed by the overall verdict and its rule."""
    rows = [TABLE_HEADER] + [_layer_cells(layer) for layer in report.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    return "\n".join([*lines, f"overall: {report.verdict} ({report.rule})"])


def _md(text: object) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def render_markdown(report: AuditReport) -> str:
    """A report a person can read and share: verdict, provenance, thresholds, per-layer evidence."""
    p = report.provenance
    data = p.get("data") or {}
    lines = [
        f"# Expert-load audit: {report.verdict}", "", f"**Decided by:** {_md(report.rule)}", "",
        "| | |", "| --- | --- |",
        f"| checkpoint | `{_md(p.get('checkpoint'))}` (step {p.get('step')}) |",
        f"| model.safetensors sha256 | `{p.get('checkpoint_sha256')}` |",
        f"| tokens | {report.tokens:,} ({data.get('rows', 0)} rows x {data.get('seq_length', '-')}) |",
        f"| data | {_md(data.get('source', '-'))}, split {_md(data.get('split', '-'))}, "
        f"fingerprint `{_md(data.get('fingerprint', '-'))}` |",
        f"| router mode | {_md(p.get('router_mode'))} |", f"| tool | {_md(p.get('tool_version'))} |",
        f"| created | {p.get('created_at')} |", f"| experts, top-k | {report.num_experts}, {report.topk} |", "",
        "## Thresholds", "", _md(report.thresholds.describe(len(report.layers))), "",
    ]
    if report.layers:
        lines += ["## Layers (each figure beside uniform routing's value at this token count)", "",
                  "| " + " | ".join(_md(name) for name in TABLE_HEADER) + " |", "|" + " --- |" * len(TABLE_HEADER)]
        lines += ["| " + " | ".join(_md(cell) for cell in _layer_cells(layer)) + " |" for layer in report.layers]
        flagged = [(layer.layer, f) for layer in report.layers for f in layer.findings]
        if flagged:
            lines += ["", "## Findings", ""] + [f"- layer {n}: **{f.level}** {_md(f.rule)}" for n, f in flagged]
    return "\n".join(lines) + "\n"


def write_reports(report: AuditReport, directory: Path) -> tuple[Path, Path]:
    """Write audit.json and audit.md into `directory` (created if needed); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / JSON_REPORT, directory / MARKDOWN_REPORT
    json_path.write_text(report.to_json() + "\n")
    markdown_path.write_text(render_markdown(report))
    return json_path, markdown_path


def record_in_store(report: AuditReport, checkpoint: Path, store_root: Path | None) -> str:
    """Append the audits row for the run the checkpoint belongs to; return a note saying what happened.

    Default store: the checkpoint's parent's parent folder; run id: the checkpoint's parent folder name."""
    from analysis.schema import SchemaError
    from analysis.store import Store, StoreError

    checkpoint = checkpoint.resolve()
    root = (store_root or checkpoint.parent.parent).resolve()
    run_id = checkpoint.parent.name
    if not (root / run_id / "manifest.json").is_file():
        return f"store: no run {run_id!r} in {root}; no audits row written"
    try:
        Store(root).append_rows(run_id, "audits", {
            "step": report.provenance.get("step", 0), "created_at": datetime.now(UTC),
            "checkpoint": str(checkpoint), "checkpoint_sha256": report.provenance.get("checkpoint_sha256", ""),
            "verdict": report.verdict, "tokens": report.tokens, "report_json": report.to_json()})
    except (StoreError, SchemaError, OSError) as error:
        return f"store: could not write the audits row: {error}"
    return f"store: audits row written for run {run_id!r} in {root}"


# --- Command line ---------------------------------------------------------------------------------------

_THRESHOLD_FLAGS = {
    "max_vio_quantile": "probability that a uniform router passes every layer's MaxVio check (default 0.99)",
    "max_vio_warn_margin": "WARN when MaxVio exceeds its floor by more than this (default 0.1)",
    "max_vio_margin": "FAIL when MaxVio exceeds its floor by more than this (default 0.5)",
    "null_expected_max": "a dead/starved/saturated finding counts when the null model expects fewer (default 0.01)",
    "starved_fraction": "starved: load below this fraction of the fair share K*T/E (default 0.1)",
    "bias_warn_fraction": "WARN when max|e| reaches this fraction of u*steps (default 0.9)",
    "bias_fail_fraction": "FAIL when max|e| reaches this fraction of u*steps (default 0.99)",
}


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vpmoe audit CHECKPOINT`; sets `func` to run_audit."""
    parser.add_argument("checkpoint", help="checkpoint folder (…/checkpoint-NNNNNN)")
    parser.add_argument("--data", help="held-out split of this folder, glob or file (default: built-in corpus)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"tokens to route, rounded up to whole rows (default {DEFAULT_TOKENS}: MaxVio's noise "
                             "floor is about 0.09 there for E=256, K=4)")
    parser.add_argument("--config", help="fail with exit 3 unless the checkpoint has this config's architecture")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--report-dir", help="where audit.json and audit.md go (default CHECKPOINT/audit)")
    parser.add_argument("--store", help="store folder for the audits row (default: the checkpoint's parent's parent)")
    parser.add_argument("--thresholds", help="TOML file of threshold keys (flags override it)")
    for name, text in _THRESHOLD_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, help=text)
    parser.set_defaults(func=run_audit)


def thresholds_from_arguments(args: argparse.Namespace) -> Thresholds:
    """Defaults, then the TOML file, then the flags."""
    base = load_thresholds(args.thresholds) if args.thresholds else Thresholds()
    flags = {name: getattr(args, name) for name in _THRESHOLD_FLAGS if getattr(args, name) is not None}
    return dataclasses.replace(base, **flags)


def run_audit(args: argparse.Namespace) -> int:
    """`vpmoe audit`: print thresholds and the per-layer table, write both reports and the store row.
    Exit 0 PASS, 1 WARN, 2 FAIL, 3 cannot audit."""
    from vpmoe.config import ConfigError
    from vpmoe.training.checkpoint import CheckpointError
    from vpmoe.training.data import DataError

    path = Path(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        thresholds = thresholds_from_arguments(args)
        report = audit_checkpoint(path, data=args.data, text_field=args.text_field, tokens=args.tokens,
                                  thresholds=thresholds, config=args.config, device=args.device)
    except (CheckpointError, DataError, ConfigError, AuditError) as error:
        print(f"vpmoe audit: cannot audit: {error}", file=sys.stderr)
        return EXIT_CANNOT_AUDIT
    directory = Path(args.report_dir) if args.report_dir else path / "audit"
    report.provenance["reports"] = {"json": str(directory.resolve() / JSON_REPORT),
                                    "markdown": str(directory.resolve() / MARKDOWN_REPORT)}
    try:
        paths = write_reports(report, directory)
    except OSError as error:
        print(f"vpmoe audit: cannot write the reports: {error}", file=sys.stderr)
        return EXIT_CANNOT_AUDIT
    note = record_in_store(report, path, Path(args.store) if args.store else None)
    if args.json:
        print(report.to_json())
    else:
        p = report.provenance
        data = p.get("data") or {}
        print(f"vpmoe audit: {p['checkpoint']} (step {p['step']}, model sha256 {p['checkpoint_sha256'][:16]}...)")
        print(f"data: {data.get('source', '-')} {data.get('split', '')} split, {report.tokens:,} tokens; "
              f"router: {p['router_mode']}; {p['tool_version']}")
        print(f"thresholds: {thresholds.describe(len(report.layers))}")
        print(format_table(report) if report.layers else f"overall: {report.verdict} ({report.rule})")
    print(f"reports: {paths[0]}, {paths[1]}", file=sys.stderr)
    print(note, file=sys.stderr)
    return report.exit_code

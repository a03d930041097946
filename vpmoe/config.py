"""TOML configuration -> frozen dataclasses with strict validation and derived properties.

Architecture tables (tokenizer, model, attention, tpa, grape, moe) change the math and are saved
with every checkpoint and run; runtime and training tables say how to run it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LayerKind = Literal["local", "global"]


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file, `[table].key`, value and rule."""


def _spec(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
          choices: tuple[Any, ...] | None = None, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field carrying its validation rule (range or allowed values)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """Vocabulary: o200k Harmony padded to 201088 ids."""

    vocab_size: int = _spec(lo=1)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Depth, widths and the per-block switches of the locked architecture."""

    num_layers: int = _spec(lo=1)
    hidden_size: int = _spec(lo=1)
    num_attention_heads: int = _spec(lo=1)
    num_query_groups: int = _spec(lo=1)
    head_dim: int = _spec(lo=2)
    ffn_hidden_size: int = _spec(lo=1)
    value_residual: bool = _spec()
    value_residual_init: float = _spec(lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    normalization: str = _spec(choices=("RMSNorm",))
    norm_epsilon: float = _spec(lo=0.0, lo_open=True)
    qk_layernorm: bool = _spec()
    softmax_type: str = _spec(choices=("learnable", "vanilla"))
    add_bias_linear: bool = _spec(choices=(True,))
    add_qkv_bias: bool = _spec(choices=(True,))
    gated_linear_unit: bool = _spec(choices=(False,))
    activation: str = _spec(choices=("squaredrelu",))
    untied_embeddings: bool = _spec(choices=(True,))
    init_method_std: float = _spec(lo=0.0, lo_open=True)
    hidden_dropout: float = _spec(lo=0.0, hi=1.0, hi_open=True)


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Local/global schedule and window; the window counts the query itself."""

    attention_dropout: float = _spec(lo=0.0, hi=1.0, hi_open=True)
    max_sequence_length: int = _spec(lo=1)
    position_embedding_type: str = _spec(choices=("grapem",))
    window_size: int = _spec(lo=1)
    window_attn_skip_freq: int = _spec(lo=1)


@dataclass(frozen=True, slots=True)
class TPAConfig:
    """Tensor Product Attention ranks for the local layers (arXiv:2501.06425)."""

    use_tpa: bool = _spec()
    tpa_rank: int = _spec(lo=1)
    tpa_q_rank: int = _spec(lo=1)


@dataclass(frozen=True, slots=True)
class GrapeConfig:
    """GRAPE-M (learnable shared RoPE frequencies) and GRAPE-A (ALiBi), arXiv:2512.07805."""

    grape_a: bool = _spec()
    grapem_learnable_freq: bool = _spec(choices=(True,))
    grapem_share_across_heads: bool = _spec(choices=(True,))
    grapem_log_freq_scale: float = _spec(lo=0.0, lo_open=True)
    grapem_base: float = _spec(lo=1.0, lo_open=True)


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Routed experts, shared expert and the DeepSeek-V3 router (Megatron-Core 0.16 semantics)."""

    num_experts: int = _spec(lo=1)
    topk: int = _spec(lo=1)
    shared_expert: bool = _spec()
    shared_expert_size: int = _spec(lo=1)
    first_layer_dense: bool = _spec()
    router_load_balancing_type: str = _spec(choices=("seq_aux_loss",))
    aux_loss_coeff: float = _spec(lo=0.0)
    router_score_function: str = _spec(choices=("sigmoid",))
    router_topk_scaling_factor: float = _spec(lo=0.0, lo_open=True)
    router_num_groups: int = _spec(lo=1)
    router_group_topk: int = _spec(lo=1)
    router_enable_expert_bias: bool = _spec()
    router_bias_update_rate: float = _spec(lo=0.0)
    router_dtype: str = _spec(choices=("fp32",))


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Where and how to run: device, dtype and kernels (resolved once at model construction)."""

    device: str = _spec(choices=("auto", "cpu", "cuda"), default="cpu")
    dtype: str = _spec(choices=("float32", "bfloat16"), default="float32")
    attention_kernel: str = _spec(choices=("auto", "reference", "blocked", "flex"), default="auto")
    expert_kernel: str = _spec(choices=("auto", "reference", "grouped"), default="auto")
    compile: bool = _spec(default=False)


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Optimisation and schedule for `vpmoe train`."""

    seq_length: int = _spec(lo=2, default=128)
    micro_batch_size: int = _spec(lo=1, default=4)
    grad_accum_steps: int = _spec(lo=1, default=1)
    steps: int = _spec(lo=1, default=300)
    lr: float = _spec(lo=0.0, lo_open=True, default=3e-3)
    min_lr: float = _spec(lo=0.0, default=3e-4)
    warmup_steps: int = _spec(lo=0, default=20)
    weight_decay: float = _spec(lo=0.0, default=0.1)
    adam_beta1: float = _spec(lo=0.0, hi=1.0, hi_open=True, default=0.9)
    adam_beta2: float = _spec(lo=0.0, hi=1.0, hi_open=True, default=0.95)
    adam_eps: float = _spec(lo=0.0, lo_open=True, default=1e-8)
    grad_clip: float = _spec(lo=0.0, default=1.0)
    eval_every: int = _spec(lo=0, default=50)
    eval_batches: int = _spec(lo=1, default=4)
    checkpoint_every: int = _spec(lo=0, default=100)
    seed: int = _spec(lo=0, default=0)


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    """What `--record` writes and how often (loads, bias and layer stats every `every` steps)."""

    every: int = _spec(lo=1, default=1)
    attention_every: int = _spec(lo=1, default=10)
    probe_every: int = _spec(lo=1, default=50)
    attention_queries: int = _spec(lo=1, default=128)
    probe_tokens: int = _spec(lo=2, default=64)
    max_map_heads: int = _spec(lo=1, default=64)
    flush_every_steps: int = _spec(lo=1, default=10)
    flush_every_s: float = _spec(lo=0.0, lo_open=True, default=2.0)


ARCHITECTURE_TABLES: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "attention": AttentionConfig,
    "tpa": TPAConfig,
    "grape": GrapeConfig,
    "moe": MoEConfig,
}
SETTINGS_TABLES: dict[str, type] = {"runtime": RuntimeConfig, "training": TrainingConfig,
                                    "recording": RecordingConfig}
ALL_TABLES: dict[str, type] = {**ARCHITECTURE_TABLES, **SETTINGS_TABLES, "meta": dict}


@dataclass(frozen=True, slots=True)
class VpMoEConfig:
    """The whole config: architecture tables, runtime and training, plus where it came from."""

    tokenizer: TokenizerConfig
    model: ModelConfig
    attention: AttentionConfig
    tpa: TPAConfig
    grape: GrapeConfig
    moe: MoEConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    source: str = "<dict>"

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Attention kind of layers 1..L (index 0 is layer 1): every `window_attn_skip_freq`-th is global."""
        freq = self.attention.window_attn_skip_freq
        return tuple("global" if layer % freq == 0 else "local" for layer in range(1, self.model.num_layers + 1))

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Whether layers 1..L use the MoE FFN (layer 1 is dense when `first_layer_dense`)."""
        dense_first = self.moe.first_layer_dense
        return tuple(not (dense_first and layer == 1) for layer in range(1, self.model.num_layers + 1))

    @property
    def num_moe_layers(self) -> int:
        """How many layers route through experts."""
        return sum(self.moe_layers)

    def architecture_dict(self) -> dict[str, dict[str, Any]]:
        """The tables that change the math, as plain dicts (saved with checkpoints and runs)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in ARCHITECTURE_TABLES}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every table as plain dicts."""
        out = self.architecture_dict()
        for name in SETTINGS_TABLES:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def architecture_hash(self) -> str:
        """sha256 of the canonical JSON of the architecture tables (first 16 hex digits)."""
        blob = json.dumps(self.architecture_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **tables: Any) -> VpMoEConfig:
        """A copy with whole tables swapped, re-validated."""
        new = dataclasses.replace(self, **tables)
        _check_cross_fields(new)
        return new


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_value(where: str, name: str, tp: type, meta: dict[str, Any], value: Any) -> Any:
    """Check one value's type and rule, returning it converted (int -> float for float fields)."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(f"{where}.{name} must be a finite number, got {value!r}")
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}.{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float:
        value = float(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(json.dumps(c) for c in choices)
        raise ConfigError(f"{where}.{name} must be one of {allowed} (vpMoE implements only these), got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
        raise ConfigError(f"{where}.{name} must be {'>' if meta['lo_open'] else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if meta["hi_open"] else value > hi):
        raise ConfigError(f"{where}.{name} must be {'<' if meta['hi_open'] else '<='} {hi}, got {value!r}")
    return value


def _build_table(source: str, table: str, cls: type, data: Any, required: bool) -> Any:
    where = f"{source}: [{table}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}.{key} is not a known key; expected one of {', '.join(known)}")
    values = {}
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    for name, f in known.items():
        tp = hints[f.type] if isinstance(f.type, str) else f.type
        if name not in data:
            if required or f.default is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name} is missing; expected {_type_name(tp)}")
            continue
        values[name] = _check_value(where, name, tp, dict(f.metadata), data[name])
    return cls(**values)


def _check_cross_fields(cfg: VpMoEConfig) -> None:
    """Rules that involve more than one key."""
    src = cfg.source
    m, moe, t, a = cfg.model, cfg.moe, cfg.training, cfg.attention
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"{src}: [model].num_query_groups must divide num_attention_heads ({m.num_attention_heads}), "
            f"got {m.num_query_groups}")
    if m.head_dim % 2:
        raise ConfigError(f"{src}: [model].head_dim must be even (GRAPE-M rotates planes of 2), got {m.head_dim}")
    if moe.num_experts % moe.router_num_groups:
        raise ConfigError(
            f"{src}: [moe].router_num_groups must divide num_experts ({moe.num_experts}), got {moe.router_num_groups}")
    if moe.router_group_topk > moe.router_num_groups:
        raise ConfigError(
            f"{src}: [moe].router_group_topk must be in 1..{moe.router_num_groups} (router_num_groups), "
            f"got {moe.router_group_topk}")
    if moe.router_group_topk > moe.topk:
        raise ConfigError(
            f"{src}: [moe].router_group_topk must be <= topk ({moe.topk}) so each group scores by its top "
            f"topk // router_group_topk experts, got {moe.router_group_topk}")
    kept = moe.router_group_topk * (moe.num_experts // moe.router_num_groups)
    if moe.topk > kept:
        raise ConfigError(
            f"{src}: [moe].topk must be <= {kept} (experts left in the router_group_topk kept groups), got {moe.topk}")
    if t.seq_length > a.max_sequence_length:
        raise ConfigError(
            f"{src}: [training].seq_length must be <= [attention].max_sequence_length ({a.max_sequence_length}), "
            f"got {t.seq_length}")
    if t.min_lr > t.lr:
        raise ConfigError(f"{src}: [training].min_lr must be <= lr ({t.lr}), got {t.min_lr}")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> VpMoEConfig:
    """Validate a parsed TOML document (tables of keys) into a `VpMoEConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the document must be a set of tables, got {type(data).__name__}")
    for table in data:
        if table not in ALL_TABLES:
            raise ConfigError(f"{source}: [{table}] is not a known table; expected one of {', '.join(ALL_TABLES)}")
    tables: dict[str, Any] = {}
    for table, cls in ARCHITECTURE_TABLES.items():
        if table not in data:
            raise ConfigError(f"{source}: [{table}] is missing; every architecture table is required")
        tables[table] = _build_table(source, table, cls, data[table], required=True)
    for table, cls in SETTINGS_TABLES.items():
        tables[table] = _build_table(source, table, cls, data.get(table, {}), required=False)
    cfg = VpMoEConfig(**tables, source=source)
    _check_cross_fields(cfg)
    return cfg


def load_config(path: str | Path) -> VpMoEConfig:
    """Read and validate a TOML config file; every problem raises `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (expected a TOML file such as configs/tiny.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, source=str(path))

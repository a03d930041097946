"""Table schemas of the run store and the validation of incoming batches against them.

Adding a table: add a `TableSpec` to `TABLES` with its pyarrow schema and sort key. Every row of
every table carries `run_id` and `step`; `layer` is 1-based, `expert` and `head` 0-based.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """A batch or a stored run does not match the schema; the message names the table or folder."""


class SchemaVersionError(SchemaError):
    """A store or run was written with a schema version this code cannot read."""


@dataclass(frozen=True)
class TableSpec:
    """One table: its pyarrow schema, the order rows are kept in, and the values some columns allow.

    `derived` tables are computed by the store (roll-ups) and cannot be appended to.
    """

    name: str
    schema: pa.Schema
    sort_key: tuple[str, ...]
    allowed_values: Mapping[str, frozenset[str]] = field(default_factory=dict)
    derived: bool = False


def _table(name: str, columns: list[tuple[str, pa.DataType, bool]], sort_key: tuple[str, ...],
           **options: Any) -> TableSpec:
    """A TableSpec from (name, type, nullable) triples, with `run_id` and `step` put first."""
    fields = [pa.field("run_id", pa.string(), nullable=False), pa.field("step", pa.int64(), nullable=False)]
    fields += [pa.field(column, dtype, nullable=nullable) for column, dtype, nullable in columns]
    return TableSpec(name=name, schema=pa.schema(fields), sort_key=sort_key, **options)


F64, F32, I16, I32, I64, STR = pa.float64(), pa.float32(), pa.int16(), pa.int32(), pa.int64(), pa.string()
UTC_TIME = pa.timestamp("us", tz="UTC")
REQUIRED, NULLABLE = False, True

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in [
    _table("steps", [
        ("lm_loss", F64, REQUIRED), ("aux_loss", F64, REQUIRED), ("eval_loss", F64, NULLABLE),
        ("lr", F64, REQUIRED), ("tokens_per_s", F64, REQUIRED), ("tokens", I64, REQUIRED),
        ("step_time_s", F64, REQUIRED), ("wall_time", F64, REQUIRED),
    ], ("step",)),
    _table("router_load", [("layer", I16, REQUIRED), ("expert", I16, REQUIRED), ("tokens", I64, REQUIRED)],
           ("step", "layer", "expert")),
    _table("expert_bias", [("layer", I16, REQUIRED), ("expert", I16, REQUIRED), ("bias", F32, REQUIRED)],
           ("step", "layer", "expert")),
    # Dense layers have no router and layer 1 has no value-residual lambda: those cells are null.
    _table("layer_stats", [
        ("layer", I16, REQUIRED), ("aux_loss", F64, NULLABLE), ("bias_override_rate", F64, NULLABLE),
        ("aux_map_disagreement", F64, NULLABLE), ("value_residual_lambda", F64, NULLABLE),
    ], ("step", "layer")),
    _table("attention_stats", [
        ("layer", I16, REQUIRED), ("head", I16, REQUIRED), ("kind", STR, REQUIRED), ("entropy", F64, REQUIRED),
        ("sink_mass", F64, REQUIRED), ("mean_distance", F64, REQUIRED), ("window_mass", F64, REQUIRED),
    ], ("step", "layer", "head"), allowed_values={"kind": frozenset({"local", "global"})}),
    _table("probe_routing", [
        ("prompt_id", I32, REQUIRED), ("position", I32, REQUIRED), ("token_id", I32, REQUIRED),
        ("token_text", STR, REQUIRED), ("domain", STR, REQUIRED), ("layer", I16, REQUIRED),
        ("rank", I16, REQUIRED), ("expert", I16, REQUIRED), ("gate", F32, REQUIRED),
    ], ("step", "prompt_id", "position", "layer", "rank")),
    _table("attention_maps", [
        ("prompt_id", I32, REQUIRED), ("layer", I16, REQUIRED), ("head", I16, REQUIRED),
        ("query_pos", I32, REQUIRED), ("key_pos", I32, REQUIRED), ("prob", F32, REQUIRED),
    ], ("step", "prompt_id", "layer", "head", "query_pos", "key_pos")),
    _table("audits", [
        ("created_at", UTC_TIME, REQUIRED), ("checkpoint", STR, REQUIRED), ("checkpoint_sha256", STR, REQUIRED),
        ("verdict", STR, REQUIRED), ("tokens", I64, REQUIRED), ("report_json", STR, REQUIRED),
    ], ("step", "created_at")),
    # Per (step, layer) summary of router_load, written by the store so pages never scan raw loads.
    _table("load_rollup", [
        ("layer", I16, REQUIRED), ("experts", I16, REQUIRED), ("tokens", I64, REQUIRED), ("max_load", I64, REQUIRED),
        ("min_load", I64, REQUIRED), ("mean_load", F64, REQUIRED), ("std_load", F64, REQUIRED),
        ("dead", I16, REQUIRED), ("entropy", F64, NULLABLE), ("entropy_norm", F64, NULLABLE),
        ("max_vio", F64, NULLABLE), ("cv", F64, NULLABLE),
    ], ("step", "layer"), derived=True),
    # Per step summary of load_rollup over the MoE layers: what a page draws for "all layers" without
    # reading a row per layer. tokens is the largest per-layer sum c (every layer routes the same K T).
    _table("load_summary", [
        ("layers", I16, REQUIRED), ("experts", I16, REQUIRED), ("tokens", I64, REQUIRED), ("dead", I32, REQUIRED),
        ("max_vio_median", F64, NULLABLE), ("max_vio_worst", F64, NULLABLE), ("cv_median", F64, NULLABLE),
        ("cv_worst", F64, NULLABLE), ("entropy_norm_median", F64, NULLABLE), ("entropy_norm_worst", F64, NULLABLE),
    ], ("step",), derived=True),
    # Per (layer, expert) drift sums of expert_bias up to a step (analysis.drift.drift_sums), written when a run is
    # compacted and, at the run's configured rate, carried forward at each compaction while it records; step is
    # the last step they cover, rate the u they counted moves at, rate_given whether u was the run's configured
    # rate (manifest shape.bias_update_rate) or estimated from the layer's biases. last_move (the sign of each
    # expert's last move) lets later steps be added without the earlier rows; null in roll-ups written before it.
    _table("bias_drift", [
        ("layer", I16, REQUIRED), ("expert", I16, REQUIRED), ("steps", I64, REQUIRED), ("first_bias", F64, REQUIRED),
        ("last_bias", F64, REQUIRED), ("path", F64, REQUIRED), ("moves", I64, REQUIRED),
        ("sign_changes", I64, REQUIRED), ("last_move", pa.int8(), NULLABLE), ("rate", F64, NULLABLE),
        ("rate_given", pa.bool_(), REQUIRED),
    ], ("step", "layer", "expert"), derived=True),
]}

# Tables with a second, per-layer copy of each compacted file, sorted by (expert, step), so that one
# expert's or one layer's history reads a few small files instead of every row of the run.
SERIES_TABLES = ("router_load", "expert_bias")

# The roll-up of router_load, one row per (run_id, step, layer), unordered. std_load is the population std
# (ddof 0); entropy uses H = ln S - (1/S) sum c ln c with S = sum c, which equals -sum f ln f
# (0 ln 0 = 0 through ln(greatest(c, 1))).
LOAD_ROLLUP_SQL = """
select run_id, step, layer,
       count(*)::smallint as experts,
       sum(c)::bigint as tokens,
       max(c)::bigint as max_load,
       min(c)::bigint as min_load,
       avg(c)::double as mean_load,
       stddev_pop(c)::double as std_load,
       count(*) filter (where c = 0)::smallint as dead,
       ln(nullif(sum(c), 0)) - sum(c * ln(greatest(c, 1))) / nullif(sum(c), 0) as entropy,
       entropy / nullif(ln(count(*)), 0) as entropy_norm,
       max(c) / nullif(avg(c), 0) - 1 as max_vio,
       stddev_pop(c) / nullif(avg(c), 0) as cv
from (select run_id, step, layer, tokens as c from {source})
group by run_id, step, layer
"""


# The summary of load_rollup rows per (run_id, step); "worst" is the largest MaxVio and CV and the
# smallest normalised entropy. median() interpolates between the middle two layers, as pandas does.
LOAD_SUMMARY_SQL = """
select run_id, step,
       count(*)::smallint as layers,
       max(experts)::smallint as experts,
       max(tokens)::bigint as tokens,
       sum(dead)::integer as dead,
       median(max_vio) as max_vio_median, max(max_vio) as max_vio_worst,
       median(cv) as cv_median, max(cv) as cv_worst,
       median(entropy_norm) as entropy_norm_median, min(entropy_norm) as entropy_norm_worst
from {source}
group by run_id, step
order by run_id, step
"""


def _column_array(spec: TableSpec, column: pa.Field, value: Any, rows: int) -> pa.Array:
    """One column converted to its schema type, scalars repeated to `rows`; errors name table and column."""
    where = f"table {spec.name}: column {column.name!r}"
    try:
        if _is_scalar(value):
            array = pa.repeat(pa.scalar(value, type=column.type), rows)
        else:
            array = pa.array(value, type=column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as error:
        raise SchemaError(f"{where}: expected {column.type}, could not convert: {error}") from error
    if not column.nullable and array.null_count:
        raise SchemaError(f"{where}: {array.null_count} null value(s) in a column that does not allow nulls")
    allowed = spec.allowed_values.get(column.name)
    if allowed is not None:
        unknown = set(pc.unique(array).to_pylist()) - allowed
        if unknown:
            raise SchemaError(f"{where}: values {sorted(unknown)} are not among {sorted(allowed)}")
    return array


def _is_scalar(value: Any) -> bool:
    """True for one value (a number, string, datetime or None) rather than a column of them."""
    return value is None or isinstance(value, str | bytes | int | float | np.generic) or not hasattr(value, "__len__")


def validate_batch(table: str, columns: Mapping[str, Any], run_id: str) -> pa.Table:
    """Rows for `table` as a pyarrow Table of its schema, `run_id` filled in; scalars are repeated.

    Raises SchemaError naming the table and column for an unknown table or column, a missing
    required column, columns of different lengths, a value of the wrong type, a null where none is
    allowed, or a negative step. Nullable columns may be left out and are then null.
    """
    spec = TABLES.get(table)
    if spec is None or spec.derived:
        known = sorted(name for name, candidate in TABLES.items() if not candidate.derived)
        why = "is computed by the store" if spec is not None else "is not a table"
        raise SchemaError(f"table {table!r} {why}; tables that take rows: {known}")
    expected = [column.name for column in spec.schema if column.name != "run_id"]
    if "run_id" in columns:
        raise SchemaError(f"table {table}: column 'run_id' is filled in by the writer; leave it out")
    unknown = sorted(set(columns) - set(expected))
    if unknown:
        raise SchemaError(f"table {table}: unknown column(s) {unknown}; expected columns {expected}")
    missing = [column.name for column in spec.schema
               if column.name != "run_id" and column.name not in columns and not column.nullable]
    if missing:
        raise SchemaError(f"table {table}: missing column(s) {missing}; expected columns {expected}")
    lengths = {name: len(value) for name, value in columns.items() if not _is_scalar(value)}
    if len(set(lengths.values())) > 1:
        raise SchemaError(f"table {table}: columns have different lengths {lengths}")
    rows = next(iter(lengths.values())) if lengths else 1
    arrays = [pa.repeat(pa.scalar(run_id, type=pa.string()), rows)]
    arrays += [_column_array(spec, column, columns.get(column.name), rows) for column in list(spec.schema)[1:]]
    batch = pa.Table.from_arrays(arrays, schema=spec.schema)
    if rows and pc.min(batch["step"]).as_py() < 0:
        raise SchemaError(f"table {table}: column 'step' has negative values; steps count from 0")
    return batch

"""Store benchmarks, measured side by side in one run (not part of the test suite).

- ingest: rows per second through RunWriter.append + flush for the locked shape (time spent
  generating the synthetic rows is not counted), and the time of close (compaction and roll-ups);
- dashboard queries: p50/p95 latency of the analysis.queries reads the pages make, on a synthetic store
  of the locked shape (80 layers, 79 MoE x 256 experts, 8 heads) with N router_load rows, while live
  (segments) and after close (compacted), against pandas answering the same question from the
  recorded Parquet files (router_load, expert_bias, ...) without the roll-ups and per-layer copies;
- bytes on disk per recorded step for the tiny and the locked shape.

    .venv/bin/python bench/bench_store.py --rows 10e6,100e6 [--repeats 20] [--dir /tmp/vpmoe-bench]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import metrics, queries
from analysis.store import RunWriter, Store


@dataclass(frozen=True)
class Shape:
    """What one step records: layer 1 dense, layers 2..L MoE, every 4th layer global attention."""

    name: str
    layers: int
    experts: int
    heads: int

    @property
    def moe_layers(self) -> int:
        """Number of MoE layers."""
        return self.layers - 1


TINY = Shape("tiny", layers=8, experts=16, heads=4)
LOCKED = Shape("locked", layers=80, experts=256, heads=8)
BIAS_UPDATE_RATE = 1e-3  # the bias moves by +-u per step (sign update), as in training
TOKENS_PER_STEP = 16384


class SyntheticSteps:
    """Fresh random per-step rows of one shape: loads drawn around a drifting preference, bias walking by +-u."""

    def __init__(self, shape: Shape, rng: np.random.Generator) -> None:
        """Fixed index columns built once; values drawn per step."""
        self.shape, self.rng = shape, rng
        self.layer = np.repeat(np.arange(2, shape.layers + 1, dtype=np.int16), shape.experts)
        self.expert = np.tile(np.arange(shape.experts, dtype=np.int16), shape.moe_layers)
        self.all_layers = np.arange(1, shape.layers + 1, dtype=np.int16)
        self.head_layer = np.repeat(self.all_layers, shape.heads)
        self.preference = rng.dirichlet(np.full(shape.experts, 20.0), size=shape.moe_layers)
        self.bias = np.zeros(len(self.layer))

    def tables(self, step: int) -> dict[str, dict[str, object]]:
        """Columns of every per-step table for one step."""
        rng, shape = self.rng, self.shape
        loads = np.stack([rng.multinomial(4 * TOKENS_PER_STEP, p) for p in self.preference])
        self.bias += BIAS_UPDATE_RATE * rng.choice([-1.0, 1.0], size=len(self.layer))
        router_stat = np.where(self.all_layers == 1, np.nan, rng.random(shape.layers))
        heads = len(self.head_layer)
        return {
            "steps": {"step": step, "lm_loss": 3.0 + rng.random(), "aux_loss": 0.01, "lr": 3e-4,
                      "tokens_per_s": 1e5, "tokens": TOKENS_PER_STEP * (step + 1), "step_time_s": 0.5,
                      "wall_time": time.time()},
            "router_load": {"step": step, "layer": self.layer, "expert": self.expert, "tokens": loads.ravel()},
            "expert_bias": {"step": step, "layer": self.layer, "expert": self.expert,
                            "bias": self.bias.astype(np.float32)},
            "layer_stats": {"step": step, "layer": self.all_layers, "aux_loss": router_stat,
                            "bias_override_rate": router_stat, "aux_map_disagreement": router_stat,
                            "value_residual_lambda": np.where(self.all_layers == 1, None, 0.5)},
            "attention_stats": {"step": step, "layer": self.head_layer,
                                "head": np.tile(np.arange(shape.heads), shape.layers),
                                "kind": np.where(self.head_layer % 4 == 0, "global", "local"),
                                **{name: rng.random(heads)
                                   for name in ("entropy", "sink_mass", "mean_distance", "window_mass")}},
        }


def record_steps(writer: RunWriter, source: SyntheticSteps, steps: int) -> tuple[int, float]:
    """Append `steps` fresh steps; returns (rows appended, seconds spent in append, flushes included)."""
    rows, spent = 0, 0.0
    for step in range(steps):
        for table, columns in source.tables(step).items():
            begin = time.perf_counter()
            writer.append(table, columns)
            spent += time.perf_counter() - begin
            rows += len(columns.get("layer", [0]))
    return rows, spent


def folder_bytes(path: Path) -> int:
    """Total size of the files under a folder."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def timings(function: Callable[[], object], repeats: int, budget_s: float) -> list[float]:
    """Wall times of up to `repeats` calls after one warm-up, stopping early once `budget_s` is spent."""
    function()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats and (len(samples) < 3 or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        function()
        samples.append(time.perf_counter() - begin)
    return samples


def p95(samples: list[float]) -> float:
    """95th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def dashboard_queries(store: Store, run: str, last: int) -> list[tuple[str, Callable, Callable]]:
    """(name, the store's query, pandas answering the same question from the recorded rows) for each read
    the dashboard's pages make. pandas reads the recorded tables (router_load, expert_bias, layer_stats, ...)
    with filters pushed down, as one would without the store's roll-ups and per-layer copies."""
    segments = store.root / run / "segments"

    def files(table: str) -> list[str]:
        return sorted(str(path) for path in (segments / table).glob("*.parquet"))

    def read(table: str, columns: list[str], filters: list | None = None) -> pd.DataFrame:
        return pd.read_parquet(files(table), columns=columns, filters=filters)

    def pandas_load(step: int) -> pd.DataFrame:
        frame = read("router_load", ["step", "layer", "expert", "tokens"], [("step", "==", step)])
        by_layer = frame.groupby(["step", "layer"]).tokens
        frame["load_fraction"] = frame.tokens / by_layer.transform("sum")
        frame["relative_load"] = frame.tokens / by_layer.transform("mean")
        return frame.sort_values(["step", "layer", "expert"])

    def pandas_imbalance(filters: list | None) -> pd.DataFrame:
        grouped = read("router_load", ["step", "layer", "tokens"], filters).groupby(["step", "layer"]).tokens
        table = grouped.agg(["max", "min", "mean", "sum"]).assign(std=grouped.std(ddof=0))
        return table.assign(max_vio=table["max"] / table["mean"] - 1, cv=table["std"] / table["mean"]).reset_index()

    def pandas_summary() -> pd.DataFrame:
        per_step = pandas_imbalance(None).groupby("step")
        return pd.DataFrame({"max_vio_median": per_step.max_vio.median(), "max_vio_worst": per_step.max_vio.max(),
                             "cv_median": per_step.cv.median(), "cv_worst": per_step.cv.max()})

    def pandas_history() -> pd.DataFrame:
        where = [("layer", "==", 40), ("expert", "==", 100)]
        loads = read("router_load", ["step", "tokens"], where)
        totals = read("router_load", ["step", "tokens"], [("layer", "==", 40)]).groupby("step").tokens.sum()
        merged = loads.merge(totals.rename("layer_tokens"), left_on="step", right_index=True)
        merged["load_fraction"] = merged.tokens / merged.layer_tokens
        return merged.merge(read("expert_bias", ["step", "bias"], where), on="step", how="outer")

    def pandas_pooled_bias() -> pd.DataFrame:
        bias = read("expert_bias", ["step", "expert", "bias"], [("layer", "==", 40)])
        steps = np.sort(bias.step.unique())
        width = max(1, -(-len(steps) // 250))
        bias["step"] = bias.step.map(dict(zip(steps, steps[np.arange(len(steps)) // width * width], strict=True)))
        return bias.groupby(["expert", "step"], as_index=False).bias.mean()

    def pandas_moves() -> pd.DataFrame:
        grid = read("expert_bias", ["step", "expert", "bias"], [("layer", "==", 40)]).pivot_table(
            index="step", columns="expert", values="bias").dropna()
        return pd.DataFrame(metrics.bias_path_sums(grid.to_numpy(), 1e-3))

    middle = last // 2
    return [
        ("last_step (file names)", lambda: queries.last_step(store, run),
         lambda: read("steps", ["step"]).step.max()),
        ("steps: loss curve", lambda: queries.steps(store, run),
         lambda: read("steps", ["step", "lm_loss", "aux_loss", "eval_loss", "lr", "tokens_per_s", "tokens",
                                "step_time_s", "wall_time"]).sort_values("step")),
        ("available_steps router_load", lambda: queries.available_steps(store, run, "router_load"),
         lambda: np.unique(read("router_load", ["step"]).step)),
        ("expert_load @ latest step", lambda: queries.expert_load(store, run), lambda: pandas_load(last)),
        ("expert_load @ middle step", lambda: queries.expert_load(store, run, step=middle),
         lambda: pandas_load(middle)),
        ("load_summary (all layers)", lambda: queries.load_summary(store, run), pandas_summary),
        ("load_imbalance layer 40", lambda: queries.load_imbalance(store, run, layer=40),
         lambda: pandas_imbalance([("layer", "==", 40)])),
        ("expert_history 40/100", lambda: queries.expert_history(store, run, 40, 100), pandas_history),
        ("expert_bias @ middle step", lambda: queries.expert_bias(store, run, step=middle),
         lambda: read("expert_bias", ["step", "layer", "expert", "bias"], [("step", "==", middle)]).sort_values(
             ["step", "layer", "expert"])),
        ("bias_history layer 40 (notebook)", lambda: queries.bias_history(store, run, 40),
         lambda: read("expert_bias", ["step", "layer", "expert", "bias"], [("layer", "==", 40)]).sort_values(
             ["expert", "step"])),
        ("bias_history layer 40, 250 spans", lambda: queries.bias_history(store, run, 40, max_steps=250),
         pandas_pooled_bias),
        ("bias_moves layer 40 (drift)", lambda: queries.bias_moves(store, run, 40, rate=1e-3), pandas_moves),
        ("layer_stats (all layers)", lambda: queries.layer_stats(store, run),
         lambda: read("layer_stats", ["step", "layer", "aux_loss", "bias_override_rate", "aux_map_disagreement",
                                      "value_residual_lambda"]).sort_values(["step", "layer"])),
        ("value_residual", lambda: queries.value_residual(store, run),
         lambda: read("layer_stats", ["step", "layer", "value_residual_lambda"]).dropna().sort_values(
             ["step", "layer"])),
        ("attention_stats @ latest", lambda: queries.attention_stats(store, run),
         lambda: read("attention_stats", ["step", "layer", "head", "kind", "entropy", "sink_mass", "mean_distance",
                                          "window_mass"], [("step", "==", last)]).sort_values(
             ["step", "layer", "head"])),
        ("load_imbalance all layers (notebook)", lambda: queries.load_imbalance(store, run),
         lambda: pandas_imbalance(None)),
    ]


def query_table(store: Store, run: str, last: int, repeats: int, budget_s: float) -> list[list[str]]:
    """Rows of latency numbers (milliseconds) for every dashboard query, DuckDB store vs pandas."""
    rows = []
    for name, ours, theirs in dashboard_queries(store, run, last):
        mine, pandas_times = timings(ours, repeats, budget_s), timings(theirs, repeats, budget_s)
        rows.append([name, f"{1e3 * statistics.median(mine):9.1f}", f"{1e3 * p95(mine):9.1f}",
                     f"{1e3 * statistics.median(pandas_times):9.1f}", f"{1e3 * p95(pandas_times):9.1f}",
                     f"{p95(pandas_times) / p95(mine):7.1f}x"])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) if index else str(cell).ljust(width)
                        for index, (cell, width) in enumerate(zip(row, widths, strict=True))))


def bench_size(root: Path, rows: int, repeats: int, budget_s: float) -> None:
    """Ingest a locked-shape run of `rows` router_load rows, then time the queries live and compacted."""
    store = Store(root / f"rows-{rows:.0e}")
    steps = math.ceil(rows / (LOCKED.moe_layers * LOCKED.experts))
    manifest = {"config": {"shape": LOCKED.name}, "shape": {"bias_update_rate": BIAS_UPDATE_RATE}}
    writer = store.create_run("bench", manifest)
    appended, ingest_s = record_steps(writer, SyntheticSteps(LOCKED, np.random.default_rng(0)), steps)
    started = time.perf_counter()
    writer.flush()
    ingest_s += time.perf_counter() - started
    header = ["query", "store p50", "store p95", "pandas p50", "pandas p95", "pandas / store p95"]
    live = query_table(store, "bench", steps - 1, repeats, budget_s)
    started = time.perf_counter()
    writer.close()
    close_s = time.perf_counter() - started
    compacted = query_table(store, "bench", steps - 1, repeats, budget_s)
    print_table(f"ingest, {steps} locked-shape steps, {appended / 1e6:.1f}M rows in all tables "
                f"({rows / 1e6:.0f}M router_load)", ["measure", "value"],
                [["append + flush rows/s", f"{appended / ingest_s:,.0f}"], ["append + flush s", f"{ingest_s:.1f}"],
                 ["close (compaction + roll-ups) s", f"{close_s:.1f}"],
                 ["store bytes on disk", f"{folder_bytes(store.root):,}"]])
    print_table(f"queries (ms), live run before close, {rows / 1e6:.0f}M router_load rows", header, live)
    print_table(f"queries (ms), compacted run, {rows / 1e6:.0f}M router_load rows", header, compacted)


def bytes_per_step(root: Path, shape: Shape, steps: int) -> list[str]:
    """Bytes on disk per recorded step of `shape`: live segments (default flushing) and compacted."""
    store = Store(root / f"bytes-{shape.name}")
    writer = store.create_run("bytes", {"config": {"shape": shape.name}}, compact_every_flushes=0)
    record_steps(writer, SyntheticSteps(shape, np.random.default_rng(1)), steps)
    writer.flush()
    segments = store.root / "bytes" / "segments"
    live = folder_bytes(segments)
    writer.close()
    compacted = folder_bytes(segments)
    per_table = {table.name: folder_bytes(table) / steps for table in sorted(segments.iterdir())}
    detail = ", ".join(f"{name} {size:,.0f}" for name, size in per_table.items())
    return [shape.name, str(steps), f"{live / steps:,.0f}", f"{compacted / steps:,.0f}", detail]


def main() -> None:
    """Parse sizes, run every benchmark, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10e6", help="router_load rows per synthetic store, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per query (after one warm-up)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per query and engine, at least 3 calls")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores (deleted afterwards)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vpmoe-bench-", dir=args.dir))
    try:
        print_table("bytes per recorded step (every table, roll-ups and per-layer copies included)",
                    ["shape", "steps", "live B/step", "compacted B/step", "compacted per table"],
                    [bytes_per_step(root, TINY, 2000), bytes_per_step(root, LOCKED, 200)])
        for rows in (int(float(size)) for size in args.rows.split(",")):
            bench_size(root, rows, args.repeats, args.budget)
            shutil.rmtree(root / f"rows-{rows:.0e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

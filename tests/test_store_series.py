"""The per-layer copies of router_load and expert_bias, the layer-sorted roll-up and the per-step summary:
every query that names a layer gives exactly the rows it gives from the step-ordered files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis.store as store_module
from analysis import queries
from analysis.store import RunWriter, Store
from tests.helpers_store import TINY, record_run, record_step

LAYER_QUERIES = {
    "router_load": "select step, layer, expert, tokens from router_load where run_id = $run and layer = $layer"
                   " order by step, expert",
    "expert_bias": "select step, layer, expert, bias from expert_bias where run_id = $run and layer = $layer"
                   " order by step, expert",
}


def copies(root: Path, run: str, table: str, layer: int) -> list[str]:
    """File names of one layer's copies."""
    folder = root / run / "segments" / f"{table}.by_layer" / f"layer-{layer}"
    return sorted(path.name for path in folder.glob("*.parquet")) if folder.is_dir() else []


def assert_layer_reads_match(store: Store, run: str) -> None:
    """For every MoE layer, reading through the copies equals reading the step-ordered files."""
    for sql in LAYER_QUERIES.values():
        for layer in TINY.moe_layers.tolist():
            through_copies = store.sql(sql, {"run": run, "layer": layer}, run=run, layer=layer)
            plain = store.sql(sql, {"run": run, "layer": layer}, run=run)
            assert len(plain) > 0
            pd.testing.assert_frame_equal(through_copies, plain)


def live_run(store: Store, run: str, steps: int, compact_every_flushes: int) -> RunWriter:
    """A run left open after `steps` synthetic steps, flushed every 2 steps (nothing buffered)."""
    rng = np.random.default_rng(steps)
    writer = store.create_run(run, {"config": {}}, flush_every_steps=2, flush_every_s=1e9,
                              compact_every_flushes=compact_every_flushes)
    for step in range(steps):
        record_step(writer, TINY, step, rng)
    writer.flush()
    return writer


def test_closed_run_has_one_merged_copy_per_layer_holding_every_compacted_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 1000)
    store = Store(tmp_path)
    record_run(store, "r1", 30, flush_every_steps=4, compact_every_flushes=0)
    for table in LAYER_QUERIES:
        sources = sorted(path.name for path in (tmp_path / "r1" / "segments" / table).glob("*.parquet"))
        assert len(sources) == 4
        for layer in TINY.moe_layers.tolist():
            folder = tmp_path / "r1" / "segments" / f"{table}.by_layer" / f"layer-{layer}"
            (merged,) = store._scan_dir(folder)[0]
            assert sorted(merged.covers) == sources and copies(tmp_path, "r1", table, layer) == [merged.name]
    folder = tmp_path / "r1" / "segments" / "router_load.by_layer" / "layer-5"
    copy = pd.read_parquet(next(folder.glob("*.parquet")))
    assert set(copy.layer) == {5} and len(copy) == 30 * 16
    assert sorted(zip(copy.expert, copy.step, strict=True)) == [(expert, step) for expert in range(16)
                                                                for step in range(30)]
    read = store._table_segments("router_load", "r1", (8, 15), layer=5)
    assert [segment.path.parent.name for segment in read] == ["layer-5"]
    assert_layer_reads_match(store, "r1")


def test_a_live_run_mixes_copies_and_fresh_segments_without_double_counting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 600)
    store = Store(tmp_path)
    writer = live_run(store, "live", 16, compact_every_flushes=3)
    loads = tmp_path / "live" / "segments" / "router_load"
    assert any("-seg-" in path.name for path in loads.glob("*.parquet"))
    assert copies(tmp_path, "live", "router_load", 2)
    assert_layer_reads_match(store, "live")
    history = queries.expert_history(store, "live", 3, 7)
    assert history.step.tolist() == list(range(16)) and history.tokens.notna().all() and history.bias.notna().all()
    writer.close()
    assert_layer_reads_match(store, "live")


def test_copies_of_replaced_files_are_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 500)  # a minor compaction writes a 448-row file
    store = Store(tmp_path)
    writer = live_run(store, "r1", 9, compact_every_flushes=2)
    early = copies(tmp_path, "r1", "expert_bias", 4)
    assert early
    writer.close()
    final = copies(tmp_path, "r1", "expert_bias", 4)
    assert len(final) == 1 and not set(early) & set(final)
    (merged,) = store._scan_dir(tmp_path / "r1" / "segments" / "expert_bias.by_layer" / "layer-4")[0]
    assert sorted(merged.covers) == sorted(
        path.name for path in (tmp_path / "r1" / "segments" / "expert_bias").glob("*-compact-*.parquet"))


def test_files_under_half_a_compacted_file_get_no_copies_and_are_read_whole(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 12, flush_every_steps=4)
    assert not copies(tmp_path, "r1", "router_load", 3)
    (whole,) = store._table_segments("router_load", "r1", None, 3)
    assert whole.path.parent.name == "router_load"
    assert_layer_reads_match(store, "r1")


def test_rollup_is_layer_sorted_after_close_and_the_summary_matches_pandas(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 25, flush_every_steps=4)
    rollup_files = list((tmp_path / "r1" / "segments" / "load_rollup").glob("*.parquet"))
    assert len(rollup_files) == 1
    stored = pd.read_parquet(rollup_files[0])
    assert stored[["layer", "step"]].equals(stored[["layer", "step"]].sort_values(["layer", "step"]))
    imbalance = queries.load_imbalance(store, "r1")
    grouped = imbalance.groupby("step")
    expected = pd.DataFrame({
        "step": grouped.size().index, "layers": grouped.size().to_numpy(),
        "experts": grouped.experts.max().to_numpy(), "tokens": grouped.tokens.max().to_numpy(),
        "dead": grouped.dead.sum().to_numpy(),
        "max_vio_median": grouped.max_vio.median().to_numpy(), "max_vio_worst": grouped.max_vio.max().to_numpy(),
        "cv_median": grouped.cv.median().to_numpy(), "cv_worst": grouped.cv.max().to_numpy(),
        "entropy_norm_median": grouped.entropy_norm.median().to_numpy(),
        "entropy_norm_worst": grouped.entropy_norm.min().to_numpy(),
    })
    summary = queries.load_summary(store, "r1")
    pd.testing.assert_frame_equal(summary, expected, check_dtype=False)
    assert queries.load_summary(store, "r1", step_range=(3, 5)).step.tolist() == [3, 4, 5]
    assert queries.available_steps(store, "r1", "router_load").step.tolist() == list(range(25))


def test_runs_recorded_before_summaries_get_their_summary_from_the_rollup(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 12, flush_every_steps=4)
    expected = queries.load_summary(store, "r1")
    for path in (tmp_path / "r1" / "segments" / "load_summary").glob("*.parquet"):
        path.unlink()
    reopened = Store(tmp_path)
    assert reopened.last_step("r1", "load_summary") is None
    pd.testing.assert_frame_equal(queries.load_summary(reopened, "r1"), expected, check_dtype=False)
    assert queries.available_steps(reopened, "r1", "router_load").step.tolist() == list(range(12))
    assert queries.load_summary(reopened, "missing").empty


def test_fresh_segments_are_merged_once_they_would_fill_a_compacted_file(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 600)  # 224 router_load rows a flush: full after 3
    store = Store(tmp_path)
    writer = live_run(store, "live", 20, compact_every_flushes=64)
    visible, _ = store._scan(tmp_path / "live", "router_load")
    fresh = [segment.rows for segment in visible if segment.kind == "seg"]
    # 10 flushes, 64 allowed: merged all the same, so that fresh rows stay under two compacted files' worth.
    assert len(visible) > len(fresh) and sum(fresh) < 2 * 600
    assert copies(tmp_path, "live", "router_load", 2)
    assert_layer_reads_match(store, "live")
    writer.close()


def test_minor_compactions_merge_small_compacted_files_and_leave_full_ones(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 1000)  # 448 router_load rows per compaction
    store = Store(tmp_path)
    writer = live_run(store, "live", 12, compact_every_flushes=2)
    early = {segment.name for segment in store._scan(tmp_path / "live", "router_load")[0] if segment.rows >= 500}
    for step in range(12, 24):
        record_step(writer, TINY, step, np.random.default_rng(step))
    writer.flush()
    steps = store._scan(tmp_path / "live", "steps")[0]
    assert len(steps) == 1 and steps[0].kind == "compact" and steps[0].rows == 24  # one file, not one per compaction
    loads = store._scan(tmp_path / "live", "router_load")[0]
    assert early and early <= {segment.name for segment in loads}  # full files are not rewritten
    assert all(segment.rows >= 500 for segment in loads[:-1]) and sum(segment.rows for segment in loads) == 24 * 112
    assert_layer_reads_match(store, "live")
    writer.close()


def test_a_layers_copies_are_merged_and_a_merged_copy_counts_only_while_its_files_are_visible(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 500)  # every minor compaction writes a 448-row file
    monkeypatch.setattr(store_module, "MERGE_COPIES", 3)
    store = Store(tmp_path)
    writer = live_run(store, "live", 16, compact_every_flushes=2)
    layer_dir = tmp_path / "live" / "segments" / "expert_bias.by_layer" / "layer-3"
    visible, _ = store._scan_dir(layer_dir)
    merged = [copy for copy in visible if copy.covers]
    sources = store._scan(tmp_path / "live", "expert_bias")[0]
    assert merged and len(store._table_segments("expert_bias", "live", None, 3)) < len(sources)
    assert_layer_reads_match(store, "live")
    # A resume truncates a file a merged copy holds: the merged copy goes, the others' files get copies again.
    writer.close("failed")
    resumed = store.resume_run("live", {"config": {}}, 5, flush_every_steps=2, flush_every_s=1e9,
                               compact_every_flushes=2)
    names = {segment.name for segment in store._scan(tmp_path / "live", "expert_bias")[0]}
    for copy in store._scan_dir(layer_dir)[0]:
        assert copy.covers <= names and (copy.covers or copy.name in names)
    assert_layer_reads_match(store, "live")
    rng = np.random.default_rng(0)
    for step in range(6, 20):
        record_step(resumed, TINY, step, rng)
    resumed.close()
    assert_layer_reads_match(store, "live")
    assert store.sql("select count(*) as n from expert_bias where layer = 3", layer=3).n[0] == 20 * 16

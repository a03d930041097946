"""The run store: manifests, writing and flushing, compaction and roll-ups, read-only SQL, versions."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from helpers_store import TINY, record_run, record_step, step_rows

from analysis import store as store_module
from analysis.schema import SCHEMA_VERSION, SchemaError, SchemaVersionError
from analysis.store import Store, StoreError

pytestmark = pytest.mark.timeout(60)


def segment_names(root: Path, run_id: str, table: str) -> list[str]:
    """File names in one table's segment folder."""
    return sorted(os.listdir(root / run_id / "segments" / table))


def test_manifest_is_written_first_and_marked_complete_last(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = store.create_run("r1", {"config": {"layers": 8}, "kernels": {"attention": "flex"},
                                     "data": {"corpus": "stdlib"}, "code_revision": "abc123", "note": "hi"})
    manifest = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["config"] == {"layers": 8} and manifest["kernels"] == {"attention": "flex"}
    assert manifest["code_revision"] == "abc123" and manifest["note"] == "hi" and len(manifest["config_hash"]) == 16
    assert manifest["writer"]["pid"] == os.getpid()
    assert store.status("r1") == "running"
    record_step(writer, TINY, 0, np.random.default_rng(0))
    writer.close(tokens=512)
    manifest = store.manifest("r1")
    assert manifest["status"] == "complete" and manifest["final"] == {"tokens": 512} and manifest["finished_at"]
    assert store.runs().loc[0, ["run_id", "status", "steps", "last_step", "tokens"]].tolist() == [
        "r1", "complete", 1, 0, 512]


@pytest.mark.parametrize("run_id", ["", ".", "..", "a/b", "x'; drop table steps; --", "' or 1=1 --",
                                    '"; select 1; --', "ünïcode", "a" * 129, "a b", None, 7])
def test_invalid_run_ids_are_rejected(tmp_path: Path, run_id: object) -> None:
    with pytest.raises(StoreError, match=r"run id .* is not valid"):
        Store(tmp_path).create_run(run_id, {"config": {}})  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_create_run_refuses_existing_runs_and_bad_manifests(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create_run("r1", {"config": {}}).close()
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("r1", {"config": {}})
    with pytest.raises(StoreError, match="set by the store"):
        store.create_run("r2", {"config": {}, "status": "complete"})
    with pytest.raises(StoreError, match="needs a 'config'"):
        store.create_run("r3", {})
    with pytest.raises(StoreError, match="not JSON"):
        store.create_run("r4", {"config": {"x": object()}})
    assert sorted(store.runs().run_id) == ["r1"]


@pytest.mark.parametrize(("table", "columns", "message"), [
    ("nope", {}, "'nope' is not a table"),
    ("load_rollup", {}, "computed by the store"),
    ("router_load", {"step": 1, "layer": 2, "expert": 0}, r"router_load: missing column\(s\) \['tokens'\]"),
    ("router_load", {"step": 1, "layer": 2, "expert": 0, "tokens": 1, "extra": 1}, r"unknown column\(s\) \['extra'\]"),
    ("router_load", {"step": 1, "layer": 2, "expert": 0, "tokens": "many"}, "column 'tokens': expected int64"),
    ("router_load", {"step": 1, "layer": 40000, "expert": 0, "tokens": 1}, "column 'layer': expected int16"),
    ("router_load", {"step": 1, "layer": [2, 3], "expert": [0], "tokens": 1}, "different lengths"),
    ("router_load", {"step": 1, "layer": 2, "expert": 0, "tokens": None}, "'tokens': 1 null"),
    ("router_load", {"step": -1, "layer": 2, "expert": 0, "tokens": 1}, "negative"),
    ("router_load", {"run_id": "x", "step": 1, "layer": 2, "expert": 0, "tokens": 1}, "filled in by the writer"),
    ("attention_stats", {**step_rows(TINY, 0, np.random.default_rng(0))["attention_stats"], "kind": "sliding"},
     "'kind': values \\['sliding'\\]"),
])
def test_append_validates_rows_against_the_schema(tmp_path: Path, table: str, columns: dict, message: str) -> None:
    writer = Store(tmp_path).create_run("r1", {"config": {}})
    with pytest.raises(SchemaError, match=message):
        writer.append(table, columns)


def test_rows_become_visible_at_flush_only_and_segments_carry_step_ranges(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = store.create_run("r1", {"config": {}}, flush_every_steps=1000, flush_every_s=1e9)
    rng = np.random.default_rng(0)
    for step in range(5):
        record_step(writer, TINY, step, rng)
    assert store.sql("select count(*) as n from router_load").n[0] == 0
    assert store.last_step("r1") is None
    writer.flush()
    assert store.sql("select count(*) as n from router_load").n[0] == 5 * 7 * 16
    assert store.last_step("r1") == 4
    assert [name[:19] for name in segment_names(tmp_path, "r1", "router_load")] == ["000000000-000000004"]
    assert os.listdir(tmp_path / "r1" / "tmp") == []
    writer.close()


def test_writer_flushes_at_step_boundaries_every_n_steps(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = store.create_run("r1", {"config": {}}, flush_every_steps=3, flush_every_s=1e9,
                              compact_every_flushes=0)
    rng = np.random.default_rng(0)
    for step in range(10):
        record_step(writer, TINY, step, rng)
    ranges = [name[:19] for name in segment_names(tmp_path, "r1", "steps")]
    assert ranges == ["000000000-000000002", "000000003-000000005", "000000006-000000008"]
    assert [name[:19] for name in segment_names(tmp_path, "r1", "router_load")] == ranges
    writer.close()


def test_close_compacts_each_table_into_one_sorted_file_with_the_same_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 30, flush_every_steps=4, compact_every_flushes=3)
    loads = store.sql("select * from router_load order by step, layer, expert")
    assert len(loads) == 30 * 7 * 16
    for table in ("steps", "router_load", "expert_bias", "layer_stats", "attention_stats", "load_rollup",
                  "probe_routing", "attention_maps"):
        names = segment_names(tmp_path, "r1", table)
        assert len(names) == 1 and "-compact-" in names[0], (table, names)
    stored = pd.read_parquet(tmp_path / "r1" / "segments" / "router_load")
    assert stored[["step", "layer", "expert"]].equals(loads[["step", "layer", "expert"]])


def test_large_tables_compact_into_files_of_bounded_size_named_by_step_range(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 1000)
    store = Store(tmp_path)
    record_run(store, "r1", 30, flush_every_steps=4, compact_every_flushes=0)
    names = segment_names(tmp_path, "r1", "router_load")
    assert [name[:19] for name in names] == ["000000000-000000007", "000000008-000000015", "000000016-000000023",
                                             "000000024-000000029"]
    assert all("-compact-" in name for name in names) and len(segment_names(tmp_path, "r1", "steps")) == 1
    assert store.sql("select count(*) as n from router_load").n[0] == 30 * 7 * 16
    assert store.sql("select count(*) as n from load_rollup").n[0] == 30 * 7


def test_load_rollup_matches_the_metric_definitions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = store.create_run("r1", {"config": {}})
    counts = np.array([0, 0, 4, 12] + [5] * 12)
    writer.append("router_load", {"step": 3, "layer": 2, "expert": np.arange(16), "tokens": counts})
    writer.flush()
    live = store.sql("select * from load_rollup")
    writer.close()
    rollup = store.sql("select * from load_rollup")
    pd.testing.assert_frame_equal(live, rollup)
    f = counts / counts.sum()
    row = rollup.iloc[0]
    assert (row.experts, row.tokens, row.max_load, row.min_load, row.dead) == (16, 76, 12, 0, 2)
    assert row.mean_load == pytest.approx(counts.mean()) and row.std_load == pytest.approx(counts.std())
    assert row.entropy == pytest.approx(-(f[f > 0] * np.log(f[f > 0])).sum())
    assert row.entropy_norm == pytest.approx(row.entropy / np.log(16))
    assert row.max_vio == pytest.approx(counts.max() / counts.mean() - 1)
    assert row.cv == pytest.approx(counts.std() / counts.mean())


def test_context_manager_marks_failure_and_never_complete(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), store.create_run("r1", {"config": {}}) as writer:
        record_step(writer, TINY, 0, np.random.default_rng(0))
        raise RuntimeError("boom")
    assert store.status("r1") == "failed" and store.manifest("r1")["status"] == "failed"
    assert store.sql("select count(*) as n from steps where run_id = 'r1'").n[0] == 1
    with pytest.raises(StoreError, match="writer is closed"):
        writer.append("steps", step_rows(TINY, 1, np.random.default_rng(0))["steps"])
    with store.create_run("r2", {"config": {}}):
        pass
    assert store.status("r2") == "complete"


def test_manifest_stays_intact_when_its_final_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    writer = store.create_run("r1", {"config": {}})
    record_step(writer, TINY, 0, np.random.default_rng(0))
    real_replace = os.replace

    def failing_replace(source: object, target: object) -> None:
        if Path(target).name == "manifest.json":  # type: ignore[arg-type]
            raise OSError("disk gone")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        writer.close()
    monkeypatch.undo()
    assert json.loads((tmp_path / "r1" / "manifest.json").read_text())["status"] == "running"
    assert os.listdir(tmp_path / "r1" / "tmp") == []
    assert store.sql("select count(*) as n from router_load").n[0] == 7 * 16


def test_newer_schema_versions_are_refused_naming_folder_and_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create_run("r1", {"config": {}}).close()
    path = tmp_path / "r1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 99}))
    expected = f"{tmp_path / 'r1'}: schema version 99 .*schema version {SCHEMA_VERSION}"
    for read in (lambda: store.manifest("r1"), store.runs, lambda: store.sql("select * from steps")):
        with pytest.raises(SchemaVersionError, match=expected):
            read()
    (tmp_path / "store.json").write_text(json.dumps({"schema_version": "two"}))
    with pytest.raises(SchemaVersionError, match=f"{tmp_path}: schema version 'two'"):
        Store(tmp_path)


@pytest.mark.parametrize("statement", [
    "drop view steps", "create table t as select 1", "insert into t values (1)", "select 1; select 2",
    "select 1; drop view steps", "attach 'x.db'", "copy (select 1) to 'x.csv'", "pragma version", "set threads = 1",
    "explain select 1", "", "this is not sql", "call pragma_version()",
])
def test_sql_accepts_only_one_select(tmp_path: Path, statement: str) -> None:
    with pytest.raises(StoreError, match=r"exactly one read-only SELECT|does not parse"):
        Store(tmp_path).sql(statement)


def test_sql_reads_only_the_store_and_takes_parameters(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 3)
    outside = tmp_path.parent / f"{tmp_path.name}-secret.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(duckdb.PermissionException):
        store.sql(f"select * from read_csv('{outside}')")
    steps = pd.DataFrame({"x": [1]})  # noqa: F841 -- a local frame named like a table must not be scanned
    assert store.sql("select count(*) as n from steps where run_id = ?", ["r1"]).n[0] == 3
    assert store.sql("with s as (select step from steps where run_id = $r) select max(step) as m from s",
                     {"r": "r1"}).m[0] == 2


def test_store_folder_with_a_quote_in_its_name(tmp_path: Path) -> None:
    store = Store(tmp_path / "it's a store")
    record_run(store, "r1", 2)
    assert store.sql("select count(*) as n from steps").n[0] == 2


def as_if_on_another_host(root: Path, run_id: str) -> None:
    """Rewrite a run's manifest so readers judge its writer by the heartbeat, not by its pid."""
    path = root / run_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["writer"]["hostname"] = "another-host"
    path.write_text(json.dumps(manifest))


def test_status_uses_heartbeat_for_writers_on_other_hosts(tmp_path: Path) -> None:
    store = Store(tmp_path, stale_after_s=1.0)
    writer = store.create_run("r1", {"config": {}})
    as_if_on_another_host(tmp_path, "r1")
    # A pause four times longer than stale_after_s with nothing appended (a long evaluation): still running.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert Store(tmp_path, stale_after_s=1.0).status("r1") == "running"
        time.sleep(0.1)
    # A writer that stops beating (dropped without close, as a frozen recorder would) turns stale.
    del writer
    time.sleep(1.5)
    assert store.status("r1") == "incomplete"


def test_heartbeats_from_the_recorder_and_the_beat_thread_do_not_collide(tmp_path: Path) -> None:
    store = Store(tmp_path, stale_after_s=0.004)  # the thread beats every millisecond
    writer = store.create_run("r1", {"config": {}})
    for _ in range(2000):
        writer.heartbeat()
    writer.close()
    assert os.listdir(tmp_path / "r1" / "tmp") == []


def test_close_stops_the_heartbeat_thread_and_a_dropped_writer_stops_it_too(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="stale_after_s must be a positive number of seconds, got 0"):
        Store(tmp_path, stale_after_s=0)
    store = Store(tmp_path, stale_after_s=0.2)
    threads = set(threading.enumerate())
    writer = store.create_run("r1", {"config": {}})
    beating, = set(threading.enumerate()) - threads
    assert beating.name == "vpmoe-heartbeat-r1" and beating.daemon
    record_step(writer, TINY, 0, np.random.default_rng(0))
    writer.close()
    assert not beating.is_alive() and beating not in threading.enumerate()
    beat_at = (tmp_path / "r1" / "heartbeat.json").stat().st_mtime_ns
    time.sleep(0.2)
    assert (tmp_path / "r1" / "heartbeat.json").stat().st_mtime_ns == beat_at
    writer = Store(tmp_path, stale_after_s=60).create_run("r2", {"config": {}})
    beating, = set(threading.enumerate()) - threads
    del writer
    beating.join(timeout=1)
    assert not beating.is_alive()


def test_a_failed_close_stops_the_heartbeat_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path, stale_after_s=0.2)
    writer = store.create_run("r1", {"config": {}})
    record_step(writer, TINY, 0, np.random.default_rng(0))

    def broken_compact(run_id: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "compact", broken_compact)
    with pytest.raises(OSError, match="disk full"):
        writer.close("complete")
    assert not writer._beat_thread.is_alive()
    writer.close("failed")
    assert store.status("r1") == "failed"


def test_append_rows_adds_an_audit_to_a_finished_run(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "r1", 2)
    store.append_rows("r1", "audits", {"step": 1, "created_at": pd.Timestamp("2025-01-01", tz="UTC"),
                                       "checkpoint": "ckpt/step1", "checkpoint_sha256": "ab" * 32,
                                       "verdict": "PASS", "tokens": 4096, "report_json": "{}"})
    audits = store.sql("select step, verdict from audits")
    assert audits.values.tolist() == [[1, "PASS"]]
    with pytest.raises(StoreError, match="no run 'r9'"):
        store.append_rows("r9", "audits", {})

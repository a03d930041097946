"""Resuming a recorded run: rows after the resume step are dropped from every table and copy, the run
goes on under the same id, and a resume refused, failed or killed half-way leaves a run that resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_store import TINY, assert_steps_whole, record_step, rows_per_step

import analysis.store as store_module
from analysis.schema import SERIES_TABLES, TABLES
from analysis.store import RunWriter, Store, StoreError

pytestmark = pytest.mark.timeout(120)

CONFIG = {"shape": "tiny", "seed": 0}
STEPS = 30
FROM_STEP = 17
ROOT = Path(__file__).resolve().parents[1]

# Records STEPS synthetic steps and dies without closing, as a crashed recorder does.
RECORD_AND_DIE = """
import json, os, sys
import numpy as np
from analysis.store import Store
from helpers_store import TINY, record_step
root, run_id, config, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
writer = Store(root).create_run(run_id, {"config": config}, flush_every_steps=4, flush_every_s=1e9,
                                compact_every_flushes=3)
rng = np.random.default_rng(0)
for step in range(steps):
    record_step(writer, TINY, step, rng, probes=step % 5 == 0)
writer.flush()
os._exit(0)
"""

# Resumes a run and kills itself with SIGKILL after its N-th directory fsync (one per file renamed in
# or batch of files removed), so every step of the resume gets interrupted in turn.
RESUME_AND_DIE = """
import json, os, signal, sys
import analysis.store as store_module
root, run_id, config, from_step, kill_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *map(int, sys.argv[4:])
real_fsync_dir, calls = store_module._fsync_dir, []
def fsync_dir_then_die(directory):
    real_fsync_dir(directory)
    calls.append(directory)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
store_module._fsync_dir = fsync_dir_then_die
store_module.Store(root).resume_run(run_id, {"config": config}, from_step)
print("resumed without being killed", flush=True)
"""


def run_script(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run one of the scripts above in a fresh interpreter that imports the tests' helpers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def record(store: Store, run_id: str, steps: range, writer: RunWriter | None = None, seed: int = 0) -> RunWriter:
    """Record synthetic steps (probes every 5th), flushing every 4 and compacting every 3 flushes."""
    writer = writer or store.create_run(run_id, {"config": CONFIG}, flush_every_steps=4, flush_every_s=1e9,
                                        compact_every_flushes=3)
    rng = np.random.default_rng(seed)
    for step in steps:
        record_step(writer, TINY, step, rng, probes=step % 5 == 0)
    return writer


def add_audits(store: Store, run_id: str, steps: list[int]) -> None:
    """One audit row per step, written after the fact as `vpmoe audit` does."""
    for step in steps:
        store.append_rows(run_id, "audits", {"step": step, "created_at": pd.Timestamp("2025-01-01", tz="UTC"),
                                             "checkpoint": f"ckpt/{step}", "checkpoint_sha256": "ab" * 32,
                                             "verdict": "PASS", "tokens": 4096, "report_json": "{}"})


def snapshot(store: Store, run_id: str) -> dict[str, pd.DataFrame]:
    """Every table of a run in its sort order, and every layer of the series tables read through the copies;
    not the bias_drift roll-up, which covers the whole run and is rebuilt, not cut, when the run ends again."""
    frames = {}
    for table, spec in TABLES.items():
        if table == "bias_drift":
            continue
        order = ", ".join(spec.sort_key)
        frames[table] = store.sql(f"select * from {table} where run_id = $run order by {order}", {"run": run_id},
                                  run=run_id)
    for table in SERIES_TABLES:
        for layer in TINY.moe_layers.tolist():
            frames[f"{table}@{layer}"] = store.sql(
                f"select * from {table} where run_id = $run and layer = $layer order by step, expert",
                {"run": run_id, "layer": layer}, run=run_id, layer=layer)
    return frames


def up_to(frames: dict[str, pd.DataFrame], step: int) -> dict[str, pd.DataFrame]:
    """The rows of each frame with a step up to `step`."""
    return {name: frame[frame.step <= step].reset_index(drop=True) for name, frame in frames.items()}


def step_ranges(root: Path, table: str) -> list[tuple[int, int]]:
    """(first, last) step of each file of one table of run r1, from the file names."""
    return sorted((int(path.name[:9]), int(path.name[10:19]))
                  for path in (root / "r1" / "segments" / table).glob("*.parquet"))


def assert_copies_match_compacted_files(root: Path) -> None:
    """Every layer holds each compacted file of the series tables of run r1 that is large enough for copies exactly
    once (in a copy of its own or a merged one), and no other file."""
    store = Store(root)
    for table in SERIES_TABLES:
        wanted = sorted(segment.name for segment in store._scan(root / "r1", table)[0]
                        if segment.kind == "compact" and segment.rows >= store_module.COMPACT_FILE_ROWS // 2)
        assert wanted
        for layer in TINY.moe_layers.tolist():
            copies = store._scan_dir(root / "r1" / "segments" / f"{table}.by_layer" / f"layer-{layer}")[0]
            assert sorted(name for copy in copies for name in copy.covers or {copy.name}) == wanted, (table, layer)


def assert_frames_equal(actual: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    """Frame by frame equality, naming the table that differs."""
    assert actual.keys() == expected.keys()
    for name, frame in expected.items():
        assert len(frame) or name in ("audits",), f"{name} is empty: the test would not check it"
        pd.testing.assert_frame_equal(actual[name].reset_index(drop=True), frame, obj=name)


@pytest.fixture(params=["failed", "complete", "incomplete"])
def stopped_run(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store with run r1 of STEPS steps and two audits, stopped as the parameter says: failed and
    incomplete runs mix compacted files (with copies) and flushes; complete ones are compacted into files
    of at most 1,000 rows, so the resume step falls inside one file of each table and files lie after it."""
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 1000)
    root = tmp_path / "store"
    store = Store(root)
    if request.param == "incomplete":
        result = run_script(RECORD_AND_DIE, root, "r1", json.dumps(CONFIG), STEPS)
        assert result.returncode == 0, result.stderr
    else:
        record(store, "r1", range(STEPS)).close(request.param)
    add_audits(store, "r1", [5, 25])
    assert store.status("r1") == request.param
    return root


def test_resume_drops_every_row_after_the_step_and_keeps_the_rest(stopped_run: Path) -> None:
    store = Store(stopped_run)
    before = snapshot(store, "r1")
    for table in ("steps", "router_load", "load_rollup"):
        ranges = step_ranges(stopped_run, table)
        assert any(first <= FROM_STEP < last for first, last in ranges), (table, ranges)
    assert any(first > FROM_STEP for first, _ in step_ranges(stopped_run, "router_load"))
    writer = store.resume_run("r1", {"config": CONFIG}, FROM_STEP)
    assert store.status("r1") == "running" and store.last_step("r1") == FROM_STEP
    assert [table for table in TABLES if max(step_ranges(stopped_run, table), default=(0, 0))[1] > FROM_STEP] == []
    assert_copies_match_compacted_files(stopped_run)
    assert_frames_equal(snapshot(Store(stopped_run), "r1"), up_to(before, FROM_STEP))
    assert [table for table in TABLES if (store.last_step("r1", table) or 0) > FROM_STEP] == []
    assert store.runs().loc[0, ["steps", "last_step"]].tolist() == [FROM_STEP + 1, FROM_STEP]
    assert drift_steps(store) == []
    writer.close()
    assert_frames_equal(snapshot(Store(stopped_run), "r1"), up_to(before, FROM_STEP))
    assert drift_steps(store) == [FROM_STEP]


def drift_steps(store: Store) -> list[int]:
    """The steps the bias_drift roll-up of run r1 says it covers."""
    return store.sql("select distinct step from bias_drift where run_id = 'r1'").step.tolist()


def test_a_resumed_run_goes_on_with_one_row_set_per_step(stopped_run: Path) -> None:
    store = Store(stopped_run)
    before = snapshot(store, "r1")
    writer = store.resume_run("r1", {"config": CONFIG}, FROM_STEP, flush_every_steps=4, flush_every_s=1e9,
                              compact_every_flushes=3)
    record(store, "r1", range(FROM_STEP + 1, 40), writer, seed=1)
    writer.flush()
    assert sorted(rows_per_step(store, "r1", "steps")) == list(range(40))
    assert_steps_whole(store, "r1", list(range(40)))
    writer.close()
    assert store.status("r1") == "complete"
    after = snapshot(Store(stopped_run), "r1")
    assert list(after["steps"].step) == list(range(40))
    assert_steps_whole(store, "r1", list(range(40)))
    assert_frames_equal(up_to(after, FROM_STEP), up_to(before, FROM_STEP))
    for table in SERIES_TABLES:
        for layer in TINY.moe_layers.tolist():
            plain = after[table][after[table].layer == layer].reset_index(drop=True)
            pd.testing.assert_frame_equal(after[f"{table}@{layer}"], plain)


def test_the_manifest_lists_resumes_and_keeps_the_original_provenance(tmp_path: Path) -> None:
    root = tmp_path / "store"
    result = run_script(RECORD_AND_DIE, root, "r1", json.dumps(CONFIG), 12)
    assert result.returncode == 0, result.stderr
    store = Store(root)
    original = store.manifest("r1")
    assert store.status("r1") == "incomplete"
    writer = store.resume_run("r1", {"config": CONFIG, "code_revision": "fix1"}, 8)
    manifest = store.manifest("r1")
    assert store.status("r1") == "running" and manifest["writer"]["pid"] == os.getpid()
    assert [(entry["from_step"], entry["previous_status"], entry["changed"]) for entry in manifest["resumes"]] == [
        (8, "incomplete", {"code_revision": "fix1"})]
    kept = ("created_at", "config", "config_hash", "code_revision", "schema_version")
    assert {key: manifest[key] for key in kept} == {key: original[key] for key in kept}
    writer.close(tokens=1)
    assert store.status("r1") == "complete" and store.manifest("r1")["final"] == {"tokens": 1}
    store.resume_run("r1", {"config": {**CONFIG}}, 8).close("failed")
    manifest = store.manifest("r1")
    assert [(entry["from_step"], entry["previous_status"]) for entry in manifest["resumes"]] == [
        (8, "incomplete"), (8, "complete")]
    assert manifest["status"] == "failed" and manifest["final"] == {}


def test_resume_refuses_unknown_runs_live_writers_other_configs_and_bad_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    live = record(store, "live", range(6))
    record(store, "done", range(6)).close()
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.resume_run("nope", {"config": CONFIG}, 3)
    with pytest.raises(StoreError, match=r"run live: its writer \(pid \d+ on .*\) is still recording it"):
        store.resume_run("live", {"config": CONFIG}, 3)
    with pytest.raises(StoreError, match=r"run done: config hash \w+ differs .* mix two models"):
        store.resume_run("done", {"config": {**CONFIG, "seed": 1}}, 3)
    with pytest.raises(StoreError, match="run done: config hash 0123 differs"):
        store.resume_run("done", {"config": CONFIG, "config_hash": "0123"}, 3)
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(StoreError, match="from_step must be a step number"):
            store.resume_run("done", {"config": CONFIG}, bad)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"manifest keys \['resumes'\] are set by the store"):
        store.resume_run("done", {"config": CONFIG, "resumes": []}, 3)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", store_module.SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="run done: written with schema version 1, this code writes 2"):
        store.resume_run("done", {"config": CONFIG}, 3)
    monkeypatch.undo()
    assert store.status("live") == "running" and store.status("done") == "complete"
    assert "resumes" not in store.manifest("done")
    assert sorted(rows_per_step(store, "done", "steps")) == list(range(6))
    live.close()


def test_a_resume_that_fails_half_way_is_marked_failed_and_resumes_again(
        stopped_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(stopped_run)
    expected = up_to(snapshot(store, "r1"), FROM_STEP)

    def disk_gone(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(Store, "_truncate_segment", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        store.resume_run("r1", {"config": CONFIG}, FROM_STEP)
    monkeypatch.undo()
    assert store.status("r1") == "failed"
    assert_steps_whole(store, "r1", list(range(FROM_STEP + 1)))
    store.resume_run("r1", {"config": CONFIG}, FROM_STEP).close()
    assert_frames_equal(snapshot(Store(stopped_run), "r1"), expected)


def test_kill_9_at_every_point_of_a_resume_leaves_a_run_that_resumes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "COMPACT_FILE_ROWS", 1000)
    original = tmp_path / "original"
    store = Store(original)
    record(store, "r1", range(STEPS)).close()
    expected = up_to(snapshot(store, "r1"), FROM_STEP)
    counted = tmp_path / "counted"
    shutil.copytree(original, counted)
    calls: list[Path] = []
    real_fsync_dir = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda directory: (calls.append(directory),
                                                                       real_fsync_dir(directory)))
    Store(counted).resume_run("r1", {"config": CONFIG}, FROM_STEP).close("failed")
    monkeypatch.setattr(store_module, "_fsync_dir", real_fsync_dir)
    operations = len(calls) - 1  # the last one is close's manifest
    assert operations >= 10
    for kill_at in sorted({1, 2, *np.linspace(3, operations, 6, dtype=int).tolist()}):
        root = tmp_path / f"killed-at-{kill_at}"
        shutil.copytree(original, root)
        result = run_script(RESUME_AND_DIE, root, "r1", json.dumps(CONFIG), FROM_STEP, kill_at)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stdout, result.stderr)
        store = Store(root)
        assert store.status("r1") == "incomplete"
        assert_frames_equal(up_to(snapshot(store, "r1"), FROM_STEP), expected)
        assert_steps_whole(store, "r1", list(range(FROM_STEP + 1)))
        store.resume_run("r1", {"config": CONFIG}, FROM_STEP).close()
        assert_frames_equal(snapshot(Store(root), "r1"), expected)
        assert_copies_match_compacted_files(root)
        assert [entry["previous_status"] for entry in store.manifest("r1")["resumes"]] == ["complete", "incomplete"]

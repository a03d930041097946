"""The store under failure: kill -9 of the recorder, live readers during writes and compaction,
damaged segments, and files the store did not write."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_store import TINY, assert_steps_whole, record_step, rows_per_step

from analysis.store import Store, StoreWarning

pytestmark = pytest.mark.timeout(120)

HELPER = Path(__file__).with_name("helpers_store.py")
PER_STEP = TINY.rows_per_step()


class Recorder:
    """The helper recorder in a subprocess, with the steps it acknowledged on stdout."""

    def __init__(self, root: Path, run_id: str, steps: int, flush_every: int, compact_every: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), str(root), run_id, str(steps), str(flush_every), str(compact_every)],
            stdout=subprocess.PIPE, text=True)
        self.acknowledged: list[int] = []
        self.closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            if line.endswith("\n"):
                if line.strip() == "closed":
                    self.closed = True
                else:
                    self.acknowledged += [int(step) for step in line.split()]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self) -> None:
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)


def test_kill_9_at_random_moments_loses_no_acknowledged_step(tmp_path: Path) -> None:
    chance = random.Random(20250101)
    root = tmp_path / "store"
    kills_after_acknowledgements = 0
    for attempt in range(10):
        run_id = f"killed{attempt}"
        recorder = Recorder(root, run_id, steps=100_000, flush_every=chance.choice([1, 2, 3]), compact_every=3)
        # Most kills land mid-recording (after a first acknowledgement); the last ones during start-up.
        recording = attempt < 8
        deadline = time.monotonic() + 30
        while recording and not recorder.acknowledged and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(chance.uniform(0.0, 0.8))
        recorder.kill()
        store = Store(root)
        if not (root / run_id / "manifest.json").exists():
            assert recorder.acknowledged == []
            continue
        kills_after_acknowledgements += bool(recorder.acknowledged)
        assert store.status(run_id) == "incomplete"
        assert_steps_whole(store, run_id, recorder.acknowledged)
        before = store.sql("select * from router_load where run_id = $run order by step, layer, expert",
                           {"run": run_id})
        store.compact(run_id)
        after = store.sql("select * from router_load where run_id = $run order by step, layer, expert",
                          {"run": run_id})
        assert before.equals(after)
        assert_steps_whole(store, run_id, recorder.acknowledged)
        assert store.status(run_id) == "incomplete"
        assert list((root / run_id / "tmp").iterdir()) == []
    assert kills_after_acknowledgements >= 8
    assert set(Store(root).runs().status) == {"incomplete"}


def test_a_reader_in_a_loop_sees_only_whole_steps_while_a_run_records_and_compacts(tmp_path: Path) -> None:
    root = tmp_path / "store"
    recorder = Recorder(root, "live", steps=80, flush_every=2, compact_every=4)
    store = Store(root)
    queries, deadline = 0, time.monotonic() + 40
    while not recorder.closed and time.monotonic() < deadline:
        if not (root / "live" / "manifest.json").exists():
            time.sleep(0.05)
            continue
        joined = store.sql(
            "select s.step, count(r.step) as n from steps s left join router_load r using (run_id, step)"
            " where s.run_id = 'live' group by s.step")
        assert set(joined.n) <= {PER_STEP["router_load"]}
        assert set(rows_per_step(store, "live", "load_rollup").values()) <= {PER_STEP["load_rollup"]}
        assert set(rows_per_step(store, "live", "expert_bias").values()) <= {PER_STEP["expert_bias"]}
        queries += 1
    recorder.finish()
    assert recorder.closed and queries >= 10
    assert_steps_whole(store, "live", recorder.acknowledged)
    assert len(rows_per_step(store, "live", "steps")) == 80 and store.status("live") == "complete"


def damage(path: Path, how: str) -> None:
    """Truncate a file, or overwrite bytes in its middle or footer."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "middle":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(range(64))
    else:
        data[-8:] = bytes(8)
    path.write_bytes(bytes(data))


def names(caught: pytest.WarningsRecorder, path: Path) -> bool:
    """True if one of the caught warnings names the file."""
    return any(str(path) in str(warning.message) for warning in caught)


def test_damaged_segments_are_named_skipped_and_kept_and_foreign_files_survive(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    writer = store.create_run("r1", {"config": {}}, compact_every_flushes=0)
    rng = np.random.default_rng(0)
    for step in range(12):
        record_step(writer, TINY, step, rng)
        if step % 2:
            writer.flush()
    writer.close("failed")
    loads = root / "r1" / "segments" / "router_load"
    segments = sorted(loads.glob("*-seg-*.parquet"))
    assert len(segments) == 6
    damaged = {how: segments[index] for index, how in enumerate(["truncate", "middle", "footer"])}
    for how, path in damaged.items():
        damage(path, how)
    foreign = [root / "r1" / "notes.txt", loads / "mine.parquet", root / "r1" / "segments" / "extra.parquet",
               root / "r1" / "tmp" / "keep.tmp", root / "not-a-run.txt"]
    for path in foreign:
        path.write_text("not written by the store")
    kept_bytes = {path: path.read_bytes() for path in [*damaged.values(), *foreign]}

    with pytest.warns(StoreWarning) as caught:
        counts = rows_per_step(store, "r1", "router_load")
    assert all(names(caught, path) for path in damaged.values())
    assert sorted(counts) == list(range(6, 12)) and set(counts.values()) == {PER_STEP["router_load"]}

    with pytest.warns(StoreWarning) as caught:
        Store(root).compact("r1")
    assert all(names(caught, path) for path in damaged.values())
    with pytest.warns(StoreWarning):
        assert rows_per_step(Store(root), "r1", "router_load") == counts
    assert rows_per_step(Store(root), "r1", "load_rollup") == dict.fromkeys(counts, PER_STEP["load_rollup"])
    for path, content in kept_bytes.items():
        assert path.read_bytes() == content, path
    assert len(list(loads.glob("*-compact-*.parquet"))) == 1

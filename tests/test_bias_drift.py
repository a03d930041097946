"""The bias_drift roll-up: written when a run is compacted and carried forward while it records (at a given rate),
equal to the drift sums of the whole history; read by queries.bias_moves as it is while it covers the run's last
step at the asked rate, extended by the later rows while it covers earlier steps at that rate."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import analysis.store as store_module
from analysis import drift, queries
from analysis.store import RunWriter, Store

RATE = 1e-3


def loop_drift(history: np.ndarray, rate: float) -> dict[str, list[float]]:
    """Per expert of [steps, experts], by plain loops: path = sum |Δ|, moves = |Δ| >= u/2, sign changes between
    consecutive moves, the sign of the last move (0 if none)."""
    sums: dict[str, list[float]] = {"path": [], "moves": [], "sign_changes": [], "last_move": []}
    for column in history.astype(np.float64).T:
        deltas = [later - earlier for earlier, later in itertools.pairwise(column)]
        signs = [1 if delta > 0 else -1 for delta in deltas if abs(delta) >= rate / 2]
        sums["path"].append(sum(abs(delta) for delta in deltas))
        sums["moves"].append(len(signs))
        sums["sign_changes"].append(sum(a != b for a, b in itertools.pairwise(signs)))
        sums["last_move"].append(signs[-1] if signs else 0)
    return sums


def assert_matches_loops(moves: object, history: np.ndarray) -> None:
    """bias_moves rows equal loop_drift over the whole history [steps, experts]."""
    expected = loop_drift(history, RATE)
    assert moves.expert.tolist() == list(range(history.shape[1])) and (moves.steps == len(history)).all()
    np.testing.assert_allclose(moves.path, expected["path"], rtol=1e-9)
    assert moves.moves.tolist() == expected["moves"]
    assert moves.sign_changes.tolist() == expected["sign_changes"]
    assert moves.last_move.tolist() == expected["last_move"]
    np.testing.assert_allclose(moves.first_bias, history[0])
    np.testing.assert_allclose(moves.last_bias, history[-1])


def walks(rng: np.random.Generator, steps: int, experts: int) -> np.ndarray:
    """Bias histories [steps, experts] (float32 as recorded): random walks, a steady drift, noise."""
    walk = np.cumsum(RATE * rng.choice([-1.0, 0.0, 1.0], size=(steps, experts - 2)), axis=0)
    steady = np.arange(steps)[:, None] * RATE
    noise = rng.normal(0, 0.01, (steps, 1))
    return np.concatenate([walk, steady, noise], axis=1).astype(np.float32)


def record(store: Store, run: str, histories: dict[int, np.ndarray], steps: np.ndarray, *, rate: float | None = RATE,
           resume_from: int | None = None, close: bool = True, compact_every_flushes: int = 64) -> RunWriter:
    """Record each layer's history at `steps` (a fresh run, or a resume from `resume_from`); the writer is
    closed unless `close` is False, when its rows are only flushed."""
    manifest = {"config": {}, "shape": {"bias_update_rate": rate}}
    options = {"flush_every_steps": 7, "flush_every_s": 1e9, "compact_every_flushes": compact_every_flushes}
    writer = (store.create_run(run, manifest, **options) if resume_from is None
              else store.resume_run(run, manifest, resume_from, **options))
    for index, step in enumerate(steps):
        for layer, history in histories.items():
            writer.append("expert_bias", {"step": int(step), "layer": layer, "expert": np.arange(history.shape[1]),
                                          "bias": history[index]})
    writer.close() if close else writer.flush()
    return writer


def test_the_rollup_equals_loops_over_the_whole_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    steps = np.arange(0, 400, 4)  # sparse: every 4th step
    histories = {2: walks(rng, len(steps), 9), 3: walks(rng, len(steps), 5)}
    store = Store(tmp_path)
    record(store, "r", histories, steps)
    rollup = store.sql("select layer, step, rate, rate_given from bias_drift where run_id = $run", {"run": "r"})
    assert sorted(rollup.layer.unique()) == [2, 3] and (rollup.step == steps[-1]).all()
    assert (rollup.rate == RATE).all() and rollup.rate_given.all()
    # The roll-up is what answers: the row-by-row computation is not even reachable at the run's rate.
    def computed(*args: object) -> None:
        raise RuntimeError("computed from rows")

    monkeypatch.setattr(queries.drift, "drift_sums", computed)
    for layer, history in histories.items():
        assert_matches_loops(queries.bias_moves(store, "r", layer, rate=RATE), history)
    with pytest.raises(RuntimeError, match="computed from rows"):
        queries.bias_moves(store, "r", 2, rate=2 * RATE)  # another rate: computed from the rows


def test_estimated_rate_rollup_matches_the_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    history = walks(rng, 50, 6)
    store = Store(tmp_path)
    record(store, "r", {2: history}, np.arange(50), rate=None)
    rolled = queries.bias_moves(store, "r", 2)
    assert not store.sql("select * from bias_drift where run_id = 'r'").rate_given.any()
    changes = np.abs(np.diff(history.astype(np.float64), axis=0))
    assert rolled.rate.iloc[0] == pytest.approx(float(np.median(changes[changes > 0])), rel=1e-12)
    computed = queries.bias_moves(store, "r", 2, rate=float(rolled.rate.iloc[0]))  # not the roll-up's: computed
    np.testing.assert_allclose(rolled.path, computed.path, rtol=1e-12)
    assert rolled.moves.tolist() == computed.moves.tolist()
    assert rolled.sign_changes.tolist() == computed.sign_changes.tolist()


def test_a_live_or_resumed_run_never_reads_a_stale_rollup(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    history = walks(rng, 90, 4)
    store = Store(tmp_path)
    record(store, "r", {2: history[:60]}, np.arange(60))
    assert queries.bias_moves(store, "r", 2, rate=RATE).steps.tolist() == [60] * 4
    # Resumed from its last step and recording on: the roll-up stops at step 59, so the rows answer.
    writer = record(store, "r", {2: history[60:75]}, np.arange(60, 75), resume_from=59, close=False)
    live = queries.bias_moves(store, "r", 2, rate=RATE)
    assert live.steps.tolist() == [75] * 4
    assert live.moves.tolist() == loop_drift(history[:75], RATE)["moves"]
    writer.close("failed")
    # Resumed from an earlier step: the roll-up goes with the later rows, and closing writes a new one.
    record(store, "r", {2: history[40:90]}, np.arange(40, 90), resume_from=39)
    rollup = store.sql("select distinct step from bias_drift where run_id = 'r'")
    assert rollup.step.tolist() == [89]
    moves = queries.bias_moves(store, "r", 2, rate=RATE)
    assert moves.moves.tolist() == loop_drift(history, RATE)["moves"]
    np.testing.assert_allclose(moves.path, loop_drift(history, RATE)["path"], rtol=1e-9)


def computed_from_rows(*args: object) -> None:
    """Stands in for drift.drift_sums where a test shows that no computation over every row happens."""
    raise RuntimeError("computed from rows")


def test_a_recording_run_carries_the_rollup_forward_and_live_reads_add_the_later_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(14)
    histories = {2: walks(rng, 115, 7), 4: walks(rng, 115, 3)}
    store = Store(tmp_path)
    # 17 flushes of 7 steps (the last of 3): the roll-up is carried to step 104 at the 15th, the last compaction.
    writer = record(store, "r", histories, np.arange(115), close=False, compact_every_flushes=3)
    assert store.sql("select distinct step from bias_drift where run_id = 'r'").step.tolist() == [104]
    monkeypatch.setattr(drift, "drift_sums", computed_from_rows)
    for layer, history in histories.items():
        assert_matches_loops(queries.bias_moves(store, "r", layer, rate=RATE), history)
    with pytest.raises(RuntimeError, match="computed from rows"):
        queries.bias_moves(store, "r", 2, rate=2 * RATE)
    monkeypatch.setattr(store_module, "drift_sums", computed_from_rows)
    writer.close()  # the close extends the roll-up to the last step, again without every row
    assert store.sql("select distinct step from bias_drift where run_id = 'r'").step.tolist() == [114]
    for layer, history in histories.items():
        assert_matches_loops(queries.bias_moves(store, "r", layer, rate=RATE), history)


def test_without_a_given_rate_nothing_is_rolled_up_while_recording(tmp_path: Path) -> None:
    history = walks(np.random.default_rng(15), 60, 4)
    store = Store(tmp_path)
    writer = record(store, "r", {2: history}, np.arange(60), rate=None, close=False, compact_every_flushes=2)
    assert store.sql("select * from bias_drift where run_id = 'r'").empty
    writer.close()
    assert store.sql("select distinct step from bias_drift where run_id = 'r'").step.tolist() == [59]


def test_extend_drift_equals_the_sums_of_every_row() -> None:
    rng = np.random.default_rng(16)
    history = walks(rng, 80, 6).astype(np.float64)
    steps = np.arange(0, 160, 2)
    step, expert = np.repeat(steps, 6), np.tile(np.arange(6), len(steps))
    whole = drift.drift_sums(step, expert, history.ravel(), RATE)
    for cut in (1, 17, 79):
        before, after = step < steps[cut], step >= steps[cut]
        sums = drift.drift_sums(step[before], expert[before], history.ravel()[before], RATE)
        extended = drift.extend_drift(sums, step[after], expert[after], history.ravel()[after], RATE)
        np.testing.assert_allclose(extended.path, whole.path, rtol=1e-12)
        pd_columns = ["expert", "steps", "moves", "sign_changes", "last_move"]
        assert extended[pd_columns].to_numpy().tolist() == whole[pd_columns].to_numpy().tolist()
        np.testing.assert_allclose(extended[["first_bias", "last_bias"]], whole[["first_bias", "last_bias"]])
    nothing_later = drift.extend_drift(whole, step[:0], expert[:0], history.ravel()[:0], RATE)
    assert nothing_later.equals(whole)
    other_experts = expert < 5  # an expert missing from the later rows: the complete steps differ
    assert drift.extend_drift(whole, step[other_experts] + 1000, expert[other_experts], history.ravel()[other_experts],
                              RATE) is None

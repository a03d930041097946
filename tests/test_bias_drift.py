"""The bias_drift roll-up: written when a run is compacted, equal to the drift sums of the whole history, read by
queries.bias_moves only while it covers the run's last step at the asked rate."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from analysis import queries
from analysis.store import RunWriter, Store

RATE = 1e-3


def loop_drift(history: np.ndarray, rate: float) -> dict[str, list[float]]:
    """Per expert of [steps, experts], by plain loops: path = sum |Δ|, moves = |Δ| >= u/2, sign changes between
    consecutive moves."""
    sums: dict[str, list[float]] = {"path": [], "moves": [], "sign_changes": []}
    for column in history.astype(np.float64).T:
        deltas = [later - earlier for earlier, later in itertools.pairwise(column)]
        signs = [1 if delta > 0 else -1 for delta in deltas if abs(delta) >= rate / 2]
        sums["path"].append(sum(abs(delta) for delta in deltas))
        sums["moves"].append(len(signs))
        sums["sign_changes"].append(sum(a != b for a, b in itertools.pairwise(signs)))
    return sums


def walks(rng: np.random.Generator, steps: int, experts: int) -> np.ndarray:
    """Bias histories [steps, experts] (float32 as recorded): random walks, a steady drift, noise."""
    walk = np.cumsum(RATE * rng.choice([-1.0, 0.0, 1.0], size=(steps, experts - 2)), axis=0)
    steady = np.arange(steps)[:, None] * RATE
    noise = rng.normal(0, 0.01, (steps, 1))
    return np.concatenate([walk, steady, noise], axis=1).astype(np.float32)


def record(store: Store, run: str, histories: dict[int, np.ndarray], steps: np.ndarray, *, rate: float | None = RATE,
           resume_from: int | None = None, close: bool = True) -> RunWriter:
    """Record each layer's history at `steps` (a fresh run, or a resume from `resume_from`); the writer is
    closed unless `close` is False, when its rows are only flushed."""
    manifest = {"config": {}, "shape": {"bias_update_rate": rate}}
    writer = (store.create_run(run, manifest, flush_every_steps=7) if resume_from is None
              else store.resume_run(run, manifest, resume_from, flush_every_steps=7))
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
        moves = queries.bias_moves(store, "r", layer, rate=RATE)
        expected = loop_drift(history, RATE)
        assert moves.expert.tolist() == list(range(history.shape[1])) and (moves.steps == len(steps)).all()
        np.testing.assert_allclose(moves.path, expected["path"], rtol=1e-9)
        assert moves.moves.tolist() == expected["moves"]
        assert moves.sign_changes.tolist() == expected["sign_changes"]
        np.testing.assert_allclose(moves.first_bias, history[0])
        np.testing.assert_allclose(moves.last_bias, history[-1])
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

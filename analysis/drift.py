"""One layer's expert-bias path from its recorded rows: the [steps, experts] grid they fill, and the per-expert
drift sums (metrics.bias_path_sums) that queries.bias_moves returns and the store keeps for a closed run."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import metrics

DRIFT_COLUMNS = ["expert", "steps", "first_bias", "last_bias", "path", "moves", "sign_changes", "last_move", "rate"]


def bias_grid(step: np.ndarray, expert: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (step, expert, bias) in any order as (recorded steps [S], experts [E], grid [S, E] float64, NaN where a
    row is missing); placing rows by index is cheaper than sorting them."""
    if not len(step):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0))
    step, column = np.asarray(step, np.int64), np.asarray(expert, np.int64)
    first, width = int(step.min()), int(column.max()) + 1
    span = int(step.max()) - first + 1
    # Dense runs index by step offset; sparse ones (recorded every k steps) by the recorded steps' rank,
    # so that the grid never holds more than four rows per recorded step.
    dense = span <= 4 * len(step) / width
    recorded_steps = None if dense else np.unique(step)
    row = step - first if dense else np.searchsorted(recorded_steps, step)
    height = span if dense else len(recorded_steps)
    grid = np.full(height * width, np.nan)
    grid[row * width + column] = bias  # flat cell index: cheaper than assigning through two index arrays
    grid = grid.reshape(height, width)  # [steps, experts]
    steps = np.arange(first, first + span) if dense else recorded_steps
    seen = ~np.isnan(grid)
    if seen.all():
        return steps, np.arange(width), grid
    recorded = seen.any(axis=1)
    experts = np.flatnonzero(seen.any(axis=0))
    grid = grid if recorded.all() else grid[recorded]
    return steps[recorded], experts, grid if len(experts) == width else grid[:, experts]


def _complete_steps(grid: np.ndarray) -> np.ndarray:
    """The rows of a bias grid where every expert has a bias."""
    complete = ~np.isnan(grid).any(axis=1)
    return grid if complete.all() else grid[complete]


def drift_sums(step: np.ndarray, expert: np.ndarray, bias: np.ndarray, rate: float | None) -> pd.DataFrame:
    """Per expert, metrics.bias_path_sums over the steps recorded for every expert of the layer, at rate u =
    `rate`, or metrics.estimated_bias_rate of those steps when None (NaN if nothing moved). Columns: DRIFT_COLUMNS."""
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    _, experts, grid = bias_grid(step, expert, bias)
    grid = _complete_steps(grid)
    if len(grid) == 0:
        return pd.DataFrame(columns=DRIFT_COLUMNS)
    u = rate if rate is not None else metrics.estimated_bias_rate(grid)
    moved = len(grid) >= 2 and u is not None
    sums = metrics.bias_path_sums(grid, u) if moved else {"path": 0.0, "moves": 0, "sign_changes": 0, "last_move": 0}
    return pd.DataFrame({"expert": experts, "steps": len(grid), "first_bias": grid[0], "last_bias": grid[-1],
                         "path": sums["path"], "moves": sums["moves"], "sign_changes": sums["sign_changes"],
                         "last_move": np.asarray(sums["last_move"], np.int8),
                         "rate": np.nan if u is None else u})[DRIFT_COLUMNS]


def extendable(sums: pd.DataFrame, rate: float | None) -> bool:
    """True if bias_drift rows `sums` can be extended by extend_drift at `rate`: counted at that given rate,
    with every expert's last move sign (roll-ups written before last_move existed lack it)."""
    return (rate is not None and not sums.empty and "last_move" in sums and bool(sums["last_move"].notna().all())
            and bool(sums["rate_given"].all()) and bool((sums["rate"] == rate).all()))


def extend_drift(sums: pd.DataFrame, step: np.ndarray, expert: np.ndarray, bias: np.ndarray,
                 rate: float) -> pd.DataFrame | None:
    """drift_sums at `rate` over a history, given `sums` (drift_sums of its earlier steps at `rate`, one row per
    expert) and the rows of its later steps, without the earlier rows. None when the later rows have another set
    of experts than `sums` (then the steps recorded for every expert differ: compute from all rows)."""
    _, experts, grid = bias_grid(step, expert, bias)
    before = sums.sort_values("expert")
    if len(grid) == 0:
        return before.reset_index(drop=True)[DRIFT_COLUMNS]
    if not np.array_equal(experts, before["expert"].to_numpy()):
        return None
    grid = _complete_steps(grid)
    if len(grid) == 0:
        return before.reset_index(drop=True)[DRIFT_COLUMNS]
    # The earlier history's last biases head the later steps, so the step between them is counted once.
    joined = np.concatenate([before["last_bias"].to_numpy(np.float64)[None], grid])
    later = metrics.bias_path_sums(joined, rate, previous_move=before["last_move"].to_numpy(np.int8))
    return pd.DataFrame({"expert": experts, "steps": before["steps"].to_numpy() + len(grid),
                         "first_bias": before["first_bias"].to_numpy(), "last_bias": grid[-1],
                         "path": before["path"].to_numpy() + later["path"],
                         "moves": before["moves"].to_numpy() + later["moves"],
                         "sign_changes": before["sign_changes"].to_numpy() + later["sign_changes"],
                         "last_move": later["last_move"].astype(np.int8), "rate": rate})[DRIFT_COLUMNS]

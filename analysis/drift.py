"""One layer's expert-bias path from its recorded rows: the [steps, experts] grid they fill, and the per-expert
drift sums (metrics.bias_path_sums) that queries.bias_moves returns and the store keeps for a closed run."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import metrics

DRIFT_COLUMNS = ["expert", "steps", "first_bias", "last_bias", "path", "moves", "sign_changes", "rate"]


def bias_grid(step: np.ndarray, expert: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (step, expert, bias) in any order as (recorded steps [S], experts [E], grid [S, E] float64, NaN where a
    row is missing); placing rows by index is cheaper than sorting them."""
    if not len(step):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0))
    step, column = np.asarray(step, np.int64), np.asarray(expert, np.int64)
    span = int(step.max() - step.min() + 1)
    # Dense runs index by step offset; sparse ones (recorded every k steps) by the recorded steps' rank,
    # so that the grid never holds more than four rows per recorded step.
    dense = span <= 4 * len(step) / (column.max() + 1)
    row = step - step.min() if dense else np.unique(step, return_inverse=True)[1]
    grid = np.full((row.max() + 1, column.max() + 1), np.nan)  # [steps, experts]
    grid[row, column] = bias
    recorded = ~np.isnan(grid).all(axis=1)
    experts = np.flatnonzero(~np.isnan(grid).all(axis=0))
    steps = (np.arange(len(grid)) + step.min())[recorded] if dense else np.unique(step)
    if not recorded.all():
        grid = grid[recorded]
    return steps, experts, grid if len(experts) == grid.shape[1] else grid[:, experts]


def drift_sums(step: np.ndarray, expert: np.ndarray, bias: np.ndarray, rate: float | None) -> pd.DataFrame:
    """Per expert, metrics.bias_path_sums over the steps recorded for every expert of the layer, at rate u =
    `rate`, or metrics.estimated_bias_rate of those steps when None (NaN if nothing moved). Columns: DRIFT_COLUMNS."""
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    _, experts, grid = bias_grid(step, expert, bias)
    complete = ~np.isnan(grid).any(axis=1)
    grid = grid if complete.all() else grid[complete]
    if len(grid) == 0:
        return pd.DataFrame(columns=DRIFT_COLUMNS)
    u = rate if rate is not None else metrics.estimated_bias_rate(grid)
    moved = len(grid) >= 2 and u is not None
    sums = metrics.bias_path_sums(grid, u) if moved else {"path": 0.0, "moves": 0, "sign_changes": 0}
    return pd.DataFrame({"expert": experts, "steps": len(grid), "first_bias": grid[0], "last_bias": grid[-1],
                         "path": sums["path"], "moves": sums["moves"], "sign_changes": sums["sign_changes"],
                         "rate": np.nan if u is None else u})[DRIFT_COLUMNS]

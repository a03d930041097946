"""Timing and reporting helpers shared by the benchmarks."""

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """One line naming the machine and the torch build the numbers were measured on."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {device}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a plain-text table with a title line and the machine line."""
    print(f"\n{title}\n{machine()}")
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))

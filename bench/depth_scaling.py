"""Training-step time against depth at full width: how step time grows per layer, and how many layers fit.

Run on a GPU:  .venv/bin/python -m bench.depth_scaling [--layers 2,4,8,16,24,32,48] [--seq 2048] [--batch 1]
On CPU, at reduced width: .venv/bin/python -m bench.depth_scaling --config configs/tiny.toml --layers 1,2,4,8 --seq 128
Each depth is the first L layers of the locked layer map (every 4th global), trained as the trainer does (fp32
weights, AdamW, bf16 autocast for a bfloat16 config) on the fused kernels. Depths are tried in order; the first that
runs out of GPU memory ends the sweep. The fit step = a + b L gives the fixed cost (embeddings, LM head, optimizer
on them) and the cost per layer.
"""

import argparse
import gc
import statistics
from dataclasses import dataclass

import torch

from bench.common import print_table, time_call
from bench.train_step import make_train_step, variant_config
from vpmoe.config import VpMoEConfig, load_config


@dataclass(frozen=True, slots=True)
class DepthPoint:
    """One depth: median step seconds and peak memory (bytes; 0 off CUDA), or None when it did not fit."""

    layers: int
    step_s: float | None
    peak_bytes: int


def step_time_at_depth(cfg: VpMoEConfig, layers: int, device: torch.device, batch: int, seq_len: int,
                       repeats: int, compile_blocks: bool) -> DepthPoint:
    """Median time of a full training step of the first `layers` layers; None when it runs out of GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step = make_train_step(variant_config(cfg, "fused", device, layers, compile_blocks), "fused", device,
                               batch, seq_len)[1]
        seconds = time_call(step, repeats=repeats, warmup=1)
    except torch.cuda.OutOfMemoryError:
        return DepthPoint(layers, None, torch.cuda.max_memory_allocated())
    finally:
        step = None
        gc.collect()  # free this depth's model and optimizer before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return DepthPoint(layers, seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)


def linear_fit(points: list[DepthPoint]) -> tuple[float, float]:
    """Least-squares (a, b) of step_s = a + b * layers over the depths that ran."""
    xs = [p.layers for p in points]
    ys = [p.step_s for p in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def sweep(cfg: VpMoEConfig, depths: list[int], device: torch.device, batch: int, seq_len: int, repeats: int,
          compile_blocks: bool) -> list[DepthPoint]:
    """Time each depth in order until one does not fit."""
    points = []
    for layers in depths:
        point = step_time_at_depth(cfg, layers, device, batch, seq_len, repeats, compile_blocks)
        points.append(point)
        if point.step_s is None:
            break
    return points


def main() -> None:
    """Sweep the depths, print a table and the linear fit."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/vpmoe.toml")
    parser.add_argument("--layers", default="2,4,8,16,24,32,48,64,80")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile each block's attention half")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config)
    points = sweep(cfg, [int(x) for x in args.layers.split(",")], device, args.batch, args.seq, args.repeats,
                   args.compile)
    ran = [p for p in points if p.step_s is not None]
    tokens = args.batch * args.seq
    rows = [[p.layers, p.step_s * 1e3 if p.step_s else "out of memory", tokens / p.step_s if p.step_s else "",
             f"{p.peak_bytes / 2**30:.1f}" if device.type == "cuda" else "n/a"] for p in points]
    title = f"training step vs depth, {args.config} widths, batch {args.batch} x {args.seq} tokens"
    if len(ran) >= 2:
        fixed, per_layer = linear_fit(ran)
        title += f"; fit: {fixed * 1e3:.1f} ms + {per_layer * 1e3:.2f} ms per layer"
    print_table(title, ["layers", "step ms", "tokens/s", "peak GiB"], rows)


if __name__ == "__main__":
    main()

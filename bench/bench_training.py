"""Training throughput of a config on this machine: fp32 against bf16 autocast, and 2 data-parallel ranks
against 1 rank for the same global batch.

Run: .venv/bin/python -m bench.bench_training [--config configs/tiny.toml] [--steps 20] [--dtype-steps 5]
     [--rounds 2]

- fp32 vs bf16: two trainers (one per dtype) take turns step by step in one process, so machine noise
  hits both alike; tokens/s = global batch tokens / median step time.
- 2 ranks vs 1 rank: the same global batch (micro_batch_size rows) on 1 process with all threads, then
  on 2 gloo processes with half the rows and half the threads each (torchrun), alternating `rounds`
  times; each run reports its median step time after warm-up steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.common import print_table
from vpmoe.config import VpMoEConfig, load_config
from vpmoe.training.data import Batch
from vpmoe.training.distributed import DistInfo, init_distributed
from vpmoe.training.loop import Trainer

WARMUP_STEPS = 2
ROOT = Path(__file__).resolve().parents[1]


def bench_config(path: str, dtype: str, micro_batch_size: int | None = None) -> VpMoEConfig:
    """`path` with `dtype`, no evals or checkpoints (they would land inside timed steps)."""
    cfg = load_config(path)
    training = dataclasses.replace(cfg.training, eval_every=0, checkpoint_every=0,
                                   micro_batch_size=micro_batch_size or cfg.training.micro_batch_size)
    return cfg.replace(runtime=dataclasses.replace(cfg.runtime, dtype=dtype), training=training)


def timed_step(trainer: Trainer, batches: Iterator[Batch]) -> float:
    """Seconds of one optimizer step."""
    start = time.perf_counter()
    trainer.train_step(batches)
    return time.perf_counter() - start


def dtype_table(config: str, steps: int) -> list[list[object]]:
    """Median step time and tokens/s of fp32 and bf16 trainers stepping in turn."""
    solo = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            cfg = bench_config(config, dtype)
            trainer = Trainer(cfg, Path(tmp) / dtype, solo, show_progress=False)
            runs[dtype] = (trainer, trainer.train_data.batches(cfg.training.micro_batch_size), [])
        for index in range(WARMUP_STEPS + steps):
            for trainer, batches, times in runs.values():
                seconds = timed_step(trainer, batches)
                if index >= WARMUP_STEPS:
                    times.append(seconds)
    tokens = cfg.training.micro_batch_size * cfg.training.seq_length
    fp32 = statistics.median(runs["float32"][2])
    return [[dtype, f"{1e3 * statistics.median(times):.0f}", f"{tokens / statistics.median(times):,.0f}",
             f"{fp32 / statistics.median(times):.2f}x"] for dtype, (_, _, times) in runs.items()]


def worker(config: str, steps: int, micro_batch_size: int) -> None:
    """Inside torchrun (or alone): time `steps` steps after warm-up; rank 0 prints the median as JSON."""
    dist = init_distributed("cpu")
    cfg = bench_config(config, "float32", micro_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), dist, show_progress=False)
        batches = trainer.train_data.batches(micro_batch_size, rank=dist.rank, world_size=dist.world_size)
        times = [timed_step(trainer, batches) for _ in range(WARMUP_STEPS + steps)][WARMUP_STEPS:]
    if dist.is_main:
        print(json.dumps({"median_s": statistics.median(times)}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ranks(config: str, steps: int, ranks: int, global_batch: int) -> float:
    """Median step time of `ranks` processes sharing the machine's threads and the global batch."""
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    worker_args = ["--worker", "--config", config, "--steps", str(steps), "--micro-batch-size",
                   str(global_batch // ranks)]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={ranks}",
                   "--module", "bench.bench_training", *worker_args]
    else:
        command = [sys.executable, "-m", "bench.bench_training", *worker_args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_s"]


def main() -> None:
    """Print the dtype table and the ranks table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per trainer or run (after warm-up)")
    parser.add_argument("--dtype-steps", type=int, default=5, help="timed steps per dtype (bf16 may be slow on CPU)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating 1-rank / 2-rank runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.steps, args.micro_batch_size)
        return
    cfg = load_config(args.config)
    tokens = cfg.training.micro_batch_size * cfg.training.seq_length
    print_table(f"training throughput, {args.config}, {tokens} tokens per step, {torch.get_num_threads()} threads, "
                f"{args.dtype_steps} interleaved steps each", ["dtype", "median step ms", "tokens/s", "speed vs fp32"],
                dtype_table(args.config, args.dtype_steps))
    global_batch = cfg.training.micro_batch_size
    rows = []
    for round_index in range(args.rounds):
        one = run_ranks(args.config, args.steps, 1, global_batch)
        two = run_ranks(args.config, args.steps, 2, global_batch)
        rows.append([round_index + 1, f"{1e3 * one:.0f}", f"{1e3 * two:.0f}", f"{two / one:.2f}"])
    print_table(f"data-parallel (gloo), global batch {global_batch} x {cfg.training.seq_length} tokens, fp32",
                ["round", "1 rank ms/step", "2 ranks ms/step", "2-rank / 1-rank step time"], rows)


if __name__ == "__main__":
    main()

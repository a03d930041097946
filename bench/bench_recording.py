"""Recording overhead: training steps with recording every step vs without, interleaved in one run.

Run: .venv/bin/python -m bench.bench_recording [--steps 20]
Two trainers of the tiny config take turns, so machine noise hits both alike. Also prints the store's
bytes per recorded step.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from analysis.probes import Recorder, probe_prompts, run_manifest
from analysis.store import Store
from bench.common import print_table
from vpmoe.config import load_config
from vpmoe.training.data import PackedDataset
from vpmoe.training.distributed import DistInfo
from vpmoe.training.loop import Trainer

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _timed_steps(trainer: Trainer, batches, steps: int, recorder: Recorder | None) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        info = trainer.train_step(batches)
        if recorder is not None:
            recorder.on_step(info, trainer.model)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Interleave plain and recorded steps; print median step times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    base = load_config(args.config)
    rows = []
    for label, attention_every in (("loads+bias+layer stats every step", 10**9), ("everything every step", 1)):
        cfg = base.replace(recording=dataclasses.replace(base.recording, every=1, attention_every=attention_every,
                                                         probe_every=10**9),
                           training=dataclasses.replace(base.training, eval_every=0, checkpoint_every=0))
        with tempfile.TemporaryDirectory() as tmp:
            plain = Trainer(cfg, Path(tmp) / "a", SOLO, show_progress=False)
            traced = Trainer(cfg, Path(tmp) / "b", SOLO, show_progress=False)
            store = Store(Path(tmp) / "store")
            writer = store.create_run("bench", run_manifest(cfg, traced.model, {}, "bench"))
            prompts = probe_prompts(PackedDataset(None, split="heldout", seq_length=64), 32)
            recorder = Recorder(traced.model, writer, prompts)
            traced.observer = recorder
            size = cfg.training.micro_batch_size
            plain_batches, traced_batches = plain.train_data.batches(size), traced.train_data.batches(size)
            _timed_steps(plain, plain_batches, 2, None)  # warm-up: nnsight compiles its trace once
            _timed_steps(traced, traced_batches, 2, recorder)
            t_plain, t_rec = [], []
            for _ in range(args.steps):
                t_plain += _timed_steps(plain, plain_batches, 1, None)
                t_rec += _timed_steps(traced, traced_batches, 1, recorder)
            writer.close()
            run_dir = Path(tmp) / "store" / "bench" / "segments"
            stored = sum(p.stat().st_size for p in run_dir.rglob("*.parquet"))
            p_med, r_med = statistics.median(t_plain), statistics.median(t_rec)
            rows.append([label, p_med * 1e3, r_med * 1e3, r_med / p_med, stored / (args.steps + 2)])
    print_table(f"recording overhead, {args.config}, {args.steps} interleaved steps each (median ms)",
                ["recording", "plain", "recorded", "ratio", "bytes/step"], rows)


if __name__ == "__main__":
    main()

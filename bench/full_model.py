"""The whole locked model (6.0B parameters, 80 layers) on one GPU in bf16: forward and recorded forward, side by side.

Run on a GPU:  .venv/bin/python -m bench.full_model [--batch 1] [--seq 2048] [--repeats 5]
On CPU, cut down to see it work: .venv/bin/python -m bench.full_model --config configs/tiny.toml --seq 128
The weights are created on the device and cast to bf16 (router, expert bias, GRAPE-M and value-residual logits stay
fp32): 12 GB for the locked model. The recorded forward is the recorder's own trace (analysis.probes.Recorder): router
loads and per-head attention statistics of every layer, read through nnsight.
"""

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from analysis.probes import Recorder
from bench.common import print_table
from bench.train_step import build_model, variant_config
from vpmoe import VpMoE
from vpmoe.config import VpMoEConfig, load_config


@dataclass(frozen=True, slots=True)
class ForwardTimes:
    """Median seconds of a plain and a recorded forward over the same tokens, with what was run."""

    plain_s: float
    recorded_s: float
    tokens: int
    parameters: int


def inference_model(cfg: VpMoEConfig, device: torch.device) -> VpMoE:
    """The fused model on `device` in eval mode, cast to bf16 when the config's dtype is bfloat16."""
    model = build_model(variant_config(cfg, "fused", device), device)
    if cfg.runtime.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_forwards(model: VpMoE, batch: int, seq_len: int, repeats: int) -> ForwardTimes:
    """Interleave plain and recorded forwards (loss through the chunked head, no logits kept); medians of each."""
    device = model.embedding.weight.device
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.cfg.tokenizer.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    tokens, labels = rows[:, :-1], rows[:, 1:]
    recorder = Recorder(model, writer=None, prompts=[])  # trace_statistics never writes

    def plain() -> None:
        model(tokens, labels=labels, return_logits=False)

    def recorded() -> None:
        recorder.trace_statistics(tokens, labels, True, model)

    times: dict[str, list[float]] = {"plain": [], "recorded": []}
    for run in range(repeats + 1):  # the first round warms up (compiled kernels, nnsight's first trace)
        for name, fn in (("plain", plain), ("recorded", recorded)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if run:
                times[name].append(time.perf_counter() - start)
    return ForwardTimes(plain_s=statistics.median(times["plain"]), recorded_s=statistics.median(times["recorded"]),
                        tokens=tokens.numel(), parameters=sum(p.numel() for p in model.parameters()))


def main() -> None:
    """Build the model, time plain and recorded forwards, print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/vpmoe.toml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config)
    model = inference_model(cfg, device)
    result = time_forwards(model, args.batch, args.seq, args.repeats)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    print_table(f"{args.config}: {result.parameters / 1e9:.2f}B parameters, {model.kernels.as_dict()}, "
                f"{cfg.runtime.dtype}, batch {args.batch} x {args.seq} tokens, peak memory {peak}",
                ["forward", "median ms", "tokens/s", "recorded / plain"],
                [["plain", result.plain_s * 1e3, result.tokens / result.plain_s, 1.0],
                 ["recorded", result.recorded_s * 1e3, result.tokens / result.recorded_s,
                  result.recorded_s / result.plain_s]])


if __name__ == "__main__":
    main()

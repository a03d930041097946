"""The benchmark suite: one command, one table, every row a ratio of two things measured side by side in this run.

Run: .venv/bin/python -m bench.suite [--quick]
Rows: B0 calibration (measured matmul throughput and memory bandwidth, against the datasheet on a known GPU); B1 fused
vs reference training step, tokens/s and model FLOP utilisation; B2 recorded vs plain training step; B3 grouped
experts vs a per-expert loop, and against the memory floor of reading one layer's expert weights; B4 FlexAttention vs
the dense reference and vs causal SDPA; B5 and B6 the full 6B model's forward and recorded forward; B7 peak memory of a
training step, fused vs reference; B8 step time against depth at full width. On a machine without a GPU the rows that
need one say so. On CPU the models are the tiny config; on a GPU, the locked widths (B1, B2, B7 at `--layers` layers).
"""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from analysis.probes import Recorder, probe_prompts, run_manifest
from analysis.store import Store
from bench.calibration import copy_bandwidth_gbs, datasheet, matmul_gflops
from bench.common import machine, time_call
from bench.depth_scaling import linear_fit, sweep
from bench.full_model import inference_model, time_forwards
from bench.model_flops import training_flops_per_token
from bench.train_step import make_train_step, variant_config
from vpmoe.config import VpMoEConfig, load_config
from vpmoe.model.attention_math import attention_local_blocked, attention_reference, attention_sdpa
from vpmoe.model.experts import experts_grouped, experts_reference
from vpmoe.model.flex_attention import FlexBlockMasks, attention_flex, flex_function
from vpmoe.model.positional import alibi_slopes
from vpmoe.model.router import sigmoid_topk_routing
from vpmoe.training.data import PackedDataset
from vpmoe.training.distributed import DistInfo
from vpmoe.training.loop import Trainer

NEEDS_GPU = "needs a GPU"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: what was compared, both measurements, their ratio, and what to know about it."""

    id: str
    what: str
    measured: str
    ratio: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Setup:
    """Where and at what size the suite runs, chosen once from the device and --quick."""

    device: torch.device
    quick: bool
    model_cfg: VpMoEConfig  # B1, B2, B7: tiny on CPU, the locked widths cut to --layers on a GPU
    batch: int
    seq_len: int
    compile_blocks: bool
    dtype: torch.dtype  # of the kernel rows (B3, B4): fp32 on CPU, bf16 on a GPU
    matmul_gflops: float = 0.0
    bandwidth_gbs: float = 0.0

    @property
    def on_gpu(self) -> bool:
        """Whether the suite runs on a CUDA device."""
        return self.device.type == "cuda"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns so that machine noise hits them alike (one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            seconds = time_call(fn, repeats=1, warmup=0)
            if round_:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def calibration_rows(setup: Setup, quick: bool) -> tuple[Setup, list[Row]]:
    """B0: matmul throughput and copy bandwidth measured here, against the datasheet where the GPU is known."""
    n = 8192 if setup.on_gpu else (1024 if quick else 2048)
    megabytes = 2048 if setup.on_gpu else (128 if quick else 512)
    gflops = matmul_gflops(setup.device, setup.dtype, n)
    gbs = copy_bandwidth_gbs(setup.device, megabytes)
    sheet = datasheet(setup.device)
    dtype = str(setup.dtype).removeprefix("torch.")
    if sheet is None:
        flop_ratio = band_ratio = "n/a"
        note = "no datasheet peak for this device"
    else:
        flop_ratio = _ratio(gflops / (sheet.bf16_tflops * 1e3))
        band_ratio = _ratio(gbs / (sheet.bandwidth_tbs * 1e3))
        note = f"datasheet {sheet.bf16_tflops:.0f} TFLOP/s bf16 dense, {sheet.bandwidth_tbs} TB/s"
    rows = [Row("B0", f"matmul {n}^3 {dtype}: measured / datasheet", f"{gflops:.1f} GFLOP/s", flop_ratio, note),
            Row("B0", f"copy {megabytes} MB (read + write): measured / datasheet", f"{gbs:.1f} GB/s", band_ratio,
                note)]
    return dataclasses.replace(setup, matmul_gflops=gflops, bandwidth_gbs=gbs), rows


def training_step_rows(setup: Setup) -> list[Row]:
    """B1: fused vs reference training step, tokens/s, and model FLOP utilisation against the measured peak."""
    steps, kernels = {}, {}
    for variant in ("fused", "reference"):
        cfg = variant_config(setup.model_cfg, variant, setup.device, compile_blocks=setup.compile_blocks)
        model, steps[variant] = make_train_step(cfg, variant, setup.device, setup.batch, setup.seq_len)
        kernels[variant] = f"{model.kernels.attention} attention, {model.kernels.experts} experts"
    times = _interleaved(steps, repeats=2 if setup.quick else 5)
    tokens = setup.batch * setup.seq_len
    flops = training_flops_per_token(setup.model_cfg, setup.seq_len) * tokens
    mfu = {name: flops / seconds / (setup.matmul_gflops * 1e9) for name, seconds in times.items()}
    sheet = datasheet(setup.device)
    peak_note = (f"datasheet MFU: fused {flops / times['fused'] / (sheet.bf16_tflops * 1e12):.1%}" if sheet
                 else "datasheet MFU: n/a")
    shape = (f"{setup.model_cfg.model.num_layers} layers x {setup.model_cfg.model.hidden_size} wide, "
             f"batch {setup.batch} x {setup.seq_len}")
    compiled = "compiled blocks" if setup.compile_blocks else "blocks not compiled"
    return [Row("B1", f"training step, {shape}: fused / reference tokens/s",
                f"fused {tokens / times['fused']:.0f} tok/s ({kernels['fused']}, chunked loss, {compiled}); "
                f"reference {tokens / times['reference']:.0f} tok/s", _ratio(times["reference"] / times["fused"])),
            Row("B1", "model FLOP utilisation vs measured matmul peak: fused / reference",
                f"fused {mfu['fused']:.1%}, reference {mfu['reference']:.1%} "
                f"({flops / tokens / 1e6:.1f} MFLOP per token)", _ratio(mfu["fused"] / mfu["reference"]), peak_note)]


def recording_rows(setup: Setup) -> list[Row]:
    """B2: training steps with recording (loads, bias, layer and attention statistics every step) vs plain."""
    base = setup.model_cfg
    cfg = base.replace(
        recording=dataclasses.replace(base.recording, every=1, attention_every=1, probe_every=10**9),
        training=dataclasses.replace(base.training, eval_every=0, checkpoint_every=0, seq_length=setup.seq_len,
                                     micro_batch_size=setup.batch),
        runtime=dataclasses.replace(base.runtime, device=setup.device.type))
    solo = DistInfo(rank=0, world_size=1, local_rank=0, device=setup.device)
    steps = 3 if setup.quick else 10
    # The trainer turns on deterministic algorithms on CPU (for exact resume); the later rows must not inherit that.
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Trainer(cfg, Path(tmp) / "plain", solo, show_progress=False)
        traced = Trainer(cfg, Path(tmp) / "traced", solo, show_progress=False)
        writer = Store(Path(tmp) / "store").create_run("bench", run_manifest(cfg, traced.model, {}, "bench"))
        prompts = probe_prompts(PackedDataset(None, split="heldout", seq_length=64), 32)
        traced.observer = Recorder(traced.model, writer, prompts)
        batches = {"plain": plain.train_data.batches(setup.batch), "traced": traced.train_data.batches(setup.batch)}

        def plain_step() -> None:
            plain.train_step(batches["plain"])

        def recorded_step() -> None:
            traced.observer.on_step(traced.train_step(batches["traced"]), traced.model)

        times = _interleaved({"plain": plain_step, "recorded": recorded_step}, repeats=steps)
        writer.close()
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    return [Row("B2", "training step recorded every step (loads, bias, layer + attention stats) / plain",
                f"recorded {times['recorded'] * 1e3:.0f} ms, plain {times['plain'] * 1e3:.0f} ms",
                _ratio(times["recorded"] / times["plain"]), f"{steps} interleaved steps each, median")]


def expert_rows(setup: Setup) -> list[Row]:
    """B3: grouped experts vs the per-expert loop (forward + backward) at the locked widths, and grouped forward
    against the floor of reading one layer's expert weights once at the measured bandwidth."""
    E, D, Fh, K, groups = 256, 1024, 128, 4, 8
    tokens = 16384 if setup.on_gpu or not setup.quick else 4096
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, D, generator=gen).to(setup.device, setup.dtype).requires_grad_()
    logits = torch.randn(tokens, E, generator=gen).to(setup.device)
    _, idx, weights = sigmoid_topk_routing(logits, None, K, groups, groups // 2, 2.5)
    params = [t.to(setup.device, setup.dtype).requires_grad_() for t in
              (torch.randn(E, Fh, D, generator=gen) * 0.02, torch.zeros(E, Fh),
               torch.randn(E, D, Fh, generator=gen) * 0.02, torch.zeros(E, D))]

    def train(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        return lambda: fn(x, idx, weights, *params).float().square().sum().backward()

    times = _interleaved({"grouped": train(experts_grouped), "loop": train(experts_reference)},
                         repeats=2 if setup.quick else 5)
    with torch.no_grad():
        forward = time_call(lambda: experts_grouped(x, idx, weights, *params), repeats=3 if setup.quick else 10)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    floor = weight_bytes / (setup.bandwidth_gbs * 1e9)
    scale = "" if tokens == 16384 else "quick on CPU: 4096 tokens, not 16k (the loop at 16k takes minutes here)"
    dtype = str(setup.dtype).removeprefix("torch.")
    return [Row("B3", f"routed experts f+b, E={E} D={D} F={Fh} K={K}, {tokens} tokens {dtype}: loop / grouped",
                f"grouped {times['grouped'] * 1e3:.1f} ms, loop {times['loop'] * 1e3:.1f} ms",
                _ratio(times["loop"] / times["grouped"]), scale),
            Row("B3", f"grouped experts forward, {tokens} tokens: time / floor of reading one layer's expert weights "
                "at the measured bandwidth",
                f"forward {forward * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms ({weight_bytes / 2**20:.0f} MiB)",
                _ratio(forward / floor))]


def _attention_kernels(setup: Setup, T: int, kind: str) -> dict[str, Callable[[], None]]:
    """The attention versions B4 times for one length and kind, at the locked head shape, on fresh inputs."""
    H, G, d, W = 8, 2, 128, 128
    grad = setup.on_gpu
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, n, d, generator=gen).to(setup.device, setup.dtype).requires_grad_(grad)
               for n in (H, G, G))
    sink = torch.randn(H, generator=gen).to(setup.device).requires_grad_(grad)
    window, slopes = (W, None) if kind == "local" else (None, alibi_slopes(H).to(setup.device))
    mask = FlexBlockMasks(W)(T, setup.device)[kind]
    flex = flex_function(setup.device.type)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        if grad:
            return lambda: fn().float().sum().backward()
        return lambda: torch.no_grad()(fn)()

    fns = {"flex": run(lambda: attention_flex(q, k, v, sink, mask, slopes, flex)),
           "reference": run(lambda: attention_reference(q, k, v, sink, window, slopes)[0]),
           "causal SDPA": run(lambda: F.scaled_dot_product_attention(
               q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True))}
    if not setup.on_gpu:  # the CPU production kernel, for scale
        fns["blocked"] = run(lambda: attention_local_blocked(q, k, v, sink, W) if kind == "local"
                             else attention_sdpa(q, k, v, sink, None, slopes))
    return fns


def attention_rows(setup: Setup) -> list[Row]:
    """B4: FlexAttention vs the dense reference and vs plain causal SDPA (no sink, window or ALiBi) at the locked
    head shape; forward only on CPU (PyTorch's CPU FlexAttention has no backward), forward + backward on a GPU."""
    lengths = (2048, 4096, 8192) if setup.on_gpu or not setup.quick else (2048, 4096)
    mode = "f+b" if setup.on_gpu else "forward"
    rows = []
    for T in lengths:
        for kind in ("local", "global"):
            t = _interleaved(_attention_kernels(setup, T, kind), repeats=1 if setup.quick else 3)
            cpu_note = "" if setup.on_gpu else (f"CPU flex is PyTorch's unfused eager path; 'blocked' kernel "
                                                f"{t['blocked'] * 1e3:.0f} ms")
            rows += [Row("B4", f"attention {mode} T={T} {kind}: reference / flex",
                         f"flex {t['flex'] * 1e3:.1f} ms, reference {t['reference'] * 1e3:.1f} ms",
                         _ratio(t["reference"] / t["flex"]), cpu_note),
                     Row("B4", f"attention {mode} T={T} {kind}: flex / causal SDPA",
                         f"flex {t['flex'] * 1e3:.1f} ms, causal SDPA {t['causal SDPA'] * 1e3:.1f} ms",
                         _ratio(t["flex"] / t["causal SDPA"]), "SDPA without sink, window or ALiBi")]
    return rows


def peak_memory_rows(setup: Setup, config_path: str) -> list[Row]:
    """B7: peak memory of one training step, fused vs reference, each in a process of its own."""
    results = {}
    for variant in ("fused", "reference"):
        command = [sys.executable, "-m", "bench.peak_memory", "--variant", variant, "--config", config_path,
                   "--device", setup.device.type, "--layers", str(setup.model_cfg.model.num_layers),
                   "--batch", str(setup.batch), "--seq", str(setup.seq_len), "--threads", str(torch.get_num_threads())]
        if setup.compile_blocks:
            command.append("--compile")
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    fused, ref = results["fused"]["step_bytes"], results["reference"]["step_bytes"]
    how = "torch.cuda.max_memory_allocated" if setup.on_gpu else "resident-set high-water mark (VmHWM)"
    return [Row("B7", "peak memory of a training step above what was resident: reference / fused",
                f"fused {fused / 2**20:.0f} MiB, reference {ref / 2**20:.0f} MiB", _ratio(ref / fused),
                f"{how}, one process each")]


def full_model_rows(setup: Setup, locked: VpMoEConfig) -> list[Row]:
    """B5, B6: the whole 6B model in bf16, forward tokens/s and recorded forward / plain forward."""
    what5 = "6B locked model forward, bf16, batch 1 x 2048: model FLOP utilisation vs measured peak"
    what6 = "6B locked model recorded forward / plain forward"
    if not setup.on_gpu:
        return [Row("B5", what5, NEEDS_GPU, "", "bench/full_model.py"),
                Row("B6", what6, NEEDS_GPU, "", "bench/full_model.py")]
    model = inference_model(locked, setup.device)
    result = time_forwards(model, 1, 2048, repeats=3 if setup.quick else 5)
    forward_flops = training_flops_per_token(locked, 2048) / 3 * result.tokens
    utilisation = forward_flops / result.plain_s / (setup.matmul_gflops * 1e9)
    del model
    torch.cuda.empty_cache()
    return [Row("B5", what5, f"{result.tokens / result.plain_s:.0f} tok/s, {result.plain_s * 1e3:.0f} ms",
                f"{utilisation:.1%}", f"{result.parameters / 1e9:.2f}B parameters"),
            Row("B6", what6, f"recorded {result.recorded_s * 1e3:.0f} ms, plain {result.plain_s * 1e3:.0f} ms",
                _ratio(result.recorded_s / result.plain_s), "router loads + attention statistics of all 80 layers")]


def depth_rows(setup: Setup, locked: VpMoEConfig) -> list[Row]:
    """B8: training-step time at full width against depth: per-layer cost, and 16 layers / 8 layers."""
    what = "training step at full width, 16 layers / 8 layers (fit: fixed + per layer)"
    if not setup.on_gpu:
        return [Row("B8", what, NEEDS_GPU, "", "bench/depth_scaling.py runs at reduced width on CPU")]
    points = sweep(locked, [8, 16], setup.device, 1, 2048, repeats=3, compile_blocks=setup.compile_blocks)
    if any(p.step_s is None for p in points):
        return [Row("B8", what, "out of memory", "", "bench/depth_scaling.py finds the depth that fits")]
    fixed, per_layer = linear_fit(points)
    return [Row("B8", what, f"8 layers {points[0].step_s * 1e3:.0f} ms, 16 layers {points[1].step_s * 1e3:.0f} ms",
                _ratio(points[1].step_s / points[0].step_s),
                f"{fixed * 1e3:.0f} ms + {per_layer * 1e3:.1f} ms per layer; bench/depth_scaling.py for the sweep")]


def print_markdown(title: str, rows: list[Row]) -> None:
    """The table as Markdown, under a title and the machine line."""
    print(f"\n{title}\n\n{machine()}\n")
    print("| row | what | measured | ratio | note |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.id} | {r.what} | {r.measured} | {r.ratio} | {r.note} |")


def main() -> None:
    """Measure every row this device can run and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    parser.add_argument("--layers", type=int, default=8, help="depth of the locked-width model of B1, B2, B7 on GPU")
    parser.add_argument("--compile", action="store_true", help="compile the fused blocks on CPU too (slow to build)")
    args = parser.parse_args()
    # On CPU FlexAttention runs eagerly on purpose (its compiled CPU form cannot return the log-sum-exp).
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    locked = load_config("configs/vpmoe.toml")
    config_path = "configs/vpmoe.toml" if on_gpu else "configs/tiny.toml"
    model_cfg = load_config(config_path)
    if on_gpu:
        model_cfg = model_cfg.replace(model=dataclasses.replace(model_cfg.model, num_layers=args.layers))
    setup = Setup(device=device, quick=args.quick, model_cfg=model_cfg, batch=1 if on_gpu else 8,
                  seq_len=2048 if on_gpu else 128, compile_blocks=on_gpu or args.compile,
                  dtype=torch.bfloat16 if on_gpu else torch.float32)
    setup, rows = calibration_rows(setup, args.quick)
    for section in (training_step_rows, recording_rows, expert_rows, attention_rows):
        rows += section(setup)
    rows += full_model_rows(setup, locked)
    rows += peak_memory_rows(setup, config_path)
    rows += depth_rows(setup, locked)
    size = "quick" if args.quick else "full"
    print_markdown(f"vpMoE benchmark suite ({size}, {time.perf_counter() - started:.0f} s): every ratio measured side "
                   "by side in this run", rows)


if __name__ == "__main__":
    main()

"""Peak memory of one training step, measured in a process of its own so that nothing else it ran is counted.

Run: .venv/bin/python -m bench.peak_memory --variant fused [--config configs/tiny.toml] [--device cpu]
Prints one JSON line. The step after a warm-up step is measured (AdamW state and compiled code already exist):
on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident-set high-water mark (Linux `VmHWM`, reset through
`/proc/self/clear_refs` before the step), both less what was resident just before it.
"""

import argparse
import json
import re
from pathlib import Path

import torch

from bench.train_step import VARIANTS, make_train_step, variant_config
from vpmoe.config import load_config

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1)) * 1024


def step_peak_bytes(step, device: torch.device) -> tuple[int, int]:
    """(bytes resident before `step()`, peak bytes during it) on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the high-water mark to the current resident size
    before = _status_bytes("VmRSS")
    step()
    return before, _status_bytes("VmHWM")


def main() -> None:
    """Build the variant, run a warm-up step, measure the next one, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="compile the fused variant's blocks")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = variant_config(load_config(args.config), args.variant, device, args.layers, args.compile)
    _, step = make_train_step(cfg, args.variant, device, args.batch, args.seq)
    step()
    before, peak = step_peak_bytes(step, device)
    print(json.dumps({"variant": args.variant, "before_bytes": before, "peak_bytes": peak,
                      "step_bytes": peak - before}))


if __name__ == "__main__":
    main()

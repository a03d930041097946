"""What this device can do, measured (matmul throughput, memory bandwidth) and, for known GPUs, from the datasheet.

Utilisation figures divide by the measured peak, so they mean something on any machine; the datasheet peak is shown
beside it where the device is one we know.
"""

from dataclasses import dataclass

import torch

from bench.common import time_call


@dataclass(frozen=True, slots=True)
class Datasheet:
    """Vendor figures: dense bf16 tensor-core TFLOP/s (no sparsity) and memory bandwidth in TB/s."""

    bf16_tflops: float
    bandwidth_tbs: float


# Matched in order against torch.cuda.get_device_name(); the more specific names come first.
DATASHEETS: tuple[tuple[str, Datasheet], ...] = (
    ("H200", Datasheet(989.0, 4.8)),
    ("H100 NVL", Datasheet(835.0, 3.9)),
    ("H100 PCIe", Datasheet(756.0, 2.0)),
    ("H100", Datasheet(989.0, 3.35)),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100", Datasheet(312.0, 2.0)),
)


def datasheet(device: torch.device) -> Datasheet | None:
    """The datasheet of `device` when it is a GPU we know, else None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((sheet for key, sheet in DATASHEETS if key in name), None)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured throughput of an n x n x n matmul: 2 n^3 / t, in GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, repeats=5, warmup=2, min_seconds=0.5)
    return 2 * n**3 / seconds / 1e9


def copy_bandwidth_gbs(device: torch.device, megabytes: int) -> float:
    """Measured memory bandwidth of a device-to-device copy: (bytes read + bytes written) / t, in GB/s."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), repeats=5, warmup=2, min_seconds=0.5)
    return 2 * src.numel() / seconds / 1e9

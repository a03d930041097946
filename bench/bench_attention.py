"""Local attention: the blocked sliding-window kernel vs dense-masked attention at growing T.

Run: .venv/bin/python -m bench.bench_attention [--lengths 1024,4096,8192]
The blocked kernel's cost grows linearly in T; the dense versions build T x T matrices.
"""

import argparse

import torch

from bench.common import print_table, time_call
from vpmoe.model.attention_math import attention_local_blocked, attention_reference, attention_sdpa


def main() -> None:
    """Time forward (and forward+backward) of each version at the locked head shape, side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    H, G, d, W = 8, 2, 128, args.window
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, n, d, generator=gen, requires_grad=True) for n in (H, G, G))
        sink = torch.randn(H, generator=gen, requires_grad=True)

        def blocked(q=q, k=k, v=v, sink=sink):
            return attention_local_blocked(q, k, v, sink, W)

        def dense_sdpa(q=q, k=k, v=v, sink=sink):
            return attention_sdpa(q, k, v, sink, W, None)

        def dense_reference(q=q, k=k, v=v, sink=sink):
            return attention_reference(q, k, v, sink, W, None)[0]

        with torch.no_grad():
            t_blocked = time_call(blocked, repeats=5)
            t_sdpa = time_call(dense_sdpa, repeats=3)
            t_ref = time_call(dense_reference, repeats=1 if T > 4096 else 3)
        t_blocked_train = time_call(lambda b=blocked: b().square().sum().backward(), repeats=3)
        t_sdpa_train = time_call(lambda s=dense_sdpa: s().square().sum().backward(), repeats=1)
        rows.append([T, t_blocked * 1e3, t_sdpa * 1e3, t_ref * 1e3, t_sdpa / t_blocked, t_ref / t_blocked,
                     t_blocked_train * 1e3, t_sdpa_train * 1e3, t_sdpa_train / t_blocked_train])
    print_table(f"local attention, H={H} G={G} d={d} window={W}, batch 1, fp32 (ms; ratio = dense / blocked)",
                ["T", "blocked", "dense sdpa", "dense ref", "x vs sdpa", "x vs ref",
                 "blocked f+b", "sdpa f+b", "x f+b"], rows)


if __name__ == "__main__":
    main()

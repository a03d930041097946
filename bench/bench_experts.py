"""Routed experts: grouped GEMMs on sorted tokens vs a per-expert loop vs dense all-experts.

Run: .venv/bin/python -m bench.bench_experts
"""

import argparse

import torch

from bench.common import print_table, time_call
from vpmoe.model.experts import experts_grouped, experts_reference
from vpmoe.model.mlp import relu_squared
from vpmoe.model.router import sigmoid_topk_routing


def experts_dense(x, idx, weights, fc1_w, fc1_b, fc2_w, fc2_b):
    """Every expert on every token, gates zero for the unchosen: the naive baseline."""
    gate = torch.zeros(x.shape[0], fc1_w.shape[0], dtype=x.dtype).scatter(1, idx, weights.to(x.dtype))
    h = relu_squared(torch.einsum("nd,efd->enf", x, fc1_w) + fc1_b[:, None])  # [E, N, F]
    out = torch.einsum("enf,edf->end", h, fc2_w) + fc2_b[:, None]  # [E, N, D]
    return torch.einsum("ne,end->nd", gate, out)


SHAPES = {"tiny": (16, 64, 32, 4, 4), "locked": (256, 1024, 128, 4, 8)}  # E, D, F, K, groups


def main() -> None:
    """Time forward and forward+backward of the three paths at the tiny and locked widths."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    rows = []
    for name, (E, D, F, K, groups) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        N = args.tokens
        x = torch.randn(N, D, generator=gen, requires_grad=True)
        _, idx, weights = sigmoid_topk_routing(torch.randn(N, E, generator=gen), None, K, groups, groups // 2, 2.5)
        params = [torch.randn(E, F, D, generator=gen) * 0.02, torch.zeros(E, F),
                  torch.randn(E, D, F, generator=gen) * 0.02, torch.zeros(E, D)]
        params = [p.requires_grad_() for p in params]
        times = {}
        for label, fn in (("grouped", experts_grouped), ("loop", experts_reference), ("dense", experts_dense)):
            def fwd(fn=fn, x=x, idx=idx, weights=weights, params=params):
                with torch.no_grad():
                    return fn(x, idx, weights, *params)

            def train(fn=fn, x=x, idx=idx, weights=weights, params=params):
                fn(x, idx, weights, *params).square().sum().backward()

            heavy = label == "dense" and name == "locked"
            times[label] = (time_call(fwd, repeats=1 if heavy else 5), time_call(train, repeats=1 if heavy else 3))
        g, lp, dn = times["grouped"], times["loop"], times["dense"]
        rows.append([name, f"E={E} D={D} F={F} K={K}", N, g[0] * 1e3, lp[0] * 1e3, dn[0] * 1e3, lp[0] / g[0],
                     dn[0] / g[0], g[1] * 1e3, lp[1] / g[1], dn[1] / g[1]])
    print_table("routed experts, fp32 (ms; ratios = other / grouped)",
                ["shape", "widths", "tokens", "grouped", "loop", "dense", "loop/grp", "dense/grp",
                 "grouped f+b", "loop/grp f+b", "dense/grp f+b"], rows)


if __name__ == "__main__":
    main()

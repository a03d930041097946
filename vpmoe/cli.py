"""The `vpmoe` command: one subcommand per job; heavy modules load only for the command that needs them."""

import argparse
import json
import sys
import time
from collections.abc import Callable

from vpmoe.config import ConfigError, load_config


def _cmd_params(args: argparse.Namespace) -> int:
    from vpmoe.params import budget_counts, build_on_meta, instantiated_counts

    cfg = load_config(args.config)
    budget = budget_counts(cfg)
    built = instantiated_counts(build_on_meta(cfg))
    if args.json:
        print(json.dumps({"budget": budget.as_dict(), "instantiated": built.as_dict()}))
        return 0
    print(f"parameter counts for {args.config}")
    print(f"{'':24}{'budget':>16}{'instantiated':>16}")
    for field in ("total", "active", "active_non_embedding"):
        print(f"{field:24}{getattr(budget, field):>16,}{getattr(built, field):>16,}")
    print("budget: the original counter's formula; instantiated: sum of numel() over the built model "
          "(adds the TPA QKV bias and the value-residual logits)")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    import torch

    from vpmoe.model.transformer import VpMoE
    from vpmoe.params import instantiated_counts

    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = VpMoE(cfg)
    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (2, cfg.training.seq_length))
    start = time.perf_counter()
    out = model(tokens, labels=tokens, return_logits=False)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    counts = instantiated_counts(model)
    print(f"{args.config}: kernels {model.kernels.as_dict()}")
    print(f"forward+backward on tokens {tuple(tokens.shape)}: lm loss {out.lm_loss.item():.4f}, "
          f"aux loss {out.aux_loss.item():.6f}, {elapsed:.2f} s")
    print(f"parameters: total {counts.total:,}, active {counts.active:,}, "
          f"active non-embedding {counts.active_non_embedding:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="vpmoe", description="Train, record, probe and audit vpMoE.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter budget and the counts of the model as built")
    p.add_argument("--config", default="configs/vpmoe.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_params)
    p = sub.add_parser("smoke", help="build a model, run one forward and backward, print counts")
    p.add_argument("--config", default="configs/tiny.toml")
    p.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vpmoe` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"vpmoe: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

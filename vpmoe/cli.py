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


def _training_config(args: argparse.Namespace):
    import dataclasses

    cfg = load_config(args.config)
    changes = {k: v for k, v in {"steps": args.steps, "micro_batch_size": args.micro_batch_size,
                                 "grad_accum_steps": args.grad_accum_steps}.items() if v is not None}
    if changes:
        cfg = cfg.replace(training=dataclasses.replace(cfg.training, **changes))
    if args.dtype:
        cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, dtype=args.dtype))
    return cfg


def _cpu_has_bf16() -> bool:
    """False where PyTorch's CPU kernels are at most AVX2 level, which has no bf16 matrix instructions."""
    import torch

    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def run_training(args: argparse.Namespace, cfg, dist, observer_factory: Callable | None = None) -> int:
    """Train as `vpmoe train` does; `observer_factory(trainer)` may return a per-step observer (recording)."""
    from pathlib import Path

    import torch

    from vpmoe.training.checkpoint import CheckpointError
    from vpmoe.training.data import DataError, PackedDataset, unigram_cross_entropy, unigram_loss
    from vpmoe.training.loop import NonFiniteError, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trainer = Trainer(cfg, Path(args.out), dist, data=args.data, text_field=args.text_field, resume=args.resume)
        if observer_factory is not None:
            trainer.observer = observer_factory(trainer)
        if dist.is_main:
            print(f"vpmoe train: {cfg.source}, {trainer.model.kernels.as_dict()}, {cfg.runtime.dtype}, "
                  f"{dist.world_size} rank(s), {trainer.global_batch_rows} rows x {cfg.training.seq_length} tokens "
                  f"per step, from step {trainer.step} -> {cfg.training.steps}", file=sys.stderr)
            if cfg.runtime.dtype == "bfloat16" and dist.device.type == "cpu" and not _cpu_has_bf16():
                print(f"vpmoe train: warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 "
                      "matrix instructions, so bf16 autocast is emulated and far slower than float32 (about 20x "
                      "for the tiny config, bench/bench_training.py); use --dtype float32 here", file=sys.stderr)
        result = trainer.run()
    except (DataError, CheckpointError) as exc:
        print(f"vpmoe train: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"vpmoe train: stopped: {exc}. Checkpoints already written are intact.", file=sys.stderr)
        return 1
    if dist.is_main:
        t = cfg.training
        rows = min(2000, max(64, result.steps * trainer.global_batch_rows))
        train_rows = PackedDataset(args.data, split="train", seq_length=t.seq_length, seed=t.seed,
                                   text_field=args.text_field)
        baseline = unigram_loss(train_rows, rows)
        tail = [h["lm_loss"] for h in result.history[-10:]] or [result.final_lm_loss]
        print(f"done: {result.steps} steps; train loss (mean of last {len(tail)}) {sum(tail) / len(tail):.3f} "
              f"against {baseline:.3f} for a unigram model of the same training rows (nats/token)")
        if result.last_eval_loss is not None and trainer.eval_data is not None:
            heldout_baseline = unigram_cross_entropy(train_rows, rows, trainer.eval_data,
                                                     t.eval_batches * t.micro_batch_size, cfg.tokenizer.vocab_size)
            print(f"held-out loss {result.last_eval_loss:.3f} against {heldout_baseline:.3f} for a unigram model of "
                  f"the training rows scored on the same held-out rows")
        print(f"checkpoints: {', '.join(str(p) for p in result.checkpoints)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vpmoe.training.distributed import init_distributed

    cfg = _training_config(args)
    return run_training(args, cfg, init_distributed(cfg.runtime.device))


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from vpmoe.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode(args.text, allow_special=args.special)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.token_text(i) for i in ids]}))
    else:
        print(" ".join(str(i) for i in ids))
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `vpmoe train` (also used by `python -m vpmoe.training` under torchrun)."""
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--out", required=True, help="run folder for checkpoints (e.g. runs/demo)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides [training].steps)")
    p.add_argument("--data", help="folder, glob or file of .txt/.jsonl/.parquet (default: built-in corpus)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--grad-accum-steps", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="overrides [runtime].dtype")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=_cmd_train)


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
    add_train_arguments(sub.add_parser("train", help="train on the built-in corpus or --data"))
    p = sub.add_parser("tokenize", help="print the o200k Harmony ids of a text")
    p.add_argument("text")
    p.add_argument("--special", action="store_true", help="parse Harmony markup such as <|start|>")
    p.add_argument("--json", action="store_true", help="ids and token texts as JSON")
    p.set_defaults(func=_cmd_tokenize)
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

"""The `vpmoe` console script: the model and training commands of `vpmoe.cli`, plus what needs the layers
above them: `train --record`, `record`, `audit` (analysis) and `serve` (the dashboard).

It lives in `app` because it is the one place allowed to see every layer; `vpmoe` imports none of them.
"""

import argparse
import sys
from pathlib import Path

from vpmoe import cli as model_cli
from vpmoe.config import ConfigError
from vpmoe.training.distributed import all_reduce_mean, init_distributed


def _store_and_run(out: Path, store: str | None, run_id: str | None) -> tuple[Path, str]:
    """Default store = the run folder's parent (runs/), run id = the run folder's name (demo)."""
    return (Path(store) if store else out.resolve().parent), (run_id or out.resolve().name)


def _cmd_train(args: argparse.Namespace) -> int:
    if not args.record:
        return model_cli._cmd_train(args)
    from analysis.probes import Recorder, probe_prompts, run_manifest
    from analysis.store import Store, StoreError
    from vpmoe.training.checkpoint import code_revision
    from vpmoe.training.data import PackedDataset
    from vpmoe.training.loop import Trainer

    cfg = model_cli._training_config(args)
    if cfg.runtime.compile:
        # nnsight reads q and k inside the attention half, which [runtime].compile hands to torch.compile,
        # where hook points added after compiling never fire.
        print(f"vpmoe train: --record needs [runtime].compile = false ({args.config} sets it true): the recorder "
              "reads attention inside the compiled half; record with a copy of the config without compile",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    store_root, run_id = _store_and_run(out, args.store, args.run_id)
    dist = init_distributed(cfg.runtime.device)
    # Under torchrun every rank records its own micro-batches and rank 0 writes the summed statistics.
    store = Store(store_root, stale_after_s=max(60.0, 4 * cfg.recording.flush_every_s)) if dist.is_main else None
    recorder_box: dict[str, Recorder] = {}

    def open_recorder(trainer: Trainer, store: Store) -> Recorder:
        heldout = PackedDataset(args.data, split="heldout", seq_length=cfg.training.seq_length,
                                seed=cfg.training.seed, text_field=args.text_field)
        prompts = probe_prompts(heldout, cfg.recording.probe_tokens)  # before the run is touched
        data = {"train": trainer.train_data.describe(), "probe_prompts": "first held-out document of each domain",
                "tokens_per_step": trainer.global_batch_rows * cfg.training.seq_length,
                "data_parallel_ranks": dist.world_size}
        manifest = run_manifest(cfg, trainer.model, data, code_revision(), checkpoints=str(out.resolve()))
        flushing = {"flush_every_steps": cfg.recording.flush_every_steps, "flush_every_s": cfg.recording.flush_every_s}
        if args.resume and store.has_run(run_id):
            # The same run goes on: its rows after the checkpoint's step are dropped and recorded again.
            writer = store.resume_run(run_id, manifest, trainer.step, **flushing)
        else:
            writer = store.create_run(run_id, {**manifest, "resumed_from": trainer.step}, **flushing)
        print(f"recording into {store_root}/{run_id} (serve it: vpmoe serve --store {store_root})", file=sys.stderr)
        return Recorder(trainer.model, writer, prompts)

    def make_observer(trainer: Trainer) -> Recorder:
        recorder, error = None, None
        if store is not None:
            try:
                recorder = open_recorder(trainer, store)
            except Exception as exc:  # re-raised below, once every rank knows rank 0 cannot record
                error = exc
        failed = error is not None
        if dist.world_size > 1:  # every rank learns whether rank 0 failed, so none waits in an all-reduce
            failed = all_reduce_mean(float(failed), dist.device) > 0
        if error is not None:
            raise error
        if failed:
            raise StoreError("rank 0 could not start recording (its message says why); every rank stops")
        recorder_box["r"] = recorder or Recorder(trainer.model, None, [])
        return recorder_box["r"]

    try:
        code = model_cli.run_training(args, cfg, dist, observer_factory=make_observer)
    except StoreError as exc:
        print(f"vpmoe train: {exc}", file=sys.stderr)
        code = 2
    recorder = recorder_box.get("r")
    if recorder is not None and recorder.writer is not None:
        recorder.writer.close("complete" if code == 0 else "failed")
    return code


def _cmd_record(args: argparse.Namespace) -> int:
    from analysis.probes import Recorder, evaluation_batches, probe_prompts, run_manifest
    from analysis.store import Store
    from vpmoe.training.checkpoint import CheckpointError, code_revision, load_model
    from vpmoe.training.data import DataError, PackedDataset

    try:
        model, ckpt = load_model(args.checkpoint)
        cfg = ckpt.config
        seq = cfg.training.seq_length
        data = PackedDataset(args.data, split=args.split, seq_length=seq, seed=cfg.training.seed,
                             text_field=args.text_field)
        heldout = PackedDataset(args.data, split="heldout", seq_length=seq, seed=cfg.training.seed,
                                text_field=args.text_field)
        prompts = probe_prompts(heldout, cfg.recording.probe_tokens)
    except (CheckpointError, DataError, ConfigError) as exc:
        print(f"vpmoe record: {exc}", file=sys.stderr)
        return 2
    path = Path(args.checkpoint).resolve()
    store_root = Path(args.store) if args.store else path.parent.parent
    run_id = args.run_id or f"{path.parent.name}-eval-{ckpt.step:06d}"
    store = Store(store_root)
    manifest = run_manifest(cfg, model, {"evaluated": data.describe(), "tokens": args.tokens}, code_revision(),
                            checkpoint=str(path), checkpoint_step=ckpt.step, router_mode="eval, expert bias on")
    with store.create_run(run_id, manifest) as writer:
        recorder = Recorder(model, writer, prompts)
        result = recorder.record_evaluation(evaluation_batches(data, cfg.training.micro_batch_size, args.tokens),
                                            ckpt.step)
    print(f"recorded {result['tokens']:,} tokens of {path} into {store_root}/{run_id}: held-out loss "
          f"{result['eval_loss']:.3f} ({result['seconds']:.1f} s)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.serve import serve

    return serve(args.store, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    """`vpmoe.cli`'s parser with the recording, audit and dashboard commands added."""
    from analysis.audit import add_audit_arguments, run_audit

    parser = model_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    train.add_argument("--record", action="store_true", help="record loads, bias, lambdas, attention into a store")
    train.add_argument("--store", help="store folder (default: the parent of --out, e.g. runs/)")
    train.add_argument("--run-id", help="run id in the store (default: the name of --out)")
    train.set_defaults(func=_cmd_train)
    p = sub.add_parser("record", help="record a saved checkpoint's signals on an evaluation set")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="evaluation data (default: the built-in corpus)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate")
    p.add_argument("--store", help="store folder (default: the checkpoint's run folder's parent)")
    p.add_argument("--run-id", help="run id in the store (default: <run>-eval-<step>)")
    p.set_defaults(func=_cmd_record)
    p = sub.add_parser("audit", help="expert-load audit of a checkpoint: PASS / WARN / FAIL per layer")
    add_audit_arguments(p)
    p.set_defaults(func=run_audit)
    p = sub.add_parser("serve", help="serve the dashboard over a store")
    p.add_argument("--store", default="runs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vpmoe` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"vpmoe: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

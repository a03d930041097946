"""Checkpoints: safetensors weights (expert bias included) and optimizer state, plus a JSON sidecar.

A checkpoint is a folder `checkpoint-NNNNNN/` holding `model.safetensors`, `optimizer.safetensors` and
`checkpoint.json` (config, step, data position, code revision, file hashes). It is written into a
temporary folder, every file fsynced, then renamed into place, so an interrupted save never damages an
earlier checkpoint. No pickles are ever loaded.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vpmoe.config import ConfigError, VpMoEConfig, config_from_dict
from vpmoe.model.transformer import VpMoE

FORMAT_VERSION = 1
SIDECAR = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^checkpoint-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, sidecar fields and tensors."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        """Optimizer steps completed when it was saved."""
        return int(self.meta["step"])

    @property
    def config(self) -> VpMoEConfig:
        """The full config saved with it."""
        return config_from_dict(self.meta["config"], source=str(self.path / SIDECAR))


def code_revision() -> str:
    """`git describe`-style revision of the code that runs, or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Flatten AdamW state to `{param_name}.{exp_avg|exp_avg_sq|step}` tensors (names from `id(param)`)."""
    out = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                out[f"{names[id(param)]}.{key}"] = value.detach().clone().contiguous()
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                      source: Path) -> None:
    """Put flattened state back into `optimizer`, naming the file and first missing entry on mismatch."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if f"{name}.{key}" not in tensors:
                    raise CheckpointError(f"{source}: optimizer state has no entry '{name}.{key}'")
                state[key] = tensors[f"{name}.{key}"].to(param.device)
            if state["exp_avg"].shape != param.shape:
                raise CheckpointError(f"{source}: optimizer state '{name}.exp_avg' has shape "
                                      f"{tuple(state['exp_avg'].shape)}, the parameter {tuple(param.shape)}")
            optimizer.state[param] = state


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    cfg: VpMoEConfig, extra: dict[str, Any], rng_state: torch.Tensor | None = None) -> Path:
    """Write `out_dir/checkpoint-{step:06d}` atomically and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{step:06d}"
    tmp = out_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    names = {id(p): n for n, p in model.named_parameters()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    files = [MODEL_FILE]
    if optimizer is not None:
        opt = optimizer_tensors(optimizer, names)
        if rng_state is not None:
            opt["rng.torch_cpu"] = rng_state
        save_file(opt, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        files.append(OPTIMIZER_FILE)
    meta = {"format_version": FORMAT_VERSION, "step": step, "created_at": time.time(),
            "config": cfg.to_dict(), "architecture_hash": cfg.architecture_hash(), "code_revision": code_revision(),
            "files": {f: file_sha256(tmp / f) for f in files}, **extra}
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in [*files, SIDECAR]:
        _fsync(tmp / f)
    _fsync(tmp)
    if final.exists():
        raise CheckpointError(f"{final}: a checkpoint for step {step} already exists; refusing to overwrite it")
    os.replace(tmp, final)
    _fsync(out_dir)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir` (a sidecar present), oldest step first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if (m := _NAME.match(p.name)) and (p / SIDECAR).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest complete checkpoint under `out_dir`, or CheckpointError naming the folder."""
    found = list_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"{out_dir}: no complete checkpoint to resume from (expected checkpoint-NNNNNN/ "
                              f"folders with {SIDECAR})")
    return found[-1]


def _first_difference(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> str:
    for table in sorted(set(a) | set(b)):
        for key in sorted(set(a.get(table, {})) | set(b.get(table, {}))):
            va, vb = a.get(table, {}).get(key), b.get(table, {}).get(key)
            if va != vb:
                return f"[{table}].{key} is {va!r} in the checkpoint but {vb!r} in the config"
    return "architecture hashes differ"


def read_checkpoint(path: str | Path, cfg: VpMoEConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder (hashes, architecture vs `cfg` when given) without a model."""
    path = Path(path)
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {SIDECAR}); expected a checkpoint-NNNNNN folder")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not valid JSON ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{sidecar}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 does not match {SIDECAR}; the file is damaged")
    try:
        saved_cfg = config_from_dict(meta["config"], source=str(sidecar))
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{sidecar}: its config is not valid: {exc}") from None
    if cfg is not None and saved_cfg.architecture_hash() != cfg.architecture_hash():
        raise CheckpointError(f"{sidecar}: checkpoint from another architecture: "
                              f"{_first_difference(saved_cfg.architecture_dict(), cfg.architecture_dict())}")
    try:
        model_state = load_file(str(path / MODEL_FILE))
        opt_file = path / OPTIMIZER_FILE
        optimizer_state = load_file(str(opt_file)) if opt_file.is_file() else {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors: {exc}") from None
    return Checkpoint(path=path, meta=meta, model_state=model_state, optimizer_state=optimizer_state)


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Names, shapes and dtypes of `state` against `model`; the first mismatch raises CheckpointError."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor '{name}' (shape {tuple(tensor.shape)})")
        got = state[name]
        if got.shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(got.shape)}, the model expects "
                                  f"{tuple(tensor.shape)}")
        if got.dtype != tensor.dtype:
            raise CheckpointError(f"{source}: tensor '{name}' has dtype {got.dtype}, the model expects {tensor.dtype}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' not in the model")


def load_model_state(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Check, then copy a checkpoint's weights and expert bias into `model`."""
    check_state_fits(model, ckpt.model_state, ckpt.path / MODEL_FILE)
    model.load_state_dict(ckpt.model_state, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """Build the model a checkpoint describes, load its weights, and put it in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    model = VpMoE(ckpt.config)
    load_model_state(model, ckpt)
    return model.to(device).eval(), ckpt

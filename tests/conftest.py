"""Shared fixtures: configs, seeded generators, and a CPU thread count that suits a 2-core machine."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vpmoe.config import VpMoEConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
LOCKED = ROOT / "configs" / "vpmoe.toml"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg() -> VpMoEConfig:
    """The tiny config, as shipped."""
    return load_config(TINY)


@pytest.fixture(scope="session")
def locked_cfg() -> VpMoEConfig:
    """The locked vpMoE config, as shipped."""
    return load_config(LOCKED)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator for random, non-zero test inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module on one CPU thread: the tiny model's tensors are too small for a second thread to pay off,
    and on a busy 2-core machine spin-waiting threads made each forward about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared fixtures: configs, seeded generators, and a CPU thread count that suits a 2-core machine."""

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

"""vpMoE: the model, its tokenizer and training; imports nothing from `analysis` or `app`."""

from vpmoe.config import ConfigError, VpMoEConfig, load_config

__all__ = ["ConfigError", "VpMoEConfig", "load_config"]

"""vpMoE: the model, its tokenizer and training; imports nothing from `analysis` or `app`."""

from vpmoe.config import ConfigError, VpMoEConfig, load_config
from vpmoe.model.transformer import VpMoE, VpMoEOutput

__all__ = ["ConfigError", "VpMoE", "VpMoEConfig", "VpMoEOutput", "load_config"]

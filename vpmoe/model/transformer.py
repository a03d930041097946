"""The whole vpMoE model: embeddings, L blocks (3:1 local:global, dense layer 1), final norm, LM head."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.block import TransformerBlock
from vpmoe.model.flex_attention import FlexBlockMasks
from vpmoe.model.kernels import KernelChoice, resolve_kernels
from vpmoe.model.lm_head import IGNORE_INDEX, lm_loss_chunked
from vpmoe.model.moe import MoEFFN
from vpmoe.model.norms import RMSNorm
from vpmoe.model.positional import GrapeM
from vpmoe.model.router import DeepSeekV3Router


@dataclass
class VpMoEOutput:
    """What a forward pass returns: logits (unless skipped), the summed MoE aux loss, the LM loss."""

    logits: Tensor | None  # [B, T, V]
    aux_loss: Tensor  # scalar fp32, sum over MoE layers
    lm_loss: Tensor | None  # scalar fp32 mean cross-entropy, when labels were given
    aux_losses: Tensor  # [num MoE layers] fp32, each layer's own term

    @property
    def loss(self) -> Tensor:
        """The training objective: LM loss plus every MoE layer's aux loss."""
        if self.lm_loss is None:
            raise ValueError("loss needs labels: call the model with labels=...")
        return self.lm_loss + self.aux_loss


class VpMoE(nn.Module):
    """vpMoE: untied embeddings and LM head (no bias), pre-norm blocks, one shared GRAPE-M frequency vector.

    Kernels are resolved once here from `cfg.runtime` (see `self.kernels`); forward never branches on speed.
    """

    def __init__(self, cfg: VpMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.kernels: KernelChoice = resolve_kernels(cfg)
        self.embedding = nn.Embedding(cfg.tokenizer.vocab_size, m.hidden_size)
        nn.init.normal_(self.embedding.weight, std=m.init_method_std)
        self.grape_m = GrapeM(m.head_dim, cfg.grape.grapem_base, cfg.grape.grapem_log_freq_scale)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, layer, kind, is_moe, self.kernels.attention, self.kernels.experts)
            for layer, (kind, is_moe) in enumerate(zip(cfg.layer_kinds, cfg.moe_layers, strict=True), start=1))
        # Block masks depend only on the sequence length: built once per length here, shared by every layer.
        self.flex_masks = FlexBlockMasks(cfg.attention.window_size) if self.kernels.attention == "flex" else None
        self.final_norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.lm_head = nn.Linear(m.hidden_size, cfg.tokenizer.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=m.init_method_std)

    def routers(self) -> list[DeepSeekV3Router]:
        """The router of every MoE layer, in layer order."""
        return [b.ffn.router for b in self.blocks if isinstance(b.ffn, MoEFFN)]

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise ValueError unless `tokens` is a [B, T] integer tensor of ids in [0, vocab_size)."""
        vocab, limit = self.cfg.tokenizer.vocab_size, self.cfg.attention.max_sequence_length
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape [B, T], got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor (torch.long), got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > limit:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds [attention].max_sequence_length = {limit}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in [0, {vocab})")

    def forward(self, tokens: Tensor, labels: Tensor | None = None, *, return_logits: bool = True) -> VpMoEOutput:
        """tokens [B, T] -> logits [B, T, V] and aux loss; with labels [B, T] also the LM loss.

        `return_logits=False` with labels skips the full logits and computes the loss in chunks.
        """
        self.check_tokens(tokens)
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels must have the shape of tokens {tuple(tokens.shape)}, got {tuple(labels.shape)}")
        B, T = tokens.shape
        x = self.embedding(tokens)
        rotary = self.grape_m(T)
        masks = self.flex_masks(T, tokens.device) if self.flex_masks is not None else None
        v1 = None
        aux_terms = []
        for block in self.blocks:
            x, v_own, aux = block(x, rotary, v1, masks)
            if v1 is None:
                v1 = v_own
            if aux is not None:
                aux_terms.append(aux)
        h = self.final_norm(x)
        aux_losses = torch.stack(aux_terms) if aux_terms else h.new_zeros(0, dtype=torch.float32)
        logits = self.lm_head(h) if return_logits or labels is None else None
        lm_loss = None
        if labels is not None:
            if logits is not None:
                lm_loss = F.cross_entropy(logits.reshape(B * T, -1).float(), labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
            else:
                lm_loss = lm_loss_chunked(h.reshape(B * T, -1), self.lm_head.weight, labels.reshape(-1))
        return VpMoEOutput(logits=logits, aux_loss=aux_losses.sum(), lm_loss=lm_loss, aux_losses=aux_losses)

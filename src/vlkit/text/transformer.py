"""Text transformer for dual encoders: token ids (B, T) -> tokens (B, T, D) -> pooled (B, D).

Two styles: CLIP's causal transformer pooled at the end-of-text token (Radford et al., 2021), and SigLIP's
bidirectional transformer pooled at the last position (Zhai et al., 2023). ``pool`` names where the pooled vector
comes from; ``causal`` names the attention pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.layers import TransformerBlock


@register_config
@dataclass(frozen=True)
class TextConfig(ConfigBase):
    kind: ClassVar[str] = "text"

    vocab_size: int = 49408
    max_seq_len: int = 77
    dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu"] = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: Literal["eos", "argmax", "last", "first", "mean"] = "eos"
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_seq_len, config.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.num_heads, config.mlp_dim, act=config.act, norm_eps=config.norm_eps)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"text has {length} tokens; this text tower takes at most {self.config.max_seq_len}")
        tokens = self.token_embed(input_ids) + self.pos_embed[:, :length]  # (B, T, D)
        mask = None
        # With a causal mask and right padding, real tokens never see padding, so the padding mask changes only
        # outputs at padded positions, which no pooling reads: skip it and keep SDPA's fast causal kernel.
        if not self.config.causal and attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        for block in self.blocks:
            tokens = block(tokens, mask=mask, is_causal=self.config.causal)
        return self.norm(tokens)

    def pool_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position (B,) that the pooled vector is read from."""
        pool = self.config.pool
        batch, length = input_ids.shape
        if pool == "eos":
            is_eos = input_ids == self.config.eos_token_id
            if not bool(is_eos.any(dim=1).all()):
                raise ValueError("every text needs an end-of-text token for pool='eos' (was it truncated away?)")
            return is_eos.int().argmax(dim=1)
        if pool == "argmax":
            return input_ids.argmax(dim=1)
        if pool == "first":
            return torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)

    def forward_head(
        self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.config.pool == "mean":
            if attention_mask is None:
                return tokens.mean(dim=1)
            weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
            return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
        index = self.pool_index(input_ids, attention_mask)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), index]  # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_ids, attention_mask = self.trim_padding(input_ids, attention_mask)
        return self.forward_head(self.forward_features(input_ids, attention_mask), input_ids, attention_mask)

    def trim_padding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop the trailing columns that are padding in every row, so a batch costs its longest text, not
        ``max_seq_len`` (ShapesWorld captions: 14 of 32 tokens, 10 % of a training step).

        The pooled vector does not change: real tokens never attend to right padding (causal, or masked as keys),
        and the "eos", "first" and "mean" poolings read real positions only. "last" (SigLIP) reads the final, padded
        position and "argmax" may land on padding, so those keep every column; so does ``forward_features``, whose
        per-token output (FILIP) must keep one length across ranks.
        """
        if attention_mask is None or self.config.pool in ("last", "argmax"):
            return input_ids, attention_mask
        used = attention_mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        if length == input_ids.shape[1]:
            return input_ids, attention_mask
        return input_ids[:, :length], attention_mask[:, :length]

"""BLIP-2's Querying Transformer (Li et al., 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models").

M learned queries, and in stage 1 also text tokens, pass through post-LN BERT layers: self-attention over queries and
text; cross-attention from the queries to the image tokens in layers 0, f, 2f, ... (f = ``cross_attention_frequency``);
then a feed-forward block of their own for the query positions and another for the text positions. Text enters with
BERT embeddings (word + learned absolute position, starting at 0 after the queries), and the queries and the text
share the embedding LayerNorm.

As a bridge: image tokens (B, N, D_vis) + key mask -> the queries' last hidden states (B, M, D_q) -> ``projection``
(BLIP-2's ``language_projection``: kept inside the bridge, so every bridge ends at D_lm) -> (B, M, D_lm); the
queries have no grid. The image tokens may include a class token (BLIP-2 keeps it); the grid is not used. Given the
prompt's text as well, the queries read it through self-attention (BLIP-2's VQA fine-tuning conditions the Q-Former
on the question, Sec. 4.3: the queries extract the image features the question asks for).

``encode`` returns the query and text hidden states (D_q) for BLIP-2's three stage-1 losses, each with its attention
pattern: "unimodal" (queries and text cannot see each other: image-text contrastive), "bidirectional" (all see all:
image-text matching), "multimodal_causal" (queries see queries; text sees the queries and the text up to itself:
image-grounded text generation). Padded text positions are never attended to.

Parameter layout and semantics follow transformers' ``Blip2QFormerModel``; ``vlkit.convert.blip2_qformer`` holds the
key map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_mask
from vlkit.config import ConfigBase, register_config
from vlkit.layers.attention import Attention, CrossAttention
from vlkit.layers.mlp import Mlp

AttentionPattern = Literal["bidirectional", "unimodal", "multimodal_causal"]
ATTENTION_PATTERNS: tuple[str, ...] = ("bidirectional", "unimodal", "multimodal_causal")


@register_config
@dataclass(frozen=True)
class QFormerConfig(ConfigBase):
    """Defaults: BLIP-2's Q-Former (BERT-base, 32 queries). ``text_input``: build the text embeddings and the text
    feed-forward blocks (stage 1); BLIP-2's stage-2 checkpoints drop them. ``vocab_size`` / ``max_seq_len`` size the
    text embeddings."""

    kind: ClassVar[str] = "qformer"

    num_queries: int = 32
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"] = "gelu"
    norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    text_input: bool = False
    vocab_size: int = 30522
    max_seq_len: int = 512

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"Q-Former dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_queries < 1 or self.depth < 1 or self.cross_attention_frequency < 1:
            raise ValueError("Q-Former needs num_queries, depth and cross_attention_frequency >= 1, got "
                             f"{self.num_queries}, {self.depth}, {self.cross_attention_frequency}")  # fmt: skip


@dataclass
class QFormerOutput:
    queries: torch.Tensor  # (B, M, D_q)
    text: torch.Tensor | None  # (B, T, D_q) when text was given


class QFormerLayer(nn.Module):
    """One post-LN BERT layer; the queries (the first ``num_queries`` positions) alone cross-attend to the image."""

    def __init__(self, config: QFormerConfig, vision_dim: int, cross_attention: bool) -> None:
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attn = Attention(dim, config.num_heads)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, context_dim=vision_dim) if cross_attention else None
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.query_mlp = Mlp(dim, config.mlp_dim, config.act)
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.text_mlp = Mlp(dim, config.mlp_dim, config.act) if config.text_input else None
        self.text_norm = nn.LayerNorm(dim, eps=eps) if config.text_input else None

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        mask: torch.Tensor | None,
        image: torch.Tensor,
        image_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask=mask))
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None and self.cross_norm is not None:
            queries = self.cross_norm(queries + self.cross_attn(queries, image, mask=image_mask))
        queries = self.query_norm(queries + self.query_mlp(queries))
        if text.shape[1] == 0 or self.text_mlp is None or self.text_norm is None:
            return queries
        text = self.text_norm(text + self.text_mlp(text))
        return torch.cat([queries, text], dim=1)  # (B, M + T, D_q)


class QFormer(Bridge):
    config_class = QFormerConfig

    def __init__(self, config: QFormerConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.queries = nn.Parameter(torch.empty(config.num_queries, config.dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        if config.text_input:
            self.word_embed = nn.Embedding(config.vocab_size, config.dim)
            self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
            # BERT's 0.02, not nn.Embedding's 1.0: the generation head is tied to these rows, and unit-scale
            # embeddings start its loss at ~160 instead of log V.
            nn.init.trunc_normal_(self.word_embed.weight, std=0.02)
            nn.init.trunc_normal_(self.pos_embed.weight, std=0.02)
        self.embed_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        frequency = config.cross_attention_frequency
        self.layers = nn.ModuleList(
            QFormerLayer(config, vision_dim, cross_attention=i % frequency == 0) for i in range(config.depth)
        )
        self.projection = nn.Linear(config.dim, lm_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: torch.Tensor,
        mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """With ``text_ids`` (B, T) (and ``text_mask``), the queries read that text too, all positions seeing each
        other (BLIP-2's question-conditioned Q-Former for VQA, Sec. 4.3); only the queries' outputs are returned."""
        check_mask(tokens, mask, "Q-Former")
        queries = self.encode(tokens, mask, text_ids, text_mask).queries
        return BridgeOutput(self.projection(queries), None, None)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.full((grid.shape[0],), self.config.num_queries, dtype=torch.long, device=grid.device)

    def encode(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        attention_pattern: AttentionPattern = "bidirectional",
    ) -> QFormerOutput:
        """image_tokens (B, N, D_vis), image_mask (B, N) bool; text_ids (B, T), text_mask (B, T) (bool or 0/1)."""
        if attention_pattern not in ATTENTION_PATTERNS:
            raise ValueError(f"unknown attention pattern {attention_pattern!r}; known: {ATTENTION_PATTERNS}")
        batch = image_tokens.shape[0]
        num_queries = self.config.num_queries
        x = self.queries.expand(batch, -1, -1)  # (B, M, D_q)
        text_length = 0
        if text_ids is not None:
            text_length = text_ids.shape[1]
            x = torch.cat([x, self.embed_text(text_ids)], dim=1)  # (B, M + T, D_q)
        x = self.embed_norm(x)
        mask = self.attention_mask(num_queries, text_length, text_mask, attention_pattern, x.device)
        image_mask = None if image_mask is None else image_mask[:, None, None, :]  # (B, 1, 1, N)
        for layer in self.layers:
            x = layer(x, num_queries, mask, image_tokens, image_mask)
        return QFormerOutput(x[:, :num_queries], x[:, num_queries:] if text_ids is not None else None)

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D_q) word + position embeddings, before the shared LayerNorm."""
        if not self.config.text_input:
            raise ValueError("this Q-Former was built without text input (QFormerConfig.text_input=False)")
        length = text_ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"text of {length} tokens exceeds the Q-Former's max_seq_len {self.config.max_seq_len}")
        return self.word_embed(text_ids) + self.pos_embed.weight[:length]

    @staticmethod
    def attention_mask(
        num_queries: int,
        text_length: int,
        text_mask: torch.Tensor | None,
        pattern: AttentionPattern,
        device: torch.device,
    ) -> torch.Tensor | None:
        """(B or 1, 1, M + T, M + T) bool self-attention mask (True = may attend), or None when all see all."""
        if text_length == 0 or (pattern == "bidirectional" and text_mask is None):
            return None
        length = num_queries + text_length
        position = torch.arange(length, device=device)
        is_text = position >= num_queries
        if pattern == "bidirectional":
            allowed = torch.ones(length, length, dtype=torch.bool, device=device)
        elif pattern == "unimodal":
            allowed = is_text[:, None] == is_text[None, :]
        else:
            causal_text = is_text[:, None] & is_text[None, :] & (position[None, :] <= position[:, None])
            allowed = ~is_text[None, :] | causal_text
        mask = allowed[None]  # (1, L, L)
        if text_mask is not None:
            queries = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=device)
            keys = torch.cat([queries, text_mask.to(device=device, dtype=torch.bool)], dim=1)  # (B, L)
            # A padded row may have no key left (an all-padding text under "unimodal"); its own position keeps
            # SDPA's softmax finite. Real rows always see themselves already, so they are unchanged.
            mask = (mask & keys[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
        return mask[:, None]  # (B, 1, L, L)

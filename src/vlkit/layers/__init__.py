"""Building blocks shared by every tower: attention, MLPs, norms, patch embedding, position embeddings, RoPE, and
a linear layer with a faster CPU inference kernel (``vlkit.layers.linear``).

Nothing here imports from the rest of vlkit.
"""

from vlkit.layers.attention import Attention, AttentionPool, CrossAttention, segment_mask
from vlkit.layers.mlp import Mlp, SwiGLU, build_mlp
from vlkit.layers.norms import LayerNorm2d, RMSNorm, build_norm
from vlkit.layers.patch_embed import ConvStem, PatchEmbed
from vlkit.layers.pos_embed import FactorizedPosEmbed2d, LearnedPosEmbed2d, grid_positions, sincos_2d, sincos_2d_at
from vlkit.layers.rope import Rope1d, Rope2d, RopeTables, apply_rope, rope_inverse_frequency
from vlkit.layers.transformer import DropPath, TransformerBlock

__all__ = [
    "Attention",
    "AttentionPool",
    "ConvStem",
    "CrossAttention",
    "DropPath",
    "FactorizedPosEmbed2d",
    "LayerNorm2d",
    "LearnedPosEmbed2d",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "Rope1d",
    "Rope2d",
    "RopeTables",
    "SwiGLU",
    "TransformerBlock",
    "apply_rope",
    "build_mlp",
    "build_norm",
    "grid_positions",
    "rope_inverse_frequency",
    "segment_mask",
    "sincos_2d",
    "sincos_2d_at",
]

"""Building blocks shared by every tower: attention, MLPs, norms, patch embedding, position embeddings.

Nothing here imports from the rest of vlkit.
"""

from vlkit.layers.attention import Attention, AttentionPool, CrossAttention
from vlkit.layers.mlp import Mlp, SwiGLU, build_mlp
from vlkit.layers.norms import LayerNorm2d, RMSNorm, build_norm
from vlkit.layers.patch_embed import PatchEmbed
from vlkit.layers.pos_embed import LearnedPosEmbed2d, sincos_2d
from vlkit.layers.transformer import DropPath, TransformerBlock

__all__ = [
    "Attention",
    "AttentionPool",
    "CrossAttention",
    "DropPath",
    "LayerNorm2d",
    "LearnedPosEmbed2d",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "SwiGLU",
    "TransformerBlock",
    "build_mlp",
    "build_norm",
    "sincos_2d",
]

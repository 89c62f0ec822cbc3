"""``LMConfig``: one decoder-only language model configuration covering Llama, Qwen2 and OPT.

Llama (Touvron et al., 2023): RMSNorm, SwiGLU, RoPE, no biases, optional grouped-query attention (Ainslie et al.,
2023). Qwen2 (Yang et al., 2024): Llama plus a QKV bias, tied embeddings in the small models. OPT (Zhang et al.,
2022): LayerNorm, ReLU MLP, learned positions offset by 2, biases everywhere, pre- or post-norm blocks (350M is
post-norm), and a token embedding narrower than the model projected in and out (350M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlkit.config import ConfigBase, register_config


@register_config
@dataclass(frozen=True)
class LMConfig(ConfigBase):
    """``num_kv_heads`` (default ``num_heads``) and ``head_dim`` (default ``dim // num_heads``) are filled in.

    ``mlp`` names the feed-forward: "swiglu" is the gated SiLU MLP, the others a two-layer MLP with that activation.
    ``rope_scaling`` with ``rope_factor`` / ``rope_original_max_seq_len`` / ``rope_low_freq_factor`` /
    ``rope_high_freq_factor`` are the fields of Hugging Face's ``rope_scaling`` ("linear", "dynamic", "llama3").
    ``position_offset``: learned position tables start at this row (OPT: 2). ``token_embed_dim``: width of the token
    embedding and LM head when it differs from ``dim`` (OPT-350M), bridged by bias-free projections.
    """

    kind: ClassVar[str] = "lm"

    vocab_size: int = 32000
    max_seq_len: int = 2048
    dim: int = 4096
    depth: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int = 11008
    mlp: Literal["swiglu", "relu", "gelu", "gelu_tanh", "quick_gelu", "silu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    pre_norm: bool = True
    final_norm: bool = True
    positions: Literal["rope", "learned"] = "rope"
    position_offset: int = 0
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "linear", "dynamic", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    token_embed_dim: int | None = None
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Derived defaults are written into the (frozen) instance, so config.json states them explicitly.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        assert self.num_kv_heads is not None and self.head_dim is not None
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
            if self.rope_scaling == "llama3" and self.rope_original_max_seq_len is None:
                raise ValueError("rope_scaling='llama3' needs rope_original_max_seq_len")
        elif self.rope_scaling != "none":
            raise ValueError(f"rope_scaling={self.rope_scaling!r} needs positions='rope'")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be positive, got {self.rope_factor}")
        for name in ("vocab_size", "max_seq_len", "dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def embed_width(self) -> int:
        """Width of the token embedding and of the LM head's input."""
        return self.token_embed_dim or self.dim

"""Bridges between vision and language: vision tokens (B, N, D_vis) on per-image grids -> LM-width tokens (B, M, D_lm).

One interface for every kind (``bridges.base``): ``forward(tokens, grid, mask) -> BridgeOutput`` and
``num_output_tokens(grid)``. Each kind has one typed config, registered by its ``kind`` so that a VLM config holding
any of them (typed ``BridgeConfig``) round-trips through config.json; ``build_bridge(config, vision_dim, lm_dim)``
builds the module.

| kind           | module            | paper                  | M                           | output grid     |
|----------------|-------------------|------------------------|-----------------------------|-----------------|
| linear_bridge  | linear.py         | LLaVA                  | N                           | the input's     |
| mlp_bridge     | mlp.py            | LLaVA-1.5 (mlp2x_gelu) | N                           | the input's     |
| pixel_shuffle  | pixel_shuffle.py  | Idefics3 / nanoVLM     | N / r^2                     | grid / r        |
| qformer        | qformer.py        | BLIP-2                 | num_queries                 | none            |
| resampler      | resampler.py      | Qwen-VL, MiniCPM-V     | num_queries                 | none            |
| c_abstractor   | c_abstractor.py   | Honeybee               | num_queries                 | sqrt M x sqrt M |
| d_abstractor   | d_abstractor.py   | Honeybee               | num_queries                 | sqrt M x sqrt M |
| attention_pool | attention_pool.py | Molmo                  | ceil(rows/2) * ceil(cols/2) | ceil(grid / 2)  |
| patch_merger   | patch_merger.py   | Qwen2-VL               | N / 4                       | grid / 2        |
"""

from __future__ import annotations

from vlkit.bridges.attention_pool import AttentionPoolBridge, AttentionPoolConfig
from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.c_abstractor import CAbstractor, CAbstractorConfig
from vlkit.bridges.d_abstractor import DAbstractor, DAbstractorConfig
from vlkit.bridges.linear import LinearBridge, LinearBridgeConfig
from vlkit.bridges.mlp import MLPBridge, MLPBridgeConfig
from vlkit.bridges.patch_merger import PatchMerger, PatchMergerConfig
from vlkit.bridges.pixel_shuffle import PixelShuffleBridge, PixelShuffleConfig
from vlkit.bridges.qformer import QFormer, QFormerConfig, QFormerOutput
from vlkit.bridges.resampler import Resampler, ResamplerConfig

BridgeConfig = (
    LinearBridgeConfig
    | MLPBridgeConfig
    | PixelShuffleConfig
    | QFormerConfig
    | ResamplerConfig
    | CAbstractorConfig
    | DAbstractorConfig
    | AttentionPoolConfig
    | PatchMergerConfig
)

BRIDGES: dict[str, type[Bridge]] = {
    cls.config_class.kind: cls
    for cls in (
        LinearBridge,
        MLPBridge,
        PixelShuffleBridge,
        QFormer,
        Resampler,
        CAbstractor,
        DAbstractor,
        AttentionPoolBridge,
        PatchMerger,
    )
}


def build_bridge(config: BridgeConfig, vision_dim: int, lm_dim: int) -> Bridge:
    """The bridge of ``config``'s kind, mapping D_vis = ``vision_dim`` tokens to D_lm = ``lm_dim``."""
    kind = getattr(config, "kind", None)
    if kind not in BRIDGES:
        raise ValueError(f"no bridge for config kind {kind!r}; known: {sorted(BRIDGES)}")
    return BRIDGES[kind](config, vision_dim, lm_dim)


__all__ = [
    "BRIDGES",
    "AttentionPoolBridge",
    "AttentionPoolConfig",
    "Bridge",
    "BridgeConfig",
    "BridgeOutput",
    "CAbstractor",
    "CAbstractorConfig",
    "DAbstractor",
    "DAbstractorConfig",
    "LinearBridge",
    "LinearBridgeConfig",
    "MLPBridge",
    "MLPBridgeConfig",
    "PatchMerger",
    "PatchMergerConfig",
    "PixelShuffleBridge",
    "PixelShuffleConfig",
    "QFormer",
    "QFormerConfig",
    "QFormerOutput",
    "Resampler",
    "ResamplerConfig",
    "build_bridge",
]

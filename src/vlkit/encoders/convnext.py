"""ConvNeXt (Liu et al., 2022, "A ConvNet for the 2020s").

pixels (B, 3, H, W) -> 4x4 stem -> four stages of blocks (depthwise 7x7, LayerNorm, inverted-bottleneck MLP with
GELU, layer scale, stochastic depth) with 2x2 downsampling between stages -> feature map (B, C, H/32, W/32).
``forward_features`` returns it as tokens (B, N, C) with its grid; ``forward_head`` is global average pooling
followed by LayerNorm, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders.base import EncoderOutput
from vlkit.layers import DropPath, LayerNorm2d


@register_config
@dataclass(frozen=True)
class ConvNeXtConfig(ConfigBase):
    kind: ClassVar[str] = "convnext"

    image_size: int | tuple[int, int] = 224
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    patch_size: int = 4
    layer_scale: float | None = 1e-6
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    head_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same length")

    @property
    def dim(self) -> int:
        return self.dims[-1]


def _fp32_convolution(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` computed in fp32 under CPU autocast, returned in autocast's dtype (what its convolution returns)."""
    with torch.autocast("cpu", enabled=False):
        return conv(x.float()).to(torch.get_autocast_dtype("cpu"))


class _Fp32Depthwise(torch.autograd.Function):
    """A depthwise convolution computed in fp32 under CPU bf16 autocast: bf16 output, and a bf16 copy of its input
    kept for backward, as autocast's bf16 convolution would (so it costs no memory over it); the weight gradient is
    computed from that copy, as autocast's is."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        out = _fp32_convolution(conv, x)  # weight and bias are conv's, passed for autograd to track
        ctx.save_for_backward(x.to(out.dtype), weight)
        ctx.conv, ctx.has_bias, ctx.dtype = conv, bias is not None, x.dtype
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        conv: nn.Conv2d = ctx.conv  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        has_bias: bool = ctx.has_bias  # type: ignore[attr-defined]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight, [weight.shape[0]] if has_bias else None, conv.stride, conv.padding,
            conv.dilation, False, [0, 0], conv.groups, [needs[0], needs[2], needs[3] and has_bias],
        )  # fmt: skip
        grad_x = grad_x.to(ctx.dtype) if needs[0] else None  # type: ignore[attr-defined]
        return grad_x, None, grad_weight, grad_bias if has_bias else None


class ConvNeXtBlock(nn.Module):
    # The depthwise 7x7 convolution in fp32 on CPU under bf16 autocast: oneDNN's bf16 depthwise convolution (its
    # backward above all) is slower than its fp32 one there: ConvNeXt-T's training step at batch 16 on a 2-core
    # AVX-512 CPU spent 1.4 s per step in bf16 convolution_backward against 0.5 s in fp32 (bench/README.md).
    fp32_depthwise_on_cpu: ClassVar[bool] = True

    def __init__(self, dim: int, layer_scale: float | None, drop_path: float, eps: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None
        self.drop_path = DropPath(drop_path)

    def depthwise(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_depthwise_on_cpu and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            if torch.is_grad_enabled() and (x.requires_grad or self.dwconv.weight.requires_grad):
                return _Fp32Depthwise.apply(x, self.dwconv, self.dwconv.weight, self.dwconv.bias)
            return _fp32_convolution(self.dwconv, x)
        return self.dwconv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C): channels-last so the MLP is a plain Linear
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, C, H, W)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, rates: list[float], config: ConvNeXtConfig, downsample: bool) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=config.norm_eps), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, config.layer_scale, r, config.norm_eps) for r in rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, config: ConvNeXtConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(3, config.dims[0], kernel_size=config.patch_size, stride=config.patch_size),
            LayerNorm2d(config.dims[0], eps=config.norm_eps),
        )
        total = sum(config.depths)
        rates = [config.drop_path * i / max(total - 1, 1) for i in range(total)]
        stages, start, in_dim = [], 0, config.dims[0]
        for index, (depth, dim) in enumerate(zip(config.depths, config.dims, strict=True)):
            stages.append(ConvNeXtStage(in_dim, dim, rates[start : start + depth], config, downsample=index > 0))
            start, in_dim = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(config.dims[-1], eps=config.head_norm_eps)
        self.apply(_init_weights)

    @property
    def dim(self) -> int:
        return self.config.dims[-1]

    def forward_features(self, pixels: torch.Tensor) -> EncoderOutput:
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        height, width = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return EncoderOutput(tokens, (height, width), 0)

    def forward_head(self, features: EncoderOutput) -> torch.Tensor:
        return self.norm(features.tokens.mean(dim=1))  # (B, C)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""Dual encoder: an image tower and a text tower projected into one embedding space (CLIP, SigLIP, LiT, ...).

pixels (B, 3, H, W) -> image features (B, E); ids (B, T) -> text features (B, E). The model owns the learned
temperature ``logit_scale`` (stored as a log, Radford et al., 2021) and, for the sigmoid loss, ``logit_bias``
(Zhai et al., 2023); the losses in ``vlkit.losses`` are separate modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders import ConvNeXtConfig, ViTConfig, build_encoder
from vlkit.encoders.base import EncoderOutput
from vlkit.losses.filip import filip_similarity
from vlkit.models.base import PretrainedModel
from vlkit.packed import PackedImages
from vlkit.text import TextConfig, TextTransformer


@register_config
@dataclass(frozen=True)
class DualEncoderConfig(ConfigBase):
    kind: ClassVar[str] = "dual_encoder"

    vision: ViTConfig | ConvNeXtConfig
    text: TextConfig
    embed_dim: int = 512
    image_projection: Literal["linear", "none"] = "linear"
    text_projection: Literal["linear", "none"] = "linear"
    projection_bias: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float = 100.0
    loss: Literal["clip", "siglip", "filip"] = "clip"
    # "token": FILIP's late interaction (Yao et al., 2021) — forward also returns per-token features and masks.
    interaction: Literal["global", "token"] = "global"

    def __post_init__(self) -> None:
        for tower, kind, dim in (
            ("image", self.image_projection, self.vision.dim),
            ("text", self.text_projection, self.text.dim),
        ):
            if kind == "none" and dim != self.embed_dim:
                raise ValueError(
                    f"{tower}_projection='none' needs the {tower} width ({dim}) to equal embed_dim ({self.embed_dim})"
                )
        if (self.loss == "filip") != (self.interaction == "token"):
            raise ValueError(
                f"loss={self.loss!r} with interaction={self.interaction!r}: the FILIP loss scores token features, "
                "so loss='filip' and interaction='token' go together"
            )


@dataclass
class DualEncoderOutput:
    image_features: torch.Tensor  # (B, E), L2-normalised
    text_features: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp() of the parameter (clamped after each update)
    logit_bias: torch.Tensor | None
    # interaction="token" only (FILIP): per-token features, L2-normalised per token, and the real-token text mask.
    image_tokens: torch.Tensor | None = None  # (B, N, E)
    text_tokens: torch.Tensor | None = None  # (B, T, E)
    text_mask: torch.Tensor | None = None  # (B, T) bool
    # forward(..., output_patch_tokens=True) only: the image encoder's patch tokens (B, N, D) as it outputs them (after
    # a ViT's token norm, before any projection), for a per-patch objective beside the contrastive one.
    patch_tokens: torch.Tensor | None = None

    @property
    def logits_per_image(self) -> torch.Tensor:
        """(B_img, B_txt) scale * similarity + bias, as transformers' ``logits_per_image`` (for FILIP, the
        image -> text token-wise similarity)."""
        return self._logits(0)

    @property
    def logits_per_text(self) -> torch.Tensor:
        """(B_txt, B_img), as transformers' ``logits_per_text`` (for FILIP, from the text -> image similarity)."""
        return self._logits(1).T

    @property
    def image_embeds(self) -> torch.Tensor:
        """transformers' name for the L2-normalised image features."""
        return self.image_features

    @property
    def text_embeds(self) -> torch.Tensor:
        """transformers' name for the L2-normalised text features."""
        return self.text_features

    @cached_property
    def similarities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image -> text, text -> image) similarities, each (B_img, B_txt): ``score_pairs`` of the outputs."""
        if self.image_tokens is not None and self.text_tokens is not None:
            return score_pairs(self.image_tokens, self.text_tokens, self.text_mask)
        return score_pairs(self.image_features, self.text_features)

    def _logits(self, direction: int) -> torch.Tensor:
        logits = self.logit_scale * self.similarities[direction]
        return logits + self.logit_bias if self.logit_bias is not None else logits


def score_pairs(
    image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None, chunk_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text, text -> image) similarities, each (N, M) indexed [image, text]: the cosines of pooled,
    L2-normalised features (N, E) and (M, E) (one matrix, twice), or FILIP's token-wise similarities of per-token
    features (N, n, E) and (M, T, E) with the text's real-token mask (``filip_similarity``, ``chunk_size`` text rows
    at a time)."""
    if image.ndim == 3:
        return filip_similarity(image, text, text_mask, chunk_size=chunk_size)
    cosine = image @ text.T  # (N, M)
    return cosine, cosine


def _projection(kind: str, dim: int, embed_dim: int, bias: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    layer = nn.Linear(dim, embed_dim, bias=bias)
    nn.init.normal_(layer.weight, std=dim**-0.5)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class DualEncoder(PretrainedModel):
    config_class = DualEncoderConfig

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_encoder(config.vision)
        self.text_encoder = TextTransformer(config.text)
        self.image_projection = _projection(
            config.image_projection, config.vision.dim, config.embed_dim, config.projection_bias
        )
        self.text_projection = _projection(
            config.text_projection, config.text.dim, config.embed_dim, config.projection_bias
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init))) if config.logit_bias_init is not None else None
        )

    def encode_image(
        self,
        pixels: torch.Tensor | PackedImages,
        normalize: bool = False,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E); packed images (``PackedImages``, NaViT) -> (I, E) in image order.

        With ``pixel_attention_mask`` (B, L) and ``spatial_shapes`` (B, 2), ``pixels`` are patchified, padded
        images (B, L, p*p*3) exactly as transformers' Siglip2ImageProcessor returns them (SigLIP 2 NaFlex).
        """
        if (pixel_attention_mask is None) != (spatial_shapes is None):
            raise ValueError("pass pixel_attention_mask and spatial_shapes together (SigLIP 2 NaFlex inputs)")
        if pixel_attention_mask is not None and spatial_shapes is not None:
            assert isinstance(pixels, torch.Tensor)
            pixels = PackedImages.from_padded(pixels, pixel_attention_mask, spatial_shapes)
        features = self.image_projection(self.image_encoder(pixels))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        features = self.text_projection(self.text_encoder(input_ids, attention_mask))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def _image_tokens(self, features: EncoderOutput) -> torch.Tensor:
        tokens = features.patch_tokens  # (B, N, D)
        # Encoders that normalise only the pooled vector (OpenAI CLIP's ViT, ConvNeXt) get the same norm per token,
        # so tokens enter the projection on the scale the pooled vector does.
        if not (isinstance(self.config.vision, ViTConfig) and self.config.vision.final_norm == "tokens"):
            tokens = self.image_encoder.norm(tokens)
        return F.normalize(self.image_projection(tokens), dim=-1)  # (B, N, E)

    def _text_tokens(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens.new_ones(tokens.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return F.normalize(self.text_projection(tokens), dim=-1), mask  # (B, T, E), (B, T)

    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, N, E) after the encoder's final norm, projected, L2-normalised per token."""
        if not isinstance(pixels, torch.Tensor):
            raise TypeError("encode_image_tokens takes whole images (B, 3, H, W); packed inputs are not supported")
        return self._image_tokens(self.image_encoder.forward_features(pixels))

    def encode_text_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> (tokens (B, T, E) projected and L2-normalised per token, real-token mask (B, T) bool)."""
        return self._text_tokens(self.text_encoder.forward_features(input_ids, attention_mask), attention_mask)

    def _forward_tokens(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_patch_tokens: bool = False,
    ) -> DualEncoderOutput:
        # One pass per tower feeds both the pooled features and the token features.
        image = self.image_encoder.forward_features(pixels)
        text = self.text_encoder.forward_features(input_ids, attention_mask)  # (B, T, D)
        text_tokens, text_mask = self._text_tokens(text, attention_mask)
        scale, bias = self.scale_and_bias()
        return DualEncoderOutput(
            F.normalize(self.image_projection(self.image_encoder.forward_head(image)), dim=-1),
            F.normalize(self.text_projection(self.text_encoder.forward_head(text, input_ids, attention_mask)), dim=-1),
            scale,
            bias,
            image_tokens=self._image_tokens(image),
            text_tokens=text_tokens,
            text_mask=text_mask,
            patch_tokens=image.patch_tokens if output_patch_tokens else None,
        )

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the scale at most ``max_logit_scale`` by clamping the parameter after each update, as open_clip
        does: a clamp in the forward pass would leave a parameter past the bound without a gradient, for good."""
        self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_patch_tokens: bool = False,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> DualEncoderOutput:
        """The processor's names, so that ``model(**processor(images=..., text=...))`` works as with transformers
        (SigLIP 2's NaFlex patches with their ``pixel_attention_mask`` and ``spatial_shapes`` too)."""
        pixels = pixel_values
        naflex = pixel_attention_mask is not None or spatial_shapes is not None
        if naflex and (self.config.interaction == "token" or output_patch_tokens):
            raise ValueError("NaFlex inputs (pixel_attention_mask, spatial_shapes) give pooled features only: not "
                             "with interaction='token' or output_patch_tokens")  # fmt: skip
        if self.config.interaction == "token":
            return self._forward_tokens(pixels, input_ids, attention_mask, output_patch_tokens)
        scale, bias = self.scale_and_bias()
        if not output_patch_tokens:
            image = self.encode_image(pixels, True, pixel_attention_mask, spatial_shapes)
            return DualEncoderOutput(image, self.encode_text(input_ids, attention_mask, normalize=True), scale, bias)
        # One pass of the image tower feeds the pooled features and the patch tokens.
        features = self.image_encoder.forward_features(pixels)
        image = F.normalize(self.image_projection(self.image_encoder.forward_head(features)), dim=-1)
        text = self.encode_text(input_ids, attention_mask, normalize=True)
        return DualEncoderOutput(image, text, scale, bias, patch_tokens=features.patch_tokens)

    def similarity(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None, chunk_size: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's image-text similarity on encoded features: (image -> text, text -> image), each (N, M)
        indexed [image, text]. Images rank texts by the first, texts rank images by the second.

        ``interaction="global"``: L2-normalised pooled features, image (N, E) and text (M, E) -> their cosines, the
        same matrix twice. ``interaction="token"`` (FILIP): per-token features, image (N, n, E) and text (M, T, E)
        with its real-token mask (M, T) -> the two token-wise similarities, chunked over ``chunk_size`` text rows
        (``filip_similarity``). Evaluation, the claims bench and ``logits`` (the forward output's ``similarities``) all
        score through ``score_pairs``.
        """
        if self.config.interaction == "token":  # filip_similarity checks the token shapes itself
            return filip_similarity(image, text, text_mask, chunk_size=chunk_size)
        if image.ndim != 2 or text.ndim != 2 or text_mask is not None:
            raise ValueError(
                f"interaction='global' scores pooled features, image (N, E) and text (M, E) without a mask; got "
                f"{tuple(image.shape)} and {tuple(text.shape)}" + (" and a text mask" if text_mask is not None else "")
            )
        return score_pairs(image, text, text_mask, chunk_size)

    def logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None, spatial_shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Image-text logits (B_img, B_txt) as the model's image -> text loss rows see them: scale * similarity +
        bias (for FILIP, the image -> text token-wise similarity); the forward's ``logits_per_image``."""
        out = self(pixel_values, input_ids, attention_mask, pixel_attention_mask=pixel_attention_mask,
                   spatial_shapes=spatial_shapes)  # fmt: skip
        return out.logits_per_image

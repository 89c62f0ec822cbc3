"""``VisionLanguageModel``: image encoder -> bridge -> the image's placeholder tokens in the text -> language model.

    pixel_values (I, 3, H, W) --encoder (hidden state ``feature_layer``, class token dropped or kept)--> (I, N, D_vis)
        --bridge--> (I, M, D_lm)
    input_ids (B, T) with M ``image_token_id`` placeholders per image --LM token embedding, placeholders filled by
        masked scatter in order (sample 0's images first)--> (B, T, D_lm) --LM--> logits (B, T, V)

LLaVA (Liu et al., 2023) is this with a CLIP ViT-L/14, a linear (LLaVA) or two-layer MLP (LLaVA-1.5) bridge and a
Llama / Vicuna LM; the other VLMs change the bridge (Q-Former, resampler, abstractors, pooling, merger) and the LM.
Samples may hold several images or none (text-only samples in the same batch): a sample's placeholders take the next
images in ``pixel_values`` order, and a count that does not match the bridge's output is an error naming the sample.
The call takes the processor's names (``input_ids``, ``attention_mask``, ``pixel_values``), so
``model(**processor(...))`` and ``model.generate(**processor(...))`` work as with transformers.

BLIP-2 (Li et al., 2023) is this with a Q-Former bridge reading the tower's normed output (class token kept) and an
OPT or Llama-family LM. Its first training stage trains the Q-Former against the image tower alone, with
image-text contrastive, matching and grounded-generation losses (``vlkit.tasks.qformer``); a config with
``embed_dim`` holds the heads those losses need (``QFormerHeads``), which nothing else reads. For VQA, BLIP-2
conditions the Q-Former on the question (Sec. 4.3: the question's tokens enter the Q-Former beside the queries and
interact with them through self-attention): with ``bridge_reads_prompt`` every image comes with the text of its prompt,
``qformer_input_ids`` (I, T) and ``qformer_attention_mask`` (I, T), one row per image (InstructBLIP's names; the
prompt tokenized by the VLM's own tokenizer, ``prompt_ids``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlkit.bridges import (
    BridgeConfig,
    BridgeOutput,
    CAbstractorConfig,
    DAbstractorConfig,
    LinearBridgeConfig,
    MLPBridgeConfig,
    QFormerConfig,
    build_bridge,
)
from vlkit.config import ConfigBase, register_config
from vlkit.encoders import ConvNeXtConfig, ViTConfig, build_encoder
from vlkit.lm.config import LMConfig
from vlkit.lm.model import DecoderLM, LMOutput
from vlkit.models.base import PretrainedModel
from vlkit.registry import get_config, register_preset

__all__ = ["QFormerHeads", "VLMConfig", "VisionLanguageModel"]


@register_config
@dataclass(frozen=True)
class VLMConfig(ConfigBase):
    """``feature_layer``: the encoder hidden state the bridge reads (transformers' numbering: -1 the last block's
    output, -2 the one before, as LLaVA-1.5; no final norm); a tuple of several: those states concatenated along the
    features, in that order (transformers' LLaVA with a list of layers; the bridge reads D_vis x layers); None: the
    encoder's output, final norm included (BLIP-2 reads the vision model's ``last_hidden_state``).
    ``keep_class_token``: LLaVA's "full" feature strategy (default: "default", patch tokens only).
    ``image_token_id``: the placeholder id in the LM's vocabulary. ``chat_template``: the ``vlkit.text.chat``
    template prompts are rendered with (eval, chat). ``embed_dim``: the width of BLIP-2's stage-1 image-text
    contrastive space; set, the model holds ``QFormerHeads`` (a Q-Former bridge with text input only).
    ``image_attention``: ``"causal"`` (LLaVA, BLIP-2, Qwen-VL: the LM is causal throughout) or ``"bidirectional"``
    (Gemma 3, Gemma Team, 2025: the tokens of one image, a contiguous run of placeholders, see each other in both
    directions; text stays causal). ``image_newline``: LLaVA-NeXT's learned separator (Liu et al., 2024,
    "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") after each row of a per-token bridge's output grid,
    so that the LM sees where each row of the image ends: an image of R x C tokens takes R x (C + 1) placeholders.
    ``bridge_reads_prompt``: the Q-Former reads each image's prompt (the question) beside its queries (BLIP-2's VQA
    fine-tuning, Sec. 4.3); needs a Q-Former with ``text_input`` sized to the LM's vocabulary."""

    kind: ClassVar[str] = "vlm"

    vision: ViTConfig | ConvNeXtConfig
    bridge: BridgeConfig
    lm: LMConfig
    feature_layer: int | tuple[int, ...] | None = -1
    keep_class_token: bool = False
    image_token_id: int = 32000
    chat_template: str = "vicuna_v1"
    embed_dim: int | None = None
    image_attention: Literal["causal", "bidirectional"] = "causal"
    image_newline: bool = False
    bridge_reads_prompt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.feature_layer, list):  # from a --set override or hand-written JSON
            object.__setattr__(self, "feature_layer", tuple(self.feature_layer))
        if isinstance(self.feature_layer, tuple) and (
            not self.feature_layer or len(set(self.feature_layer)) != len(self.feature_layer)
        ):
            raise ValueError(
                f"feature_layer: several layers must be distinct and at least one, got {self.feature_layer}"
            )
        if self.image_attention not in ("causal", "bidirectional"):
            raise ValueError(f"image_attention must be 'causal' or 'bidirectional', got {self.image_attention!r}")
        if not isinstance(self.vision, ViTConfig):
            raise ValueError(f"a VLM's encoder must be a ViT, got {type(self.vision).__name__}")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the LM vocabulary "
                             f"({self.lm.vocab_size})")  # fmt: skip
        for layer in self.feature_layers:
            self.vision.hidden_state(layer, f"feature_layer {layer}")
        if self.keep_class_token and not self.vision.class_token:
            raise ValueError("keep_class_token needs a ViT with a class token")
        if self.embed_dim is not None and not (isinstance(self.bridge, QFormerConfig) and self.bridge.text_input):
            raise ValueError("embed_dim (BLIP-2's stage-1 heads) needs a Q-Former bridge with text_input=True")
        if self.bridge_reads_prompt and not (isinstance(self.bridge, QFormerConfig) and self.bridge.text_input
                                             and self.bridge.vocab_size == self.lm.vocab_size):  # fmt: skip
            raise ValueError("bridge_reads_prompt needs a Q-Former bridge with text_input=True and the LM's vocabulary "
                             f"size ({self.lm.vocab_size}): it reads the prompt in the VLM's tokens")  # fmt: skip
        if self.image_newline and not (isinstance(self.bridge, LinearBridgeConfig | MLPBridgeConfig)
                                       and not self.keep_class_token):  # fmt: skip
            raise ValueError("image_newline (LLaVA-NeXT's row separator) needs a per-token bridge (linear or MLP) "
                             "over the patch tokens alone (keep_class_token=False)")  # fmt: skip

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The hidden states the bridge reads, as a tuple (empty for the encoder's output)."""
        layer = self.feature_layer
        return () if layer is None else (layer,) if isinstance(layer, int) else layer

    @property
    def vision_feature_dim(self) -> int:
        """The width of the tokens the bridge reads: D_vis, times the number of concatenated hidden states."""
        return self.vision.dim * max(len(self.feature_layers), 1)


MAX_LOGIT_SCALE = 100.0  # the Q-Former heads' temperature floor (1 / 100), as CLIP's


class QFormerHeads(nn.Module):
    """BLIP-2's stage-1 heads on the Q-Former (Li et al., 2023, Sec. 3.2): ``image_proj`` / ``text_proj`` map the
    query and text outputs (D_q) into the contrastive space (E), ``logit_scale`` is the learnable log inverse
    temperature (BLIP-2 starts at 1 / 0.07), ``itm_head`` scores a bidirectional pass's query outputs as matched or
    not (2 logits). Image-grounded generation needs no head of its own: its logits are the Q-Former's word
    embeddings, tied."""

    def __init__(self, dim: int, embed_dim: int) -> None:
        super().__init__()
        self.image_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head = nn.Linear(dim, 2)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The temperature's floor (1 / 100, as CLIP's), kept on the parameter so its gradient never dies."""
        self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))


class VisionLanguageModel(PretrainedModel):
    config_class = VLMConfig
    # Loaded on the meta device like the LMs (every weight is in the state dict; a tower with non-persistent buffers
    # falls back to an ordinary build in ``load_vlkit_directory``), so a 7B VLM's weights exist once.
    meta_init = True

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.vision)
        self.bridge = build_bridge(config.bridge, config.vision_feature_dim, config.lm.dim)
        self.lm = DecoderLM(config.lm)
        self.qformer_heads = (
            QFormerHeads(config.bridge.dim, config.embed_dim)  # type: ignore[union-attr]
            if config.embed_dim is not None
            else None
        )
        # LLaVA-NeXT initialises its newline embedding as randn / sqrt(D_lm).
        self.image_newline = (
            nn.Parameter(torch.randn(config.lm.dim) / math.sqrt(config.lm.dim)) if config.image_newline else None
        )

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        # Kept on the LM, whose generate decodes stop strings with it.
        self.lm.tokenizer = value

    @property
    def generation_config(self) -> Any:
        """The decoding defaults (``vlkit.lm.GenerationConfig`` or None), kept on the LM whose generate reads them."""
        return self.lm.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.lm.generation_config = value

    def tokens_per_image(self) -> int:
        """M for one image at the configured size: how many placeholders a prompt holds per image."""
        rows, cols = self.config.vision.grid
        count = int(self.bridge.num_output_tokens(torch.tensor([[rows, cols]], device="cpu"))[0])
        # A kept class token passes a per-token bridge as one more output; learned queries (Q-Former, resampler)
        # give M whatever they read.
        per_token = isinstance(self.config.bridge, LinearBridgeConfig | MLPBridgeConfig)
        return count + int(self.config.keep_class_token and per_token) + (rows if self.config.image_newline else 0)

    def image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, 3, H, W) -> the encoder tokens the bridge reads (I, N, D_vis) and their grid (I, 2)."""
        features = self.encoder.forward_features(pixel_values.to(self._vision_dtype()), layer=self.config.feature_layer)
        tokens = features.tokens if self.config.keep_class_token else features.patch_tokens  # (I, N, D_vis)
        rows, cols = features.grid
        return tokens, torch.tensor([[rows, cols]], device=tokens.device).expand(tokens.shape[0], 2)

    def prompt_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``qformer_input_ids`` (I, T) and ``qformer_attention_mask`` (I, T) of one prompt text per image (the
        question, without the image placeholder): tokenized as the Q-Former's stage-1 text, right-padded, cut at the
        Q-Former's ``max_seq_len``."""
        if self.tokenizer is None:
            raise ValueError("prompt_ids needs the model's tokenizer")
        return qformer_prompt_ids(self.tokenizer, prompts, self.config.bridge.max_seq_len)  # type: ignore[union-attr]

    def embed_image(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """(I, 3, H, W) -> the bridge's LM-width tokens (I, M, D_lm), in the LM's dtype; with ``bridge_reads_prompt``
        each image's prompt ``qformer_input_ids`` (I, T) is read by the Q-Former too."""
        tokens, grid = self.image_tokens(pixel_values)
        prompt = {}
        if self.config.bridge_reads_prompt:
            if qformer_input_ids is None:
                raise ValueError("this model's Q-Former reads each image's prompt (bridge_reads_prompt): pass "
                                 "qformer_input_ids, one row per image (VisionLanguageModel.prompt_ids)")  # fmt: skip
            if qformer_input_ids.shape[0] != tokens.shape[0]:
                raise ValueError(f"qformer_input_ids has {qformer_input_ids.shape[0]} rows for "
                                 f"{tokens.shape[0]} images: one prompt per image")  # fmt: skip
            prompt = {"text_ids": qformer_input_ids, "text_mask": qformer_attention_mask}
        elif qformer_input_ids is not None:
            raise ValueError("qformer_input_ids given, but this model's bridge does not read the prompt "
                             "(VLMConfig.bridge_reads_prompt=False)")  # fmt: skip
        out = self.bridge(tokens, grid, **prompt)
        if self.image_newline is not None:
            out = _with_newlines(out, self.image_newline)
        return BridgeOutput(out.tokens.to(self.lm.token_embed.weight.dtype), out.grid, out.mask)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D_lm) with each image's placeholders replaced by its bridge tokens."""
        placeholders = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.lm.embed(input_ids.masked_fill(placeholders, 0))  # (B, T, D_lm)
        if pixel_values is None:
            if bool(placeholders.any()):
                rows = placeholders.any(dim=1).nonzero().flatten().tolist()
                raise ValueError(f"samples {rows} hold image placeholders but no pixel_values were given")
            return embeds
        image = self.embed_image(pixel_values, qformer_input_ids, qformer_attention_mask)
        real = image.tokens if image.mask is None else image.tokens[image.mask]  # (I*M or sum M, D_lm)
        per_image = (
            torch.full((image.tokens.shape[0],), image.tokens.shape[1]) if image.mask is None else image.mask.sum(1)
        ).tolist()
        _check_placeholders(placeholders.sum(dim=1).tolist(), per_image)
        return embeds.masked_scatter(placeholders[..., None], real.reshape(-1, real.shape[-1]))

    def attention_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) the LM's bidirectional blocks: with ``image_attention="bidirectional"`` each image's placeholders
        are one block (the row's k-th image: its placeholders k*M .. k*M + M - 1, so two adjacent images stay two
        blocks), every other token -1; None for a causal LM."""
        if self.config.image_attention == "causal":
            return None
        placeholders = input_ids == self.config.image_token_id
        image = torch.div(placeholders.long().cumsum(1) - 1, self.tokens_per_image(), rounding_mode="floor")
        return torch.where(placeholders, image, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        return_logits: bool = True,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """Logits (B, T, V); with ``labels`` (B, T, -100 where nothing is trained on) the next-token loss, weighted
        by ``loss_weights`` (B, T) if given; ``return_logits=False`` computes the loss alone (``DecoderLM.forward``).
        ``qformer_input_ids`` / ``qformer_attention_mask`` (I, T): each image's prompt, for ``bridge_reads_prompt``."""
        embeds = self.embed_inputs(input_ids, pixel_values, qformer_input_ids, qformer_attention_mask)
        return self.lm(attention_mask=attention_mask, inputs_embeds=embeds, labels=labels, loss_weights=loss_weights,
                       return_logits=return_logits, attention_blocks=self.attention_blocks(input_ids))  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        streamer: Callable[[torch.Tensor], Any] | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Prompt + new ids (B, T + steps) for left-padded prompts; decoding starts from ``generation_config`` (greedy,
        32 new tokens without one) and ``max_new_tokens`` / ``options`` replace its fields (``DecoderLM.generate``).
        ``qformer_input_ids`` / ``qformer_attention_mask`` (I, T): each image's prompt, for ``bridge_reads_prompt``.
        A Q-Former model (BLIP-2) given no ``input_ids`` captions each image: its queries' tokens, then the language
        model's begin-of-text token; and without an ``attention_mask`` every token is real (transformers' BLIP-2 builds
        both so). Other models, as in transformers, need ``input_ids`` (their prompts come from a chat template)."""
        blip2 = isinstance(self.config.bridge, QFormerConfig)
        if input_ids is None:
            if not blip2 or pixel_values is None or attention_mask is not None:
                raise ValueError("generate needs input_ids (images alone are captioned by Q-Former models only, "
                                 "without an attention_mask)")  # fmt: skip
            bos = [] if self.config.lm.bos_token_id is None else [self.config.lm.bos_token_id]
            start = [self.config.image_token_id] * self.tokens_per_image() + bos
            device = self.lm.token_embed.weight.device
            input_ids = torch.tensor([start], device=device).repeat(pixel_values.shape[0], 1)
        if blip2 and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, pixel_values, qformer_input_ids, qformer_attention_mask)
        return self.lm.generate(input_ids, attention_mask, embeds, max_new_tokens, streamer=streamer, decode=decode,
                                attention_blocks=self.attention_blocks(input_ids), **options)  # fmt: skip

    def _vision_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype


def qformer_prompt_ids(tokenizer: Any, prompts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt text per image -> ``qformer_input_ids`` and ``qformer_attention_mask`` (I, T) long: each text
    tokenized as the Q-Former's stage-1 text, cut at ``max_len`` tokens, right-padded."""
    rows = [torch.tensor(tokenizer.encode(text)[:max_len], dtype=torch.long) for text in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
    mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_value=0)
    return ids, mask


def _with_newlines(out: BridgeOutput, newline: torch.Tensor) -> BridgeOutput:
    """A per-token bridge's (I, R*C, D) output with ``newline`` after each of its R rows: (I, R*(C+1), D) on an
    R x (C+1) grid (the images of one call share their grid, so no output mask exists)."""
    assert out.grid is not None and out.mask is None
    images, _, dim = out.tokens.shape
    rows, cols = (int(v) for v in out.grid[0])
    grid = out.tokens.view(images, rows, cols, dim)
    separators = newline.to(grid.dtype).expand(images, rows, 1, dim)
    tokens = torch.cat([grid, separators], dim=2).reshape(images, rows * (cols + 1), dim)
    return BridgeOutput(tokens, out.grid + torch.tensor([0, 1], device=out.grid.device), None)


def _check_placeholders(counts: list[int], per_image: list[int]) -> None:
    """Each sample's placeholders must be exactly its images' tokens, images taken in order."""
    image = 0
    for sample, count in enumerate(counts):
        taken = 0
        while taken < count and image < len(per_image):
            taken += per_image[image]
            image += 1
        if taken != count:
            tokens = per_image[0] if per_image else 0
            raise ValueError(f"sample {sample}: {count} image placeholder tokens do not match its images' "
                             f"{taken} bridge tokens ({tokens} per image): expand each <image> to as many")  # fmt: skip
    if image != len(per_image):
        raise ValueError(f"{len(per_image)} images were given but the placeholders of the batch take only {image}")


# --- presets (the LM presets live in vlkit.lm.presets, the towers' in vlkit.models.presets)


@register_preset
def llava_1_5_7b() -> VLMConfig:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px, its second-to-last layer without the class
    token, ``mlp2x_gelu``, Vicuna-7B with the vocabulary grown by the <image> token and padding (32064)."""
    lm = replace(get_config("vicuna_7b"), vocab_size=32064)
    vision = get_config("clip_vit_large_patch14_336").vision
    return VLMConfig(vision=vision, bridge=MLPBridgeConfig(act="gelu"), lm=lm, feature_layer=-2, image_token_id=32000,
                     chat_template="vicuna_v1")  # fmt: skip


@register_preset
def shapes_llava() -> VLMConfig:
    """The ShapesWorld VLM: ``shapes_siglip``'s image tower (64 patch tokens), an MLP bridge and a small Llama-style
    LM; the recipe sizes the vocabulary and the image token to its tokenizer."""
    lm = LMConfig(vocab_size=1024, max_seq_len=192, dim=256, depth=4, num_heads=4, mlp_dim=768, norm_eps=1e-5,
                  bos_token_id=None, eos_token_ids=(2,), pad_token_id=0)  # fmt: skip
    return VLMConfig(vision=get_config("shapes_siglip").vision, bridge=MLPBridgeConfig(act="gelu"), lm=lm,
                     image_token_id=3, chat_template="shapes")  # fmt: skip


@register_preset
def shapes_blip2() -> VLMConfig:
    """BLIP-2 at ShapesWorld scale: ``shapes_siglip``'s image tower read at its output (final norm included, as
    BLIP-2 reads ``last_hidden_state``), a 4-layer Q-Former as wide as the tower (half the LM's width, as BLIP-2's
    is narrower than its tower and LM) with 16 queries, cross-attention every second layer as BLIP-2's, text input
    and the stage-1 heads (contrastive space 64), and ``shapes_llava``'s LM. The Q-Former's text side reads the
    VLM's tokenizer: its vocabulary is sized as the LM's."""
    base = shapes_llava()
    qformer = QFormerConfig(num_queries=16, dim=128, depth=4, num_heads=4, mlp_dim=512, cross_attention_frequency=2,
                            text_input=True, vocab_size=base.lm.vocab_size, max_seq_len=64)  # fmt: skip
    return base.replace(bridge=qformer, feature_layer=None, embed_dim=64)


@register_preset
def shapes_honeybee_c() -> VLMConfig:
    """Honeybee's C-Abstractor (Cha et al., 2023) in ``shapes_llava``: 16 output tokens (4 x 4, a quarter of the
    tower's 8 x 8), RegNet blocks as wide as the tower (3 before and 3 after the pooling, the paper's depth) and a
    learned position table on the tower's grid."""
    base = shapes_llava()
    vision = base.vision
    assert isinstance(vision, ViTConfig)
    bridge = CAbstractorConfig(num_queries=16, dim=vision.dim, depth=3, mlp_depth=2, pos_embed_grid=vision.grid)
    return base.replace(bridge=bridge)


@register_preset
def shapes_honeybee_d() -> VLMConfig:
    """Honeybee's D-Abstractor in ``shapes_llava``: 16 queries (4 x 4 reference points, initialised from the
    adaptively pooled features), two deformable-attention decoder layers as wide as the tower, 4 sampling points per
    head, and a learned position table on the tower's grid."""
    base = shapes_llava()
    vision = base.vision
    assert isinstance(vision, ViTConfig)
    bridge = DAbstractorConfig(num_queries=16, dim=vision.dim, depth=2, num_heads=4, num_points=4,
                               pos_embed_grid=vision.grid)  # fmt: skip
    return base.replace(bridge=bridge)


@register_preset
def test_llava() -> VLMConfig:
    vision = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, act="quick_gelu",
                       final_norm="pooled", pool="cls")  # fmt: skip
    return VLMConfig(vision=vision, bridge=MLPBridgeConfig(act="gelu"), lm=get_config("test_llama_lm"),
                     feature_layer=-2, image_token_id=127, chat_template="vicuna_v1")  # fmt: skip


@register_preset
def llava_siglip_qwen2_0_5b() -> VLMConfig:
    """LLaVA-OneVision-0.5B's components in the plain LLaVA layout (llava-hf/llava-onevision-qwen2-0.5b-ov-hf without
    its AnyRes tiling): SigLIP so400m/14 at 384 px cut to its first 26 blocks (the last one is never read) and without
    the MAP head, every one of its 27 x 27 = 729 patch tokens (strategy "full"; SigLIP has no class token) from the
    last kept block, ``mlp2x_gelu``, Qwen2-0.5B with the vocabulary grown to 152000 around <image> (151646)."""
    vision = get_config("siglip_so400m_patch14_384").vision.replace(depth=26, pool="none")
    lm = replace(get_config("qwen2_0_5b"), vocab_size=152000)
    return VLMConfig(vision=vision, bridge=MLPBridgeConfig(act="gelu"), lm=lm, feature_layer=-1,
                     image_token_id=151646, chat_template="chatml")  # fmt: skip


@register_preset
def blip2_opt_2_7b() -> VLMConfig:
    """BLIP-2 OPT-2.7b (Salesforce/blip2-opt-2.7b): EVA's ViT-g/14 at 224 px (39 pre-norm blocks of width 1408, class
    token and learned positions, read at ``post_layernorm`` with the class token), the BERT-base Q-Former with 32
    queries cross-attending every second layer and its language projection, and OPT-2.7B with the vocabulary grown to
    50304 around <image> (50265) and BLIP-2's end of text, the newline (50118)."""
    vision = ViTConfig(image_size=224, patch_size=14, dim=1408, depth=39, num_heads=16, mlp_dim=6144, act="gelu",
                       norm_eps=1e-6, class_token=True, pre_norm=False, final_norm="tokens", pool="cls")  # fmt: skip
    lm = replace(get_config("opt_2_7b"), vocab_size=50304, eos_token_ids=(50118,))
    return VLMConfig(vision=vision, bridge=QFormerConfig(num_queries=32), lm=lm, feature_layer=None,
                     keep_class_token=True, image_token_id=50265, chat_template="plain")  # fmt: skip

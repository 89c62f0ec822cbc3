"""Hugging Face ``LlavaForConditionalGeneration`` (Liu et al., 2023, "Visual Instruction Tuning"; LLaVA-1.5) <->
vlkit ``VisionLanguageModel``.

    pixel_values (I, 3, H, W) --vision_tower (CLIP or SigLIP), hidden_states[vision_feature_layer]--> (I, N, D_vis)
        --"default": drop the class token | "full": keep every token--> --multi_modal_projector (linear_1, act,
        linear_2)--> (I, M, D_lm) --masked scatter at image_token_index--> language_model (Llama or Qwen2) --> logits

Key map (the layout transformers 5 saves; ``vlkit`` <-> ``hf``):

- ``encoder.*`` <-> ``vision_tower.*``: the CLIP / SigLIP vision towers' own key maps (``convert.clip``,
  ``convert.siglip``), re-rooted. Both towers keep their final norm (CLIP's ``post_layernorm``) and SigLIP its MAP
  ``head`` (unless ``vision_use_head`` is false), although LLaVA reads an unnormed hidden state and never uses them.
- ``bridge.linear_{1,2}`` <-> ``multi_modal_projector.linear_{1,2}`` (``projector_hidden_act``,
  ``multimodal_projector_bias``).
- ``lm.*`` <-> ``language_model.model.*`` and ``language_model.lm_head`` (absent when tied): ``convert.llama``'s
  map.

Loading also accepts the other layouts transformers has used: the runtime / 4.5x one (``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model.*``, top-level ``lm_head``) and the older vision towers with
a ``vision_model.`` level (``vision_tower.vision_model.*``). A checkpoint is read as the LM converters read theirs:
the model is built on the meta device and each tensor read from safetensors when its turn comes, keeping the stored
dtype unless ``dtype`` is given. (vlkit's CLIP and SigLIP towers hold no buffers, so nothing is lost on the meta
device; ``_read`` checks that.)

Options read: ``vision_config.model_type`` (``clip_vision_model`` / ``siglip_vision_model``),
``vision_feature_layer`` (one int, or a list of layers concatenated along the features as transformers does),
``vision_feature_select_strategy``, ``projector_hidden_act``, ``multimodal_projector_bias``, ``image_token_index``
(or ``image_token_id``), ``tie_word_embeddings`` and ``text_config.model_type`` (``llama`` / ``qwen2``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vlkit.bridges import MLPBridgeConfig
from vlkit.convert import clip, llama, siglip
from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    activation_from_hf,
    check_channels,
    raise_if,
    rule,
    square_size,
    with_defaults,
)
from vlkit.convert.llama import WeightSource, fill_model
from vlkit.encoders import ViTConfig
from vlkit.models.vlm import VisionLanguageModel, VLMConfig

MODEL_TYPE = "llava"
ARCHITECTURES = ("LlavaForConditionalGeneration",)

# LlavaConfig's defaults (config.json files omit fields left at their default) and the vision tower it builds when
# the config names none (CLIP ViT-L/14 at 336 px).
DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2, "multimodal_projector_bias": True,
}  # fmt: skip
DEFAULT_VISION: dict[str, Any] = {
    "model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
    "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
}  # fmt: skip
_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# projector_hidden_act: transformers' ACT2FN names <-> MLPBridgeConfig.act.
_PROJECTOR_ACTS = {"silu": "silu", "swish": "silu"}
_PROJECTOR_ACTS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
                       "silu": "silu"}  # fmt: skip
_CHAT_TEMPLATES = {"llama": "vicuna_v1", "qwen2": "chatml"}
# Fixed architecture of each tower family as ViTConfig fields (SigLIP's ``pool`` is "map" or, without head, "none").
_CLIP_LAYOUT: dict[str, Any] = {"patch_bias": False, "class_token": True, "pre_norm": True, "final_norm": "pooled",
                                "pool": "cls"}  # fmt: skip
_SIGLIP_LAYOUT: dict[str, Any] = {"patch_bias": True, "class_token": False, "pre_norm": False, "final_norm": "tokens"}


# --- key layouts


def canonical_key(key: str) -> str:
    """Any LLaVA checkpoint key -> the layout transformers 5 saves (``vision_tower.*``, ``multi_modal_projector.*``,
    ``language_model.model.*``, ``language_model.lm_head.*``)."""
    if key.startswith("model."):
        key = key.removeprefix("model.")
        if key.startswith("language_model."):
            key = "language_model.model." + key.removeprefix("language_model.")
    elif key.startswith("lm_head."):
        key = "language_model." + key
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key.removeprefix("vision_tower.vision_model.")
    return key


class _CanonicalSource:
    """A ``WeightSource`` seen through ``canonical_key``: the same tensors under the saved layout's names."""

    def __init__(self, source: WeightSource, where: str) -> None:
        self.source = source
        self.names: dict[str, str] = {}
        stored = source.keys()
        for key in stored:
            name = canonical_key(key)
            if name in self.names:
                raise ConversionError(f"{where}: {self.names[name]} and {key} are the same weight in two layouts")
            self.names[name] = key

    def keys(self) -> set[str]:
        return set(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self.names[key])

    def dtype(self, key: str) -> torch.dtype | None:
        return self.source.dtype(self.names[key])

    def read(self, key: str) -> torch.Tensor:
        return self.source.read(self.names[key])


def _rooted(rules: list[Rule], vlkit: tuple[str, str], hf: tuple[str, str]) -> list[Rule]:
    """``rules`` with the vlkit and foreign key prefixes replaced (``(old, new)`` each)."""

    def move(key: str, prefix: tuple[str, str]) -> str:
        old, new = prefix
        if not key.startswith(old):
            raise ConversionError(f"converter bug: {key} does not start with {old}")
        return new + key.removeprefix(old)

    return [Rule(tuple(move(k, vlkit) for k in r.vlkit), tuple(move(k, hf) for k in r.hf), r.hf_shape) for r in rules]


def rules(config: VLMConfig) -> list[Rule]:
    """The full key map of a LLaVA model (vlkit keys <-> the saved layout)."""
    vision = config.vision
    assert isinstance(vision, ViTConfig)
    roots = ("image_encoder.", "encoder."), ("vision_model.", "vision_tower.")
    if vision.class_token:
        tower = _rooted(clip._vision_rules(vision), *roots)
    else:
        tower = _rooted(siglip._vision_rules(vision), *roots)
        if vision.pool != "map":  # vision_use_head=false: no MAP head
            tower = [r for r in tower if not r.vlkit[0].startswith("encoder.head.")]
    bridge = [
        rule(f"bridge.linear_{i}.{part}", f"multi_modal_projector.linear_{i}.{part}")
        for i in (1, 2)
        for part in (("weight", "bias") if config.bridge.bias else ("weight",))  # type: ignore[attr-defined]
    ]
    # llama's map under language_model.model; its top-level lm_head is language_model.lm_head in the saved layout.
    lm_rules = llama.rules(config.lm, prefix="language_model.model")
    text = [Rule(tuple(f"lm.{k}" for k in r.vlkit), tuple(_saved_head(k) for k in r.hf), r.hf_shape) for r in lm_rules]
    return [*tower, *bridge, *text]


def _saved_head(key: str) -> str:
    return f"language_model.{key}" if key.startswith("lm_head.") else key


def _fused_sizes(config: VLMConfig) -> dict[str, list[int]]:
    return {f"lm.{key}": sizes for key, sizes in llama.fused_sizes(config.lm).items()}


# --- config


def _feature_layer(value: Any, where: str) -> int | tuple[int, ...]:
    """One int, or a list of layers (concatenated along the features); a list of one is that layer."""
    if isinstance(value, list | tuple):
        if not value or len(set(value)) != len(value):
            raise ConversionError(f"{where}: vision_feature_layer={list(value)} needs distinct layers, at least one")
        return int(value[0]) if len(value) == 1 else tuple(int(layer) for layer in value)
    return int(value)


def config_from_hf(hf: dict[str, Any], where: str) -> VLMConfig:
    """A LLaVA ``config.json`` dict -> ``VLMConfig`` (every option the converter reads is checked here)."""
    top = with_defaults(hf, DEFAULTS)
    raw_vision = hf.get("vision_config") or DEFAULT_VISION
    tower = _TOWERS.get(str(raw_vision.get("model_type", "clip_vision_model")))
    if tower is None:
        raise ConversionError(f"{where}: vision_config.model_type {raw_vision.get('model_type')!r} is not supported; "
                              f"supported: {sorted(_TOWERS)}")  # fmt: skip
    vision = with_defaults(raw_vision, clip.VISION_DEFAULTS if tower == "clip" else siglip.VISION_DEFAULTS)
    check_channels(vision, where)
    size = square_size(vision["image_size"], "image_size", where)
    patch = square_size(vision["patch_size"], "patch_size", where)
    if tower == "clip":
        vit = clip.vision_tower(vision, where, size, patch, **_CLIP_LAYOUT)
    else:
        vit = siglip.vision_tower(vision, where, size, patch, pool="map" if vision["vision_use_head"] else "none")
    layer = _feature_layer(top["vision_feature_layer"], where)
    for index in (layer,) if isinstance(layer, int) else layer:
        try:
            vit.hidden_state(index, f"vision_feature_layer={index}")
        except ValueError as error:
            raise ConversionError(f"{where}: {error}") from None
    strategy = top["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy={strategy!r}; known: 'default', 'full'")
    if strategy == "default" and not vit.class_token:
        raise ConversionError(
            f"{where}: vision_feature_select_strategy='default' with a SigLIP tower (no class token): transformers "
            "then drops the first patch token, which vlkit does not express; SigLIP LLaVA checkpoints use 'full'"
        )
    act = str(top["projector_hidden_act"])
    bridge = MLPBridgeConfig(act=_PROJECTOR_ACTS.get(act) or activation_from_hf(act, f"{where} projector_hidden_act"),
                             bias=bool(top["multimodal_projector_bias"]))  # type: ignore[arg-type]  # fmt: skip
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if text.get("pad_token_id") is None and hf.get("pad_token_id") is not None:  # llava-1.5-hf keeps it at the top
        text["pad_token_id"] = hf["pad_token_id"]
    if text["model_type"] not in llama.MODEL_TYPES:
        raise ConversionError(f"{where}: text_config.model_type {text['model_type']!r} is not supported; "
                              f"supported: {list(llama.MODEL_TYPES)}")  # fmt: skip
    # LlavaConfig ties the head when either level asks for it (its __post_init__ copies the text config's flag up).
    tied = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    lm = llama.config_from_hf({**text, "tie_word_embeddings": tied}, f"{where} text_config")
    image_token = hf.get("image_token_index", hf.get("image_token_id", DEFAULTS["image_token_index"]))
    if not 0 <= int(image_token) < lm.vocab_size:
        raise ConversionError(f"{where}: image_token_index {image_token} is outside the vocabulary ({lm.vocab_size})")
    return VLMConfig(
        vision=vit, bridge=bridge, lm=lm, feature_layer=layer, keep_class_token=strategy == "full" and vit.class_token,
        image_token_id=int(image_token), chat_template=_CHAT_TEMPLATES[text["model_type"]],
    )  # fmt: skip


def strategy(config: VLMConfig) -> str:
    """LLaVA's ``vision_feature_select_strategy`` of a vlkit config: "default" drops a class token, "full" keeps every
    token (a tower without class token has nothing to drop)."""
    assert isinstance(config.vision, ViTConfig)
    return "default" if config.vision.class_token and not config.keep_class_token else "full"


# --- loading


def _read(config: VLMConfig, source: Any, where: str, dtype: torch.dtype | None) -> VisionLanguageModel:
    key_map = rules(config)
    if config.lm.tie_embeddings and llama.head_stored_apart(
        source, key_map, "lm.token_embed.weight", "language_model.lm_head.weight"
    ):
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, tie_embeddings=False))
        key_map = rules(config)
    wanted = {key for r in key_map for key in r.hf}
    ignored = {"language_model.lm_head.weight"} if config.lm.tie_embeddings else set()
    for key in source.keys() - wanted:  # position ids that older vision towers saved as a buffer: checked and dropped
        if key.endswith("embeddings.position_ids"):
            ids = source.read(key).reshape(-1).long()
            if not torch.equal(ids, torch.arange(ids.numel())):
                raise ConversionError(
                    f"{where}: {key} is not 0..{ids.numel() - 1}; custom position ids are unsupported"
                )
            ignored.add(key)
    return read_vlm(config, key_map, source, where, dtype, ignored, _fused_sizes(config))


def read_vlm(
    config: VLMConfig,
    key_map: list[Rule],
    source: WeightSource,
    where: str,
    dtype: torch.dtype | None,
    ignored: set[str],
    sizes: dict[str, list[int]],
) -> VisionLanguageModel:
    """Build ``VisionLanguageModel(config)`` on the meta device and fill it through ``key_map`` (``fill_model``)."""
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    return fill_model(model, key_map, source, where, dtype, ignored, sizes)


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    for name in hf.get("architectures") or []:
        if name not in ARCHITECTURES:
            raise ConversionError(f"{where}: architecture {name} is not supported for llava; supported: "
                                  f"{list(ARCHITECTURES)}")  # fmt: skip


def load_directory(directory: Path, hf: dict[str, Any], dtype: torch.dtype | None = None) -> VisionLanguageModel:
    where = str(directory)
    _check_architecture(hf, where)
    config = config_from_hf(hf, where)
    return _read(config, _CanonicalSource(WeightSource.from_directory(directory), where), where, dtype)


def load(checkpoint: HFCheckpoint, source: str) -> VisionLanguageModel:
    _check_architecture(checkpoint.config, source)
    config = config_from_hf(checkpoint.config, source)
    return _read(config, _CanonicalSource(WeightSource(checkpoint.weights), source), source, None)


# --- export


def _problems(config: VLMConfig) -> list[str]:
    """Every option of a vlkit VLM that ``LlavaForConditionalGeneration`` cannot express."""
    vision, bridge = config.vision, config.bridge
    if not isinstance(vision, ViTConfig):
        return [f"the image tower is {type(vision).__name__}; LLaVA needs a CLIP or SigLIP ViT"]
    problems = clip.vit_tower_problems(vision)
    layout = _CLIP_LAYOUT if vision.class_token else {**_SIGLIP_LAYOUT, "pool": ("map", "none")}
    family = "CLIP" if vision.class_token else "SigLIP"
    for key, wanted in layout.items():
        value = getattr(vision, key)
        if value not in (wanted if isinstance(wanted, tuple) else (wanted,)):
            problems.append(f"vision.{key}={value!r} ({family} towers have {wanted!r})")
    if config.feature_layer is None:
        problems.append("feature_layer=None (the tower's normed output; LLaVA reads hidden states)")
    if not isinstance(bridge, MLPBridgeConfig):
        problems.append(f"bridge {type(bridge).__name__}: LLaVA's projector is the two-layer MLP bridge")
    else:
        if bridge.mlp_dim not in (None, config.lm.dim):
            problems.append(
                f"bridge.mlp_dim={bridge.mlp_dim} (LLaVA's projector is as wide as the LM, {config.lm.dim})"
            )
        if bridge.act not in _PROJECTOR_ACTS_OUT:
            problems.append(f"bridge.act={bridge.act!r} has no projector_hidden_act")
    if not llama.matches(config.lm):
        problems.append("the language model is neither a Llama nor a Qwen2 layout")
    if config.image_attention != "causal":
        problems.append(f"image_attention={config.image_attention!r} (LLaVA's language model is causal throughout)")
    if config.image_newline:
        problems.append("image_newline=True (LLaVA-NeXT's row separator; LlavaForConditionalGeneration has none)")
    return problems


def matches(config: Any) -> bool:
    return isinstance(config, VLMConfig) and not _problems(config)


def export(model: VisionLanguageModel) -> HFCheckpoint:
    config = model.config
    raise_if(_problems(config), "LLaVA export")
    vision = config.vision
    assert isinstance(vision, ViTConfig) and isinstance(config.bridge, MLPBridgeConfig)
    where = "LLaVA export"
    text = llama.export(model.lm).config
    text.pop("architectures")
    vision_fields = clip.vit_tower_fields(vision, where)
    vision_config = (
        {"model_type": "clip_vision_model", **vision_fields}
        if vision.class_token
        else {"model_type": "siglip_vision_model", **vision_fields, "vision_use_head": vision.pool == "map"}
    )
    hf = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "vision_config": vision_config,
        "text_config": text,
        "image_token_index": config.image_token_id,
        "image_seq_length": model.tokens_per_image(),
        "projector_hidden_act": _PROJECTOR_ACTS_OUT[config.bridge.act],
        "multimodal_projector_bias": config.bridge.bias,
        "vision_feature_layer": list(layer) if isinstance(layer := config.feature_layer, tuple) else layer,
        "vision_feature_select_strategy": strategy(config),
        "tie_word_embeddings": config.lm.tie_embeddings,
    }
    return HFCheckpoint(hf, _export_tensors(model, rules(config), _fused_sizes(config)))


def _export_tensors(
    model: VisionLanguageModel, key_map: list[Rule], sizes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """The foreign weights as views of the parameters (the shard writer copies them one shard at a time); a fused
    tensor is split by ``sizes`` (GQA's q, k, v) or into equal parts, and reshaped to its ``hf_shape``."""
    source = model.state_dict()
    leftover = set(source) - {key for r in key_map for key in r.vlkit}
    if leftover:
        raise ConversionError(f"vlkit weights with no place in LLaVA: {sorted(leftover)[:8]}")
    out: dict[str, torch.Tensor] = {}
    for r in key_map:
        joined = source[r.vlkit[0]] if len(r.vlkit) == 1 else torch.cat([source[k] for k in r.vlkit], dim=0)
        split = sizes.get(r.vlkit[0])
        parts = [joined] if len(r.hf) == 1 else joined.split(split) if split else joined.chunk(len(r.hf), dim=0)
        for key, part in zip(r.hf, parts, strict=True):
            out[key] = (part.reshape(r.hf_shape) if r.hf_shape is not None else part).detach().cpu()
    return out

"""Hugging Face ``ConvNextForImageClassification`` / ``ConvNextModel`` (Liu et al., 2022) <-> vlkit ``ImageClassifier``.

Both compute: patchify stem + channels-first LayerNorm, stages of (downsampling LayerNorm + 2x2 conv, then blocks of
depthwise 7x7 conv, LayerNorm, pointwise MLP, layer scale), global average pool, LayerNorm, linear classifier.
``ConvNextModel``'s output is the pooled, normed vector (``pooler_output``), which vlkit returns as an
``ImageClassifier`` with ``num_classes=0``. transformers fixes the eps of every LayerNorm but the last at 1e-6
(``layer_norm_eps`` is the final norm's), which is vlkit's ``norm_eps`` / ``head_norm_eps`` split.
"""

from __future__ import annotations

from typing import Any

from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    check_channels,
    export_weights,
    linear,
    load_weights,
    raise_if,
    rule,
    square_size,
    with_defaults,
)
from vlkit.convert.vit import class_names, label_fields
from vlkit.encoders import ConvNeXtConfig
from vlkit.models import ImageClassifier, ImageClassifierConfig

MODEL_TYPE = "convnext"
ARCHITECTURES = ("ConvNextForImageClassification", "ConvNextModel")
DEFAULTS: dict[str, Any] = {
    "num_channels": 3, "patch_size": 4, "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3],
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "layer_scale_init_value": 1e-6, "drop_path_rate": 0.0,
    "image_size": 224,
}  # fmt: skip
PREFIX = "convnext."
BLOCK_NORM_EPS = 1e-6  # hard-coded in transformers' ConvNextEmbeddings, ConvNextStage and ConvNextLayer


def _rules(config: ImageClassifierConfig, prefix: str) -> list[Rule]:
    vision = config.vision
    assert isinstance(vision, ConvNeXtConfig)
    v, h = "encoder", prefix
    rules = [
        *linear(f"{v}.stem.0", f"{h}embeddings.patch_embeddings"),
        *linear(f"{v}.stem.1", f"{h}embeddings.layernorm"),
    ]
    for i, depth in enumerate(vision.depths):
        stage, hf_stage = f"{v}.stages.{i}", f"{h}encoder.stages.{i}"
        if i > 0:
            rules += linear(f"{stage}.downsample.0", f"{hf_stage}.downsampling_layer.0")
            rules += linear(f"{stage}.downsample.1", f"{hf_stage}.downsampling_layer.1")
        for j in range(depth):
            block, layer = f"{stage}.blocks.{j}", f"{hf_stage}.layers.{j}"
            rules += linear(f"{block}.dwconv", f"{layer}.dwconv")
            rules += linear(f"{block}.norm", f"{layer}.layernorm")
            rules += linear(f"{block}.fc1", f"{layer}.pwconv1")
            rules += linear(f"{block}.fc2", f"{layer}.pwconv2")
            if vision.layer_scale:
                rules.append(rule(f"{block}.gamma", f"{layer}.layer_scale_parameter"))
    rules += linear(f"{v}.norm", f"{h}layernorm")
    if config.num_classes:
        rules += linear("head", "classifier")
    return rules


def load(checkpoint: HFCheckpoint, source: str) -> ImageClassifier:
    raw = with_defaults(checkpoint.config, DEFAULTS)
    check_channels(raw, source)
    if raw["hidden_act"] != "gelu":
        raise ConversionError(f"{source}: hidden_act={raw['hidden_act']!r}; vlkit's ConvNeXt block uses exact GELU")
    depths, dims = tuple(int(d) for d in raw["depths"]), tuple(int(d) for d in raw["hidden_sizes"])
    if "num_stages" in raw and int(raw["num_stages"]) != len(depths):
        raise ConversionError(f"{source}: num_stages={raw['num_stages']} but depths has {len(depths)} entries")
    layer_scale = float(raw["layer_scale_init_value"])
    vision = ConvNeXtConfig(
        image_size=square_size(raw["image_size"], "image_size", source),
        depths=depths,
        dims=dims,
        patch_size=square_size(raw["patch_size"], "patch_size", source),
        layer_scale=layer_scale if layer_scale > 0 else None,
        drop_path=float(raw["drop_path_rate"]),
        norm_eps=BLOCK_NORM_EPS,
        head_norm_eps=float(raw["layer_norm_eps"]),
    )
    weights = checkpoint.weights
    prefix = PREFIX if any(key.startswith(PREFIX) for key in weights) else ""
    num_classes = int(weights["classifier.weight"].shape[0]) if "classifier.weight" in weights else 0
    config = ImageClassifierConfig(vision, num_classes, class_names(raw, num_classes, source))
    model = ImageClassifier(config)
    load_weights(model, _rules(config, prefix), weights, source)
    return model


def matches(config: ImageClassifierConfig) -> bool:
    return isinstance(config.vision, ConvNeXtConfig)


def export(model: ImageClassifier) -> HFCheckpoint:
    config = model.config
    vision = config.vision
    assert isinstance(vision, ConvNeXtConfig)
    problems = []
    if vision.norm_eps != BLOCK_NORM_EPS:
        problems.append(f"norm_eps={vision.norm_eps} (transformers fixes the block norms' eps at {BLOCK_NORM_EPS})")
    if not isinstance(vision.image_size, int) and vision.image_size[0] != vision.image_size[1]:
        problems.append(f"image_size={vision.image_size} is not square")
    raise_if(problems, "ConvNeXt export")
    headless = not config.num_classes
    weights = export_weights(model, _rules(config, "" if headless else PREFIX))
    hf_config = {
        "architectures": ["ConvNextModel" if headless else "ConvNextForImageClassification"],
        "model_type": MODEL_TYPE,
        "num_channels": 3,
        "patch_size": vision.patch_size,
        "num_stages": len(vision.depths),
        "hidden_sizes": list(vision.dims),
        "depths": list(vision.depths),
        "hidden_act": "gelu",
        "layer_norm_eps": vision.head_norm_eps,
        "layer_scale_init_value": vision.layer_scale or 0.0,
        "drop_path_rate": vision.drop_path,
        "image_size": vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0],
        **label_fields(config),
    }
    return HFCheckpoint(hf_config, weights)

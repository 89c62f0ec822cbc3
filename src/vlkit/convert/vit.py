"""Hugging Face ``ViTForImageClassification`` / ``ViTModel`` (Dosovitskiy et al., 2021) <-> vlkit ``ImageClassifier``.

The classifier reads ``layernorm(tokens)[:, 0]`` (the class token after the final norm) and applies ``classifier``;
``ViTModel`` becomes an ``ImageClassifier`` with ``num_classes=0`` whose output is that same vector,
``last_hidden_state[:, 0]``. ``ViTModel``'s optional pooler (dense + tanh on the class token, the "pre-logits"
layer of the original in21k models) has no counterpart in vlkit: it is dropped with a warning naming its keys, so
the vlkit model's output is never silently something else than what it says. Exporting a headless classifier
writes a ``ViTModel`` without pooler: load it with ``ViTModel.from_pretrained(path, add_pooling_layer=False)``.

Checkpoints come in two key layouts: the one on the Hub (``encoder.layer.N.attention.attention.query``, which
transformers 5 still writes) and transformers 5's in-memory one (``layers.N.attention.q_proj``). Both are read;
export writes the Hub layout, which every transformers version loads.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    activation_from_hf,
    activation_to_hf,
    check_channels,
    export_weights,
    linear,
    load_weights,
    raise_if,
    rule,
    square_size,
    with_defaults,
)
from vlkit.encoders import ViTConfig
from vlkit.models import ImageClassifier, ImageClassifierConfig

MODEL_TYPE = "vit"
ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True,
}  # fmt: skip
PREFIX = "vit."

# transformers 5's module names -> the Hub layout (the reverse of its own conversion mapping for ViT).
_NATIVE_TO_HUB = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\.", r"encoder.layer.\1.\2."),
)


def _hub_layout(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in weights.items():
        name = key.removeprefix(prefix)
        for pattern, replacement in _NATIVE_TO_HUB:
            name, count = re.subn(pattern, replacement, name)
            if count:
                key = prefix + name
                break
        out[key] = value
    return out


def _rules(config: ImageClassifierConfig, prefix: str) -> list[Rule]:
    vision = config.vision
    assert isinstance(vision, ViTConfig)
    v, h = "encoder", prefix
    rules = [
        rule(f"{v}.class_token", f"{h}embeddings.cls_token"),
        *linear(f"{v}.patch_embed.proj", f"{h}embeddings.patch_embeddings.projection"),
        rule(f"{v}.pos_embed.weight", f"{h}embeddings.position_embeddings"),
    ]
    for i in range(vision.depth):
        b, layer = f"{v}.blocks.{i}", f"{h}encoder.layer.{i}"
        rules += linear(f"{b}.norm1", f"{layer}.layernorm_before")
        for part in ("weight", "bias") if vision.qkv_bias else ("weight",):
            names = ("query", "key", "value")
            rules.append(rule(f"{b}.attn.qkv.{part}", tuple(f"{layer}.attention.attention.{n}.{part}" for n in names)))
        rules += linear(f"{b}.attn.proj", f"{layer}.attention.output.dense")
        rules += linear(f"{b}.norm2", f"{layer}.layernorm_after")
        rules += linear(f"{b}.mlp.fc1", f"{layer}.intermediate.dense")
        rules += linear(f"{b}.mlp.fc2", f"{layer}.output.dense")
    rules += linear(f"{v}.norm", f"{h}layernorm")
    if config.num_classes:
        rules += linear("head", "classifier")
    return rules


def class_names(config: dict[str, Any], num_classes: int, source: str) -> tuple[str, ...]:
    """``id2label`` as a tuple ordered by class index; empty when the config has none."""
    id2label = config.get("id2label") or {}
    if not num_classes or not id2label:
        return ()
    try:
        labels = {int(key): str(value) for key, value in id2label.items()}
    except ValueError:
        raise ConversionError(f"{source}: id2label keys must be class indices, got {sorted(id2label)[:5]}") from None
    if sorted(labels) != list(range(num_classes)):
        raise ConversionError(f"{source}: id2label has {len(labels)} entries for a {num_classes}-way classifier")
    return tuple(labels[i] for i in range(num_classes))


def label_fields(config: ImageClassifierConfig) -> dict[str, Any]:
    if not config.num_classes:
        return {}
    names = config.class_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    return {"id2label": {str(i): name for i, name in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def load(checkpoint: HFCheckpoint, source: str) -> ImageClassifier:
    raw = with_defaults(checkpoint.config, DEFAULTS)
    check_channels(raw, source)
    prefix = PREFIX if any(key.startswith(PREFIX) for key in checkpoint.weights) else ""
    weights = _hub_layout(checkpoint.weights, prefix)
    pooler = sorted(key for key in weights if key.startswith(f"{prefix}pooler."))
    if pooler:
        warnings.warn(
            f"{source}: dropping ViTModel's pooler ({', '.join(pooler)}): vlkit has no dense+tanh pooler, so the "
            "imported model returns last_hidden_state[:, 0], not pooler_output",
            UserWarning,
            stacklevel=3,
        )
        weights = {key: value for key, value in weights.items() if key not in pooler}
    image_size = raw["image_size"]
    vision = ViTConfig(
        image_size=(int(image_size[0]), int(image_size[1]))
        if isinstance(image_size, list | tuple)
        else int(image_size),
        patch_size=square_size(raw["patch_size"], "patch_size", source),
        dim=int(raw["hidden_size"]),
        depth=int(raw["num_hidden_layers"]),
        num_heads=int(raw["num_attention_heads"]),
        mlp_dim=int(raw["intermediate_size"]),
        act=activation_from_hf(raw["hidden_act"], source),  # type: ignore[arg-type]
        norm_eps=float(raw["layer_norm_eps"]),
        qkv_bias=bool(raw["qkv_bias"]),
        patch_bias=True,
        class_token=True,
        pre_norm=False,
        final_norm="tokens",
        pool="cls",
    )
    num_classes = int(weights["classifier.weight"].shape[0]) if "classifier.weight" in weights else 0
    config = ImageClassifierConfig(vision, num_classes, class_names(raw, num_classes, source))
    model = ImageClassifier(config)
    load_weights(model, _rules(config, prefix), weights, source)
    return model


def matches(config: ImageClassifierConfig) -> bool:
    return isinstance(config.vision, ViTConfig)


def export(model: ImageClassifier) -> HFCheckpoint:
    config = model.config
    vision = config.vision
    assert isinstance(vision, ViTConfig)
    where = "ViT export"
    wanted = {
        "class_token": True, "pre_norm": False, "final_norm": "tokens", "pool": "cls", "patch_bias": True,
        "norm": "layernorm", "pos_embed": "learned", "layer_scale": None, "stem": "patch",
    }  # fmt: skip
    problems = [
        f"vision.{k}={getattr(vision, k)!r} (HF ViT has {v!r})" for k, v in wanted.items() if getattr(vision, k) != v
    ]
    if vision.act == "swiglu":
        problems.append("vision.act='swiglu'")
    raise_if(problems, where)
    headless = not config.num_classes
    weights = export_weights(model, _rules(config, "" if headless else PREFIX))
    image_size = vision.image_size if isinstance(vision.image_size, int) else list(vision.image_size)
    hf_config = {
        "architectures": ["ViTModel" if headless else "ViTForImageClassification"],
        "model_type": MODEL_TYPE,
        "hidden_size": vision.dim,
        "num_hidden_layers": vision.depth,
        "num_attention_heads": vision.num_heads,
        "intermediate_size": vision.mlp_dim,
        "hidden_act": activation_to_hf(vision.act, where),
        "layer_norm_eps": vision.norm_eps,
        "image_size": image_size,
        "patch_size": vision.patch_size,
        "num_channels": 3,
        "qkv_bias": vision.qkv_bias,
        **label_fields(config),
    }
    return HFCheckpoint(hf_config, weights)

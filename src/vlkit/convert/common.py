"""What every checkpoint converter shares: safetensors I/O, an explicit key map with shape checks, activations.

A converter describes the correspondence between a foreign checkpoint and a vlkit model as a list of ``Rule``s.
Each rule names the vlkit keys and the foreign keys that hold the same numbers: one to one (``norm.weight`` <->
``layernorm.weight``), fused (vlkit's one ``qkv`` Linear <-> separate q, k, v projections, concatenated on dim 0)
or split (SigLIP's fused ``in_proj_weight`` <-> vlkit's ``q`` and ``kv``). ``load_weights`` and ``export_weights``
run the same rules in opposite directions, and both refuse to finish while any key on either side is left over:
nothing is silently dropped or left at its random initialisation.

Weights are read only from safetensors files (``model.safetensors`` or a sharded ``model.safetensors.index.json``);
pickled ``pytorch_model.bin`` checkpoints are refused rather than unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlkit.files import atomic_write, load_safetensors, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Hugging Face activation names -> vlkit's. The tanh approximations differ from each other only in how the constant
# sqrt(2/pi) is written, i.e. by float rounding, so they all map to PyTorch's tanh GELU.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
_ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}


class ConversionError(ValueError):
    """A checkpoint that does not fit the format it claims, or a vlkit model a foreign format cannot express."""


@dataclass
class HFCheckpoint:
    """A Hugging Face model in memory: the ``config.json`` dict and the flat weight dict."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """``cat(vlkit tensors, dim 0)`` holds the same numbers as ``cat(foreign tensors, dim 0)``.

    ``hf_shape`` is set where the foreign tensor has another shape than vlkit's (CLIP's class embedding is (D,),
    vlkit's class token (1, 1, D)); the import then checks the foreign tensor has exactly that shape.
    """

    vlkit: tuple[str, ...]
    hf: tuple[str, ...]
    hf_shape: tuple[int, ...] | None = None


def rule(vlkit: str | tuple[str, ...], hf: str | tuple[str, ...], hf_shape: tuple[int, ...] | None = None) -> Rule:
    return Rule((vlkit,) if isinstance(vlkit, str) else vlkit, (hf,) if isinstance(hf, str) else hf, hf_shape)


def linear(vlkit: str, hf: str, bias: bool = True) -> list[Rule]:
    """A Linear, LayerNorm or convolution: ``.weight`` (and ``.bias``) under both prefixes."""
    rules = [rule(f"{vlkit}.weight", f"{hf}.weight")]
    return [*rules, rule(f"{vlkit}.bias", f"{hf}.bias")] if bias else rules


def clip_style_blocks(vlkit: str, hf: str, depth: int) -> list[Rule]:
    """vlkit ``TransformerBlock``s <-> the encoder layers CLIP and SigLIP share (q/k/v/out_proj, layer_norm1/2)."""
    rules: list[Rule] = []
    for i in range(depth):
        v, h = f"{vlkit}.{i}", f"{hf}.{i}"
        rules += linear(f"{v}.norm1", f"{h}.layer_norm1")
        for part in ("weight", "bias"):
            rules.append(rule(f"{v}.attn.qkv.{part}", tuple(f"{h}.self_attn.{p}_proj.{part}" for p in "qkv")))
        rules += linear(f"{v}.attn.proj", f"{h}.self_attn.out_proj")
        rules += linear(f"{v}.norm2", f"{h}.layer_norm2")
        rules += linear(f"{v}.mlp.fc1", f"{h}.mlp.fc1")
        rules += linear(f"{v}.mlp.fc2", f"{h}.mlp.fc2")
    return rules


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, rules: list[Rule], weights: dict[str, torch.Tensor], source: str) -> None:
    """Fill ``model`` from foreign ``weights`` through ``rules``; any missing, extra or misshapen key is an error."""
    expected = model.state_dict()
    remaining = dict(weights)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    problems: list[str] = []
    for r in rules:
        absent = [key for key in r.hf if key not in remaining]
        if absent:
            missing += absent
            continue
        tensors = [remaining.pop(key) for key in r.hf]
        unknown = [key for key in r.vlkit if key not in expected]
        if unknown:
            raise ConversionError(f"converter bug: the key map names vlkit keys the model lacks: {unknown}")
        targets = [tuple(expected[key].shape) for key in r.vlkit]
        if len(tensors) == 1 and len(targets) == 1:
            tensor, target = tensors[0], targets[0]
            wanted = r.hf_shape if r.hf_shape is not None else target
            if tuple(tensor.shape) != tuple(wanted):
                problems.append(f"{r.hf[0]} has shape {tuple(tensor.shape)}, expected {tuple(wanted)}")
                continue
            state[r.vlkit[0]] = tensor.reshape(target)
            continue
        shapes = [tuple(t.shape) for t in tensors]
        if len({s[1:] for s in shapes + targets}) != 1 or sum(s[0] for s in shapes) != sum(s[0] for s in targets):
            problems.append(f"{' + '.join(r.hf)} have shapes {shapes}; {' + '.join(r.vlkit)} need {targets}")
            continue
        joined = torch.cat(tensors, dim=0)
        for key, part in zip(r.vlkit, joined.split([s[0] for s in targets]), strict=True):
            state[key] = part
    if missing:
        problems.insert(0, f"missing keys: {_short(missing)}")
    if remaining:
        problems.append(f"unexpected keys (no place for them in the vlkit model): {_short(remaining)}")
    uncovered = set(expected) - set(state) - {key for r in rules for key in r.vlkit}
    if uncovered:
        problems.append(f"converter bug: vlkit keys no rule fills: {_short(uncovered)}")
    if problems:
        raise ConversionError(f"{source}: checkpoint does not match its config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def export_weights(model: nn.Module, rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The foreign weight dict of ``model``; every vlkit key must be used by exactly one rule."""
    source = model.state_dict()
    used = [key for r in rules for key in r.vlkit]
    leftover = set(source) - set(used)
    if leftover:
        raise ConversionError(f"vlkit weights with no place in the target format: {_short(leftover)}")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        joined = torch.cat([source[key] for key in r.vlkit], dim=0) if len(r.vlkit) > 1 else source[r.vlkit[0]]
        parts = [joined] if len(r.hf) == 1 else list(joined.chunk(len(r.hf), dim=0))
        for key, part in zip(r.hf, parts, strict=True):
            part = part.reshape(r.hf_shape) if r.hf_shape is not None else part
            # A clone per tensor: safetensors refuses tensors that share storage (the chunks of one qkv matrix).
            out[key] = part.detach().to("cpu").contiguous().clone()
    return out


def pop_position_ids(weights: dict[str, torch.Tensor], key: str, length: int, source: str) -> None:
    """Drop a ``position_ids`` buffer older checkpoints saved, after checking it holds the plain 0..length-1."""
    if key not in weights:
        return
    ids = weights.pop(key)
    if ids.numel() != length or not torch.equal(ids.reshape(-1).long(), torch.arange(length)):
        raise ConversionError(f"{source}: {key} is not 0..{length - 1}; custom position ids are not supported")


def activation_from_hf(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConversionError(f"{where}: activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def activation_to_hf(name: str, where: str) -> str:
    if name not in _ACTIVATIONS_OUT:
        raise ConversionError(f"{where}: vlkit activation {name!r} has no Hugging Face equivalent here")
    return _ACTIVATIONS_OUT[name]


def square_size(value: Any, name: str, where: str) -> int:
    """An int from a size that may be written as ``224`` or ``[224, 224]``; non-square sizes are an error."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{where}: {name}={value} is not square, which vlkit's layout cannot express")
        value = value[0]
    return int(value)


def with_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The config with Hugging Face's class defaults filled in: saved configs omit fields left at their default."""
    return {**defaults, **{key: value for key, value in config.items() if value is not None}}


def check_channels(config: dict[str, Any], where: str) -> None:
    if int(config.get("num_channels", 3)) != 3:
        raise ConversionError(f"{where}: num_channels={config['num_channels']}; vlkit encoders take RGB (3)")


def raise_if(problems: list[str], where: str) -> None:
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))


def logit_scale_limit(weights: dict[str, torch.Tensor], key: str, default: float) -> float:
    """vlkit clamps exp(logit_scale) at ``max_logit_scale``; Hugging Face does not. A checkpoint whose trained scale
    lies above the default limit (SigLIP's is about 117) gets the limit raised to it, so logits match."""
    if key not in weights:
        return default
    return max(default, math.exp(float(weights[key].reshape(-1)[0])))


# --- files


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.exists():
        return load_safetensors(single)
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no weight_map")
        if not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ConversionError(f"{index}: weight_map values must be shard file names")
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if Path(shard).name != shard:
                raise ConversionError(f"{index}: shard {shard!r} is not a file name in the model directory")
            if not shard_path.exists():
                raise ConversionError(f"{shard_path} is missing (listed in {index.name})")
            tensors = load_safetensors(shard_path)
            listed = {key for key, name in weight_map.items() if name == shard}
            if set(tensors) != listed:
                raise ConversionError(
                    f"{shard_path}: holds {_short(set(tensors) - listed) or 'nothing extra'} beyond the index and "
                    f"lacks {_short(listed - set(tensors)) or 'nothing'}"
                )
            weights.update(tensors)
        return weights
    pickled = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (directory / name).exists()]
    if pickled:
        raise ConversionError(
            f"{directory}: only pickled weights ({pickled[0]}); vlkit never unpickles checkpoints. Convert them to "
            "safetensors first (e.g. transformers' save_pretrained(..., safe_serialization=True))"
        )
    raise ConversionError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def write_weights(target: Path, weights: dict[str, torch.Tensor]) -> None:
    atomic_write(target, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))

"""Hugging Face ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` <-> vlkit ``DecoderLM``; and the loading machinery every
language-model converter shares (``read_lm``: weights streamed into a model built on the meta device).

Key map, per layer i (``model.layers.i.`` <-> ``blocks.i.``): ``input_layernorm`` <-> ``norm1``;
``self_attn.{q,k,v}_proj`` <-> the fused ``attn.qkv`` (concatenated on the output axis); ``self_attn.o_proj`` <->
``attn.proj``; ``post_attention_layernorm`` <-> ``norm2``; ``mlp.{gate,up}_proj`` <-> the fused ``mlp.gate_up``;
``mlp.down_proj`` <-> ``mlp.down``. Outside the layers: ``model.embed_tokens`` <-> ``token_embed``, ``model.norm``
<-> ``norm``, ``lm_head`` <-> ``lm_head`` (absent when the embeddings are tied).

Llama's ``attention_bias`` puts a bias on q, k, v and o; Qwen2 always has one on q, k, v and never on o. RoPE is
read from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (earlier versions): default,
"linear", "dynamic" and "llama3"; export writes the earlier form, which every version reads.

Loading a 7B checkpoint on a 24 GB machine: the model is built on the meta device and each parameter is read from
safetensors (a single file or the shards of an index) only when its turn comes, fused, cast if asked, and assigned,
so the weights are held once. By default they keep the dtype they were stored in.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vlkit.convert.common import INDEX_NAME, WEIGHTS_NAME, ConversionError, HFCheckpoint, Rule, raise_if, rule
from vlkit.files import check_safetensors, read_json
from vlkit.lm import DecoderLM, LMConfig

MODEL_TYPE = "llama"
MODEL_TYPES = ("llama", "qwen2")
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# transformers' LlamaConfig / Qwen2Config defaults (config.json files omit fields left at their default).
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "rope_theta": 10000.0,
    },
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "rope_theta": 10000.0,
    },
}  # fmt: skip
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# --- shared by the language-model converters


def token_ids(config: dict[str, Any]) -> dict[str, Any]:
    """bos / eos / pad ids of a Hugging Face config as ``LMConfig`` fields (eos may be one id or a list)."""
    eos = config.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    return {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        "pad_token_id": config.get("pad_token_id"),
    }


def token_fields(config: LMConfig) -> dict[str, Any]:
    """The reverse of ``token_ids``."""
    eos = config.eos_token_ids
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos),
        "pad_token_id": config.pad_token_id,
    }


class WeightSource:
    """Tensors by name, read one at a time: from a dict in memory or from safetensors files (``from_directory``)."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self._tensors = tensors or {}
        self._files: dict[str, Path] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_directory(cls, directory: Path) -> WeightSource:
        source = cls()
        single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
        if single.exists():
            files = [single]
        elif index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no weight_map")
            files = []
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or not (directory / shard).exists():
                    raise ConversionError(f"{index}: shard {shard!r} is missing or outside the directory")
                files.append(directory / shard)
        else:
            pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (directory / n).exists()]
            if pickled:
                raise ConversionError(
                    f"{directory}: only pickled weights ({pickled[0]}); vlkit never unpickles checkpoints. Convert "
                    "them to safetensors first (transformers' save_pretrained(..., safe_serialization=True))"
                )
            raise ConversionError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        for path in files:
            header = check_safetensors(path)  # structure only: no tensor is read here
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if key in source._files:
                    raise ConversionError(f"{directory}: {key} is stored in two shards")
                source._files[key], source._headers[key] = path, info
        if index.exists() and not single.exists():
            listed = set(read_json(index)["weight_map"])
            if listed != set(source._files):
                extra, lacking = sorted(set(source._files) - listed)[:5], sorted(listed - set(source._files))[:5]
                raise ConversionError(f"{index}: shards hold {extra} beyond the index and lack {lacking}")
        return source

    def keys(self) -> set[str]:
        return set(self._tensors) | set(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return tuple(int(d) for d in self._headers[key]["shape"])

    def dtype(self, key: str) -> torch.dtype | None:
        if key in self._tensors:
            return self._tensors[key].dtype
        return _DTYPES.get(self._headers[key]["dtype"])

    def read(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(key)


def read_lm(
    config: LMConfig, rules: list[Rule], source: WeightSource, where: str, dtype: torch.dtype | None = None,
    ignored: Iterable[str] = (), sizes: dict[str, list[int]] | None = None,
) -> DecoderLM:  # fmt: skip
    """Build ``DecoderLM(config)`` on the meta device and fill it through ``rules`` from ``source`` (``fill_model``)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    return fill_model(model, rules, source, where, dtype, ignored, sizes)


def fill_model(
    model: nn.Module, rules: list[Rule], source: WeightSource, where: str, dtype: torch.dtype | None = None,
    ignored: Iterable[str] = (), sizes: dict[str, list[int]] | None = None,
) -> nn.Module:  # fmt: skip
    """Fill ``model`` (built on the meta device) through ``rules`` from ``source``; the read tensors become its
    parameters (no random initialisation, no second copy).

    Every key is checked (missing, unexpected, misshapen) before any tensor is read. ``dtype`` None keeps the stored
    floating dtype (the one most elements have, should a checkpoint mix them); ``ignored`` foreign keys may be present
    unread (a tied head). ``sizes``: for a vlkit key fused from several foreign tensors, their sizes along dim 0 (q,
    k, v differ under GQA).
    """
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    uncovered = sorted(set(expected) - {key for r in rules for key in r.vlkit})
    if uncovered:
        raise ConversionError(f"converter bug: vlkit keys no rule fills: {uncovered[:8]}")
    available, wanted = source.keys(), {key for r in rules for key in r.hf}
    problems = []
    missing = sorted(wanted - available)
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(available - wanted - set(ignored))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for r in rules:
        if any(key in missing for key in r.hf):
            continue
        shapes = [source.shape(key) for key in r.hf]
        targets = [expected[key] for key in r.vlkit]
        if r.hf_shape is not None:
            bad = shapes != [r.hf_shape] or math.prod(r.hf_shape) != math.prod(targets[0])
        else:
            parts = (sizes or {}).get(r.vlkit[0])
            bad = (parts is not None and [s[0] for s in shapes] != parts) or len({s[1:] for s in shapes + targets}) != 1
            bad = bad or sum(s[0] for s in shapes) != sum(s[0] for s in targets)
        if bad:
            problems.append(f"{' + '.join(r.hf)} have shapes {shapes}; {' + '.join(r.vlkit)} need {targets}")
    raise_if(problems, f"{where}: checkpoint does not match its config")
    if dtype is None:  # the dtype most of the weights are stored in, by elements (many small norms may be fp32)
        stored: Counter[torch.dtype] = Counter()
        for key in wanted:
            kind = source.dtype(key)
            if kind is not None and kind.is_floating_point:
                stored[kind] += math.prod(source.shape(key))
        dtype = stored.most_common(1)[0][0] if stored else torch.float32
    state: dict[str, torch.Tensor] = {}
    for r in rules:
        tensors = [source.read(key) for key in r.hf]
        joined = (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)).to(dtype)
        if len(r.vlkit) == 1:
            state[r.vlkit[0]] = joined.reshape(expected[r.vlkit[0]])
        else:
            for key, part in zip(r.vlkit, joined.split([expected[k][0] for k in r.vlkit]), strict=True):
                state[key] = part
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ConversionError(f"converter bug: {left[:5]} stayed on the meta device (buffers no checkpoint holds)")
    return model


def export_tensors(
    model: DecoderLM, rules: list[Rule], sizes: dict[str, list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """The foreign weights of ``model`` as views of its parameters (no copy; the writer copies shard by shard).
    A fused parameter is split into its foreign tensors by ``sizes`` (as in ``read_lm``), else into equal parts."""
    source = model.state_dict()
    leftover = set(source) - {key for r in rules for key in r.vlkit}
    if leftover:
        raise ConversionError(f"vlkit weights with no place in the target format: {sorted(leftover)[:8]}")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        joined = source[r.vlkit[0]] if len(r.vlkit) == 1 else torch.cat([source[k] for k in r.vlkit], dim=0)
        if len(r.hf) == 1:
            out[r.hf[0]] = joined.detach().cpu()
            continue
        split = (sizes or {}).get(r.vlkit[0])
        parts = joined.split(split) if split else joined.chunk(len(r.hf), dim=0)
        for key, part in zip(r.hf, parts, strict=True):
            out[key] = part.detach().cpu()
    return out


# --- Llama / Qwen2


def _rope(config: dict[str, Any], where: str) -> dict[str, Any]:
    # transformers' precedence: a config.json holding both reads rope_scaling.
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor={partial} is not supported")
    fields: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return fields
    if kind not in ("linear", "dynamic", "llama3"):
        raise ConversionError(f"{where}: RoPE type {kind!r} is not supported; known: default, linear, dynamic, llama3")
    fields |= {"rope_scaling": kind, "rope_factor": float(parameters["factor"])}
    if kind == "llama3":
        fields |= {
            # A top-level original_max_position_embeddings wins over the one inside, as transformers reads it.
            "rope_original_max_seq_len": int(
                config.get("original_max_position_embeddings")
                or parameters.get("original_max_position_embeddings", config["max_position_embeddings"])
            ),
            "rope_low_freq_factor": float(parameters["low_freq_factor"]),
            "rope_high_freq_factor": float(parameters["high_freq_factor"]),
        }
    return fields


def config_from_hf(hf: dict[str, Any], where: str) -> LMConfig:
    model_type = hf.get("model_type")
    if model_type not in DEFAULTS:
        raise ConversionError(f"{where}: model_type {model_type!r} is not one of {MODEL_TYPES}")
    config = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k.endswith("token_id")}}
    problems = []
    if config["hidden_act"] != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}: vlkit's gated MLP is SwiGLU (silu)")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        problems.append("use_sliding_window=true: sliding-window attention is not supported")
    raise_if(problems, where)
    heads = int(config["num_attention_heads"])
    if model_type == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = bool(config["attention_bias"])
        mlp_bias = bool(config["mlp_bias"])
    return LMConfig(
        vocab_size=int(config["vocab_size"]),
        max_seq_len=int(config["max_position_embeddings"]),
        dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        mlp_dim=int(config["intermediate_size"]),
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=float(config["rms_norm_eps"]),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(config["tie_word_embeddings"]),
        **_rope(config, where),
        **token_ids(config),
    )


def rules(config: LMConfig, prefix: str = "model") -> list[Rule]:
    out = [rule("token_embed.weight", f"{prefix}.embed_tokens.weight")]
    for i in range(config.depth):
        v, h = f"blocks.{i}", f"{prefix}.layers.{i}"
        out.append(rule(f"{v}.norm1.weight", f"{h}.input_layernorm.weight"))
        for part, present in (("weight", True), ("bias", config.qkv_bias)):
            if present:
                fused = tuple(f"{h}.self_attn.{p}_proj.{part}" for p in "qkv")
                out.append(Rule((f"{v}.attn.qkv.{part}",), fused))
        out.append(rule(f"{v}.attn.proj.weight", f"{h}.self_attn.o_proj.weight"))
        if config.out_bias:
            out.append(rule(f"{v}.attn.proj.bias", f"{h}.self_attn.o_proj.bias"))
        out.append(rule(f"{v}.norm2.weight", f"{h}.post_attention_layernorm.weight"))
        for part, present in (("weight", True), ("bias", config.mlp_bias)):
            if present:
                out.append(rule(f"{v}.mlp.gate_up.{part}", (f"{h}.mlp.gate_proj.{part}", f"{h}.mlp.up_proj.{part}")))
                out.append(rule(f"{v}.mlp.down.{part}", f"{h}.mlp.down_proj.{part}"))
    out.append(rule("norm.weight", f"{prefix}.norm.weight"))
    if not config.tie_embeddings:
        out.append(rule("lm_head.weight", "lm_head.weight"))
    return out


def fused_sizes(config: LMConfig) -> dict[str, list[int]]:
    """dim-0 sizes of q, k, v inside each fused ``attn.qkv`` weight and bias."""
    assert config.num_kv_heads is not None and config.head_dim is not None
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {f"blocks.{i}.attn.qkv.{part}": [q, kv, kv] for i in range(config.depth) for part in ("weight", "bias")}


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    wanted = _ARCHITECTURE.get(str(hf.get("model_type")))
    for name in hf.get("architectures") or []:
        if name != wanted:
            raise ConversionError(f"{where}: architecture {name} is not supported for {hf.get('model_type')}; "
                                  f"supported: {wanted}")  # fmt: skip


def head_stored_apart(source: Any, key_map: list[Rule], embed: str, head: str) -> bool:
    """Whether a checkpoint whose config ties the LM head stores a head (``head``) that differs from its embedding
    (the foreign key of vlkit's ``embed``). transformers then keeps that head, untied; so does vlkit, or its logits
    would differ. A stored head equal to the embedding is the tied one, written anyway, and is ignored."""
    keys = source.keys()
    embed_key = next((r.hf[0] for r in key_map if r.vlkit == (embed,)), None)
    if embed_key is None or head not in keys or embed_key not in keys:
        return False
    return not torch.equal(source.read(head), source.read(embed_key))


def _read_checkpoint(hf: dict[str, Any], source: WeightSource, where: str, dtype: torch.dtype | None) -> DecoderLM:
    _check_architecture(hf, where)
    config = config_from_hf(hf, where)
    if config.tie_embeddings and head_stored_apart(source, rules(config), "token_embed.weight", "lm_head.weight"):
        config = dataclasses.replace(config, tie_embeddings=False)
    ignored = ("lm_head.weight",) if config.tie_embeddings else ()  # a tied head written anyway
    return read_lm(config, rules(config), source, where, dtype, ignored, fused_sizes(config))


def load_directory(directory: Path, hf: dict[str, Any], dtype: torch.dtype | None = None) -> DecoderLM:
    return _read_checkpoint(hf, WeightSource.from_directory(directory), str(directory), dtype)


def load(checkpoint: HFCheckpoint, source: str) -> DecoderLM:
    return _read_checkpoint(checkpoint.config, WeightSource(checkpoint.weights), source, None)


def _model_type(config: LMConfig) -> str | None:
    layout = (
        config.norm == "rmsnorm" and config.mlp == "swiglu" and config.positions == "rope" and config.pre_norm
        and config.final_norm and config.token_embed_dim is None
    )  # fmt: skip
    if not layout:
        return None
    if config.qkv_bias and not config.out_bias and not config.mlp_bias:
        return "qwen2"
    return "llama" if config.qkv_bias == config.out_bias else None


def matches(config: Any) -> bool:
    return isinstance(config, LMConfig) and _model_type(config) is not None


def export(model: DecoderLM) -> HFCheckpoint:
    config = model.config
    model_type = _model_type(config)
    if model_type is None:
        raise ConversionError("this DecoderLM is neither a Llama nor a Qwen2 layout")
    scaling: dict[str, Any] | None = None
    if config.rope_scaling != "none":
        scaling = {"rope_type": config.rope_scaling, "factor": config.rope_factor}
        if config.rope_scaling == "llama3":
            scaling |= {
                "original_max_position_embeddings": config.rope_original_max_seq_len,
                "low_freq_factor": config.rope_low_freq_factor,
                "high_freq_factor": config.rope_high_freq_factor,
            }
        elif config.rope_scaling == "dynamic" and config.rope_original_max_seq_len not in (None, config.max_seq_len):
            raise ConversionError(
                "dynamic RoPE scaling starts at max_position_embeddings in transformers; "
                f"rope_original_max_seq_len={config.rope_original_max_seq_len} cannot be written"
            )
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURE[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_embeddings,
        **token_fields(config),
    }
    if model_type == "llama":
        hf |= {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}
    else:
        hf |= {"use_sliding_window": False, "sliding_window": None}
    return HFCheckpoint(hf, export_tensors(model, rules(config), fused_sizes(config)))

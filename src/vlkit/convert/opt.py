"""Hugging Face ``OPTForCausalLM`` (Zhang et al., 2022) <-> vlkit ``DecoderLM``.

Key map, per layer i (``model.decoder.layers.i.`` <-> ``blocks.i.``): ``self_attn_layer_norm`` <-> ``norm1``;
``self_attn.{q,k,v}_proj`` <-> the fused ``attn.qkv``; ``self_attn.out_proj`` <-> ``attn.proj``;
``final_layer_norm`` <-> ``norm2``; ``fc1`` / ``fc2`` <-> ``mlp.fc1`` / ``mlp.fc2``. Outside the layers:
``embed_tokens`` <-> ``token_embed``, ``embed_positions`` (max positions + 2 rows: OPT's positions start at row 2)
<-> ``pos_embed``, the decoder's ``final_layer_norm`` <-> ``norm`` (absent in post-norm models such as OPT-350M),
``project_in`` / ``project_out`` <-> ``embed_in`` / ``embed_out`` (when ``word_embed_proj_dim`` differs from the
width), ``lm_head`` (tied to the embedding unless ``tie_word_embeddings`` is false). ``enable_bias`` sets every
linear bias. Checkpoints saved from ``OPTModel`` (keys under ``decoder.``) load too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    activation_from_hf,
    activation_to_hf,
    linear,
    raise_if,
    rule,
    with_defaults,
)
from vlkit.convert.llama import WeightSource, export_tensors, head_stored_apart, read_lm, token_fields, token_ids
from vlkit.lm import DecoderLM, LMConfig

MODEL_TYPE = "opt"
ARCHITECTURES = ("OPTForCausalLM",)
OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding reads row position + 2
# transformers' OPTConfig defaults (config.json files omit fields left at their default).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "num_attention_heads": 12, "activation_function": "relu", "enable_bias": True,
    "layer_norm_elementwise_affine": True, "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 2,
    "eos_token_id": 2,
}  # fmt: skip


def config_from_hf(hf: dict[str, Any], where: str) -> LMConfig:
    config = with_defaults(hf, DEFAULTS)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in hf:  # an explicit null means "none", not the default
            config[key] = hf[key]
    if not config["layer_norm_elementwise_affine"]:
        raise_if(["layer_norm_elementwise_affine=false (norms without weights) is not supported"], where)
    dim = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    if dim % heads:
        raise ConversionError(f"{where}: hidden_size {dim} is not divisible by num_attention_heads {heads}")
    embed_dim = config.get("word_embed_proj_dim") or dim
    pre_norm = bool(config["do_layer_norm_before"])
    bias = bool(config["enable_bias"])
    return LMConfig(
        vocab_size=int(config["vocab_size"]),
        max_seq_len=int(config["max_position_embeddings"]),
        dim=dim,
        depth=int(config["num_hidden_layers"]),
        num_heads=heads,
        mlp_dim=int(config["ffn_dim"]),
        mlp=activation_from_hf(config["activation_function"], where),  # type: ignore[arg-type]
        norm="layernorm",
        norm_eps=1e-5,  # torch's LayerNorm default, which OPT uses
        pre_norm=pre_norm,
        final_norm=pre_norm and not config["_remove_final_layer_norm"],
        positions="learned",
        position_offset=OFFSET,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(config["tie_word_embeddings"]),
        token_embed_dim=int(embed_dim) if int(embed_dim) != dim else None,
        **token_ids(config),
    )


def rules(config: LMConfig, prefix: str = "model.decoder") -> list[Rule]:
    bias = config.qkv_bias
    out = [
        rule("token_embed.weight", f"{prefix}.embed_tokens.weight"),
        rule("pos_embed.weight", f"{prefix}.embed_positions.weight"),
    ]
    if config.token_embed_dim is not None:
        out += [rule("embed_in.weight", f"{prefix}.project_in.weight")]
        out += [rule("embed_out.weight", f"{prefix}.project_out.weight")]
    for i in range(config.depth):
        v, h = f"blocks.{i}", f"{prefix}.layers.{i}"
        out += linear(f"{v}.norm1", f"{h}.self_attn_layer_norm")
        for part in ("weight", "bias") if bias else ("weight",):
            out.append(rule(f"{v}.attn.qkv.{part}", tuple(f"{h}.self_attn.{p}_proj.{part}" for p in "qkv")))
        out += linear(f"{v}.attn.proj", f"{h}.self_attn.out_proj", bias)
        out += linear(f"{v}.norm2", f"{h}.final_layer_norm")
        out += linear(f"{v}.mlp.fc1", f"{h}.fc1", bias)
        out += linear(f"{v}.mlp.fc2", f"{h}.fc2", bias)
    if config.final_norm:
        out += linear("norm", f"{prefix}.final_layer_norm")
    if not config.tie_embeddings:
        out.append(rule("lm_head.weight", "lm_head.weight"))
    return out


def _prefix(keys: set[str]) -> str:
    return "decoder" if "decoder.embed_tokens.weight" in keys else "model.decoder"


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    unsupported = [name for name in hf.get("architectures") or [] if name not in ARCHITECTURES]
    if unsupported:
        raise ConversionError(f"{where}: architecture {unsupported[0]} is not supported; supported: {ARCHITECTURES}")


def _read(hf: dict[str, Any], source: WeightSource, where: str, dtype: torch.dtype | None) -> DecoderLM:
    _check_architecture(hf, where)
    config = config_from_hf(hf, where)
    prefix = _prefix(source.keys())
    if config.tie_embeddings and head_stored_apart(
        source, rules(config, prefix), "token_embed.weight", "lm_head.weight"
    ):
        config = dataclasses.replace(config, tie_embeddings=False)
    ignored = ("lm_head.weight",) if config.tie_embeddings else ()
    return read_lm(config, rules(config, prefix), source, where, dtype, ignored)


def load_directory(directory: Path, hf: dict[str, Any], dtype: torch.dtype | None = None) -> DecoderLM:
    return _read(hf, WeightSource.from_directory(directory), str(directory), dtype)


def load(checkpoint: HFCheckpoint, source: str) -> DecoderLM:
    return _read(checkpoint.config, WeightSource(checkpoint.weights), source, None)


def _problems(config: LMConfig) -> list[str]:
    problems = []
    if config.norm != "layernorm" or config.positions != "learned" or config.position_offset != OFFSET:
        problems.append("OPT needs LayerNorm and learned positions offset by 2")
    if config.mlp == "swiglu":
        problems.append("OPT's MLP is not gated")
    if not config.qkv_bias == config.out_bias == config.mlp_bias:
        problems.append("OPT has biases on every linear layer or on none")
    if config.num_kv_heads != config.num_heads or config.head_dim * config.num_heads != config.dim:  # type: ignore[operator]
        problems.append("OPT has no grouped-query attention and head_dim = dim / num_heads")
    if config.final_norm and not config.pre_norm:
        problems.append("a post-norm OPT has no final norm")
    if config.norm_eps != 1e-5:
        problems.append(f"OPT's LayerNorm eps is 1e-5, not {config.norm_eps}")
    return problems


def matches(config: Any) -> bool:
    return isinstance(config, LMConfig) and not _problems(config)


def export(model: DecoderLM) -> HFCheckpoint:
    config = model.config
    raise_if(_problems(config), "cannot export as OPT")
    hf: dict[str, Any] = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "ffn_dim": config.mlp_dim,
        "max_position_embeddings": config.max_seq_len,
        "do_layer_norm_before": config.pre_norm,
        "_remove_final_layer_norm": config.pre_norm and not config.final_norm,
        "word_embed_proj_dim": config.embed_width,
        "num_attention_heads": config.num_heads,
        "activation_function": activation_to_hf(config.mlp, "OPT export"),
        "enable_bias": config.qkv_bias,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": config.tie_embeddings,
        **token_fields(config),
    }
    return HFCheckpoint(hf, export_tensors(model, rules(config)))

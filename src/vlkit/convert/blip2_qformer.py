"""Transformers' BLIP-2 Q-Former <-> vlkit ``QFormer``: the config translation and the explicit key map.

Not a checkpoint format of its own (no ``MODEL_TYPE``): the BLIP-2 converter uses it for the Q-Former part of
``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval`` and ``Blip2Model``. On the Hugging Face side the
Q-Former is spread over ``query_tokens`` (1, M, D_q), ``qformer.*`` (``Blip2QFormerModel``, whose ``layernorm`` is
the embedding LayerNorm the queries and the text share), the text ``embeddings.*`` (``Blip2TextEmbeddings``, in
stage-1 models) and ``language_projection`` (stage-2 models); in vlkit it is one ``QFormer`` module.

| transformers ``qformer.encoder.layer.{i}.``               | vlkit ``layers.{i}.``                 |
|-----------------------------------------------------------|---------------------------------------|
| ``attention.attention.{query,key,value}``                 | ``attn.qkv`` (fused: q, k, v on dim 0) |
| ``attention.output.dense`` / ``.LayerNorm``               | ``attn.proj`` / ``attn_norm``         |
| ``crossattention.attention.query`` / ``{key,value}``      | ``cross_attn.q`` / ``cross_attn.kv``  |
| ``crossattention.output.dense`` / ``.LayerNorm``          | ``cross_attn.proj`` / ``cross_norm``  |
| ``intermediate_query.dense``, ``output_query.dense`` / LN | ``query_mlp.fc1``, ``.fc2`` / ``query_norm`` |
| ``intermediate.dense``, ``output.dense`` / LN (text)      | ``text_mlp.fc1``, ``.fc2`` / ``text_norm``   |

``qformer.layernorm`` <-> ``embed_norm``; ``query_tokens`` <-> ``queries`` (M, D_q);
``embeddings.{word,position}_embeddings`` <-> ``word_embed`` / ``pos_embed``; ``language_projection`` <->
``projection``. transformers' ``use_qformer_text_input`` is vlkit's ``text_input``: it adds the text feed-forward
blocks and, with them, the text embeddings.
"""

from __future__ import annotations

from typing import Any

from vlkit.bridges.qformer import QFormerConfig
from vlkit.convert.common import Rule, activation_from_hf, activation_to_hf, linear, rule, with_defaults

# transformers' Blip2QFormerConfig defaults (config.json files omit fields left at their default).
QFORMER_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "cross_attention_frequency": 2, "encoder_hidden_size": 1408, "use_qformer_text_input": False,
}  # fmt: skip
_QKV = ("query", "key", "value")


def qformer_config_from_hf(qformer_config: dict[str, Any], num_query_tokens: int, where: str) -> QFormerConfig:
    """A ``Blip2QFormerConfig`` dict (``qformer_config`` of a BLIP-2 config.json) + ``num_query_tokens``."""
    config = with_defaults(qformer_config, QFORMER_DEFAULTS)
    return QFormerConfig(
        num_queries=int(num_query_tokens),
        dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_dim=int(config["intermediate_size"]),
        act=activation_from_hf(config["hidden_act"], where),  # type: ignore[arg-type]
        norm_eps=float(config["layer_norm_eps"]),
        cross_attention_frequency=int(config["cross_attention_frequency"]),
        text_input=bool(config["use_qformer_text_input"]),
        vocab_size=int(config["vocab_size"]),
        max_seq_len=int(config["max_position_embeddings"]),
    )


def qformer_config_to_hf(config: QFormerConfig, vision_dim: int) -> dict[str, Any]:
    """The ``qformer_config`` dict transformers' ``Blip2QFormerConfig`` reads (the query count lives one level up,
    in ``num_query_tokens``)."""
    return {
        "model_type": "blip_2_qformer",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": activation_to_hf(config.act, "Q-Former"),
        "layer_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "cross_attention_frequency": config.cross_attention_frequency,
        "encoder_hidden_size": vision_dim,
        "use_qformer_text_input": config.text_input,
    }


def qformer_rules(
    config: QFormerConfig,
    vlkit_prefix: str = "",
    hf_prefix: str = "qformer.",
    query_tokens: str = "query_tokens",
    embeddings: str = "embeddings.",
    projection: str | None = "language_projection",
) -> list[Rule]:
    """The key map between a vlkit ``QFormer`` (its keys under ``vlkit_prefix``, e.g. ``"bridge."``) and the
    Hugging Face keys. ``projection=None`` leaves ``projection`` out, for models without a language projection."""
    v, h = vlkit_prefix, hf_prefix
    rules = [rule(f"{v}queries", query_tokens, hf_shape=(1, config.num_queries, config.dim))]
    rules += linear(f"{v}embed_norm", f"{h}layernorm")
    if config.text_input:
        rules.append(rule(f"{v}word_embed.weight", f"{embeddings}word_embeddings.weight"))
        rules.append(rule(f"{v}pos_embed.weight", f"{embeddings}position_embeddings.weight"))
    for i in range(config.depth):
        vl, hl = f"{v}layers.{i}", f"{h}encoder.layer.{i}"
        for part in ("weight", "bias"):
            rules.append(rule(f"{vl}.attn.qkv.{part}", tuple(f"{hl}.attention.attention.{p}.{part}" for p in _QKV)))
        rules += linear(f"{vl}.attn.proj", f"{hl}.attention.output.dense")
        rules += linear(f"{vl}.attn_norm", f"{hl}.attention.output.LayerNorm")
        if i % config.cross_attention_frequency == 0:
            rules += linear(f"{vl}.cross_attn.q", f"{hl}.crossattention.attention.query")
            for part in ("weight", "bias"):
                keys = tuple(f"{hl}.crossattention.attention.{p}.{part}" for p in ("key", "value"))
                rules.append(rule(f"{vl}.cross_attn.kv.{part}", keys))
            rules += linear(f"{vl}.cross_attn.proj", f"{hl}.crossattention.output.dense")
            rules += linear(f"{vl}.cross_norm", f"{hl}.crossattention.output.LayerNorm")
        rules += linear(f"{vl}.query_mlp.fc1", f"{hl}.intermediate_query.dense")
        rules += linear(f"{vl}.query_mlp.fc2", f"{hl}.output_query.dense")
        rules += linear(f"{vl}.query_norm", f"{hl}.output_query.LayerNorm")
        if config.text_input:
            rules += linear(f"{vl}.text_mlp.fc1", f"{hl}.intermediate.dense")
            rules += linear(f"{vl}.text_mlp.fc2", f"{hl}.output.dense")
            rules += linear(f"{vl}.text_norm", f"{hl}.output.LayerNorm")
    if projection is not None:
        rules += linear(f"{v}projection", projection)
    return rules

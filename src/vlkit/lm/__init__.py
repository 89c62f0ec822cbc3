"""Decoder-only language models (Llama, Qwen2, OPT), their KV cache and generation."""

from vlkit.lm.cache import CacheStep, CacheView, KVCache
from vlkit.lm.config import LMConfig
from vlkit.lm.generate import GenerationConfig, generate, sample_logits, stream_generate
from vlkit.lm.model import DecoderLM, LMOutput

__all__ = [
    "CacheStep",
    "CacheView",
    "DecoderLM",
    "GenerationConfig",
    "KVCache",
    "LMConfig",
    "LMOutput",
    "generate",
    "sample_logits",
    "stream_generate",
]

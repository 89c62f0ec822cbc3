"""Language-model presets: the exact public architectures (parameter shapes and counts equal the checkpoints', see
tests/test_convert_lm.py) and tiny ``test_*`` models for the tests."""

from __future__ import annotations

from vlkit.lm.config import LMConfig
from vlkit.registry import register_preset


@register_preset
def vicuna_7b() -> LMConfig:
    """Vicuna-7B v1.5 (lmsys), the language model of LLaVA-1.5: the Llama-2-7B architecture."""
    return LMConfig(
        vocab_size=32000, max_seq_len=4096, dim=4096, depth=32, num_heads=32, mlp_dim=11008, norm_eps=1e-5,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )  # fmt: skip


@register_preset
def qwen2_0_5b() -> LMConfig:
    """Qwen2-0.5B: grouped-query attention (14 query, 2 key/value heads), QKV bias, tied embeddings."""
    return LMConfig(
        vocab_size=151936, max_seq_len=32768, dim=896, depth=24, num_heads=14, num_kv_heads=2, mlp_dim=4864,
        rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True, bos_token_id=151643, eos_token_ids=(151643,),
    )  # fmt: skip


@register_preset
def opt_2_7b() -> LMConfig:
    """OPT-2.7B, the language model of BLIP-2 OPT-2.7b: pre-norm LayerNorm, ReLU, learned positions offset by 2."""
    return LMConfig(
        vocab_size=50272, max_seq_len=2048, dim=2560, depth=32, num_heads=32, mlp_dim=10240, mlp="relu",
        norm="layernorm", norm_eps=1e-5, positions="learned", position_offset=2, qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=True, bos_token_id=2, eos_token_ids=(2,), pad_token_id=1,
    )  # fmt: skip


# --- tiny models for tests


@register_preset
def test_llama_lm() -> LMConfig:
    return LMConfig(
        vocab_size=128, max_seq_len=64, dim=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )  # fmt: skip


@register_preset
def test_qwen2_lm() -> LMConfig:
    return LMConfig(
        vocab_size=128, max_seq_len=64, dim=64, depth=2, num_heads=4, num_kv_heads=1, mlp_dim=96,
        rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True, bos_token_id=None, eos_token_ids=(2,),
    )  # fmt: skip


@register_preset
def test_opt_lm() -> LMConfig:
    return LMConfig(
        vocab_size=128, max_seq_len=64, dim=64, depth=2, num_heads=4, mlp_dim=128, mlp="relu", norm="layernorm",
        norm_eps=1e-5, positions="learned", position_offset=2, qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=True, bos_token_id=2, eos_token_ids=(2,), pad_token_id=1,
    )  # fmt: skip

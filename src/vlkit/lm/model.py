"""Decoder-only language model: ids (B, T) or embeddings (B, T, E) -> blocks -> final norm -> logits (B, T, V).

One configurable decoder for Llama (Touvron et al., 2023), Qwen2 (Yang et al., 2024) and OPT (Zhang et al., 2022);
``LMConfig`` lists the options. Attention is causal, grouped-query where ``num_kv_heads < num_heads`` (Ainslie et al.,
2023), with one fused QKV projection and ``F.scaled_dot_product_attention``. Queries and keys may differ in length:
with a ``CacheView`` the new tokens attend to everything their cache slots hold (prefill, then one token per decode
step). Position ids follow the attention mask (cumsum), so a left-padded row gets the positions it would have alone.

``inputs_embeds`` replaces the token lookup, which is how a vision-language model feeds image tokens in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.compiling import compiled_or_eager, compiler_present
from vlkit.layers import Rope1d, build_mlp, build_norm
from vlkit.layers.attention import sdpa
from vlkit.layers.linear import MKL_ONE_ROW, Linear, linear, release_packed, use_fast_linears
from vlkit.lm.cache import CacheStep, CacheView, KVCache, same_block
from vlkit.lm.config import LMConfig
from vlkit.models.base import PretrainedModel

# CPU inference keeps oneDNN-packed copies of the linear weights (see vlkit.layers.linear) when they take at most this
# much memory in fp32: the copies double the weights' memory, which a 7B model cannot afford on a 24 GB machine.
PACK_BUDGET_BYTES = 2 * 2**30

# Compiled decoding (``DecoderLM.compile_decoding``): "auto" compiles a model's one-token steps on a CPU once its
# eager steps have read this many bytes of linear weights per layer in the process, so that a short answer never waits
# for the compiler. The step is one graph of every layer, so compiling it takes longer the deeper the model: on the
# 2-core EPYC of bench/generate.py 5 s with inductor's cache warm (19-23 s cold) at 8 layers, 9.5 s (68 s cold) at 32.
# It saved ~6.5 ms per step of the 156 MB, 8-layer model (eager 79-94 tok/s, compiled 164-177): paid back after ~1000
# steps warm. What a step saves grows with the weights it reads, so the threshold is in bytes per layer: ~1000 steps
# of that model (about 12 s of eager decoding, 2x a warm compile), ~50 of a 7B model in bf16 (32 layers, 13 GB a step,
# about a second each here: ~50 s of eager decoding against a 10-70 s compile).
AUTO_COMPILE_DECODING_BYTES_PER_LAYER = 20 * 10**9
# Several rows in lockstep (generate's batches) save less a step, for their products stay the eager kernel
# (vlkit.layers.linear's opaque op) and only what lies between them fuses: in three runs of bench/generate.py (the
# thirty-fifth session, same EPYC kind) 1.8-2.6 ms of a 10.2-11.5 ms eager step at 8 rows, against 4.0-4.4 ms of 9.1-9.7
# at one. Batched steps then wait this many times longer before "auto" compiles them.
AUTO_COMPILE_BATCHED_FACTOR = 2
COMPILE_DECODING_MIN_BYTES = 64 * 2**20

# Training on the real tokens only (``Unpadded``) and the head at the targets only (``DecoderLM.next_token_loss``)
# give the products a row count N that changes with every batch. oneDNN, which runs bf16 products on CPUs, builds a
# kernel per shape (for AMX tiles, a JIT-compiled one) and keeps 1024 of them: a new N every step rebuilds the
# kernels of every product (2.3x the time of the products themselves at 2000-3000 rows of a 256-wide layer on the
# AMX Xeon). So N is rounded up to a multiple of this many rows with positions that the result never reads (pads, or
# positions without a target): a few dozen shapes for ~1 % more rows. On the AMX Xeon (the thirty-ninth session) the
# demo's instruct stage went from 81 to 117 samples/s (105 before the unpadded training), bench/vlm_step.py's step on
# new batches 1.21x (bench/results/vlm_step_honeybee_amx_s39.json).
ROW_MULTIPLE = 64


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the forward pass computed the loss alone
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100 (weighted: see forward)


class AttentionContext(NamedTuple):
    """What every block of one forward pass shares, computed once."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sign-folded sin: (B, T, 1, head_dim), or (N, 1, head_dim)
    mask: torch.Tensor | None  # (B, 1, T, L): bool, True = attend, or an additive 0 / -inf bias
    is_causal: bool  # no mask and no cache: SDPA's own causal pattern
    step: CacheStep | None
    unpadded: Unpadded | None = None  # the blocks run on the real tokens only (N, E)


class Unpadded(NamedTuple):
    """A right-padded batch (B, T) as its N real tokens: ``index`` (N,) their flat positions in B * T.

    Training runs every per-token product (QKV, output projection, MLP), norm and residual on the real tokens only,
    and lays them out as (B, T) around the attention alone; pads cost nothing but zeros there. Under the causal
    pattern of a right-padded row no real token sees a pad, so the real tokens' outputs are those of the padded
    batch. (Transformers' "padding-free" training packs rows instead, which needs a variable-length attention kernel.)
    The first few pads join the real tokens so that N is a multiple of ``ROW_MULTIPLE`` (or B * T): they compute what
    the padded batch computes there, which nothing reads.
    """

    index: torch.Tensor
    batch: int
    length: int

    @staticmethod
    def of(attention_mask: torch.Tensor) -> Unpadded:
        """The real tokens of ``attention_mask`` (B, T) and, to a multiple of ``ROW_MULTIPLE``, pads."""
        return Unpadded(_rows_to_multiple(attention_mask.flatten().bool()).nonzero().squeeze(1), *attention_mask.shape)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the pads."""
        full = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return full.unflatten(0, (self.batch, self.length))


class CausalSelfAttention(nn.Module):
    # Whether bf16 training on a CPU without AMX may run as two products (``layers.attention.sdpa``): 1.07-1.21x on
    # the ShapesWorld instruct steps, and harmless there, but off: three LMs whose text stage (from scratch) trained
    # that way gave the demo's VLM validation VQA 0.69-0.76 against 0.80-0.87 for the kernel's three, the same text
    # loss (docs/experiments.md, the thirty-eighth session). A run that only fine-tunes a trained LM may turn it on.
    bf16_products = False

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        assert config.num_kv_heads is not None and config.head_dim is not None
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, config.qkv_bias)
        self.proj = nn.Linear(self.num_heads * self.head_dim, config.dim, bias=config.out_bias)

    def forward(self, x: torch.Tensor, context: AttentionContext, layer: int) -> torch.Tensor:
        attended = self.attend(*self.project(x, context.rope, context.unpadded), context, layer)
        return self.proj(attended if context.unpadded is None else context.unpadded.pack(attended))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, unpadded: Unpadded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, heads, T, head_dim), keys and values (B, kv_heads, T, head_dim) of x (B, T, E), rotated by
        ``rope``; of x (N, E), the real tokens of ``unpadded``, laid out as (B, T) with zeros at the pads."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).unflatten(-1, (heads + 2 * kv_heads, head_dim))
        qk = qkv[..., : heads + kv_heads, :]  # queries and keys rotate together: one set of ops per layer
        if rope is not None:
            cos, sin = rope
            # rotate_half(x) = x with its halves swapped and the first negated; the sign is folded into sin. Swapped
            # as a flip of a (2, head_dim/2) view rather than a roll: compiled, the halves then load as whole vectors
            # where the roll's wrap-around index gathered them element by element (the decoding step's attention
            # recomputes the rotation per stored key: 145 -> 87 us a layer at 8 rows, bench/generate.py's model).
            swapped = qk.unflatten(-1, (2, head_dim // 2)).flip(-2).flatten(-2)
            qk = qk * cos + swapped * sin
            if unpadded is not None:  # laid out with v in one tensor (attend casts q and k to v's dtype too)
                qkv = torch.cat([qk.to(qkv.dtype), qkv[..., heads + kv_heads :, :]], dim=-2)
        if unpadded is not None:
            qkv = unpadded.unpack(qkv)
            qk = qkv[..., : heads + kv_heads, :]
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext, layer: int
    ) -> torch.Tensor:
        """Attention of the new tokens' q, k, v (``project``) over themselves and the cache: (B, T, heads * head_dim),
        before the output projection."""
        batch, heads, length, head_dim = q.shape
        kv_heads = self.num_kv_heads
        if context.step is not None:
            k, v = context.step.update(layer, k, v)  # (B, kv_heads, L, head_dim)
        groups = heads // kv_heads
        if length == 1:
            # One query per row: the query heads sharing a key head become that head's query rows, so keys and
            # values are read once instead of being repeated per group.
            q = q.reshape(batch, kv_heads, groups, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=context.mask)  # (B, kv_heads, groups, hd)
            return out.reshape(batch, 1, heads * head_dim)
        if groups > 1:
            keys_len = k.shape[2]
            k = k[:, :, None].expand(batch, kv_heads, groups, keys_len, head_dim).reshape(batch, heads, keys_len, -1)
            v = v[:, :, None].expand(batch, kv_heads, groups, keys_len, head_dim).reshape(batch, heads, keys_len, -1)
        if q.dtype != v.dtype:  # under autocast the rotation left q, k in fp32: SDPA would cast them to v's bf16 anyway
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = sdpa(q, k, v, context.mask, context.is_causal, bf16_products=self.bf16_products)  # see sdpa
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


class DecoderBlock(nn.Module):
    """Pre-norm x + attn(norm1(x)), x + mlp(norm2(x)); or post-norm norm1(x + attn(x)), norm2(x + mlp(x)) (OPT-350M)."""

    # Its RoPE, norm, activation and residual passes are memory-bound elementwise work that torch.compile fuses: the
    # llava_shapes instruct step trains 1.28x faster on a 2-core CPU (vlkit.train.compile, bench/compile_step.py).
    compile_in_training = True

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.norm1 = build_norm(config.norm, config.dim, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm2 = build_norm(config.norm, config.dim, config.norm_eps)
        self.mlp = build_mlp(config.dim, config.mlp_dim, config.mlp, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, context: AttentionContext, layer: int) -> torch.Tensor:
        return self.residuals(x, self.attn(self.norm1(x) if self.pre_norm else x, context, layer))

    def attention_inputs(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's q, k, v of the block's input x (normalised first in a pre-norm block)."""
        return self.attn.project(self.norm1(x) if self.pre_norm else x, rope)

    def attention_outputs(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block's output from its input x and the attention's output before projection."""
        return self.residuals(x, self.attn.proj(attended))

    def residuals(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The block's output from its input x and its attention's output: the residuals, the second norm, the MLP."""
        if self.pre_norm:
            x = x + attention
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + attention)
        return self.norm2(x + self.mlp(x))


class DecoderLM(PretrainedModel):
    """``forward`` -> ``LMOutput(logits, loss)``; ``forward_features`` / ``forward_head`` split it at the final hidden
    states; ``generate`` decodes with a KV cache (``new_cache`` makes one for a server's own loop).

    ``decode_step`` is one decoding step of one new token per row over a ``CacheView`` (``generate``'s loop, or a
    server's). ``compile_decoding`` ("auto", "on", "off"): whether a decoding step of one row, or of several in
    lockstep (consecutive cache slots holding equally many positions, as ``generate``'s batches), on a CPU in fp32 or
    bf16 without gradients runs as one compiled function (``torch.compile``): every block with its attention over the
    cache, the final norm and the head in one graph, whose only input that grows is the cache (a dynamic length, so
    it never recompiles as the sequence grows; each batch size is its own graph); the new keys and values come out of
    it and are stored after it. Inside it a one-row product is a multiply-and-sum that inductor emits as one streaming
    reduction, which reads the weights faster than the BLAS and oneDNN kernels do at one row
    (``vlkit.layers.linear``); several rows' products call the eager packed kernel as one opaque operator. The norms,
    rotation, attention and residuals fuse around the products. "auto" does this once such eager steps have read
    ``AUTO_COMPILE_DECODING_BYTES_PER_LAYER`` of weights per layer (``AUTO_COMPILE_BATCHED_FACTOR`` times as much for
    batched steps; compiling takes longer the deeper the model), for models of at least ``COMPILE_DECODING_MIN_BYTES``
    of linear weights, where a C++ compiler is present, and not on Intel CPUs, where the eager step is the faster one
    at one row (MKL's one-row product in fp32, oneDNN's in bf16; on the 2-core AMX Xeon of bench/generate.py eager
    145-152 tok/s against compiled 131-132 in fp32, 182 against 170 in bf16; batched steps not compared there: "on"
    compiles there all the same). If compiling fails, decoding warns once and stays eager. The numbers equal the eager
    ones up to summation order (bench/generate.py: 55 M Qwen2-style, 2-core AVX-512 EPYC, batch 1, fp32: eager 73-79
    tok/s; each block's parts compiled around an eager attention, the nineteenth session, 105-147; the whole step,
    README "Generation").

    ``train_unpadded``: with gradients on, a right-padded batch's blocks run on its real tokens only (``Unpadded``;
    the same loss and gradients, the products and elementwise work of the pads skipped: on a 2-core EPYC the
    ShapesWorld VLMs' instruct steps, 6-15 % of whose positions are pads, 1.04-1.17x faster (``bench/vlm_step.py``),
    their text stage, 63 % pads, 1.5x; README "Speed"). False runs the padded batch as it is.
    """

    config_class = LMConfig
    meta_init = True
    compile_decoding: Literal["auto", "on", "off"] = "auto"
    train_unpadded = True

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        width = config.embed_width
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.embed_in = nn.Linear(width, config.dim, bias=False) if config.token_embed_dim else None
        self.pos_embed = (
            nn.Embedding(config.max_seq_len + config.position_offset, config.dim)
            if config.positions == "learned"
            else None
        )
        assert config.head_dim is not None
        self.rope = (
            Rope1d(
                config.head_dim,
                config.rope_theta,
                config.rope_scaling,
                config.rope_factor,
                config.rope_original_max_seq_len or config.max_seq_len,
                config.rope_low_freq_factor,
                config.rope_high_freq_factor,
            )
            if config.positions == "rope"
            else None
        )
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.norm = build_norm(config.norm, config.dim, config.norm_eps) if config.final_norm else None
        self.embed_out = nn.Linear(config.dim, width, bias=False) if config.token_embed_dim else None
        # Tied: the head reads token_embed.weight directly, so the state dict holds one tensor (safetensors refuses
        # two names for shared storage).
        self.lm_head = None if config.tie_embeddings else nn.Linear(width, config.vocab_size, bias=False)
        self._rope_tables: tuple[tuple[torch.device, torch.dtype], torch.Tensor, torch.Tensor] | None = None  # (L, hd)
        self._init_weights()
        linear_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        linear_params += self.token_embed.weight.numel() if self.lm_head is None else 0
        self.set_weight_packing(4 * linear_params <= PACK_BUDGET_BYTES)
        self._linear_params = linear_params
        # Linear weights read by the eager steps "auto" compile_decoding has seen: batched ones (False), one-row (True).
        self._decoding_bytes = {False: 0, True: 0}

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_weight_packing(self, enabled: bool) -> None:
        """Whether CPU inference runs on packed copies of the linear weights (faster at batch 1-8, twice the
        memory); on by default for models whose linear weights fit ``PACK_BUDGET_BYTES`` in fp32."""
        self.pack_weights = enabled
        use_fast_linears(self, pack=enabled)
        if not enabled:
            release_packed(m.weight for m in self.modules() if isinstance(m, Linear))
            release_packed([self.head_weight])

    def train(self, mode: bool = True) -> DecoderLM:
        """Training changes the weights behind the packed copies, and an optimizer's fused in-place step need not bump
        a tensor's version counter: the copies are dropped whenever the model goes back to training."""
        if mode:
            release_packed(m.weight for m in self.modules() if isinstance(m, Linear))
            release_packed([self.head_weight])
        return super().train(mode)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.token_embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(
        self, num_slots: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVCache:
        """An empty KV cache for ``num_slots`` sequences of up to ``max_len`` positions each."""
        config, weight = self.config, self.token_embed.weight
        assert config.num_kv_heads is not None and config.head_dim is not None
        return KVCache(
            config.depth, num_slots, config.num_kv_heads, max_len, config.head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device,
        )  # fmt: skip

    # --- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, E): what ``inputs_embeds`` replaces."""
        return self.token_embed(input_ids)

    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CacheView | None = None,
        attention_blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, E), E = ``config.embed_width``; the LM head is ``forward_head``.

        ``attention_mask`` (B, T) marks real tokens (1) and padding (0). With ``cache`` it may also span the cached
        tokens too, as transformers passes it (B, past + T): its last T columns describe the new tokens.
        ``attention_blocks`` (B, T) long: tokens of this pass sharing an id >= 0 see each other in both directions (a
        VLM's image tokens, as Gemma 3's); -1 (and any token outside a block) attends causally.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # type: ignore[arg-type]
        batch, length = x.shape[:2]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -length:]
        if attention_blocks is not None and (length == 1 or not bool((attention_blocks >= 0).any())):
            attention_blocks = None  # a block of one token is causal already
        step = None
        if cache is not None:
            if len(cache) != batch:
                raise ValueError(f"cache view has {len(cache)} slots for a batch of {batch}")
            step = cache.begin(length, attention_mask, attention_blocks)
            start = cache.rows(cache.cache.next_position)  # (B,)
            mask, is_causal = step.attention_mask, False
        else:
            start = None
            mask, is_causal = _padding_mask(attention_mask, length, attention_blocks)
        limit = None  # positions stay below it: known on the host unless the caller passed position ids
        if position_ids is None:
            position_ids = _positions(attention_mask, start, batch, length, x.device)
            limit = step.end if step is not None else length
        x, rope = self._block_inputs(x, position_ids, limit)
        unpadded = None
        if (
            self.train_unpadded
            and is_causal
            and attention_mask is not None
            and torch.is_grad_enabled()
            and not bool(attention_mask.all())
        ):
            # Training on a right-padded batch: the blocks see its real tokens only (Unpadded).
            unpadded = Unpadded.of(attention_mask)
            x = unpadded.pack(x)
            if rope is not None:  # (B or 1, T, 1, head_dim): position ids may broadcast over the batch
                cos, sin = (table.expand(batch, length, *table.shape[2:]) for table in rope)
                rope = (unpadded.pack(cos), unpadded.pack(sin))
        context = AttentionContext(rope, mask, is_causal, step, unpadded)
        for layer, block in enumerate(self.blocks):
            x = block(x, context, layer)
        x = self._block_outputs(x)
        if unpadded is not None:
            x = unpadded.unpack(x)
        if step is not None:
            assert start is not None
            step.finish(start + (length if attention_mask is None else attention_mask.sum(-1)))
        return x

    def _block_inputs(
        self, x: torch.Tensor, position_ids: torch.Tensor, limit: int | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The first block's input from the embeddings (B, T, E) at ``position_ids``, and the rotation tables.
        ``limit``: a bound on the positions known without reading them (None: unknown)."""
        if self.embed_in is not None:
            x = self.embed_in(x)
        if self.pos_embed is not None:
            if (limit is None or limit > self.config.max_seq_len) and int(
                position_ids.max()
            ) >= self.config.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} is past max_seq_len {self.config.max_seq_len}")
            x = x + self.pos_embed(position_ids + self.config.position_offset)
        return x, self._rope(position_ids, x.dtype, limit) if self.rope is not None else None

    def _block_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states from the last block's output: the final norm and the output projection."""
        if self.norm is not None:
            x = self.norm(x)
        return x if self.embed_out is None else self.embed_out(x)

    def _rope(
        self, position_ids: torch.Tensor, dtype: torch.dtype, limit: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (B, T, 1, head_dim) in the activations' dtype, as the reference implementations
        rotate (bf16 models rotate in bf16). ``limit``: a bound on the positions known without reading them."""
        assert self.rope is not None
        if limit is None or self.config.rope_scaling == "dynamic":  # dynamic: frequencies follow the longest position
            cos, sin = _signed(*self.rope(position_ids))
            return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)
        tables = self._rope_tables
        if tables is None or tables[0] != (position_ids.device, dtype) or tables[1].shape[0] < limit:
            # One row per position, computed as the direct formula computes it: a decode step then costs two lookups.
            positions = torch.arange(max(limit, self.config.max_seq_len), device=position_ids.device)[None]
            cos, sin = _signed(*self.rope(positions))
            tables = self._rope_tables = ((position_ids.device, dtype), cos[0].to(dtype), sin[0].to(dtype))
        return F.embedding(position_ids, tables[1])[:, :, None], F.embedding(position_ids, tables[2])[:, :, None]

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., E)."""
        return linear(hidden, self.head_weight, pack=self.pack_weights)

    def decode_step(self, input_ids: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """Logits (B, V) of one new token per row (``input_ids`` (B, 1)) after what the rows' cache slots hold; the
        new keys and values are stored in the slots. ``compile_decoding`` may run it compiled (above) when the rows
        decode in lockstep: consecutive slots holding the same number of positions, as ``generate``'s do."""
        x = self.embed(input_ids)
        rows, lengths = len(cache), cache.lengths
        lockstep = (
            input_ids.shape == (rows, 1) and cache.range is not None and len(set(lengths)) == 1 and lengths[0] > 0
        )
        if not lockstep or not self._compiles_decoding(x):
            return self.forward_head(self.forward_features(inputs_embeds=x, cache=cache)[:, -1])
        kv, (first, last), stored = cache.cache, cache.range, lengths[0]  # type: ignore[misc]
        position = kv.next_position[first:last, None]  # (B, 1)
        x, rope = self._block_inputs(x, position, stored + 1)
        keys, values = kv.keys[:, first:last, :, :stored], kv.values[:, first:last, :, :stored]  # (layers, B, ...)
        key_bias = kv.key_bias[first:last, :stored]  # (B, L): -inf at the prompts' padding
        if stored > 1:  # one graph for every cache length (a length of 1 is specialised by the compiler)
            for tensor, length_dim in ((keys, 3), (values, 3), (key_bias, 1)):
                torch._dynamo.mark_dynamic(tensor, length_dim)
        logits, new_keys, new_values = _decoding_step()(self, x, rope, keys, values, key_bias)
        step = cache.begin(1, None)
        step.store(new_keys, new_values)
        step.finish(position[:, 0] + 1)
        return logits

    def _compiles_decoding(self, x: torch.Tensor) -> bool:
        """Whether a decoding step of the embeddings ``x`` (B, 1, D) runs compiled; "auto" counts the steps'
        weights, one-row steps and batched ones apart (they save different shares of a step)."""
        if self.compile_decoding == "off" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if x.device.type != "cpu" or x.dtype not in _DECODING_DTYPES or _DECODING["failed"]:
            return False
        if self.compile_decoding == "on":
            return True
        one_row = x.numel() == x.shape[-1]
        weight_bytes = self._linear_params * x.element_size()
        if MKL_ONE_ROW or weight_bytes < COMPILE_DECODING_MIN_BYTES or not compiler_present():
            return False
        self._decoding_bytes[one_row] += weight_bytes
        threshold = AUTO_COMPILE_DECODING_BYTES_PER_LAYER * (1 if one_row else AUTO_COMPILE_BATCHED_FACTOR)
        return self._decoding_bytes[one_row] > threshold * self.config.depth

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CacheView | None = None,
        labels: torch.Tensor | None = None,
        attention_blocks: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """``labels`` (B, T) are the targets aligned with the inputs (shifted inside, as transformers does);
        -100 marks positions without a target. ``attention_blocks``: see ``forward_features``.

        ``loss_weights`` (B, T), aligned with ``labels``: the loss is the weighted mean of the token losses (default:
        the plain mean). ``return_logits=False`` (training): the head runs only where a target is, and
        ``LMOutput.logits`` is None; a VLM sample's image tokens and prompt then cost the head nothing."""
        hidden = self.forward_features(input_ids, attention_mask, inputs_embeds, position_ids, cache, attention_blocks)
        if not return_logits:
            if labels is None:
                raise ValueError("return_logits=False computes the loss alone and needs labels")
            return LMOutput(None, self.next_token_loss(hidden, labels, loss_weights))
        logits = self.forward_head(hidden)
        loss = None if labels is None else _loss_of_logits(logits, labels, loss_weights)
        return LMOutput(logits, loss)

    def next_token_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The next-token loss of final hidden states (B, T, E), the head applied only at positions with a target."""
        labels = labels.to(hidden.device)
        # Position t predicts token t + 1; a few positions without a target join, to a multiple of ROW_MULTIPLE rows.
        trained = _rows_to_multiple(labels[:, 1:] != -100)
        logits = self.forward_head(hidden[:, :-1][trained])  # (N, V)
        weights = None if weights is None else weights[:, 1:][trained.to(weights.device)]
        return _weighted_cross_entropy(logits, labels[:, 1:][trained], weights)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        streamer: Callable[[torch.Tensor], Any] | None = None,
        generator: torch.Generator | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        attention_blocks: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Prompt + new ids (B, T + steps), as transformers' decoder-only ``generate``; see ``vlkit.lm.generate``.

        Decoding starts from ``self.generation_config`` (a checkpoint's ``generation_config.json``; greedy and 32 new
        tokens without one); ``max_new_tokens`` and ``options``, ``GenerationConfig`` fields (do_sample, temperature,
        top_k, top_p, repetition_penalty, stop_token_ids, stop_strings, pad_token_id, min_new_tokens; transformers'
        ``eos_token_id`` for ``stop_token_ids``), replace its fields one by one. Left-padded ``input_ids`` without an
        ``attention_mask`` get the mask their pad id implies, as in transformers.
        Stop strings are matched in text decoded by ``decode``, by default this model's tokenizer (special tokens
        kept). ``attention_blocks`` (B, T) marks the prompt's bidirectional blocks (see ``forward_features``).
        """
        from vlkit.lm.generate import decoding_config, generate

        return generate(
            self,
            input_ids,
            attention_mask,
            inputs_embeds,
            decoding_config(self, max_new_tokens, **options),
            streamer=streamer,
            generator=generator,
            decode=decode,
            attention_blocks=attention_blocks,
        )


# --- compiled decoding (DecoderLM.compile_decoding)

_DECODING = {"failed": False}  # compilation failed once in this process: every model decodes eagerly from then on
_DECODING_DTYPES = (torch.float32, torch.bfloat16)


def _lockstep_step(
    model: DecoderLM,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoding step of B rows in lockstep from the first block's input x (B, 1, D): logits (B, V) and the new
    token's keys and values of every layer (layers, B, kv_heads, 1, head_dim), over the stored ``keys`` / ``values``
    (layers, B, kv_heads, L, head_dim) and their additive ``key_bias`` (B, L). Nothing is written: the caller stores
    the new keys."""
    new_keys, new_values = [], []
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attention_inputs(x, rope)
        attended = _one_query_attention(q, k, v, keys[layer], values[layer], key_bias)
        x = block.attention_outputs(x, attended.to(x.dtype))
        new_keys.append(k)
        new_values.append(v)
    logits = model.forward_head(model._block_outputs(x)[:, -1])
    return logits, torch.stack(new_keys), torch.stack(new_values)


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor
) -> torch.Tensor:
    """SDPA of one query per row, q (B, heads, 1, hd), over the stored keys / values (B, kv_heads, L, hd) plus the
    row's own k, v (B, kv_heads, 1, hd), without concatenating them: (B, 1, heads * hd), in fp32. Written as products
    and sums that inductor fuses into a few reductions over L; the query heads sharing a key head read it once."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
    stored = (q[:, :, :, None] * keys.float()[:, :, None]).sum(-1)  # (B, kv_heads, groups, L)
    stored = stored + key_bias.float()[:, None, None]
    own = (q * k.float()).sum(-1, keepdim=True)  # (B, kv_heads, groups, 1)
    top = torch.maximum(stored.amax(-1, keepdim=True), own)
    stored, own = (stored - top).exp(), (own - top).exp()
    out = (stored[..., None] * values.float()[:, :, None]).sum(-2) + own * v.float()  # (B, kv_heads, groups, hd)
    return (out / (stored.sum(-1, keepdim=True) + own)).reshape(batch, 1, heads * head_dim)


def _fallible(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` through ``torch.compile`` (static shapes but for the dims marked dynamic: a decoding step's cache
    length), eager once that fails."""
    return compiled_or_eager(
        torch.compile(function, dynamic=False), function, _DECODING, "compiling the decoding step failed",
        "decoding continues eagerly (model.compile_decoding = 'off' skips the attempt)",
    )  # fmt: skip


@functools.cache
def _decoding_step() -> Callable[..., Any]:
    """The compiled ``_lockstep_step``, shared by every model."""
    return _fallible(_lockstep_step)


def _rows_to_multiple(chosen: torch.Tensor) -> torch.Tensor:
    """``chosen`` (bool) with its first unchosen positions added until it counts a multiple of ``ROW_MULTIPLE`` (or
    every position)."""
    count = int(chosen.sum())
    extra = min(-count % ROW_MULTIPLE, chosen.numel() - count)
    if extra == 0:
        return chosen
    flat = chosen.flatten().clone()
    flat[(~flat).nonzero()[:extra, 0]] = True
    return flat.view_as(chosen)


def _loss_of_logits(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The next-token loss of full logits (B, T, V) against ``labels`` (B, T), -100 ignored."""
    labels = labels.to(logits.device)
    weights = None if weights is None else weights[:, 1:].flatten()
    return _weighted_cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), weights)


def _weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy (fp32) of logits (N, V), mean over targets != -100, or weighted by ``weights`` (N,)."""
    if weights is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)
    losses = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    weights = weights.to(losses).masked_fill(targets == -100, 0.0)
    return (losses * weights).sum() / weights.sum()


def _signed(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_half(x) * sin == roll(x, head_dim/2) * (sin with its first half negated)."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _padding_mask(
    attention_mask: torch.Tensor | None, length: int, blocks: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, bool]:
    """Without a cache: SDPA's causal kernel when nothing is padded or the padding is all on the right (a training
    batch: under the causal pattern no real token sees a later pad, and a pad's own output, which nothing reads,
    still sees the real tokens) and no bidirectional ``blocks`` (B, T) exist, else a bool (B, 1, T, T) mask."""
    right_padded = attention_mask is None or not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())
    if right_padded and blocks is None:
        return None, True  # no real token after a pad
    device = (attention_mask if attention_mask is not None else blocks).device  # type: ignore[union-attr]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (T, T)
    real = torch.ones(1, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    # Each position also sees itself, so a padded query row is never empty (SDPA would give NaN there).
    mask = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)  # (B or 1, T, T)
    if blocks is not None:
        mask = mask | same_block(blocks, blocks)
    return mask[:, None], False  # (B, 1, T, T)


def _positions(
    attention_mask: torch.Tensor | None, start: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Position ids (B, T): counted over real tokens only (left padding sits at 0), from each slot's next position."""
    if attention_mask is None:
        positions = torch.arange(length, device=device).expand(batch, length)
    else:
        real = attention_mask.long()
        positions = (real.cumsum(-1) - 1).masked_fill(real == 0, 0)
    return positions if start is None else positions + start[:, None]

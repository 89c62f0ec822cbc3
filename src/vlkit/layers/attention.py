"""Multi-head attention on ``F.scaled_dot_product_attention``.

``Attention``: self-attention with one fused QKV projection, (B, N, D) -> (B, N, D), optional boolean or additive
mask and causal flag (Vaswani et al., 2017), and optional rotary tables (``vlkit.layers.rope``) applied to q and k.
``segment_mask``: the block-diagonal mask of sequences packed with several items (NaViT's patch n' pack).
``CrossAttention``: queries from one sequence, fused KV from another.
``AttentionPool``: multi-head attention pooling with learned probe queries — the MAP head of SigLIP / big_vision
(Zhai et al., 2023) and the pooling bridge of Molmo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.cpuinfo import amx_tiles, avx512_bf16
from vlkit.layers.mlp import build_mlp
from vlkit.layers.rope import RopeTables, apply_rope

# PyTorch's CPU flash-attention kernel in bf16, measured against the same kernel on fp32 copies of q, k, v (forward +
# backward; bench/README.md, "On an AMX CPU" and `cpu_kernels.py`):
# - without AMX tiles (AVX-512 bf16, AVX2) bf16 is slower in both directions (1.1-2x on ViT/text-sized attention):
#   attention under bf16 autocast runs in fp32 there.
# - with AMX the bf16 forward is the faster one (9.3 vs 13.9 ms for a ViT-B/16 layer at batch 16), but the bf16
#   backward pays a large fixed cost per (batch, head) pair: 3.5x the fp32 kernel's time at 64 keys x 32 channels,
#   2.3x at 64 x 64, even at 256 x 64, ahead only from about 512 x 64 (0.74x) or 256 x 128 (0.72x). So in training
#   the forward stays bf16 and the backward runs in fp32 wherever keys x head_dim <= _AMX_FP32_BACKWARD_MAX.
# - without AMX but with AVX-512 bf16 dot products (not emulated, as on AVX2 alone), training with no mask can run
#   as two bf16 products and a softmax (`_math_attention`, where the caller allows it: `bf16_products`, off by
#   default) while the (queries x keys) scores stay small beside q, k and v: up to 4 keys per head channel causal (the
#   kernel skips the masked half, the products do not), 8 otherwise. Measured on an AVX-512 EPYC in two runs
#   (bench/results/cpu_kernels_epyc.json is the second): 0.34-0.87 and 0.35-1.37 of the fp32 kernel's forward +
#   backward time in the 21 cells of the grid within those limits (32-wide heads at 128-256 keys flip between runs),
#   0.76-2.17 beyond them; the gradients' error relative to fp64, 0.5-1.8 %, is about the bf16 flash kernel's
#   (0.4-1.1 %; the fp32 kernel's 0.1-0.5 %). But the first product rounds the scores to bf16 before the softmax
#   (flash kernels keep them in fp32): on a trained tower's q, k, v the output and dv errors are 2-3x the bf16 flash
#   kernel's, and three language models trained from scratch this way gave the demo's VLM VQA 0.69-0.76 against
#   0.80-0.87 for the kernel's three (docs/experiments.md, the thirty-eighth session). Hence off by default; CPU
#   PyTorch has no bf16 x bf16 -> fp32 product, and the scores as an fp32 product keep little of the speed.
# Asked once, at import: a constant is what torch.compile can trace (it will not trace the CPU query itself).
_CPU_BF16_ATTENTION_SLOW = not amx_tiles()
_CPU_BF16_PRODUCTS = avx512_bf16()
_AMX_FP32_BACKWARD_MAX = 256 * 64
_MATH_KEYS_PER_CHANNEL_CAUSAL = 4
_MATH_KEYS_PER_CHANNEL = 8


def _cpu_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _fp32_on_this_cpu(x: torch.Tensor) -> bool:
    """Whether attention on ``x`` (bf16 on a CPU without AMX) is faster computed in fp32, in both directions."""
    return _cpu_bf16(x) and _CPU_BF16_ATTENTION_SLOW


def _fp32_backward_on_this_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the backward of bf16 attention is faster in fp32 on an AMX CPU: short keys, narrow heads."""
    return _cpu_bf16(q) and not _CPU_BF16_ATTENTION_SLOW and k.shape[-2] * q.shape[-1] <= _AMX_FP32_BACKWARD_MAX


def _math_on_this_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """Whether bf16 attention with gradients is faster as products and a softmax (no AMX, AVX-512 bf16, few keys per
    head channel)."""
    per_channel = _MATH_KEYS_PER_CHANNEL_CAUSAL if is_causal else _MATH_KEYS_PER_CHANNEL
    same = q.dtype == k.dtype == v.dtype
    return same and _CPU_BF16_PRODUCTS and _fp32_on_this_cpu(q) and k.shape[-2] <= per_channel * q.shape[-1]


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v in q's dtype: two products and a softmax (which computes in fp32 inside and
    rounds its output), as transformers' eager attention does in bf16; the (.., queries, keys) probabilities are kept
    for backward. ``is_causal`` masks as SDPA does (query i sees keys 0..i).

    One custom op each way (``vlkit::attention_products`` and its backward), so that torch.compile calls these ATen
    kernels instead of generating its own softmax: inside the compiled LM block inductor fused the softmax with the
    layout copies around it and laid k and the gradients out transposed, which cost two thirds of the products' gain
    (`llava_shapes`' instruct step: 1.02x where the eager kernels give more; bench/README.md, "Attention as two
    products")."""
    with torch.autocast(q.device.type, enabled=False):
        return _products(q.contiguous(), k.contiguous(), v.contiguous(), is_causal)[0]


@torch.library.custom_op("vlkit::attention_products", mutates_args=())
def _products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, probabilities) of attention over contiguous q, k, v (``_math_attention``)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if is_causal:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores, -1)
    return torch.matmul(probs, v).contiguous(), probs.contiguous()


@_products.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((*q.shape[:-1], k.shape[-2]))


@torch.library.custom_op("vlkit::attention_products_backward", mutates_args=())
def _products_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from the output's ``grad`` and the kept probabilities."""
    grad_v = torch.matmul(probs.transpose(-2, -1), grad)
    grad_scores = torch._softmax_backward_data(torch.matmul(grad, v.transpose(-2, -1)), probs, -1, probs.dtype)
    grad_scores.mul_(q.shape[-1] ** -0.5)
    grad_q, grad_k = torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-2, -1), q)
    return grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous()


@_products_backward.register_fake
def _(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _products_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k, v, _ = inputs
    ctx.save_for_backward(q, k, v, output[1])


def _products_grad(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, probs = ctx.saved_tensors  # type: ignore[attr-defined]
    return (*_products_backward(grad.contiguous(), q, k, v, probs), None)


_products.register_autograd(_products_grad, setup_context=_products_setup)


def _additive_fp32(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool (True = attend) or additive mask as the fp32 additive bias the CPU flash kernel takes."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


class _Fp32Attention(torch.autograd.Function):
    """SDPA on bf16 q, k, v with the CPU flash kernel's backward in fp32, keeping bf16 tensors for backward.

    ``fp32_forward``: the forward in fp32 too (CPUs without AMX); otherwise the bf16 kernel's forward, whose output
    and log-sum-exp (fp32) the fp32 backward takes as they are. Casting q, k, v to fp32 before
    ``F.scaled_dot_product_attention`` would leave autograd holding fp32 q, k, v and output (16 bytes per element,
    against 8 for the bf16 kernel): 350 MiB more at the peak of a ViT-B/16 CLIP step. Here the bf16 inputs and the
    bf16 output (the same tensor the output projection keeps) are saved and cast again in backward, so the fp32 path
    costs no memory: 6 bytes per element beyond the output.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        fp32_forward: bool,
    ) -> torch.Tensor:
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with torch.autocast("cpu", enabled=False):
            if fp32_forward:
                out, lse = kernel(q.float(), k.float(), v.float(), 0.0, is_causal, attn_mask=mask)
            else:
                out, lse = kernel(q, k, v, 0.0, is_causal, attn_mask=None if mask is None else mask.to(q.dtype))
        out = out.to(q.dtype)  # keeps the kernel's (B, N, heads, head_dim) memory order: merging heads is a view
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal = is_causal
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, mask = ctx.saved_tensors  # type: ignore[attr-defined]
        with torch.autocast("cpu", enabled=False):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.is_causal, attn_mask=mask
            )
        return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)), None, None, None)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    bf16_products: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the output in the dtype of q.

    bf16 on a CPU: where bf16 attention is slower than fp32 (``_CPU_BF16_ATTENTION_SLOW``: no AMX), q, k, v are
    attended in fp32 (in training through ``_Fp32Attention``, which keeps no fp32 copies) and the output cast back,
    except, where the caller allows it (``bf16_products``), in training without a mask over few keys per head channel,
    which runs ``_math_attention`` in bf16; on AMX CPUs training with short keys and narrow heads keeps the bf16
    forward and runs the backward in fp32 (``_fp32_backward_on_this_cpu``). Without autocast and bf16 (plain fp32
    training) this is exactly the plain call.
    """
    fp32 = _fp32_on_this_cpu(q)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if bf16_products and training and mask is None and _math_on_this_cpu(q, k, v, is_causal):
        return _math_attention(q, k, v, is_causal)
    if training and not (mask is not None and mask.requires_grad) and (fp32 or _fp32_backward_on_this_cpu(q, k)):
        return _Fp32Attention.apply(q, k, v, _additive_fp32(mask), is_causal, fp32)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(torch.float32 if fp32 else q.dtype)
    if not fp32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 copies back to bf16
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal)
    return out.to(q.dtype)


def allow_bf16_products(model: nn.Module) -> Callable[[], None]:
    """Let every attention module of ``model`` that can (its class has ``bf16_products``: ``Attention``, the
    language model's ``CausalSelfAttention``) run bf16 training as two products (``sdpa``: on CPUs without AMX that
    have AVX-512 bf16, a no-op elsewhere), for one training run (``TrainConfig.attention_products``); returns the
    undo, which gives each module its class's setting back."""
    modules = [module for module in model.modules() if hasattr(type(module), "bf16_products")]
    for module in modules:
        module.bf16_products = True

    def undo() -> None:
        for module in modules:
            module.__dict__.pop("bf16_products", None)

    return undo


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (S, 1, L, L) mask from segment ids (S, L): a token attends only to tokens of its own segment.

    Padding must carry one shared id (vlkit uses -1): padding then attends to padding, so no row is fully masked
    (SDPA would return NaN there, and a NaN value times a zero weight still poisons the real tokens' outputs).
    """
    return (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, num_heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)  # (B, L, heads * head_dim)


class Attention(nn.Module):
    """Self-attention with fused QKV. ``mask``: bool (True = attend) or additive float, broadcast to (B, h, N, N).

    ``bf16_products``: whether bf16 training on a CPU without AMX may run as two products (``sdpa``): 1.11-1.14x on
    the demo's tower step, off by default as in the language model (``CausalSelfAttention.bf16_products``): the
    scores are rounded to bf16, and the tower trained with them held out 72.0 / 71.0 / 83.75 % of the validation
    split's combinations against the kernel's 76.75 / 84.5 / 77.0 % (docs/experiments.md, the thirty-eighth session).
    """

    bf16_products = False

    def __init__(
        self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv(x)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        # Unbinding dim 2 (not a permuted dim 0) gives the same strided views, but autograd's stack then writes the
        # q/k/v gradients straight into a contiguous (B, N, 3, heads, head_dim) tensor: one copy fewer per layer.
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # 3 x (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if is_causal and mask is not None:
            # SDPA takes a mask or is_causal, not both: fold the causal pattern into the mask instead of dropping it.
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # (N, N)
            if mask.dtype == torch.bool:
                mask = mask & causal
            else:
                mask = mask + torch.zeros_like(causal, dtype=mask.dtype).masked_fill(~causal, float("-inf"))
        out = sdpa(q, k, v, mask, is_causal and mask is None, bf16_products=self.bf16_products)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries (B, M, D_q) attend to a context (B, N, D_kv); output (B, M, D_q), or (B, M, out_dim) when given.

    ``key_pos`` (B or 1, N, D_kv): a position embedding added to the context on the key path only, k = W_k (context +
    pos), v = W_v context, as DETR and Qwen-VL's resampler do.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = context.shape
        q, kv = self.q(x), self.kv(context)
        q = _split_heads(q, self.num_heads)  # (B, heads, M, head_dim)
        k, v = kv.view(batch, length, 2, self.num_heads, self.head_dim).unbind(2)  # 2 x (B, N, heads, head_dim)
        if key_pos is not None:
            # W_k is linear, so the position is projected on its own and added after the one fused KV matmul.
            pos_k = F.linear(key_pos, self.kv.weight[: self.num_heads * self.head_dim])
            k = k + pos_k.view(-1, length, self.num_heads, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, head_dim)
        out = sdpa(q, k, v, mask)
        return self.proj(_merge_heads(out))


class AttentionPool(nn.Module):
    """MAP head: ``num_queries`` learned probes cross-attend to the tokens, then a residual MLP.

    (B, N, D) -> (B, num_queries, D). SigLIP uses one probe and takes its output as the pooled embedding.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        num_queries: int = 1,
        act: str = "gelu_tanh",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.probe, std=0.02)
        self.attn = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = build_mlp(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, M, D)
        pooled = self.attn(probe, x, mask=mask)
        return pooled + self.mlp(self.norm(pooled))

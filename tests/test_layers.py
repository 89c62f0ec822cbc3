"""Each layer in vlkit.layers against a slow, obvious reference written here."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.layers import (
    Attention,
    AttentionPool,
    CrossAttention,
    DropPath,
    FactorizedPosEmbed2d,
    LayerNorm2d,
    LearnedPosEmbed2d,
    Mlp,
    PatchEmbed,
    RMSNorm,
    Rope2d,
    RopeTables,
    SwiGLU,
    TransformerBlock,
    build_mlp,
    build_norm,
    grid_positions,
    segment_mask,
    sincos_2d,
    sincos_2d_at,
)

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and biases everywhere (zero-initialised biases would hide bias bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


def _naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """q (B, h, M, d), k/v (B, h, N, d); ``allowed`` bool broadcast to (B, h, M, N). One row at a time."""
    batch, heads, length_q, head_dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(length_q):
                scores = (k[b, h] @ q[b, h, i]) / math.sqrt(head_dim)  # (N,)
                if allowed is not None:
                    row = allowed.expand(batch, heads, length_q, k.shape[2])[b, h, i]
                    scores = scores.masked_fill(~row, float("-inf"))
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, i] = weights @ v[b, h]
    return out


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.reshape(batch, length, num_heads, inner // num_heads).transpose(1, 2)  # (B, h, L, d)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _reference_self_attention(attn: Attention, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    inner = attn.num_heads * attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = x @ w[:inner].T + b[:inner]
    k = x @ w[inner : 2 * inner].T + b[inner : 2 * inner]
    v = x @ w[2 * inner :].T + b[2 * inner :]
    out = _naive_attention(_heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads), allowed)
    return _merge(out) @ attn.proj.weight.T + attn.proj.bias


def _reference_cross_attention(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    inner = attn.num_heads * attn.head_dim
    q = x @ attn.q.weight.T + attn.q.bias
    k = context @ attn.kv.weight[:inner].T + attn.kv.bias[:inner]
    v = context @ attn.kv.weight[inner:].T + attn.kv.bias[inner:]
    out = _naive_attention(_heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads))
    return _merge(out) @ attn.proj.weight.T + attn.proj.bias


# --- attention


@pytest.mark.parametrize("head_dim", [None, 5])
def test_attention_matches_naive_softmax_no_mask(head_dim: int | None) -> None:
    torch.manual_seed(0)
    attn = _randomize(Attention(12, num_heads=3, head_dim=head_dim)).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference_self_attention(attn, x, None), **TIGHT)


def test_attention_boolean_padding_mask() -> None:
    torch.manual_seed(1)
    attn = _randomize(Attention(8, num_heads=2)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = keep[:, None, None, :]  # (B, 1, 1, N)
    out = attn(x, mask=mask)
    torch.testing.assert_close(out, _reference_self_attention(attn, x, mask), **TIGHT)
    # The masked keys' content must not matter.
    x2 = x.clone()
    x2[0, 4:] = torch.randn(2, 8, dtype=torch.float64) * 10
    torch.testing.assert_close(attn(x2, mask=mask)[0, :4], out[0, :4], **TIGHT)
    assert not torch.allclose(attn(x2)[0, :4], attn(x)[0, :4])


def test_attention_additive_mask_equals_boolean_mask() -> None:
    torch.manual_seed(2)
    attn = _randomize(Attention(8, num_heads=2)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attn(x, mask=additive), _reference_self_attention(attn, x, keep), **TIGHT)


def test_attention_causal() -> None:
    torch.manual_seed(3)
    attn = _randomize(Attention(8, num_heads=2)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    out = attn(x, is_causal=True)
    torch.testing.assert_close(out, _reference_self_attention(attn, x, causal), **TIGHT)
    assert not torch.allclose(out, attn(x))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_causal_combined_with_padding_mask(kind: str) -> None:
    torch.manual_seed(4)
    attn = _randomize(Attention(8, num_heads=2)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 0]], dtype=torch.bool)[:, None, None, :]
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    allowed = keep & torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, mask=mask, is_causal=True), _reference_self_attention(attn, x, allowed), **TIGHT)


def _bf16_forward_backward(
    attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor
) -> list[torch.Tensor]:
    """``attend``'s output on bf16 copies of q, k, v and, after backward of ``grad_out``, their gradients."""
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    out.backward(grad_out)
    return [out, *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
@pytest.mark.parametrize("case", ["none", "bool", "additive", "causal", "cross"])
def test_bf16_attention_in_fp32_matches_the_cast_and_keeps_no_fp32_copies(
    monkeypatch: pytest.MonkeyPatch, case: str, amx: bool
) -> None:
    """On CPUs without AMX, attention under bf16 autocast runs in fp32 (faster there); on AMX CPUs training keeps the
    bf16 forward and runs the backward in fp32 for short keys. Outputs and gradients must be those of SDPA on fp32
    copies of q, k, v (to bf16 rounding), and autograd must keep no fp32 tensor the size of q, k or v (so the path
    costs no more memory than the bf16 kernel)."""
    from vlkit.layers import attention

    monkeypatch.setattr(attention, "_CPU_BF16_ATTENTION_SLOW", not amx)
    monkeypatch.setattr(attention, "_MATH_KEYS_PER_CHANNEL_CAUSAL", 0)  # the two products: their own tests, below
    monkeypatch.setattr(attention, "_MATH_KEYS_PER_CHANNEL", 0)
    routed: list[bool] = []
    apply = attention._Fp32Attention.apply
    monkeypatch.setattr(attention._Fp32Attention, "apply", lambda *args: routed.append(args[-1]) or apply(*args))
    torch.manual_seed(6)
    keys = 12 if case == "cross" else 9
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, keys, 16), torch.randn(2, 4, keys, 16)
    keep = torch.rand(2, 1, 9, keys) > 0.3
    keep[..., 0] = True
    mask = {"bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))}.get(case)
    causal = case == "causal"
    grad_out = torch.randn(q.shape).bfloat16()

    ours = _bf16_forward_backward(lambda q, k, v: attention.sdpa(q, k, v, mask, causal), q, k, v, grad_out)
    cast = _bf16_forward_backward(lambda q, k, v: F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal).bfloat16(), q, k, v, grad_out)  # fmt: skip
    for got, expected in zip(ours, cast, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert routed == [not amx], "the fp32 path (both directions without AMX, the backward with AMX) was not taken"

    module = _randomize(CrossAttention(64, num_heads=4) if case == "cross" else Attention(64, num_heads=4))
    x = torch.randn(2, 9, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    keep_saved = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with keep_saved, torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, torch.randn(2, 12, 64)) if case == "cross" else module(x, mask=mask, is_causal=causal)
    large_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= q.numel()]
    assert not large_fp32, f"fp32 tensors kept for backward: {large_fp32}"
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("case", ["none", "causal", "cross", "causal-cross"])
def test_bf16_attention_as_two_products_matches_the_fp32_kernel(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Without AMX, bf16 training attention with no mask over few keys per head channel runs as two bf16 products
    and a softmax: outputs and gradients are SDPA's on fp32 copies to bf16 rounding (the causal pattern aligned as
    SDPA aligns it when queries and keys differ in number), and autograd keeps no fp32 tensor."""
    from vlkit.layers import attention

    monkeypatch.setattr(attention, "_CPU_BF16_ATTENTION_SLOW", True)
    monkeypatch.setattr(attention, "_CPU_BF16_PRODUCTS", True)
    routed: list[bool] = []
    math_attention = attention._math_attention
    monkeypatch.setattr(attention, "_math_attention", lambda *args: routed.append(True) or math_attention(*args))
    torch.manual_seed(7)
    keys = 12 if "cross" in case else 9
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, keys, 16), torch.randn(2, 4, keys, 16)
    causal = case.startswith("causal")
    grad_out = torch.randn(q.shape).bfloat16()

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = _bf16_forward_backward(
            lambda q, k, v: attention.sdpa(q, k, v, None, causal, bf16_products=True), q, k, v, grad_out
        )
    cast = _bf16_forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal),
        q, k, v, grad_out,
    )  # fmt: skip
    for got, expected in zip(ours, cast, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert routed == [True], "the two products were not taken"
    assert not [t.shape for t in saved if t.dtype == torch.float32], "fp32 tensors kept for backward"


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attention_products_ops_pass_opcheck_and_compile(monkeypatch: pytest.MonkeyPatch, is_causal: bool) -> None:
    """The two custom ops behind the products: fake kernels, autograd registration and schema as torch.library checks
    them, and a compiled self-attention layer (dynamic lengths) giving the eager layer's outputs and gradients."""
    from vlkit.layers import attention

    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 4, 7, 16).bfloat16().requires_grad_() for _ in range(3))
    torch.library.opcheck(attention._products, (q, k, v, is_causal))
    probs = attention._products(q, k, v, is_causal)[1].detach()
    grad = torch.randn(2, 4, 7, 16).bfloat16()
    torch.library.opcheck(attention._products_backward, (grad, *(t.detach() for t in (q, k, v)), probs))

    monkeypatch.setattr(attention, "_CPU_BF16_ATTENTION_SLOW", True)
    monkeypatch.setattr(attention, "_CPU_BF16_PRODUCTS", True)
    calls: list[bool] = []
    products = attention._products
    monkeypatch.setattr(attention, "_products", lambda *args: calls.append(True) or products(*args))
    layer = _randomize(Attention(64, num_heads=4))
    layer.bf16_products = True  # the towers' default is the kernel
    compiled = torch.compile(layer, dynamic=True)

    def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, is_causal=is_causal)
        out.float().square().sum().backward()
        return [out.float(), x.grad, layer.qkv.weight.grad]

    for length in (9, 13):
        x = torch.randn(2, length, 64)
        for got, expected in zip(run(compiled, x), run(layer, x), strict=True):
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert calls, "the products were not taken"


def test_bf16_attention_as_two_products_only_in_training_without_mask_for_short_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller that does not allow them (the towers' ``Attention`` by default), a mask, more keys per head channel
    than the limits (4 causal, 8 otherwise), no gradients, an AMX CPU or one without AVX-512 bf16 (bf16 products
    emulated) keep the flash kernel."""
    from vlkit.layers import attention

    routed: list[bool] = []
    math_attention = attention._math_attention
    monkeypatch.setattr(attention, "_math_attention", lambda *args: routed.append(True) or math_attention(*args))
    head_dim = 16
    causal_limit = attention._MATH_KEYS_PER_CHANNEL_CAUSAL * head_dim
    limit = attention._MATH_KEYS_PER_CHANNEL * head_dim
    for keys, causal, grad, mask, cpu, allowed, expected in [
        (limit, False, True, False, "avx512_bf16", True, [True]),
        (limit, False, True, False, "avx512_bf16", False, []),
        (limit + 1, False, True, False, "avx512_bf16", True, []),
        (causal_limit, True, True, False, "avx512_bf16", True, [True]),
        (causal_limit + 1, True, True, False, "avx512_bf16", True, []),
        (8, False, True, True, "avx512_bf16", True, []),
        (8, False, False, False, "avx512_bf16", True, []),
        (8, False, True, False, "amx", True, []),
        (8, False, True, False, "avx2", True, []),
    ]:
        monkeypatch.setattr(attention, "_CPU_BF16_ATTENTION_SLOW", cpu != "amx")
        monkeypatch.setattr(attention, "_CPU_BF16_PRODUCTS", cpu != "avx2")
        routed.clear()
        q = torch.randn(1, 2, 4, head_dim).bfloat16().requires_grad_(grad)
        kv = torch.randn(1, 2, keys, head_dim).bfloat16()
        keep = torch.ones(1, 1, 4, keys, dtype=torch.bool) if mask else None
        out = attention.sdpa(q, kv, kv, keep, causal, bf16_products=allowed)
        assert out.dtype == torch.bfloat16 and routed == expected, (keys, causal, grad, mask, cpu, allowed, routed)


def test_bf16_attention_on_amx_keeps_the_bf16_kernel_for_long_keys_and_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """With AMX, the fp32 backward is taken only in training with keys x head_dim <= _AMX_FP32_BACKWARD_MAX; long
    keys, and attention without gradients, run the bf16 kernel as they are."""
    from vlkit.layers import attention

    monkeypatch.setattr(attention, "_CPU_BF16_ATTENTION_SLOW", False)
    routed: list[bool] = []
    apply = attention._Fp32Attention.apply
    monkeypatch.setattr(attention._Fp32Attention, "apply", lambda *args: routed.append(args[-1]) or apply(*args))
    head_dim = 16
    longest = attention._AMX_FP32_BACKWARD_MAX // head_dim
    for keys, grad, expected in [(longest, True, [False]), (longest + 1, True, []), (8, False, [])]:
        routed.clear()
        q = torch.randn(1, 2, 4, head_dim).bfloat16().requires_grad_(grad)
        kv = torch.randn(1, 2, keys, head_dim).bfloat16()
        out = attention.sdpa(q, kv, kv)
        assert out.dtype == torch.bfloat16 and routed == expected, (keys, grad, routed)


def test_cross_attention_matches_naive() -> None:
    torch.manual_seed(5)
    attn = _randomize(CrossAttention(8, num_heads=2, context_dim=6)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    context = torch.randn(2, 7, 6, dtype=torch.float64)
    out = attn(x, context)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, _reference_cross_attention(attn, x, context), **TIGHT)


def test_attention_pool_matches_naive() -> None:
    torch.manual_seed(6)
    pool = _randomize(AttentionPool(8, num_heads=2, mlp_dim=16, num_queries=2, act="gelu_tanh")).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    probe = pool.probe.expand(3, -1, -1)
    pooled = _reference_cross_attention(pool.attn, probe, x)
    normed = F.layer_norm(pooled, (8,), pool.norm.weight, pool.norm.bias, pool.norm.eps)
    hidden = normed @ pool.mlp.fc1.weight.T + pool.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    expected = pooled + hidden @ pool.mlp.fc2.weight.T + pool.mlp.fc2.bias
    out = pool(x)
    assert out.shape == (3, 2, 8)
    torch.testing.assert_close(out, expected, **TIGHT)


# --- MLPs


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
    "relu": lambda x: x.clamp_min(0),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_mlp_activation_formulas(act: str) -> None:
    torch.manual_seed(7)
    mlp = _randomize(Mlp(6, 10, act=act, out_dim=4)).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64) * 2
    hidden = ACTIVATIONS[act](x @ mlp.fc1.weight.T + mlp.fc1.bias)
    torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias, **TIGHT)


def test_quick_gelu_gradient_matches_its_formula() -> None:
    """QuickGELU's hand-written backward (silu's derivative at 1.702 x) is the derivative of x * sigmoid(1.702 x)."""
    from vlkit.layers.mlp import QuickGELU

    x = (torch.randn(4, 7, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    grad = torch.randn(4, 7, dtype=torch.float64)
    (ours,) = torch.autograd.grad(QuickGELU()(x), x, grad)
    (formula,) = torch.autograd.grad(ACTIVATIONS["quick_gelu"](x), x, grad)
    torch.testing.assert_close(ours, formula, **TIGHT)


def test_quick_gelu_differs_from_gelu() -> None:
    # Loading OpenAI CLIP weights with the wrong GELU would silently degrade it: the two must not coincide.
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    quick = Mlp(1, 1, act="quick_gelu").act(x)
    exact = Mlp(1, 1, act="gelu").act(x)
    assert (quick - exact).abs().max() > 1e-3


def test_unknown_activation_raises() -> None:
    with pytest.raises(ValueError, match="swish"):
        Mlp(4, 8, act="swish")


def test_swiglu_matches_silu_gate_times_up() -> None:
    torch.manual_seed(8)
    mlp = _randomize(SwiGLU(6, 10, bias=True)).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    projected = x @ mlp.gate_up.weight.T + mlp.gate_up.bias
    gate, up = projected[..., :10], projected[..., 10:]
    expected = (gate / (1 + torch.exp(-gate)) * up) @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), expected, **TIGHT)
    assert isinstance(build_mlp(6, 10, "swiglu"), SwiGLU)
    assert isinstance(build_mlp(6, 10, "gelu"), Mlp)


# --- norms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rmsnorm_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(9)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = (torch.randn(3, 4, 8, dtype=torch.float64) * 3 + 1).to(dtype)
    x64 = x.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    out = norm(x)
    assert out.dtype == dtype
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.double(), expected, **tol)


def test_build_norm() -> None:
    assert isinstance(build_norm("layernorm", 4, 1e-6), nn.LayerNorm)
    assert isinstance(build_norm("rmsnorm", 4, 1e-6), RMSNorm)
    with pytest.raises(ValueError, match="batchnorm"):
        build_norm("batchnorm", 4, 1e-6)  # type: ignore[arg-type]


def test_layernorm2d_equals_permuted_layernorm() -> None:
    torch.manual_seed(10)
    norm = _randomize(LayerNorm2d(5, eps=1e-6)).double()
    reference = nn.LayerNorm(5, eps=1e-6).double()
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 2 + 1
    out = norm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), **TIGHT)
    # Per pixel, the channels are normalised: with unit weight and zero bias, mean 0 and variance 1 over C.
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    plain = norm(x)
    torch.testing.assert_close(plain.mean(1), torch.zeros(2, 3, 4, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        plain.var(1, unbiased=False), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-4, rtol=0
    )


# --- patch embedding


@pytest.mark.parametrize(("height", "width", "grid"), [(32, 32, (4, 4)), (30, 36, (3, 4)), (16, 47, (2, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_embed_equals_conv2d(height: int, width: int, grid: tuple[int, int], bias: bool) -> None:
    torch.manual_seed(11)
    embed = _randomize(PatchEmbed(8, 12, in_channels=3, bias=bias)).double()
    pixels = torch.randn(2, 3, height, width, dtype=torch.float64)
    tokens, out_grid = embed(pixels)
    expected = F.conv2d(pixels, embed.proj.weight, embed.proj.bias, stride=8)  # (B, D, h, w), floors like conv
    assert out_grid == grid == tuple(expected.shape[2:])
    assert tokens.shape == (2, grid[0] * grid[1], 12)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), **TIGHT)


# --- position embeddings


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a = -0.75)."""

    def near(d: float) -> float:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: float) -> float:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """Bicubic resampling along one axis, align_corners=False, border taps clamped; one output at a time."""
    x = x.movedim(axis, 0)
    length = x.shape[0]
    scale = length / size
    out = []
    for j in range(size):
        source = (j + 0.5) * scale - 0.5
        base = math.floor(source)
        weights = _cubic_weights(source - base)
        out.append(sum(w * x[min(max(base - 1 + i, 0), length - 1)] for i, w in enumerate(weights)))
    return torch.stack(out).movedim(0, axis)


def test_learned_pos_embed_native_grid_is_table_unchanged() -> None:
    torch.manual_seed(12)
    pos = LearnedPosEmbed2d((3, 4), 6, num_prefix=1)
    assert pos.weight.shape == (1, 13, 6)
    assert pos((3, 4)) is pos.weight


@pytest.mark.parametrize(("num_prefix", "new_grid"), [(1, (5, 6)), (0, (2, 7)), (1, (3, 2))])
def test_learned_pos_embed_bicubic_resize(num_prefix: int, new_grid: tuple[int, int]) -> None:
    torch.manual_seed(13)
    pos = LearnedPosEmbed2d((3, 4), 6, num_prefix=num_prefix).double()
    with torch.no_grad():
        pos.weight.normal_()
    out = pos(new_grid)
    assert out.shape == (1, num_prefix + new_grid[0] * new_grid[1], 6)
    torch.testing.assert_close(out[:, :num_prefix], pos.weight[:, :num_prefix], rtol=0, atol=0)
    table = pos.weight[0, num_prefix:].detach().reshape(3, 4, 6)  # (h, w, D), row-major
    expected = _resize_axis(_resize_axis(table, new_grid[0], 0), new_grid[1], 1).reshape(-1, 6)
    torch.testing.assert_close(out[0, num_prefix:], expected, atol=1e-6, rtol=1e-6)


def test_learned_pos_embed_resize_keeps_rows_and_columns_apart() -> None:
    # A table that varies only down the rows must still vary only down the rows after resizing.
    pos = LearnedPosEmbed2d((4, 3), 2)
    with torch.no_grad():
        rows = torch.arange(4.0)[:, None, None].expand(4, 3, 2)  # value = row index
        pos.weight.copy_(rows.reshape(1, 12, 2))
    out = pos((4, 5)).reshape(4, 5, 2)
    torch.testing.assert_close(out, torch.arange(4.0)[:, None, None].expand(4, 5, 2))


def test_sincos_2d_values() -> None:
    grid, dim = (3, 5), 16
    table = sincos_2d(grid, dim)
    assert table.shape == (15, 16)
    quarter = dim // 4
    for index in range(15):
        y, x = divmod(index, grid[1])
        for k in range(quarter):
            omega = 1.0 / 10000.0 ** (k / (quarter - 1))
            expected = [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega), math.cos(y * omega)]
            got = [float(table[index, part * quarter + k]) for part in range(4)]
            assert got == pytest.approx(expected, abs=1e-5), (index, k)


def test_sincos_2d_rejects_dim_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


# --- transformer block pieces


def test_drop_path_identity_in_eval_and_when_rate_zero() -> None:
    x = torch.randn(16, 3, 4)
    drop = DropPath(0.5).eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_train_drops_whole_samples_and_rescales() -> None:
    torch.manual_seed(14)
    x = torch.rand(20000, 2, 3) + 1.0  # strictly positive, so a kept sample is never all zeros
    out = DropPath(0.25).train()(x)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = ~dropped
    assert ((out == 0).flatten(1).any(dim=1) == dropped).all(), "a sample is dropped whole or not at all"
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.2 < float(dropped.float().mean()) < 0.3
    # Unbiased: the mean survives (std of this estimate is about 0.006).
    torch.testing.assert_close(out.mean(), x.mean(), atol=0.03, rtol=0)


def test_transformer_block_matches_reference() -> None:
    torch.manual_seed(15)
    block = _randomize(TransformerBlock(8, num_heads=2, mlp_dim=16, act="quick_gelu", layer_scale=0.5)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    h = x + block.scale1.gamma * _reference_self_attention(
        block.attn, F.layer_norm(x, (8,), block.norm1.weight, block.norm1.bias, block.norm1.eps), causal
    )
    hidden = F.layer_norm(h, (8,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    hidden = ACTIVATIONS["quick_gelu"](hidden @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    expected = h + block.scale2.gamma * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    torch.testing.assert_close(block(x, is_causal=True), expected, **TIGHT)


def test_transformer_block_causal_ignores_future_tokens() -> None:
    torch.manual_seed(16)
    block = _randomize(TransformerBlock(8, num_heads=2, mlp_dim=16)).eval()
    x = torch.randn(2, 7, 8)
    for t in range(6):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(2, 6 - t, 8)
        before, after = block(x, is_causal=True), block(changed, is_causal=True)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])
        # Without the causal flag the same change does reach position t.
        assert not torch.allclose(block(changed)[:, : t + 1], block(x)[:, : t + 1])


# --- 2D RoPE, packed-sequence masks, factorised and per-image resized position embeddings


def _slow_rope_2d(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x (N, d), positions (N, 2): rotate channel pair (i, i + d/2) by row * f_i for i < d/4, by col * f_(i-d/4)
    for d/4 <= i < d/2, with f_k = theta^(-4k/d). One pair at a time, as 2x2 rotation matrices."""
    length, head_dim = x.shape
    quarter = head_dim // 4
    out = x.clone()
    for n in range(length):
        for i in range(head_dim // 2):
            axis, k = (0, i) if i < quarter else (1, i - quarter)
            angle = float(positions[n, axis]) * theta ** (-4.0 * k / head_dim)
            rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                                    dtype=x.dtype)  # fmt: skip
            pair = torch.stack([x[n, i], x[n, i + head_dim // 2]])
            out[n, i], out[n, i + head_dim // 2] = rotation @ pair
    return out


def test_rope_2d_matches_slow_rotation_reference() -> None:
    torch.manual_seed(20)
    head_dim = 8
    positions = torch.tensor([[0, 0], [0, 3], [2, 1], [5, 4], [7, 0]])
    x = torch.randn(2, 3, len(positions), head_dim, dtype=torch.float64)  # (B, heads, N, d)
    tables = Rope2d(head_dim)(positions[None])
    from vlkit.layers import apply_rope

    out = apply_rope(x, RopeTables(tables.cos.double(), tables.sin.double()))
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, h], _slow_rope_2d(x[b, h], positions), atol=1e-6, rtol=1e-6)


def test_rope_2d_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(21)
    from vlkit.layers import apply_rope

    rope = Rope2d(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(query_at: tuple[int, int], key_at: tuple[int, int]) -> float:
        rotated_q = apply_rope(q, rope(torch.tensor([[query_at]])))
        rotated_k = apply_rope(k, rope(torch.tensor([[key_at]])))
        return float((rotated_q * rotated_k).sum())

    assert score((3, 5), (1, 2)) == pytest.approx(score((7, 9), (5, 6)), abs=1e-4)
    assert score((3, 5), (1, 2)) != pytest.approx(score((3, 5), (2, 1)), abs=1e-3)  # rows and columns differ


def test_rope_2d_needs_head_dim_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope2d(6)


def test_attention_with_rope_matches_naive_on_rotated_q_k() -> None:
    torch.manual_seed(22)
    attn = _randomize(Attention(16, 2), seed=3).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    positions = grid_positions((1, 5))[None].expand(2, -1, -1)
    tables = Rope2d(8)(positions)
    tables = RopeTables(tables.cos.double(), tables.sin.double())
    inner = 16
    w, b = attn.qkv.weight, attn.qkv.bias
    q = _heads(x @ w[:inner].T + b[:inner], 2)
    k = _heads(x @ w[inner : 2 * inner].T + b[inner : 2 * inner], 2)
    v = _heads(x @ w[2 * inner :].T + b[2 * inner :], 2)
    q = torch.stack([torch.stack([_slow_rope_2d(q[i, h], positions[i]) for h in range(2)]) for i in range(2)])
    k = torch.stack([torch.stack([_slow_rope_2d(k[i, h], positions[i]) for h in range(2)]) for i in range(2)])
    expected = _merge(_naive_attention(q, k, v)) @ attn.proj.weight.T + attn.proj.bias
    # The tables hold fp32 angles (as every RoPE implementation does); the reference rotates by exact ones.
    torch.testing.assert_close(attn(x, rope=tables), expected, atol=1e-5, rtol=1e-5)


def test_segment_mask_is_block_diagonal_and_padding_sees_only_padding() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    mask = segment_mask(segments)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for s in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(mask[s, 0, i, j]) == (int(segments[s, i]) == int(segments[s, j])), (s, i, j)
    assert mask.any(dim=-1).all()  # no fully masked row: SDPA would give NaN there


def test_factorized_pos_embed_at_row_and_col() -> None:
    torch.manual_seed(23)
    pos = FactorizedPosEmbed2d((5, 7), 4)
    positions = torch.tensor([[[0, 0], [4, 6], [2, 3]]])
    out = pos(positions)
    for n, (row, col) in enumerate(positions[0].tolist()):
        torch.testing.assert_close(out[0, n], pos.rows[row] + pos.cols[col], rtol=0, atol=0)
    table = pos.grid((2, 3))
    torch.testing.assert_close(table[1 * 3 + 2], pos.rows[1] + pos.cols[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_grid"):
        pos.grid((6, 2))


def test_sincos_2d_at_equals_the_grid_table_at_those_positions() -> None:
    table = sincos_2d((4, 6), 16)
    positions = torch.tensor([[3, 5], [0, 2], [1, 0]])
    torch.testing.assert_close(sincos_2d_at(positions, 16), table[positions[:, 0] * 6 + positions[:, 1]])


def _slow_antialiased_bilinear(table: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """Resize one axis with the triangle filter stretched by the scale when shrinking (PIL / torch antialias)."""
    length = table.shape[axis]
    x = table.movedim(axis, 0)
    scale = length / size
    support = max(scale, 1.0)
    out = []
    for j in range(size):
        centre = (j + 0.5) * scale - 0.5
        weights = [max(0.0, 1 - abs(i - centre) / support) for i in range(length)]
        total = sum(weights)
        out.append(sum(w / total * x[i] for i, w in enumerate(weights)))
    return torch.stack(out).movedim(0, axis)


@pytest.mark.parametrize("new_grid", [(2, 7), (6, 3), (1, 1)])
def test_learned_pos_embed_bilinear_antialias_resize(new_grid: tuple[int, int]) -> None:
    torch.manual_seed(24)
    pos = LearnedPosEmbed2d((4, 5), 3, interpolation="bilinear_antialias").double()
    table = pos.weight[0].detach().reshape(4, 5, 3)
    expected = _slow_antialiased_bilinear(_slow_antialiased_bilinear(table, new_grid[0], 0), new_grid[1], 1)
    torch.testing.assert_close(pos.resized(new_grid), expected.reshape(-1, 3), atol=1e-6, rtol=1e-6)


def test_learned_pos_embed_packed_gathers_each_images_resized_table() -> None:
    torch.manual_seed(25)
    pos = LearnedPosEmbed2d((3, 3), 4, interpolation="bilinear_antialias")
    grids = torch.tensor([[2, 4], [3, 3], [2, 4]])
    segments = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    positions = torch.tensor([[[0, 3], [1, 1], [2, 2], [0, 0], [0, 0]], [[1, 0], [1, 3], [0, 2], [0, 0], [0, 0]]])
    out = pos.packed(positions, segments, grids)
    for s in range(2):
        for n in range(5):
            image = int(segments[s, n])
            if image < 0:
                assert out[s, n].abs().sum() == 0
                continue
            grid = tuple(grids[image].tolist())
            row, col = positions[s, n].tolist()
            torch.testing.assert_close(out[s, n], pos.resized(grid)[row * grid[1] + col])

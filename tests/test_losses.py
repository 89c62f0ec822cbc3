"""Contrastive losses against full-matrix references: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.losses import ClipLoss, SigLipLoss


def _features(batch: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype)


# --- CLIP


def _clip_reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    logits = (scale * image.double() @ text.double().T).tolist()
    size = len(logits)
    image_to_text = -sum(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i])) for i in range(size)) / size
    columns = [[logits[i][j] for i in range(size)] for j in range(size)]
    text_to_image = -sum(columns[j][j] - math.log(sum(math.exp(v) for v in columns[j])) for j in range(size)) / size
    return (image_to_text + text_to_image) / 2


def test_clip_loss_matches_two_cross_entropies() -> None:
    image, text = _features(6, 5, torch.float64, seed=0)
    scale = torch.tensor(7.5, dtype=torch.float64)
    loss = ClipLoss()(image, text, scale)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(_clip_reference(image, text, 7.5), rel=1e-6)


def test_clip_loss_is_asymmetric_in_directions_but_averaged() -> None:
    # A non-square-symmetric similarity: swapping image and text transposes the logits; the average must not care.
    image, text = _features(5, 4, torch.float64, seed=1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(image, text, scale), ClipLoss()(text, image, scale))
    # Shifting all logits by a bias leaves both softmaxes unchanged.
    torch.testing.assert_close(
        ClipLoss()(image, text, scale, torch.tensor(-4.0, dtype=torch.float64)), ClipLoss()(image, text, scale)
    )


def test_clip_loss_perfect_alignment_is_small() -> None:
    eye = torch.eye(4)
    assert float(ClipLoss()(eye, eye, torch.tensor(50.0))) < 1e-6
    assert float(ClipLoss()(eye, eye.flip(0), torch.tensor(50.0))) > 10


# --- SigLIP


def _siglip_reference(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """-1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)) over the full (B, B) matrix, autograd does the rest."""
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    signs = 2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def _loss_and_grads(
    loss_fn, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, text, scale)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_(True))
    loss = loss_fn(*leaves[:3], leaves[3] if bias is not None else None)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), list(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 16])
def test_siglip_chunked_matches_full_matrix(dtype: torch.dtype, chunk_size: int) -> None:
    batch = 10  # not divisible by 3 or 7
    image, text = _features(batch, 6, dtype, seed=2)
    scale = torch.tensor(10.0, dtype=dtype)
    bias = torch.tensor(-3.0, dtype=dtype)
    loss, grads = _loss_and_grads(SigLipLoss(chunk_size), image, text, scale, bias)
    expected, expected_grads = _loss_and_grads(_siglip_reference, image, text, scale, bias)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected, **tol)
    for name, got, want in zip(("image", "text", "scale", "bias"), grads, expected_grads, strict=True):
        assert got.dtype == want.dtype == dtype, name
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_siglip_without_bias_matches_reference() -> None:
    image, text = _features(7, 4, torch.float64, seed=3)
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss, grads = _loss_and_grads(SigLipLoss(3), image, text, scale, None)
    expected, expected_grads = _loss_and_grads(_siglip_reference, image, text, scale, None)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    # And the bias really enters the loss when given.
    with_bias = SigLipLoss(3)(image, text, scale, torch.tensor(-2.0, dtype=torch.float64))
    assert not torch.allclose(with_bias, loss)


def test_siglip_gradcheck_float64() -> None:
    image, text = _features(5, 3, torch.float64, seed=4)
    inputs = (
        image.requires_grad_(True),
        text.requires_grad_(True),
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
        torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
    )
    loss = SigLipLoss(chunk_size=2)
    assert torch.autograd.gradcheck(lambda x, y, t, b: loss(x, y, t, b), inputs)


def test_siglip_gradient_through_logit_scale_parameter() -> None:
    # The usual call: logit_scale = exp(log_scale) from the model; chain rule through the custom backward.
    image, text = _features(6, 4, torch.float32, seed=5)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    SigLipLoss(4)(image, text, log_scale.exp(), None).backward()
    reference_log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    _siglip_reference(image, text, reference_log_scale.exp(), None).backward()
    torch.testing.assert_close(log_scale.grad, reference_log_scale.grad)


def test_siglip_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="shapes differ"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(4, 2), torch.tensor(1.0))


def test_siglip_bfloat16_runs_and_is_close_to_float32() -> None:
    image, text = _features(12, 8, torch.float32, seed=6)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss32, grads32 = _loss_and_grads(SigLipLoss(5), image, text, scale, bias)
    loss16, grads16 = _loss_and_grads(
        SigLipLoss(5), image.bfloat16(), text.bfloat16(), scale.bfloat16(), bias.bfloat16()
    )
    assert torch.isfinite(loss16)
    torch.testing.assert_close(loss16.float(), loss32, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads16, grads32, strict=True):
        assert got.dtype == torch.bfloat16
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=2e-2)


def test_siglip_perfect_alignment_beats_random() -> None:
    eye = torch.eye(6)
    scale, bias = torch.tensor(20.0), torch.tensor(-10.0)
    aligned = SigLipLoss(4)(eye, eye, scale, bias)
    shuffled = SigLipLoss(4)(eye, eye.roll(1, 0), scale, bias)
    assert float(aligned) < 1e-3 < 5 < float(shuffled)


# --- under bf16 autocast


@pytest.mark.parametrize("loss_fn", [SigLipLoss(5), ClipLoss()], ids=["siglip", "clip"])
def test_losses_score_in_fp32_under_bf16_autocast(loss_fn) -> None:
    # A tower under bf16 autocast hands the loss bf16 features. Near SigLIP's bias of -10 a bf16 logit is resolved to
    # 1/16, which moves a pair's sigmoid gradient by up to ~6 %: the logits must be formed in fp32 whatever the
    # autocast context, and the gradients must equal the fp32 loss's on the same (bf16-valued) features.
    image, text = _features(12, 8, torch.bfloat16, seed=7)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    leaves = [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)  # outside autocast, as the trainer (and PyTorch's guide) calls it
    want, want_grads = _loss_and_grads(loss_fn, image.float(), text.float(), scale, bias)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for name, got, expected in zip(("image", "text", "scale", "bias"), grads, want_grads, strict=True):
        assert got.dtype == (torch.bfloat16 if name in ("image", "text") else torch.float32), name
        torch.testing.assert_close(got.float(), expected.to(got.dtype).float(), rtol=0, atol=0, msg=name)

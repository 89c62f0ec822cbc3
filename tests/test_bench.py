"""The analytic FLOP count ``bench/train_step.py`` reports GFLOP/s from."""

import importlib.util
from pathlib import Path

import vlkit

_spec = importlib.util.spec_from_file_location("train_step", Path(__file__).parents[1] / "bench" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_stem_flops_count_the_patch_embedding_and_every_conv_of_a_conv_stem() -> None:
    patch = vlkit.create_model("test_clip").image_encoder
    size, p, dim = patch.config.image_size, patch.config.patch_size, patch.config.dim
    # One (D, 3*p*p) matmul per patch, although the patch embedding's forward never calls its Conv2d.
    assert train_step.stem_weight_positions(patch.patch_embed, size) == dim * 3 * p * p * (size // p) ** 2
    # shapes_siglip's conv stem at 64 px: 3->32 at 32x32, 32->64 at 16x16, 64->128 at 8x8, 3x3 kernels.
    stem = vlkit.create_model("shapes_siglip").image_encoder.patch_embed
    expected = 9 * (3 * 32 * 32 * 32 + 32 * 64 * 16 * 16 + 64 * 128 * 8 * 8)
    assert train_step.stem_weight_positions(stem, 64) == expected


def test_step_flops_scale_with_the_batch() -> None:
    model = vlkit.create_model("shapes_siglip")
    one, four = train_step.step_flops(model, 1, 32), train_step.step_flops(model, 4, 32)
    assert four["total"] == 4 * one["total"] > 0

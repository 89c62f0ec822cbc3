"""NaViT's patch n' pack in vlkit's ViT: packed sequences give each image exactly the output it gets alone.

Also: the packer (first-fit, padding, segment ids), patch dropout on whole-image batches and before packing, the
input policies of the recipe at equal compute, and a training step on packed ShapesWorld batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vlkit
from graph_utils import order_dependent_sums
from vlkit.data.packing import (
    PackingCollate,
    PatchedImage,
    drop_patches,
    first_fit,
    pack_images,
    patchify,
    resize_to_budget,
    size_for_max_patches,
)
from vlkit.data.shapes import ShapesConfig, generate
from vlkit.encoders.vit import PackedImages, ViT, ViTConfig, kept_patch_count
from vlkit.losses import SigLipLoss
from vlkit.recipes import get_recipe
from vlkit.tasks.navit import NativeTransform, NaViTDataset, input_policies, navit_step

POLICIES = ["learned", "sincos", "none", "factorized", "rope2d"]


def _vit(pos_embed: str, pool: str = "map", **changes: Any) -> ViT:
    torch.manual_seed(0)
    fields = dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, class_token=False, pool=pool,
                  pos_embed=pos_embed, max_grid=8)  # fmt: skip
    config = ViTConfig(**{**fields, **changes})  # type: ignore[arg-type]
    model = ViT(config).eval()
    with torch.no_grad():  # no parameter at a special value (zero biases, unit norms) that could hide a bug
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # 3x5 and 4x2 patch grids (one wider, one taller), the second with pixels past its last whole patch
    return [torch.randn(3, 24, 40, generator=generator), torch.randn(3, 35, 16, generator=generator)]


@pytest.mark.parametrize("pool", ["map", "mean"])
@pytest.mark.parametrize("pos_embed", POLICIES)
def test_two_images_in_one_sequence_equal_each_image_alone(pos_embed: str, pool: str) -> None:
    model = _vit(pos_embed, pool, pos_embed_interpolation="bilinear_antialias")
    images = _images()
    result = pack_images([patchify(image, 8) for image in images], seq_len=32)
    assert result.packed.patches.shape == (1, 32, 8 * 8 * 3)
    assert result.packed.images_per_sequence.tolist() == [2]
    with torch.no_grad():
        packed = model(result.packed)
        alone = torch.cat([model(image[None]) for image in images])
    assert packed.shape == (2, 32)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed", ["learned", "rope2d"])
def test_padding_does_not_change_outputs(pos_embed: str) -> None:
    model = _vit(pos_embed)
    patched = [patchify(image, 8) for image in _images(1)]
    with torch.no_grad():
        tight = model(pack_images(patched, seq_len=23).packed)
        padded = pack_images(patched, seq_len=40, num_sequences=3).packed
        padded.patches[padded.segment_ids < 0] = 1e3  # padding content must not matter either
        loose = model(padded)
    torch.testing.assert_close(tight, loose, atol=1e-5, rtol=1e-5)


def test_images_never_attend_to_each_other() -> None:
    model = _vit("factorized")
    first, second = _images(2)
    with torch.no_grad():
        before = model(pack_images([patchify(first, 8), patchify(second, 8)], 32).packed)
        after = model(pack_images([patchify(first, 8), patchify(second * 3 + 1, 8)], 32).packed)
        features = model.forward_features(pack_images([patchify(first, 8), patchify(second, 8)], 32).packed)
    torch.testing.assert_close(before[0], after[0], atol=1e-6, rtol=0)
    assert (before[1] - after[1]).abs().max() > 1e-3
    segments = torch.tensor([[0, 0, 1, 1, -1]])
    positions = torch.zeros(1, 5, 2, dtype=torch.long)
    mask = PackedImages(torch.zeros(1, 5, 3), positions, segments, torch.ones(2, 2, dtype=torch.long)).attention_mask()
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(mask[0, 0], expected.bool())
    assert features.tokens.shape == (1, 32, 32)


def test_packed_forward_backward_and_images_in_order_across_sequences() -> None:
    model = _vit("factorized").train()
    images = [torch.randn(3, 8 * h, 8 * w) for h, w in [(3, 4), (2, 3), (2, 4), (2, 2)]]
    result = pack_images([patchify(image, 8) for image in images], seq_len=16)
    assert [sorted(set(row.tolist()) - {-1}) for row in result.packed.segment_ids] == [[0, 3], [1, 2]]
    pooled = model(result.packed)
    pooled.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(result.packed), torch.cat([model(image[None]) for image in images]),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("pos_embed", POLICIES)
def test_packed_backward_adds_in_a_fixed_order(pos_embed: str) -> None:
    # Packed images share grids and every image repeats row and column ids: a gather whose backward accumulates in
    # thread-timing order would make packed training differ from run to run on a multi-threaded CPU.
    model = _vit(pos_embed).train()
    images = [torch.randn(3, 8 * h, 8 * w) for h, w in [(3, 4), (3, 4), (2, 4), (3, 4)]]
    assert not order_dependent_sums(model(pack_images([patchify(image, 8) for image in images], seq_len=32).packed))


def test_packed_input_refuses_a_class_token_and_wrong_patch_size() -> None:
    patched = pack_images([patchify(torch.randn(3, 16, 16), 8)], 8).packed
    with pytest.raises(ValueError, match="class_token=False"):
        ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, mlp_dim=64))(patched)
    with pytest.raises(ValueError, match="packed patches have"):
        _vit("learned", patch_size=4)(patched)
    with pytest.raises(ValueError, match="max_grid"):
        _vit("factorized")(pack_images([patchify(torch.randn(3, 8, 80), 8)], 10).packed)


def test_from_padded_reads_siglip2_processor_layout() -> None:
    values = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    packed = PackedImages.from_padded(values, mask, torch.tensor([[2, 3], [1, 3]]))
    assert packed.segment_ids.tolist() == [[0] * 6, [1, 1, 1, -1, -1, -1]]
    assert packed.position_ids[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert packed.position_ids[1, :3].tolist() == [[0, 0], [0, 1], [0, 2]]
    assert packed.padding_fraction.item() == pytest.approx(0.25)


# --- patch dropout


def test_patch_dropout_keeps_prefix_tokens_and_the_right_count() -> None:
    torch.manual_seed(3)
    config = ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32, patch_dropout=0.3)
    model = ViT(config).train()
    tokens = torch.arange(2 * 17 * 16, dtype=torch.float32).reshape(2, 17, 16)
    kept, keep = model._drop_patches(tokens)
    count = kept_patch_count(16, 0.3)
    assert count == 11 and kept.shape == (2, 1 + count, 16) and keep.shape == (2, count)
    torch.testing.assert_close(kept[:, 0], tokens[:, 0])  # the class token always stays, first
    for row in range(2):
        assert keep[row].tolist() == sorted(set(keep[row].tolist()))  # distinct, in raster order
        torch.testing.assert_close(kept[row, 1:], tokens[row, 1 + keep[row]])
    assert not torch.equal(keep[0], keep[1])  # a separate draw per image
    pixels = torch.randn(2, 3, 32, 32)
    assert model.forward_features(pixels).tokens.shape == (2, 1 + count, 16)
    assert model.eval().forward_features(pixels).tokens.shape == (2, 17, 16)  # evaluation keeps every token


def test_patch_dropout_with_rope_rotates_kept_tokens_by_their_own_positions() -> None:
    model = _vit("rope2d", pool="mean", patch_dropout=0.5).train()
    pixels = torch.randn(1, 3, 32, 32)
    torch.manual_seed(4)
    with torch.no_grad():
        dropped = model(pixels)
    torch.manual_seed(4)
    _, keep = model._drop_patches(torch.zeros(1, 16, 32))  # the same draw
    patched = patchify(pixels[0], 8)
    kept = PatchedImage(patched.patches[keep[0]], patched.position_ids[keep[0]], patched.grid)
    with torch.no_grad():
        expected = model.eval()(pack_images([kept], 16).packed)
    torch.testing.assert_close(dropped, expected, atol=1e-5, rtol=1e-5)


def test_drop_patches_before_packing_keeps_positions_and_packs_denser() -> None:
    patched = patchify(torch.randn(3, 32, 48), 8)
    generator = torch.Generator().manual_seed(5)
    dropped = drop_patches(patched, 0.5, generator)
    assert dropped.num_tokens == 12 and dropped.grid == (4, 6)
    rows = (dropped.position_ids[:, 0] * 6 + dropped.position_ids[:, 1]).tolist()
    assert rows == sorted(set(rows))
    torch.testing.assert_close(dropped.patches, patched.patches[rows])
    full = pack_images([patched] * 4, seq_len=24)
    half = pack_images([drop_patches(patched, 0.5, generator) for _ in range(4)], seq_len=24)
    assert full.packed.patches.shape[0] == 4 and half.packed.patches.shape[0] == 2


# --- the packer


def test_first_fit_fills_the_first_sequence_with_room() -> None:
    assert first_fit([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert first_fit([5, 3, 4, 2, 6], 8, max_bins=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="image 1 has 9 tokens"):
        first_fit([2, 9], 8)


def test_pack_images_layout_and_padding_fraction() -> None:
    images = [patchify(torch.randn(3, 8 * h, 8 * w), 8) for h, w in [(2, 2), (1, 3), (2, 3), (1, 1)]]
    result = pack_images(images, seq_len=8, num_sequences=1)
    packed = result.packed
    # First-fit-decreasing: the 6-token image goes first, the 1-token one fills the gap, the 4- and 3-token ones
    # find no room; kept images keep their input order.
    assert result.kept == [2, 3] and result.overflow == 2
    assert packed.segment_ids.tolist() == [[0, 0, 0, 0, 0, 0, 1, -1]]
    assert packed.grids.tolist() == [[2, 3], [1, 1]]
    assert packed.images_per_sequence.tolist() == [2]
    assert packed.padding_fraction.item() == pytest.approx(1 / 8)
    sparse = pack_images(images[:1], seq_len=8, num_sequences=2).packed
    assert sparse.segment_ids.tolist() == [[0, 0, 0, 0, -1, -1, -1, -1], [-1] * 8]
    assert sparse.images_per_sequence.tolist() == [1, 0]
    assert sparse.padding_fraction.item() == pytest.approx(0.75)
    torch.testing.assert_close(packed.patches[0, :6], images[2].patches)
    assert packed.position_ids[0, :6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    everything = pack_images(images, seq_len=8).packed  # as many sequences as needed: 6+1, 4+3
    assert everything.segment_ids.tolist() == [[2, 2, 2, 2, 2, 2, 3, -1], [0, 0, 0, 0, 1, 1, 1, -1]]


def test_patchify_layout_is_row_col_channel() -> None:
    pixels = torch.randn(3, 16, 24)
    patched = patchify(pixels, 8)
    assert patched.grid == (2, 3) and patched.patches.shape == (6, 192)
    row, col = 1, 2
    patch = pixels[:, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]  # (3, 8, 8)
    torch.testing.assert_close(patched.patches[row * 3 + col], patch.permute(1, 2, 0).flatten())


def test_size_for_max_patches_keeps_aspect_within_budget() -> None:
    for height, width, budget in [(480, 640, 256), (64, 200, 64), (10, 10, 4), (1000, 20, 16)]:
        new_height, new_width = size_for_max_patches(height, width, 16, budget)
        assert new_height % 16 == 0 and new_width % 16 == 0
        assert (new_height // 16) * (new_width // 16) <= budget
    assert size_for_max_patches(480, 640, 16, 256) == (224, 288)  # 14 x 18 = 252 patches
    assert resize_to_budget(torch.randn(3, 480, 640), 16, 256).shape == (3, 224, 288)


# --- recipe pieces


def _shapes_samples(count: int, seed: int = 0) -> list[dict[str, Any]]:
    config = ShapesConfig(aspect_ratios=(0.5, 2.0), seed=seed)
    transform = NativeTransform()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        ids = torch.randint(3, 100, (16,), generator=generator)
        ids[6:] = 1
        mask = (torch.arange(16) < 7).long()
        samples.append({"pixels": transform(generate(config, "train", index).image), "input_ids": ids,
                        "attention_mask": mask, "index": index})  # fmt: skip
    return samples


def test_navit_dataset_collate_and_step_train_the_test_preset() -> None:
    torch.manual_seed(6)
    model = vlkit.create_model("test_navit").train()
    dataset = NaViTDataset(_shapes_samples(6), patch_size=8, max_patches=(4, 16), seed=1)
    samples = [dataset[index] for index in range(6)]
    assert len({tuple(sample["pixels"].shape) for sample in samples}) > 1  # native aspect ratios, sampled budgets
    assert all((s["pixels"].shape[1] // 8) * (s["pixels"].shape[2] // 8) <= 16 for s in samples)
    assert torch.equal(dataset[2]["pixels"], samples[2]["pixels"])  # a pure function of (seed, epoch, index)
    batch = PackingCollate(patch_size=8, seq_len=16, patch_dropout=model.config.vision.patch_dropout)(samples)
    assert batch["input_ids"].shape == (len(batch["kept"]), 16)
    output = navit_step(SigLipLoss())(model, batch)
    output.loss.backward()
    packed = PackedImages.from_dict(batch)
    assert output.metrics["padding_fraction"] == pytest.approx(float(packed.padding_fraction))
    assert 0.0 <= output.metrics["padding_fraction"] < 1.0
    assert torch.isfinite(output.loss) and model.image_encoder.pos_embed.rows.grad is not None


def test_input_policies_use_the_same_token_slots_and_all_train() -> None:
    torch.manual_seed(7)
    policies = input_policies(4, patch_size=8, max_patches=16, min_patches=4, oversample=1.5)
    assert {setup.token_slots for setup in policies.values()} == {4 * 16}
    assert policies["pack"].samples_per_batch == 6 and policies["resize_square"].samples_per_batch == 4
    model = vlkit.create_model("test_navit").train()
    images = [generate(ShapesConfig(aspect_ratios=(0.5, 2.0)), "train", index).image for index in range(6)]
    for name, setup in policies.items():
        base = [{"pixels": setup.transform(image), "input_ids": torch.randint(3, 100, (16,)),
                 "attention_mask": torch.ones(16, dtype=torch.long)} for image in images]  # fmt: skip
        dataset = setup.wrap_dataset(base)
        batch = setup.collate_fn([dataset[index] for index in range(setup.samples_per_batch)])
        batch.pop("skipped", None)
        if name == "pack":
            assert batch["patches"].shape[:2] == (4, 16)
        else:
            assert batch["pixels"].shape == (4, 3, 32, 32)
        output = setup.step_fn(SigLipLoss())(model, batch)
        output.loss.backward()
        assert torch.isfinite(output.loss), name


def test_navit_recipe_uses_native_aspect_ratio_data() -> None:
    recipe = get_recipe("navit_shapes")
    assert recipe.model == "navit_shapes" and recipe.data.config.aspect_ratios == (0.5, 2.0)
    assert vlkit.get_config(recipe.model).vision.pos_embed == "factorized"

"""Every bridge in vlkit.bridges: shapes, counts, gradients, batches of different grids, and slow references.

Every kind runs a batch of two images with different grids (padding filled with noise, not zeros) and must give
each image the output it gets alone; patch merger, pixel shuffle, attention pooling, the resampler, the adaptive
pooling and the deformable sampling are each compared with a slow, obvious reference written here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_utils import order_dependent_sums
from vlkit.bridges import (
    BRIDGES,
    AttentionPoolConfig,
    BridgeConfig,
    CAbstractorConfig,
    DAbstractorConfig,
    LinearBridgeConfig,
    MLPBridgeConfig,
    PatchMergerConfig,
    PixelShuffleConfig,
    QFormer,
    QFormerConfig,
    ResamplerConfig,
    build_bridge,
)
from vlkit.bridges.c_abstractor import CAbstractor
from vlkit.bridges.d_abstractor import DAbstractor, DeformableAttention
from vlkit.bridges.grid import adaptive_pool_weights, to_canvas
from vlkit.bridges.resampler import Resampler
from vlkit.config import ConfigBase, config_from_dict, register_config

VISION, LM = 16, 24
CLOSE = {"atol": 1e-5, "rtol": 1e-5}

CONFIGS: dict[str, Any] = {
    "linear": LinearBridgeConfig(),
    "mlp": MLPBridgeConfig(act="gelu_tanh", mlp_dim=20),
    "pixel_shuffle": PixelShuffleConfig(factor=2),
    "qformer": QFormerConfig(
        num_queries=4, dim=12, depth=3, num_heads=2, mlp_dim=20, text_input=True, vocab_size=30, max_seq_len=8
    ),
    "resampler_qwen_vl": ResamplerConfig(num_queries=4, dim=VISION, num_heads=2),
    "resampler_minicpm_v": ResamplerConfig(
        num_queries=5, dim=12, num_heads=3, query_pos_embed=False, key_pos_embed="computed"
    ),
    "c_abstractor": CAbstractorConfig(num_queries=4, dim=12, depth=2, pos_embed_grid=(4, 4)),
    "d_abstractor": DAbstractorConfig(
        num_queries=4, dim=12, depth=2, num_heads=2, num_points=3, mlp_dim=16, pos_embed_grid=(4, 4)
    ),
    "attention_pool": AttentionPoolConfig(num_heads=2, dim=12, mlp_dim=20),
    "attention_pool_gelu": AttentionPoolConfig(num_heads=4, head_dim=3, act="gelu", mlp_bias=True),
    "patch_merger": PatchMergerConfig(mlp_dim=32),
}
DIVISIBLE_ONLY = {"pixel_shuffle", "patch_merger"}


def _grids(name: str) -> list[tuple[int, int]]:
    """Two different grids per batch; odd and non-square where the bridge allows it."""
    return [(4, 6), (2, 4)] if name in DIVISIBLE_ONLY else [(3, 5), (4, 2)]


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bridge = build_bridge(CONFIGS[name], VISION, LM)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in bridge.parameters():  # no weight left at a special init (zero offsets, unit norms)
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return bridge.eval()


def _images(grids: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows * cols, VISION, generator=generator) for rows, cols in grids]


def _pad(images: list[torch.Tensor], grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-aligned batch; the padding is noise, so any leak of padding into a real output shows."""
    length = max(len(image) for image in images)
    tokens = 5 * torch.randn(len(images), length, VISION, generator=torch.Generator().manual_seed(99))
    mask = torch.zeros(len(images), length, dtype=torch.bool)
    for b, image in enumerate(images):
        tokens[b, : len(image)] = image
        mask[b, : len(image)] = True
    return tokens, torch.tensor(grids), mask


def _real(out: Any, b: int) -> torch.Tensor:
    tokens = out.tokens[b]
    return tokens if out.mask is None else tokens[out.mask[b]]


# --- interface


def test_every_kind_is_registered_and_built_by_kind() -> None:
    kinds = {config.kind for config in CONFIGS.values()}
    assert kinds == set(BRIDGES)
    for name, config in CONFIGS.items():
        assert isinstance(build_bridge(config, VISION, LM), BRIDGES[config.kind]), name
    with pytest.raises(ValueError, match="no bridge for config kind"):
        build_bridge(object(), VISION, LM)  # type: ignore[arg-type]


@register_config
@dataclasses.dataclass(frozen=True)
class _Holder(ConfigBase):
    """Stands in for the VLM config: a field typed with the union of every bridge config."""

    kind: ClassVar[str] = "test_bridge_holder"
    bridge: BridgeConfig = dataclasses.field(default_factory=LinearBridgeConfig)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trips_through_json_inside_a_parent_config(name: str) -> None:
    holder = _Holder(bridge=CONFIGS[name])
    data = json.loads(json.dumps(holder.to_dict()))
    assert data["bridge"]["kind"] == CONFIGS[name].kind
    assert config_from_dict(object, data) == holder


def test_config_validation_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="must be a square"):
        CAbstractorConfig(num_queries=10)
    with pytest.raises(ValueError, match="must be a square"):
        ResamplerConfig(num_queries=10)
    ResamplerConfig(num_queries=10, query_pos_embed=False, key_pos_embed="computed")  # no grid of queries needed
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        QFormerConfig(dim=10, num_heads=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_bridge(AttentionPoolConfig(num_heads=5), VISION, LM)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_counts_and_zero_padding(name: str) -> None:
    bridge = _build(name)
    grids = _grids(name)
    tokens, grid, mask = _pad(_images(grids), grids)
    out = bridge(tokens, grid, mask)
    counts = bridge.num_output_tokens(grid)
    assert out.tokens.shape == (2, int(counts.max()), LM)
    real = torch.full((2,), out.tokens.shape[1]) if out.mask is None else out.mask.sum(1)
    torch.testing.assert_close(counts, real)
    if out.mask is not None:
        assert torch.all(out.tokens[~out.mask] == 0)
    expected_grid = {
        "pixel_shuffle": grid // 2,
        "patch_merger": grid // 2,
        "attention_pool": (grid + 1) // 2,
        "attention_pool_gelu": (grid + 1) // 2,
        "c_abstractor": torch.full((2, 2), 2),
        "d_abstractor": torch.full((2, 2), 2),
        "linear": grid,
        "mlp": grid,
    }.get(name)
    if expected_grid is None:
        assert out.grid is None
    else:
        torch.testing.assert_close(out.grid, expected_grid)
        torch.testing.assert_close(out.grid[:, 0] * out.grid[:, 1], counts)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_image_in_a_mixed_batch_gets_its_output_alone(name: str) -> None:
    bridge = _build(name)
    grids = _grids(name)
    images = _images(grids)
    tokens, grid, mask = _pad(images, grids)
    with torch.no_grad():
        batched = bridge(tokens, grid, mask)
        for b, (image, image_grid) in enumerate(zip(images, grids, strict=True)):
            alone = bridge(image[None], torch.tensor([image_grid]))
            assert alone.mask is None
            torch.testing.assert_close(_real(batched, b), alone.tokens[0], **CLOSE)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_reaches_every_parameter(name: str) -> None:
    bridge = _build(name).train()
    grids = _grids(name)
    tokens, grid, mask = _pad(_images(grids), grids)
    out = bridge(tokens, grid, mask)
    loss = (out.tokens * torch.randn_like(out.tokens)).sum()
    if isinstance(bridge, QFormer):  # the text embeddings and text feed-forward serve stage 1's text path only
        text = bridge.encode(tokens, mask, torch.randint(0, 30, (2, 5)), attention_pattern="bidirectional").text
        assert text is not None
        loss = loss + text.square().sum()
    loss.backward()
    starved = [n for n, p in bridge.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not starved, starved


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_adds_in_a_fixed_order(name: str) -> None:
    # Images of a batch share grids, so per-grid tables are gathered with repeated indices; a gather whose backward
    # accumulates in thread-timing order made the Honeybee demo's training differ from run to run on 2 threads.
    bridge = _build(name).train()
    grids = [*_grids(name), *_grids(name)]
    tokens, grid, mask = _pad(_images(grids), grids)
    out = bridge(tokens, grid, mask)
    assert not order_dependent_sums(out.tokens)


# --- bad input


@pytest.mark.parametrize("name", ["pixel_shuffle", "patch_merger"])
def test_grid_that_does_not_divide_is_an_error_naming_it(name: str) -> None:
    bridge = _build(name)
    with pytest.raises(ValueError, match=r"image 1's 3x4 grid is not divisible by 2"):
        bridge(
            torch.randn(2, 16, VISION),
            torch.tensor([[4, 4], [3, 4]]),
            torch.arange(16)[None] < torch.tensor([[16], [12]]),
        )


@pytest.mark.parametrize("name", ["c_abstractor", "resampler_qwen_vl", "attention_pool"])
def test_mask_or_grid_inconsistent_with_the_tokens_is_an_error(name: str) -> None:
    bridge = _build(name)
    grid = torch.tensor([[4, 4], [2, 4]])
    with pytest.raises(ValueError, match="a padded batch needs a mask"):
        bridge(torch.randn(2, 16, VISION), grid)
    wrong = torch.ones(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"the mask of image 1 \(2x4 grid\)"):
        bridge(torch.randn(2, 16, VISION), grid, wrong)
    with pytest.raises(ValueError, match="more than the batch's 16"):
        bridge(torch.randn(1, 16, VISION), torch.tensor([[4, 5]]))


def test_qformer_key_mask_matters() -> None:
    """Without the mask the noise padding of the smaller image would enter its queries' cross-attention."""
    bridge = _build("qformer")
    grids = _grids("qformer")
    tokens, grid, mask = _pad(_images(grids), grids)
    with torch.no_grad():
        masked, unmasked = bridge(tokens, grid, mask), bridge(tokens, grid, None)
    torch.testing.assert_close(masked.tokens[0], unmasked.tokens[0])  # image 0 fills the batch: no padding
    assert not torch.allclose(masked.tokens[1], unmasked.tokens[1], atol=1e-3)


# --- slow references


def _reference_patch_merger(bridge: nn.Module, image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    rows, cols = grid
    normed = bridge.norm(image).view(rows, cols, -1)
    out = []
    for i in range(rows // 2):
        for j in range(cols // 2):
            window = [normed[2 * i + a, 2 * j + b] for a in range(2) for b in range(2)]
            out.append(bridge.mlp(torch.cat(window)))
    return torch.stack(out)


def test_patch_merger_matches_a_loop_over_windows() -> None:
    bridge = _build("patch_merger")
    grids = _grids("patch_merger")
    images = _images(grids)
    with torch.no_grad():
        out = bridge(*_pad(images, grids))
        for b, (image, grid) in enumerate(zip(images, grids, strict=True)):
            torch.testing.assert_close(_real(out, b), _reference_patch_merger(bridge, image, grid), **CLOSE)


def _idefics3_pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Idefics3's space-to-depth of a square grid by reshapes: (1, n*n, D) -> (1, n*n / r^2, D r^2)."""
    batch, length, dim = x.shape
    side = math.isqrt(length)
    x = x.view(batch, side, side // factor, dim * factor)
    x = x.permute(0, 2, 1, 3).reshape(batch, side // factor, side // factor, dim * factor * factor)
    return x.permute(0, 2, 1, 3).reshape(batch, length // factor**2, dim * factor**2)


def test_pixel_shuffle_matches_idefics3_and_a_loop_over_windows() -> None:
    bridge = _build("pixel_shuffle")
    square = torch.randn(1, 36, VISION)
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(square, torch.tensor([[6, 6]])).tokens, bridge.proj(_idefics3_pixel_shuffle(square, 2)), **CLOSE
        )
        rows, cols = 2, 6
        image = torch.randn(rows * cols, VISION)
        grid = image.view(rows, cols, VISION)
        windows = [
            torch.cat([grid[2 * i + a, 2 * j + b] for a in range(2) for b in range(2)])
            for i in range(rows // 2)
            for j in range(cols // 2)
        ]
        expected = bridge.proj(torch.stack(windows))
        torch.testing.assert_close(bridge(image[None], torch.tensor([[rows, cols]])).tokens[0], expected, **CLOSE)


def _reference_attention_pool(bridge: nn.Module, image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per window: query = mean of the window's tokens inside the grid, multi-head softmax attention over them."""
    attn = bridge.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    rows, cols = grid
    tokens = image.view(rows, cols, -1)
    out = []
    for i in range(math.ceil(rows / 2)):
        for j in range(math.ceil(cols / 2)):
            window = torch.stack([tokens[a, b] for a in range(2 * i, min(2 * i + 2, rows))
                                  for b in range(2 * j, min(2 * j + 2, cols))])  # fmt: skip
            q = attn.q(window.mean(0)).view(heads, head_dim)
            k, v = attn.kv(window).view(len(window), 2, heads, head_dim).unbind(1)  # (k, heads, hd)
            weights = (torch.einsum("hd,khd->hk", q, k) / math.sqrt(head_dim)).softmax(-1)
            pooled = torch.einsum("hk,khd->hd", weights, v).reshape(-1)
            out.append(bridge.mlp(attn.proj(pooled)))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["attention_pool", "attention_pool_gelu"])
def test_attention_pool_matches_a_loop_over_windows(name: str) -> None:
    bridge = _build(name)
    grids = _grids(name)
    images = _images(grids)
    with torch.no_grad():
        out = bridge(*_pad(images, grids))
        for b, (image, grid) in enumerate(zip(images, grids, strict=True)):
            torch.testing.assert_close(_real(out, b), _reference_attention_pool(bridge, image, grid), **CLOSE)


@pytest.mark.parametrize("grid", [(6, 6), (5, 7), (2, 3), (7, 4)])
def test_adaptive_pool_weights_equal_adaptive_avg_pool2d(grid: tuple[int, int]) -> None:
    size = 3
    image = torch.randn(1, 5, *grid, dtype=torch.float64)
    canvas = F.pad(image, (0, 8 - grid[1], 0, 8 - grid[0]), value=7.0)  # the padding must get no weight
    weights = adaptive_pool_weights(torch.tensor([grid]), size, 8, 8).double()  # (1, s*s, 64)
    pooled = (weights @ canvas.flatten(2).mT).mT.reshape(1, 5, size, size)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(image, size))


def test_to_canvas_places_each_image_top_left_with_zero_padding() -> None:
    images = _images([(2, 3), (3, 1)])
    tokens, grid, _ = _pad(images, [(2, 3), (3, 1)])
    canvas, valid = to_canvas(tokens, grid)
    assert canvas.shape == (2, VISION, 3, 3)
    torch.testing.assert_close(canvas[0, :, :2, :3], images[0].T.reshape(VISION, 2, 3))
    torch.testing.assert_close(canvas[1, :, :3, :1], images[1].T.reshape(VISION, 3, 1))
    assert torch.all(canvas * (1 - valid) == 0) and int(valid[0].sum()) == 6 and int(valid[1].sum()) == 3


def test_c_abstractor_on_one_image_matches_plain_convolutions_and_adaptive_pooling() -> None:
    bridge = _build("c_abstractor")
    assert isinstance(bridge, CAbstractor)
    rows, cols = 5, 3
    image = torch.randn(1, rows * cols, VISION)
    with torch.no_grad():
        x = image + bridge.pos_embed.resized((rows, cols))
        x = x.transpose(1, 2).reshape(1, VISION, rows, cols)
        for block in bridge.pre_blocks:
            x = block(x)  # no validity mask: the plain zero-padded convolutions of one image
        x = F.adaptive_avg_pool2d(x, 2)
        for block in bridge.post_blocks:
            x = block(x)
        expected = bridge.readout(x.flatten(2).transpose(1, 2))
        torch.testing.assert_close(bridge(image, torch.tensor([[rows, cols]])).tokens, expected, **CLOSE)


def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (H, W, C) at continuous pixel coordinates (x, y), pixel centres at integers, zero outside."""
    height, width, channels = value.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(channels, dtype=value.dtype)
    for row, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for col, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= row < height and 0 <= col < width:
                out += wy * wx * value[row, col]
    return out


def test_deformable_attention_matches_explicit_bilinear_sampling() -> None:
    torch.manual_seed(0)
    dim, heads, points, rows, cols = 8, 2, 3, 3, 5
    attn = DeformableAttention(dim, heads, points)
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))  # offsets of a token or two, uneven weights
    query, reference = torch.randn(1, 4, dim), torch.rand(4, 2)
    image = torch.randn(rows, cols, dim)
    with torch.no_grad():
        value_map = image.permute(2, 0, 1)[None]  # (1, D, H, W)
        actual = attn(query, reference, value_map, torch.ones(1, 1, rows, cols), torch.tensor([[rows, cols]]))
        value = attn.value(image)  # (H, W, D)
        head_dim = dim // heads
        expected = []
        for m in range(4):
            offsets = attn.offsets(query[0, m]).view(heads, points, 2)
            weights = attn.weights(query[0, m]).view(heads, points).softmax(-1)
            per_head = []
            for h in range(heads):
                sampled = torch.zeros(head_dim)
                for p in range(points):
                    x = (reference[m, 0] + offsets[h, p, 0] / cols) * cols - 0.5
                    y = (reference[m, 1] + offsets[h, p, 1] / rows) * rows - 0.5
                    sample = _bilinear(value[..., h * head_dim : (h + 1) * head_dim], float(x), float(y))
                    sampled += weights[h, p] * sample
                per_head.append(sampled)
            expected.append(attn.proj(torch.cat(per_head)))
    torch.testing.assert_close(actual[0], torch.stack(expected), **CLOSE)


def test_d_abstractor_reference_points_start_on_the_output_grid_cell_centres() -> None:
    bridge = build_bridge(DAbstractorConfig(num_queries=9, dim=8, num_heads=2), VISION, LM)
    assert isinstance(bridge, DAbstractor)
    centres = torch.tensor([1 / 6, 1 / 2, 5 / 6])
    torch.testing.assert_close(bridge.reference_points[:3], torch.stack([centres, torch.full((3,), 1 / 6)], -1))
    torch.testing.assert_close(bridge.reference_points[3::3, 1], centres[1:])


def _mae_sincos(rows: int, cols: int, dim: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed as Qwen-VL and MiniCPM-V use it: (rows*cols, dim), x (column) half first."""

    def one_axis(positions: torch.Tensor, width: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
        angles = positions.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([one_axis(col.flatten(), dim // 2), one_axis(row.flatten(), dim // 2)], dim=1).float()


def _reference_resampler(bridge: Resampler, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """Qwen-VL's / MiniCPM-V's forward on torch's nn.MultiheadAttention, keys padded per image."""
    dim = bridge.dim
    mha = nn.MultiheadAttention(dim, bridge.attn.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([bridge.attn.q.weight, bridge.attn.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([bridge.attn.q.bias, bridge.attn.kv.bias]))
        mha.out_proj.load_state_dict(bridge.attn.proj.state_dict())
    side = math.isqrt(bridge.config.num_queries)
    x = bridge.ln_kv(bridge.kv_proj(tokens))
    key_pos = torch.zeros_like(x)
    padding = torch.ones(x.shape[:2], dtype=torch.bool)
    for b, (rows, cols) in enumerate(grids):
        if bridge.config.key_pos_embed == "computed":
            table = _mae_sincos(rows, cols, dim)
        else:
            table = _mae_sincos(side, side, dim).T.reshape(1, dim, side, side)
            table = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
            table = table.reshape(dim, rows * cols).T
        key_pos[b, : rows * cols] = table
        padding[b, : rows * cols] = False
    queries = bridge.ln_q(bridge.queries)
    if bridge.config.query_pos_embed:
        queries = queries + _mae_sincos(side, side, dim)
    out = mha(queries.expand(len(grids), -1, -1), x + key_pos, x, key_padding_mask=padding)[0]
    return bridge.proj(bridge.ln_post(out))


@pytest.mark.parametrize("name", ["resampler_qwen_vl", "resampler_minicpm_v"])
def test_resampler_matches_multihead_attention_with_mae_positions(name: str) -> None:
    bridge = _build(name)
    assert isinstance(bridge, Resampler)
    grids = [(3, 5), (2, 2), (2, 2)]  # the 2x2 grid equals Qwen-VL's query grid: its table is not resized
    tokens, grid, mask = _pad(_images(grids), grids)
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(tokens, grid, mask).tokens, _reference_resampler(bridge, tokens, grids), **CLOSE
        )

"""Model presets: every tiny preset trains a step, checkpoints round-trip, configs round-trip, the text tower pools
where it should, and the real-size presets have exactly the parameters of the published Hugging Face models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import vlkit
from vlkit.config import config_from_dict
from vlkit.encoders import ConvNeXtConfig, ViT, ViTConfig
from vlkit.layers import DropPath
from vlkit.losses import build_contrastive_loss, contrastive_loss_inputs
from vlkit.models import DualEncoder, DualEncoderConfig, DualEncoderOutput, ImageClassifier
from vlkit.text import TextConfig, TextTransformer

# Image and dual-encoder presets; language models (test_lm.py) and VLMs (test_vlm.py) have their own tests.
SWEEP = [
    name
    for name in vlkit.list_models("test_*") + vlkit.list_models("shapes_*")
    if vlkit.get_config(name).kind not in ("lm", "vlm")
]


def _image_size(config: ViTConfig | ConvNeXtConfig) -> tuple[int, int]:
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _pixels(config: ViTConfig | ConvNeXtConfig, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *_image_size(config), generator=generator)


def _text_batch(config: TextConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids with an end-of-text token; lengths differ per row. Returns (ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    length = min(10, config.max_seq_len)
    special = {config.eos_token_id, config.pad_token_id}
    low = max(special) + 1
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        eos = 3 + (row * 3) % (length - 3)
        ids[row, eos] = config.eos_token_id
        ids[row, eos + 1 :] = config.pad_token_id
        mask[row, : eos + 1] = 1
    return ids, mask


def _model_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    config = model.config
    inputs = {"pixel_values": _pixels(config.vision, batch, seed)}
    if isinstance(model, DualEncoder):
        inputs["input_ids"], inputs["attention_mask"] = _text_batch(config.text, batch, seed)
    return inputs


# --- every tiny preset: build, forward, backward


@pytest.mark.parametrize("name", SWEEP)
def test_preset_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = vlkit.create_model(name).train()
    batch = 3
    inputs = _model_inputs(model, batch)
    if isinstance(model, DualEncoder):
        out = model(**inputs)
        assert isinstance(out, DualEncoderOutput)
        embed_dim = model.config.embed_dim
        assert out.image_features.shape == out.text_features.shape == (batch, embed_dim)
        for features in (out.image_features, out.text_features):
            torch.testing.assert_close(features.norm(dim=-1), torch.ones(batch))
        assert out.logit_scale.ndim == 0
        torch.testing.assert_close(out.logit_scale, torch.tensor(math.exp(model.config.logit_scale_init)))
        assert (out.logit_bias is None) == (model.config.logit_bias_init is None)
        options = {} if model.config.loss == "clip" else {"chunk_size": 2}
        loss_fn = build_contrastive_loss(model.config.loss, **options)
        loss = loss_fn(**contrastive_loss_inputs(out))
    else:
        assert isinstance(model, ImageClassifier)
        with torch.no_grad():  # the head starts at zero, which would zero every gradient below it
            model.head.weight.normal_(std=0.1)
        logits = model(**inputs)
        assert isinstance(logits, torch.Tensor)
        assert logits.shape == (batch, model.config.num_classes)
        loss = F.cross_entropy(logits, torch.arange(batch) % model.config.num_classes)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for param_name, param in trainable:
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"


def test_dual_encoder_logits_are_scaled_cosines_plus_bias() -> None:
    torch.manual_seed(0)
    model = vlkit.create_model("test_siglip").eval()
    inputs = _model_inputs(model, batch=3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        logits = model.logits(**inputs)
        image = F.normalize(model.encode_image(inputs["pixel_values"]), dim=-1)
        text = F.normalize(model.encode_text(inputs["input_ids"], inputs["attention_mask"]), dim=-1)
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, 20.0 * image @ text.T + model.logit_bias)


def test_the_scale_is_bounded_on_the_parameter_so_it_can_come_back_down(tmp_path: Path) -> None:
    """Past max_logit_scale the parameter is clamped after the update (open_clip's way); the scale keeps its
    gradient, so a loss that wants a lower temperature lowers it again."""
    from vlkit.losses import ClipLoss
    from vlkit.train import StepOutput, TrainConfig, Trainer

    torch.manual_seed(0)
    model = vlkit.create_model("test_clip")
    inputs = _model_inputs(model, batch=4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) + 0.01)
    loss_fn = ClipLoss()

    def step(model: torch.nn.Module, batch: dict) -> StepOutput:
        out = model(**inputs)
        return StepOutput(loss=loss_fn(out.image_features, out.text_features, out.logit_scale))

    assert torch.autograd.grad(step(model, {}).loss, model.logit_scale)[0] != 0
    config = TrainConfig(steps=1, batch_size=4, lr=1e-3, precision="fp32", progress=False)
    Trainer(model, config, [{"x": torch.zeros(1)}] * 4, None, step, tmp_path).fit()
    assert model.logit_scale.item() <= math.log(100.0) + 1e-6  # (in fp32)


# --- checkpoints and configs


@pytest.mark.parametrize("name", [name for name in vlkit.list_models("test_*") if name in SWEEP])
def test_save_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = vlkit.create_model(name).eval()
    with torch.no_grad():
        for param in model.parameters():  # zero-initialised heads would make equal outputs trivial
            param.add_(torch.randn_like(param) * 0.01)
    inputs = _model_inputs(model, batch=2, seed=1)
    path = model.save_pretrained(tmp_path / name)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())["vlkit_format"] == 1
    loaded = vlkit.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    with torch.no_grad():
        before, after = model(**inputs), loaded(**inputs)
    if isinstance(before, DualEncoderOutput):
        assert torch.equal(before.image_features, after.image_features)
        assert torch.equal(before.text_features, after.text_features)
        assert torch.equal(before.logit_scale, after.logit_scale)
    else:
        assert before.abs().sum() > 0
        assert torch.equal(before, after)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        vlkit.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        vlkit.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", vlkit.list_models())
def test_config_json_round_trip(name: str) -> None:
    config = vlkit.get_config(name)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == config.kind
    restored = config_from_dict(object, data)
    assert type(restored) is type(config)
    assert restored == config
    assert type(config).from_dict(data) == config


def test_config_round_trip_keeps_tuples_and_unions() -> None:
    config = vlkit.get_config("test_clip", {"vision.image_size": (32, 48)})
    restored = config_from_dict(object, json.loads(json.dumps(config.to_dict())))
    assert restored.vision.image_size == (32, 48)
    assert isinstance(restored.vision.image_size, tuple)
    convnext = vlkit.get_config("test_convnext_clip")
    restored = config_from_dict(object, json.loads(json.dumps(convnext.to_dict())))
    assert isinstance(restored.vision, ConvNeXtConfig)
    assert restored.vision.depths == (1, 1) and isinstance(restored.vision.depths, tuple)


def test_config_from_dict_rejects_bad_input() -> None:
    data = vlkit.get_config("test_vit").to_dict()
    with pytest.raises(ValueError, match="unknown config fields"):
        config_from_dict(object, {**data, "colour": "red"})
    with pytest.raises(ValueError, match="unknown config kind"):
        config_from_dict(object, {**data, "kind": "perceiver"})
    with pytest.raises(ValueError, match="mystery"):
        config_from_dict(object, {**data, "vision": {**data["vision"], "act": "mystery"}})


def test_create_model_nested_overrides() -> None:
    model = vlkit.create_model("test_clip", **{"vision.depth": 1, "embed_dim": 16})
    assert model.config.vision.depth == 1 and len(model.image_encoder.blocks) == 1
    assert model.config.text.depth == vlkit.get_config("test_clip").text.depth == len(model.text_encoder.blocks)
    assert model.config.embed_dim == 16 and model.text_projection.out_features == 16
    # Both changes to one sub-config land in one replace: dim 32 with 3 heads alone would fail validation.
    model = vlkit.create_model("test_clip", **{"text.num_heads": 3, "text.dim": 48})
    assert model.config.text.num_heads == 3 and model.text_encoder.token_embed.embedding_dim == 48
    with pytest.raises(ValueError, match="divisible"):
        vlkit.create_model("test_clip", **{"text.num_heads": 3})


def test_create_model_unknown_field_and_preset() -> None:
    with pytest.raises(KeyError, match="depht"):
        vlkit.create_model("test_clip", **{"vision.depht": 1})
    with pytest.raises(KeyError, match="colour"):
        vlkit.create_model("test_clip", colour="red")
    with pytest.raises(KeyError, match="unknown model preset 'clip_vit_huge_patch14'") as info:
        vlkit.create_model("clip_vit_huge_patch14")
    assert "clip_vit_base_patch32" in str(info.value)
    with pytest.raises(KeyError, match="unknown model preset 'qwerty'"):
        vlkit.get_config("qwerty")


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(class_token=False, pool="cls")
    with pytest.raises(ValueError, match="smaller than patch_size"):
        ViTConfig(image_size=8, patch_size=16)
    with pytest.raises(ValueError, match="same length"):
        ConvNeXtConfig(depths=(1, 1), dims=(8, 16, 32))
    config = vlkit.get_config("test_siglip")
    with pytest.raises(ValueError, match="image_projection='none'"):
        DualEncoderConfig(vision=config.vision, text=config.text, embed_dim=16, image_projection="none")


# --- text tower pooling


def _text_tower(**changes: object) -> TextTransformer:
    torch.manual_seed(2)
    config = TextConfig(vocab_size=50, max_seq_len=12, dim=16, depth=2, num_heads=2, mlp_dim=32, eos_token_id=2)
    return TextTransformer(config.replace(**changes)).eval()


def test_causal_eos_pooling_ignores_tokens_after_eos() -> None:
    tower = _text_tower(causal=True, pool="eos")
    ids = torch.randint(3, 50, (2, 12))
    ids[0, 4] = 2
    ids[1, 8] = 2
    with torch.no_grad():
        pooled = tower(ids)
        tokens = tower.forward_features(ids)
        torch.testing.assert_close(pooled, torch.stack([tokens[0, 4], tokens[1, 8]]))
        changed = ids.clone()
        changed[0, 5:] = torch.randint(3, 50, (7,))
        changed[1, 9:] = torch.randint(3, 50, (3,))
        torch.testing.assert_close(tower(changed), pooled, rtol=1e-6, atol=1e-6)
        # A token before the end-of-text token does reach the pooled vector.
        before = ids.clone()
        before[:, 1] = (ids[:, 1] - 3 + 1) % 47 + 3
        assert not torch.allclose(tower(before), pooled)


def test_eos_pooling_reads_the_first_eos() -> None:
    tower = _text_tower(causal=True, pool="eos")
    ids = torch.randint(3, 50, (1, 10))
    ids[0, 3] = 2
    ids[0, 7] = 2
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), tower.forward_features(ids)[:, 3])


def test_eos_pooling_without_eos_raises() -> None:
    tower = _text_tower(causal=True, pool="eos")
    ids = torch.randint(3, 50, (2, 8))
    ids[0, 5] = 2  # only the first row has one
    with pytest.raises(ValueError, match="end-of-text"):
        tower(ids)


def test_argmax_pooling_reads_the_largest_id() -> None:
    tower = _text_tower(causal=True, pool="argmax")
    ids = torch.randint(3, 40, (2, 9))
    ids[0, 6] = 49
    ids[1, 2] = 49
    with torch.no_grad():
        tokens = tower.forward_features(ids)
        torch.testing.assert_close(tower(ids), torch.stack([tokens[0, 6], tokens[1, 2]]))


def test_text_longer_than_max_seq_len_raises() -> None:
    tower = _text_tower()
    with pytest.raises(ValueError, match="at most 12"):
        tower(torch.full((1, 13), 2))


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_bidirectional_tower_mask_ignores_padding_content(pool: str) -> None:
    tower = _text_tower(causal=False, pool=pool)
    ids = torch.randint(3, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    changed = ids.clone()
    changed[0, 6:] = torch.randint(3, 50, (4,))
    changed[1, 3:] = torch.randint(3, 50, (7,))
    assert not torch.equal(changed, ids)
    with torch.no_grad():
        pooled = tower(ids, mask)
        torch.testing.assert_close(tower(changed, mask), pooled, rtol=1e-6, atol=1e-6)
        # Without the mask the padded content is seen, so the check above is not vacuous.
        assert not torch.allclose(tower(changed), tower(ids))
        if pool == "mean":
            tokens = tower.forward_features(ids, mask)
            expected = torch.stack([tokens[0, :6].mean(0), tokens[1, :3].mean(0)])
            torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize(("causal", "pool"), [(True, "eos"), (False, "mean"), (False, "first"), (False, "eos")])
def test_trailing_padding_is_trimmed_without_changing_the_pooled_vector(causal: bool, pool: str) -> None:
    tower = _text_tower(causal=causal, pool=pool)
    ids = torch.randint(3, 50, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :5], mask[1, :7] = 1, 1  # columns 7.. are padding in every row
    ids[0, 4], ids[1, 6] = 2, 2
    ids[mask == 0] = 0
    trimmed_ids, trimmed_mask = tower.trim_padding(ids, mask)
    assert trimmed_ids.shape == trimmed_mask.shape == (2, 7)
    with torch.no_grad():
        full = tower.forward_head(tower.forward_features(ids, mask), ids, mask)  # every column, no trimming
        torch.testing.assert_close(tower(ids, mask), full, rtol=1e-6, atol=1e-6)


def test_last_token_pooling_keeps_the_padding() -> None:
    tower = _text_tower(causal=False, pool="last")
    ids, mask = torch.randint(3, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[:, 6:] = 0
    assert tower.trim_padding(ids, mask)[0].shape == (2, 12)


def test_bidirectional_tower_sees_later_tokens() -> None:
    tower = _text_tower(causal=False, pool="first")
    ids = torch.randint(3, 50, (1, 6))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] - 3 + 1) % 47 + 3
    with torch.no_grad():
        assert not torch.allclose(tower(changed), tower(ids))


# --- vision encoders


def test_vit_forward_features_at_another_size_interpolates_pos_embed() -> None:
    torch.manual_seed(3)
    vit = ViT(vlkit.get_config("test_clip").vision).eval()  # class token, learned position embedding, 32 px / 8
    with torch.no_grad():
        vit.pos_embed.weight.normal_()
    pixels = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        features = vit.forward_features(pixels)
        assert features.grid == (5, 6)
        assert features.tokens.shape == (2, 1 + 30, vit.dim)
        assert features.patch_tokens.shape == (2, 30, vit.dim)
        pooled = vit.forward_head(features)
        assert pooled.shape == (2, vit.dim) and torch.isfinite(pooled).all()
        tokens, _ = vit.embed(pixels)
        patches = F.conv2d(pixels, vit.patch_embed.proj.weight, stride=8).flatten(2).transpose(1, 2)  # no bias
        table = vit.pos_embed.weight[0, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(5, 6), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(30, -1)
        torch.testing.assert_close(tokens[:, 0], (vit.class_token[0, 0] + vit.pos_embed.weight[0, 0]).expand(2, -1))
        torch.testing.assert_close(tokens[:, 1:], patches + table, rtol=1e-5, atol=1e-5)
        # At the native size the table is used as is.
        native, _ = vit.embed(pixels[:, :, :32, :32])
        patches = F.conv2d(pixels[:, :, :32, :32], vit.patch_embed.proj.weight, stride=8).flatten(2).transpose(1, 2)
        expected = torch.cat([vit.class_token.expand(2, -1, -1), patches], 1) + vit.pos_embed.weight  # (B, 17, D)
        torch.testing.assert_close(native, expected, rtol=1e-5, atol=1e-5)


def test_vit_sincos_position_embedding_skips_class_token() -> None:
    from vlkit.layers import sincos_2d

    torch.manual_seed(4)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=8, depth=1, num_heads=2, mlp_dim=16, pos_embed="sincos"))
    pixels = torch.randn(1, 3, 24, 16)
    with torch.no_grad():
        tokens, grid = vit.embed(pixels)
        patches, _ = vit.patch_embed(pixels)
    assert grid == (3, 2)
    torch.testing.assert_close(tokens[:, 0], vit.class_token[:, 0].detach())
    torch.testing.assert_close(tokens[:, 1:], patches + sincos_2d((3, 2), 8))


def test_convnext_stochastic_depth_only_in_train_mode() -> None:
    torch.manual_seed(5)
    model = vlkit.create_model("test_convnext")
    encoder = model.encoder
    rates = [m.rate for m in encoder.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.1 * i / 4 for i in range(5)])
    with torch.no_grad():
        for block_param in (p for n, p in encoder.named_parameters() if n.endswith("gamma")):
            block_param.fill_(1.0)  # layer scale 1e-6 would make a dropped branch nearly invisible
    pixels = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        encoder.eval()
        reference = encoder(pixels)
        assert torch.equal(encoder(pixels), reference)
        encoder.train()
        train_outputs = []
        for seed in range(4):
            torch.manual_seed(seed)
            train_outputs.append(encoder(pixels))
        assert any(not torch.allclose(out, reference) for out in train_outputs)
        # With every rate at zero, train mode is exactly eval mode: drop path is the only stochastic part.
        for module in encoder.modules():
            if isinstance(module, DropPath):
                module.rate = 0.0
        torch.testing.assert_close(encoder(pixels), reference)


# --- real-size presets: exactly the parameters of the published models


def _canonical_shapes(model: nn.Module) -> Counter[tuple[int, ...]]:
    """Parameter shapes with fused projections split (vlkit's qkv / kv, PyTorch MHA's in_proj) and leading 1s
    dropped (a (1, N, D) table and an (N, D) embedding, a () and a (1,) scalar are the same parameters)."""
    shapes: Counter[tuple[int, ...]] = Counter()
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        parts = 1
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias", "in_proj_weight", "in_proj_bias")):
            parts = 3
        elif name.endswith(("attn.kv.weight", "attn.kv.bias")):
            parts = 2
        if parts > 1:
            assert shape[0] % parts == 0, name
            shape = (shape[0] // parts, *shape[1:])
        while shape and shape[0] == 1:
            shape = shape[1:]
        shapes[shape] += parts
    return shapes


TOWER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _clip_reference(patch: int, vision: tuple[int, int, int, int], text: tuple[int, int, int, int], projection: int):
    vision_config = dict(zip(TOWER_FIELDS, vision, strict=True))
    text_config = dict(zip(TOWER_FIELDS, text, strict=True))
    config = transformers.CLIPConfig(
        vision_config={**vision_config, "patch_size": patch, "image_size": 224},
        text_config={**text_config, "vocab_size": 49408, "max_position_embeddings": 77},
        projection_dim=projection,
    )
    return transformers.CLIPModel(config)


def _siglip_reference(image_size: int, patch: int, hidden: int, layers: int, heads: int, mlp: int):
    tower = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": mlp}
    config = transformers.SiglipConfig(
        vision_config={**tower, "patch_size": patch, "image_size": image_size},
        text_config={**tower, "vocab_size": 32000, "max_position_embeddings": 64, "pad_token_id": 1,
                     "eos_token_id": 1, "bos_token_id": None},
    )  # fmt: skip
    return transformers.SiglipModel(config)


REFERENCES = {
    "clip_vit_base_patch32": lambda: _clip_reference(32, (768, 12, 12, 3072), (512, 12, 8, 2048), 512),
    "clip_vit_base_patch16": lambda: _clip_reference(16, (768, 12, 12, 3072), (512, 12, 8, 2048), 512),
    "clip_vit_large_patch14": lambda: _clip_reference(14, (1024, 24, 16, 4096), (768, 12, 12, 3072), 768),
    "siglip_base_patch16_224": lambda: _siglip_reference(224, 16, 768, 12, 12, 3072),
    "siglip_so400m_patch14_384": lambda: _siglip_reference(384, 14, 1152, 27, 16, 4304),
    "vit_base_patch16_224": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)),
    "convnext_tiny": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(num_labels=1000)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_real_size_preset_matches_reference_parameters(name: str) -> None:
    with torch.device("meta"):
        ours = vlkit.create_model(name)
        reference = REFERENCES[name]()
    our_total = sum(p.numel() for p in ours.parameters())
    reference_total = sum(p.numel() for p in reference.parameters())
    assert our_total == reference_total, f"{name}: {our_total} parameters vs {reference_total} in transformers"
    ours_shapes, reference_shapes = _canonical_shapes(ours), _canonical_shapes(reference)
    assert ours_shapes == reference_shapes, (
        f"{name}: only in vlkit {ours_shapes - reference_shapes}, only in transformers {reference_shapes - ours_shapes}"
    )
    # The fused qkv projection is exactly three of the reference's query projections.
    query_shapes = {tuple(p.shape) for n, p in reference.named_parameters() if n.endswith("q_proj.weight")}
    for param_name, param in ours.named_parameters():
        if param_name.endswith("attn.qkv.weight"):
            assert (param.shape[0] // 3, param.shape[1]) in query_shapes, param_name


def test_published_sizes_of_siglip_so400m() -> None:
    # 400M in the name is the image tower: check the one number people quote.
    with torch.device("meta"):
        model = vlkit.create_model("siglip_so400m_patch14_384")
    vision = sum(p.numel() for p in model.image_encoder.parameters())
    assert 400e6 < vision < 430e6
    assert model.image_encoder.patch_embed(torch.empty(1, 3, 384, 384, device="meta"))[1] == (27, 27)


def test_an_override_can_replace_a_sub_config_by_kind() -> None:
    from vlkit.bridges import ResamplerConfig
    from vlkit.config import register_config
    from vlkit.registry import apply_overrides, get_config

    config = apply_overrides(get_config("shapes_llava"), {"bridge": {"kind": "resampler", "num_queries": 16}})
    assert config.bridge == ResamplerConfig(num_queries=16)
    with pytest.raises(ValueError, match="num_querie"):
        apply_overrides(get_config("shapes_llava"), {"bridge": {"kind": "resampler", "num_querie": 16}})

    # A second class cannot take a registered kind (saved configs of that kind would load as the wrong class).
    @dataclasses.dataclass(frozen=True)
    class Impostor:
        kind: ClassVar[str] = "resampler"

    with pytest.raises(ValueError, match="resampler"):
        register_config(Impostor)


def test_convnext_depthwise_convolution_runs_in_fp32_under_cpu_bf16_autocast() -> None:
    from vlkit.encoders.convnext import ConvNeXtBlock

    torch.manual_seed(0)
    block = ConvNeXtBlock(16, layer_scale=1.0, drop_path=0.0, eps=1e-6)
    x = torch.randn(2, 16, 9, 9)

    def run(fp32_depthwise: bool) -> tuple[torch.Tensor, ...]:
        block.zero_grad()
        source = x.clone().requires_grad_()
        ConvNeXtBlock.fp32_depthwise_on_cpu = fp32_depthwise
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                conv_out = block.depthwise(source)
                out = block(source)
        finally:
            ConvNeXtBlock.fp32_depthwise_on_cpu = True
        out.float().square().sum().backward()
        return conv_out, source.grad, block.dwconv.weight.grad, block.dwconv.bias.grad

    fp32, bf16 = run(True), run(False)
    assert fp32[0].dtype == bf16[0].dtype == torch.bfloat16  # what autocast's convolution returns
    # The fp32 convolution, rounded once, against the exact one; autocast's bf16 one is further off.
    exact = F.conv2d(x, block.dwconv.weight, block.dwconv.bias, padding=3, groups=16)
    torch.testing.assert_close(fp32[0].float(), exact, rtol=2**-8, atol=1e-6)  # one rounding to bf16
    assert (bf16[0].float() - exact).abs().max() > (fp32[0].float() - exact).abs().max()
    for ours, autocast in zip(fp32[1:], bf16[1:], strict=True):  # gradients agree to bf16 precision
        torch.testing.assert_close(ours, autocast.float(), rtol=0.05, atol=0.05 * autocast.abs().max().item())
    # Without autograd (inference under autocast) the same fp32 convolution, no custom function.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(block.depthwise(x), fp32[0].detach())

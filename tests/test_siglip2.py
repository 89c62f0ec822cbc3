"""SigLIP 2 NaFlex: transformers' ``Siglip2Model`` <-> vlkit ``DualEncoder``, and its image processor.

The reference is built from a tiny config with random weights (no download), saved, loaded with
``vlkit.from_pretrained``, and compared in fp32 on a batch of two aspect ratios (one grid larger than the position
table in one direction and smaller in the other, so the antialiased resize runs both ways); then exported with
``vlkit.export_hf``, loaded back with transformers (no missing or unexpected keys) and compared again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.convert import ConversionError
from vlkit.data.processors import load_processor
from vlkit.data.shapes import ShapesConfig, generate
from vlkit.encoders.vit import PackedImages
from vlkit.models import DualEncoder

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}

CASES: dict[str, dict[str, Any]] = {
    "naflex_tanh": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                    num_patches=16),
        text=dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=12, eos_token_id=1, pad_token_id=1),
        shapes=[(3, 6), (5, 2)], max_patches=20, logit_scale=0.3,
    ),
    "naflex_gelu_ragged": dict(
        vision=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=1, num_attention_heads=3, patch_size=3,
                    num_patches=25, hidden_act="gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=30, hidden_size=24, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=9, projection_size=48, hidden_act="quick_gelu", eos_token_id=3),
        shapes=[(1, 9), (7, 4)], max_patches=30, logit_scale=4.8,  # scale above vlkit's default clamp of 100
    ),
}  # fmt: skip


def _reference(case: dict[str, Any], seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.Siglip2Config(text_config=case["text"], vision_config=case["vision"])
    model = transformers.Siglip2Model(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        model.logit_scale.fill_(case["logit_scale"])
    return model.eval()


def _inputs(case: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Patchified, padded images exactly as Siglip2ImageProcessor lays them out, and right-padded text."""
    generator = torch.Generator().manual_seed(seed)
    length, patch = case["max_patches"], case["vision"]["patch_size"]
    shapes = torch.tensor(case["shapes"])
    pixel_values = torch.zeros(len(shapes), length, patch * patch * 3)
    mask = torch.zeros(len(shapes), length, dtype=torch.int32)
    for row, (height, width) in enumerate(case["shapes"]):
        pixel_values[row, : height * width] = torch.randn(height * width, patch * patch * 3, generator=generator)
        mask[row, : height * width] = 1
    text = case["text"]
    width = text["max_position_embeddings"]
    ids = torch.randint(4, text["vocab_size"], (2, width), generator=generator)
    attention = torch.ones(2, width, dtype=torch.long)
    ids[0, 5:], attention[0, 6:] = text["eos_token_id"], 0
    ids[0, 5] = text["eos_token_id"]
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": shapes, "input_ids": ids,
            "attention_mask": attention}  # fmt: skip


def _parity(reference: Any, model: DualEncoder, inputs: dict[str, torch.Tensor]) -> None:
    images = {key: inputs[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = reference(**inputs)
        torch.testing.assert_close(
            model.encode_image(images["pixel_values"], normalize=True, pixel_attention_mask=images[
                "pixel_attention_mask"], spatial_shapes=images["spatial_shapes"]), out.image_embeds, **TOLERANCE,
        )  # fmt: skip
        torch.testing.assert_close(model.encode_text(ids, attention, normalize=True), out.text_embeds, **TOLERANCE)
        packed = PackedImages.from_padded(
            images["pixel_values"], images["pixel_attention_mask"], images["spatial_shapes"]
        )
        torch.testing.assert_close(model.logits(packed, ids, attention), out.logits_per_image, **TOLERANCE)
        features = reference.get_image_features(**images)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        torch.testing.assert_close(model.encode_image(packed), features, **TOLERANCE)


@pytest.mark.parametrize("name", list(CASES))
def test_siglip2_parity_both_directions(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    reference = _reference(case, seed=len(name))
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(model, DualEncoder) and model.config.loss == "siglip"
    assert model.config.vision.pos_embed_interpolation == "bilinear_antialias"
    inputs = _inputs(case, seed=1)
    _parity(reference, model, inputs)

    exported = vlkit.export_hf(model, tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Siglip2Model"]
    for cls in (transformers.AutoModel, transformers.Siglip2Model):
        back, info = cls.from_pretrained(exported, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert type(back) is transformers.Siglip2Model
        _parity(back.eval(), model, inputs)


def test_whole_square_images_equal_their_naflex_patches(tmp_path: Path) -> None:
    """At the table's own grid the ordinary (B, 3, H, W) path and the NaFlex path are the same model."""
    model = DualEncoder(vlkit.get_config("test_siglip2")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    values = pixels.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)  # (B, L, p*p*3)
    shapes = torch.tensor([[4, 4], [4, 4]])
    with torch.no_grad():
        naflex = model.encode_image(values, pixel_attention_mask=torch.ones(2, 16), spatial_shapes=shapes)
        torch.testing.assert_close(model.encode_image(pixels), naflex, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="together"):
        model.encode_image(values, pixel_attention_mask=torch.ones(2, 16))


def test_test_siglip2_preset_exports_and_reloads(tmp_path: Path) -> None:
    model = DualEncoder(vlkit.get_config("test_siglip2")).eval()
    exported = vlkit.export_hf(model, tmp_path)
    back = transformers.Siglip2Model.from_pretrained(exported).eval()
    case = {"max_patches": 24, "vision": {"patch_size": 8}, "shapes": [(2, 6), (5, 3)],
            "text": {"max_position_embeddings": 16, "vocab_size": 100, "eos_token_id": 2}}  # fmt: skip
    _parity(back, model, _inputs(case, seed=3))
    reloaded = vlkit.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_export_refuses_what_siglip2_cannot_express(tmp_path: Path) -> None:
    model = vlkit.create_model("test_siglip2", **{"vision.image_size": (32, 40)})
    with pytest.raises(ConversionError, match="square"):
        vlkit.export_hf(model, tmp_path)
    # A plain SigLIP model (bicubic resizing) still exports as SiglipModel, not as SigLIP 2.
    vlkit.export_hf(vlkit.create_model("test_siglip"), tmp_path / "siglip")
    assert json.loads((tmp_path / "siglip" / "config.json").read_text())["model_type"] == "siglip"


@pytest.fixture
def siglip2_directory(tmp_path: Path) -> Path:
    _reference(CASES["naflex_tanh"], seed=0).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_converter_errors_name_keys_and_fields(siglip2_directory: Path) -> None:
    weights_file = siglip2_directory / "model.safetensors"
    weights = load_file(weights_file)
    key = "vision_model.embeddings.patch_embedding.weight"
    save_file({**weights, key: weights[key][:, :-3].contiguous()}, weights_file)
    with pytest.raises(ConversionError, match=key):
        vlkit.from_pretrained(siglip2_directory)
    save_file({k: v for k, v in weights.items() if k != "vision_model.head.probe"}, weights_file)
    with pytest.raises(ConversionError, match=r"missing keys: vision_model\.head\.probe"):
        vlkit.from_pretrained(siglip2_directory)
    save_file(weights, weights_file)
    config = json.loads((siglip2_directory / "config.json").read_text())
    config["vision_config"]["num_patches"] = 15
    (siglip2_directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="num_patches=15 is not a square"):
        vlkit.from_pretrained(siglip2_directory)


def test_real_size_preset_matches_transformers_parameters() -> None:
    with torch.device("meta"):
        ours = vlkit.create_model("siglip2_base_patch16_naflex")
        reference = transformers.Siglip2Model(transformers.Siglip2Config(text_config={"vocab_size": 256000},
                                                                        vision_config={}))  # fmt: skip
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


# --- the NaFlex image processor


PROCESSOR_CASES = {
    "defaults": {"image_processor_type": "Siglip2ImageProcessor"},
    "patch14_budget100_bicubic": {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 14,
                                  "max_num_patches": 100, "resample": 3},
    "tiny_budget": {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 8, "max_num_patches": 5},
}  # fmt: skip


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    wide = generate(ShapesConfig(aspect_ratios=(2.5, 3.0)), "test", 1).image
    return [*photos, wide, photos[1].crop((100, 50, 401, 97))]


@pytest.mark.parametrize("name", list(PROCESSOR_CASES))
def test_naflex_processor_matches_transformers(name: str, images: list[Image.Image], tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CASES[name]))
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    expected = reference(images, return_tensors="pt")
    out = load_processor(tmp_path)(images=images)
    assert out.pixel_values is not None and out.pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(out.pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(out.pixel_attention_mask, expected["pixel_attention_mask"])
    assert torch.equal(out.spatial_shapes, expected["spatial_shapes"])
    assert len({tuple(shape) for shape in out.spatial_shapes.tolist()}) > 1  # the aspect ratios really differ


def test_processor_output_feeds_both_models_alike(images: list[Image.Image], siglip2_directory: Path) -> None:
    config = {**PROCESSOR_CASES["tiny_budget"], "patch_size": 4, "max_num_patches": 20}
    (siglip2_directory / "preprocessor_config.json").write_text(json.dumps(config))
    inputs = load_processor(siglip2_directory)(images=images[:3])
    reference = transformers.Siglip2Model.from_pretrained(siglip2_directory).eval()
    model = vlkit.from_pretrained(siglip2_directory).eval()
    with torch.no_grad():
        expected = reference.get_image_features(**inputs.as_dict())
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        actual = model.encode_image(inputs.pixel_values, pixel_attention_mask=inputs.pixel_attention_mask,
                                    spatial_shapes=inputs.spatial_shapes)  # fmt: skip
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    exported = load_processor(siglip2_directory).image_processor
    assert exported is not None
    (siglip2_directory / "preprocessor_config.json").write_text(json.dumps(exported.to_hf_dict()))
    assert load_processor(siglip2_directory).image_processor == exported


# --- the text: transformers reads every SigLIP 2 directory with Siglip2Tokenizer (lower-cased, padded on the left)


def _siglip2_checkpoint(directory: Path, tokenizer_settings: dict[str, Any]) -> None:
    """A SigLIP 2 checkpoint as the hub keeps it, offline: a tiny ``Siglip2Model`` whose text tower reads 64 tokens,
    and Gemma's kind of tokenizer.json (byte-fallback BPE, spaces as "▁", no lower-casing of its own) named
    ``GemmaTokenizer`` in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    text = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, projection_size=32, eos_token_id=1, pad_token_id=0)  # fmt: skip
    _reference({**CASES["naflex_tanh"], "text": text}, seed=3).save_pretrained(directory)
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    merges = [("r", "e"), ("re", "d"), ("s", "t"), ("st", "a"), ("sta", "r"), ("▁", "a")]
    for piece in [*"abcdefghijklmnopqrstuvwxyz▁", *(left + right for left, right in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                "unk_token": "<unk>", "mask_token": "<mask>", "model_max_length": 64, **tokenizer_settings}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    (directory / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CASES["defaults"]))


SIGLIP2_TEXTS = ["a red star", "A RED Star", "ünï", "the star " * 20, "b"]


@pytest.mark.parametrize(
    ("settings", "stored_normalizer"),
    [({}, True), ({"padding_side": "right"}, True), ({}, False)],
    ids=["class_default", "config_right", "no_stored_normalizer"],
)
def test_siglip2_text_matches_transformers(settings: dict[str, Any], stored_normalizer: bool, tmp_path: Path) -> None:
    """Siglip2Tokenizer's own pipeline over the stored vocabulary, whatever normalizer the file holds."""
    _siglip2_checkpoint(tmp_path / "hf", settings)
    if not stored_normalizer:
        document = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
        (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({**document, "normalizer": None}))
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor.tokenizer).__name__ == "Siglip2Tokenizer"
    expected = processor(text=SIGLIP2_TEXTS, return_tensors="pt")
    out = vlkit.load_processor(tmp_path / "hf")(text=SIGLIP2_TEXTS)
    assert out.input_ids is not None and out.input_ids.shape == (len(SIGLIP2_TEXTS), 64)
    assert torch.equal(out.input_ids, expected["input_ids"])
    assert torch.equal(out.attention_mask, expected["attention_mask"])
    left = not settings
    assert int(out.attention_mask[0, -1 if left else 0]) == 1 and int(out.attention_mask[0, 0 if left else -1]) == 0
    assert torch.equal(out.input_ids[0], out.input_ids[1])  # lower-cased, as SigLIP 2 trained

    reference = transformers.Siglip2Model.from_pretrained(tmp_path / "hf").eval()
    model = vlkit.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        features = reference.get_text_features(**expected)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        torch.testing.assert_close(model.encode_text(**out), features, **TOLERANCE)
        # The whole call, as with transformers: model(**processor(images=..., text=...)), NaFlex inputs and all, with
        # transformers' output names. (transformers' Siglip2Processor prepares 16-pixel patches whatever the
        # directory says, which this tiny model cannot read: both models take vlkit's, at the model's patch size.)
        images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue")]
        tiny = {**PROCESSOR_CASES["tiny_budget"], "patch_size": 4, "max_num_patches": 20}
        (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(tiny))
        inputs = vlkit.load_processor(tmp_path / "hf")(images=images, text=SIGLIP2_TEXTS[:2])
        theirs, ours = reference(**inputs), model(**inputs)
        for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **TOLERANCE)

    # Exported, transformers reads the same tokens back, and so does vlkit from its own save.
    exported = vlkit.export_hf(model, tmp_path / "export")
    again = transformers.AutoTokenizer.from_pretrained(exported)
    assert torch.equal(again(SIGLIP2_TEXTS, padding="max_length", max_length=64, truncation=True,
                             return_tensors="pt")["input_ids"], expected["input_ids"])  # fmt: skip
    model.save_pretrained(tmp_path / "vlkit")
    assert torch.equal(vlkit.load_processor(tmp_path / "vlkit")(text=SIGLIP2_TEXTS).input_ids, expected["input_ids"])

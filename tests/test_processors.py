"""Processors: pixels and token ids prepared exactly as transformers' processors prepare them.

Reference processors are built from config dicts, saved, and both sides load the same directory. Images: the two
scikit-learn sample photographs (427 x 640), a ShapesWorld scene (64 x 64, upsampled), and a narrow crop (smaller
than some crops, so the zero-padding branch of the centre crop runs). transformers 5 falls back to its PIL backend
here (torchvision is not installed), which is what these tests compare against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.processors import ImageProcessor, Processor, load_processor
from vlkit.data.shapes import ShapesConfig, generate

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    return [*photos, generate(ShapesConfig(), "test", 0).image, photos[1].crop((100, 50, 401, 97)).convert("L")]


IMAGE_CASES: dict[str, dict[str, Any]] = {
    "clip": {"image_processor_type": "CLIPImageProcessor"},
    "clip_odd_sizes": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 97},
                       "crop_size": {"height": 91, "width": 64}},
    "clip_crop_larger_than_image": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 50},
                                    "crop_size": {"height": 120, "width": 64}},
    "clip_legacy_feature_extractor": {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
                                      "do_center_crop": True, "resample": 3},
    "siglip_384": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}},
    "siglip_non_square_bilinear": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 40, "width": 72},
                                   "resample": 2},
    "vit": {"image_processor_type": "ViTImageProcessor"},
    "vit_legacy_int_size": {"feature_extractor_type": "ViTFeatureExtractor", "size": 96, "image_mean": [0.1, 0.2, 0.3],
                            "image_std": [0.9, 0.8, 0.7]},
    "convnext_224_crop_pct": {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
                              "crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406],
                              "image_std": [0.229, 0.224, 0.225]},
    "convnext_384_warp": {"image_processor_type": "ConvNextImageProcessor"},
    "convnext_odd_crop_pct": {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 101},
                              "crop_pct": 0.9},
    "convnext_legacy_feature_extractor": {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 224,
                                          "crop_pct": 0.875},
    "no_rescale": {"image_processor_type": "SiglipImageProcessor", "do_rescale": False, "size": {"height": 32,
                   "width": 32}},
    # do_pad is LLaVA's pad-to-square only in LlavaImageProcessor; elsewhere it pads a batch to its largest image.
    "clip_do_pad": {"image_processor_type": "CLIPImageProcessor", "do_pad": True, "size": {"shortest_edge": 32},
                    "crop_size": {"height": 32, "width": 32}},
    "siglip_do_pad": {"image_processor_type": "SiglipImageProcessor", "do_pad": True, "size": {"height": 24,
                      "width": 40}},
    "blip_do_pad": {"image_processor_type": "BlipImageProcessor", "do_pad": True, "size": {"height": 32,
                    "width": 32}},
    "vit_do_pad": {"image_processor_type": "ViTImageProcessor", "do_pad": True, "size": {"height": 32, "width": 32}},
    "convnext_do_pad": {"image_processor_type": "ConvNextImageProcessor", "do_pad": True, "pad_size": {"height": 64,
                        "width": 64}, "size": {"shortest_edge": 32}, "crop_pct": 0.875},
}  # fmt: skip


def _reference_images(directory: Path, config: dict[str, Any]) -> Any:
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return transformers.AutoImageProcessor.from_pretrained(directory)


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_pixels_match_transformers(name: str, images: list[Image.Image], tmp_path: Path) -> None:
    reference = _reference_images(tmp_path, IMAGE_CASES[name])
    processor = load_processor(tmp_path)
    worst = 0.0
    for image in images:
        if reference.do_convert_rgb is not True and image.mode != "RGB":
            continue  # without do_convert_rgb transformers keeps one channel and cannot normalise it; vlkit converts
        expected = reference(image, return_tensors="pt").pixel_values
        actual = processor(images=image).pixel_values
        assert actual is not None and actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected.float(), atol=1e-5, rtol=0)
        worst = max(worst, float((actual - expected).abs().max()))
    print(f"{name}: max |diff| {worst:.1e}")


def test_do_pad_changes_nothing_where_every_image_is_processed_to_one_size(
    images: list[Image.Image], tmp_path: Path
) -> None:
    reference = _reference_images(tmp_path, IMAGE_CASES["clip_do_pad"])
    expected = reference(images, return_tensors="pt").pixel_values  # one size after the crop: nothing to pad
    torch.testing.assert_close(load_processor(tmp_path)(images=images).pixel_values, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="LlavaImageProcessor"):
        ImageProcessor(family="SiglipImageProcessor", do_pad=True)


def test_batch_and_array_input(images: list[Image.Image], tmp_path: Path) -> None:
    reference = _reference_images(tmp_path, IMAGE_CASES["clip"])
    processor = load_processor(tmp_path)
    batch = processor(images=[np.asarray(image) for image in images[:3]]).pixel_values
    expected = reference(images[:3], return_tensors="pt").pixel_values
    assert batch is not None and batch.shape == (3, 3, 224, 224)
    torch.testing.assert_close(batch, expected, atol=1e-5, rtol=0)


def test_image_processor_round_trips_through_its_hf_dict(images: list[Image.Image], tmp_path: Path) -> None:
    original = ImageProcessor.from_hf_dict(IMAGE_CASES["convnext_odd_crop_pct"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(original.to_hf_dict()))
    assert load_processor(tmp_path).image_processor == original
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    expected = reference(images[0], return_tensors="pt").pixel_values
    torch.testing.assert_close(original(images[0])[None], expected, atol=1e-5, rtol=0)


def test_export_writes_a_processor_transformers_reads(images: list[Image.Image], tmp_path: Path) -> None:
    processor = Processor(ImageProcessor.from_hf_dict({"image_processor_type": "SiglipImageProcessor",
                                                       "size": {"height": 32, "width": 32}}))  # fmt: skip
    vlkit.export_hf(vlkit.create_model("test_siglip"), tmp_path, processor=processor)
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(
        processor(images=images[2]).pixel_values, reference(images[2], return_tensors="pt").pixel_values, atol=1e-5,
        rtol=0,
    )  # fmt: skip


def test_a_vlkit_models_own_preprocessing_exports(images: list[Image.Image], tmp_path: Path) -> None:
    """A model vlkit trained prepares images with its ``ImageTransform``: exported with its processor, transformers
    reads a CLIPImageProcessor that gives the same pixels (crop margins of 3 mod 4 aside: the docstring's one-pixel
    shift); a transform transformers has no processor for is refused before anything is written."""
    from vlkit.convert import ConversionError
    from vlkit.data.processors import TransformImages
    from vlkit.data.transforms import ImageTransform

    model = vlkit.create_model("test_siglip")
    model.save_pretrained(tmp_path / "run")
    ours = load_processor(tmp_path / "run")
    assert isinstance(ours.image_processor, TransformImages)
    vlkit.export_hf(model, tmp_path / "out", processor=ours)
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    size = model.config.vision.image_size
    for image in (*images[2:], images[0].resize((size + 8, size)), images[0].resize((size, size + 2))):
        pixels = reference(image, return_tensors="pt").pixel_values
        torch.testing.assert_close(ours(images=image).pixel_values, pixels, rtol=0, atol=0)
    for photo in images[:2]:  # 640 x 427, resized to 47 x 32: a margin of 15, the crop one pixel apart
        pixels, own = reference(photo, return_tensors="pt").pixel_values, ours(images=photo).pixel_values
        assert torch.equal(own[..., :-1], pixels[..., 1:]) and not torch.equal(own, pixels)
    padded = Processor(TransformImages(ImageTransform(image_size=size, resize_mode="pad")))
    with pytest.raises(ConversionError, match="'pad' image transform"):
        vlkit.export_hf(model, tmp_path / "padded", processor=padded)
    assert not (tmp_path / "padded").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image_processor_type": "DonutImageProcessor"}, "not supported"),
        ({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 300}}, "longest_edge"),
        (
            {"image_processor_type": "CLIPImageProcessor", "do_pad": True, "pad_size": {"height": 40, "width": 40}},
            "pad_size",
        ),
    ],
)
def test_unsupported_image_processors_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageProcessor.from_hf_dict(config)


# --- text


def _clip_tokenizer(directory: Path) -> Any:
    """A CLIP BPE tokenizer built offline: byte alphabet, end-of-word forms, a few merges, CLIP's special tokens."""
    from tokenizers import pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"{char}</w>": len(vocab) + index for index, char in enumerate(sorted(vocab))})
    merges = [("r", "e"), ("re", "d</w>"), ("s", "t"), ("st", "a"), ("sta", "r</w>"), ("t", "h"), ("th", "e</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(directory)  # before any call: calls leave padding state in tokenizer.json
    return tokenizer


def _siglip_style_tokenizer(directory: Path, words: list[str]) -> Any:
    """A tokenizers.json with SigLIP's conventions: lower-cased words, ``</s>`` appended, ``</s>`` as padding.

    SigLIP's own SiglipTokenizer needs sentencepiece and an ``spiece.model``, neither of which is available
    offline here, so this checks the padding / truncation / special-token conventions, not SentencePiece itself.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=64
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


TEXTS = ["a red star", "The red star above the star and the red star next to the " + "star " * 30, "Ünïcode TEXT!!", ""]


def test_clip_text_matches_transformers(tmp_path: Path) -> None:
    reference = _clip_tokenizer(tmp_path)
    expected = reference(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    out = load_processor(tmp_path)(text=TEXTS)
    assert out.input_ids is not None and out.input_ids.shape == (len(TEXTS), 77)
    assert torch.equal(out.input_ids, expected["input_ids"])
    assert torch.equal(out.attention_mask, expected["attention_mask"])
    assert int(out.input_ids[1, -1]) == reference.eos_token_id  # truncation keeps the end-of-text token


def test_siglip_style_text_matches_transformers(tmp_path: Path) -> None:
    words = ["a", "red", "star", "the", "above", "and", "next", "to"]
    reference = _siglip_style_tokenizer(tmp_path, words)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "text_config": {}}))
    expected = reference(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    out = load_processor(tmp_path)(text=TEXTS)
    assert out.input_ids is not None and out.input_ids.shape == (len(TEXTS), 64)
    assert torch.equal(out.input_ids, expected["input_ids"])
    assert torch.equal(out.attention_mask, expected["attention_mask"])


def test_text_length_follows_the_model_and_the_tokenizer_json(tmp_path: Path) -> None:
    _clip_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {"max_position_embeddings": 16}})
    )
    assert load_processor(tmp_path)(text="a red star").input_ids.shape == (1, 16)  # the text tower's 16 positions

    document = json.loads((tmp_path / "tokenizer.json").read_text())
    end = document["model"]["vocab"]["<|endoftext|>"]
    document["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": end, "pad_type_id": 0, "pad_token": "<|endoftext|>"}  # fmt: skip
    document["truncation"] = {"direction": "Right", "max_length": 12, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(document))
    processor = load_processor(tmp_path)
    assert processor.padding == "longest"
    out = processor(text=["a red star", "red " * 40])
    assert out.input_ids.shape == (2, 12)  # the stored truncation length, and the longest text fills it
    assert processor(text=["a", "red star"]).input_ids.shape == (2, 4)  # <start> red star <end>

    # CLIP's causal text tower, pooled at its end-of-text token (also its pad), reads right-padded text only.
    document["padding"]["direction"] = "Left"
    (tmp_path / "tokenizer.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="pads on the left"):
        load_processor(tmp_path)
    # Without a causal tower to feed, a tokenizer.json that pads on the left is followed, as transformers follows it.
    (tmp_path / "config.json").unlink()
    texts = ["a red star", "the star", "red"]
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)(texts, padding=True, truncation=True,
                                                                     return_tensors="pt")  # fmt: skip
    out = load_processor(tmp_path)(text=texts)
    assert torch.equal(out.input_ids, expected["input_ids"]) and int(out.attention_mask[2, 0]) == 0
    assert torch.equal(out.attention_mask, expected["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("template", ["$A", "<bos> $A", "$A <eos>", "<bos> $A <eos>"])
def test_truncation_matches_transformers(template: str, side: str, tmp_path: Path) -> None:
    """A text too long keeps the special tokens the tokenizer adds and cuts its own: an end-of-text token is kept only
    where the tokenizer adds one (a tokenizer that adds none, as SigLIP 2's, is simply cut)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "red", "star", "the"]
    vocab = {token: index for index, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [(token, vocab[token]) for token in ("<bos>", "<eos>") if token in template]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", model_max_length=6,
                                                     truncation_side=side)  # fmt: skip
    reference.save_pretrained(tmp_path)
    texts = ["the red star", "a red star and the red star"]
    expected = reference(texts, padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    out = load_processor(tmp_path)(text=texts)
    assert torch.equal(out.input_ids, expected["input_ids"]), (out.input_ids, expected["input_ids"])
    assert torch.equal(out.attention_mask, expected["attention_mask"])


def _tiny_clip(tokenizer: Any) -> Any:
    """A random one-layer CLIPModel for 32-pixel images and ``tokenizer``'s vocabulary."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=8,
    )  # fmt: skip
    return transformers.CLIPModel(config).eval()


def test_images_and_text_together_feed_a_transformers_model(images: list[Image.Image], tmp_path: Path) -> None:
    tokenizer = _clip_tokenizer(tmp_path)
    reference = _tiny_clip(tokenizer)
    reference.save_pretrained(tmp_path)
    _reference_images(tmp_path, {**IMAGE_CASES["clip"], "size": {"shortest_edge": 32},
                                 "crop_size": {"height": 32, "width": 32}})  # fmt: skip
    inputs = vlkit.load_processor(tmp_path)(images=images[:2], text=["a red star", "the star"])
    model = vlkit.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference(**inputs.as_dict()).logits_per_image
        actual = model.logits(**inputs)  # the processor's names unpack into the model, as into transformers'
        features = model(**inputs).image_features
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert features.shape[0] == 2


def test_a_processor_transformers_5_saved_keeps_its_image_settings(images: list[Image.Image], tmp_path: Path) -> None:
    """transformers 5 saves a CLIPProcessor's image settings inside processor_config.json (no
    preprocessor_config.json): read from there, and exported where transformers finds them again."""
    tokenizer = _clip_tokenizer(tmp_path / "tokenizer")
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    _tiny_clip(tokenizer).save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    assert "image_processor" in json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    expected = processor(images=images[:2], text=["a red star", "the star"], padding="max_length", return_tensors="pt")
    ours = load_processor(tmp_path / "hf")
    out = ours(images=images[:2], text=["a red star", "the star"])
    for key in ("pixel_values", "input_ids", "attention_mask"):
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)
    vlkit.export_hf(vlkit.from_pretrained(tmp_path / "hf"), tmp_path / "out", processor=ours)
    again = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    redone = again(images=images[:2], text=["a red star", "the star"], padding="max_length", return_tensors="pt")
    assert all(torch.equal(redone[key], expected[key]) for key in ("pixel_values", "input_ids", "attention_mask"))


def test_processor_without_files_or_parts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither preprocessor_config\.json nor tokenizer\.json"):
        load_processor(tmp_path)
    _reference_images(tmp_path, IMAGE_CASES["vit"])
    with pytest.raises(ValueError, match="no tokenizer"):
        load_processor(tmp_path)(text="a red star")


def test_clip_vocab_and_merges_alone_are_not_read_as_gpt2s(tmp_path: Path) -> None:
    """Only OPT's family builds its tokenizer from vocab.json and merges.txt; CLIP's files are another BPE (word ends,
    cleaning), which vlkit reads from tokenizer.json only."""
    from tokenizers import Tokenizer

    _clip_tokenizer(tmp_path)
    Tokenizer.from_file(str(tmp_path / "tokenizer.json")).model.save(str(tmp_path))  # vocab.json, merges.txt
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}}))
    with pytest.raises(FileNotFoundError, match=r"neither preprocessor_config\.json nor tokenizer\.json"):
        load_processor(tmp_path)

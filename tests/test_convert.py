"""Checkpoint converters: Hugging Face CLIP / SigLIP / ViT / ConvNeXt directories <-> vlkit models.

Every parity test builds the transformers reference from a tiny config with random weights (no download), saves
it, loads it with ``vlkit.from_pretrained`` and compares outputs in fp32; then exports the vlkit model with
``vlkit.export_hf``, loads that with transformers (``AutoModel`` and the specific class, no missing or unexpected
keys) and compares again. The configs between them vary every option the converters read.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.convert import FORMATS, ConversionError
from vlkit.convert.common import HFCheckpoint
from vlkit.models import DualEncoder, ImageClassifier

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
MAX_DIFF: dict[str, float] = {}  # largest |vlkit - transformers| seen per test, printed with -s


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), float((actual - expected).abs().max()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # transformers initialises the reference models from the global generator


@pytest.fixture(scope="module", autouse=True)
def _report_max_diff():
    yield
    for name, diff in sorted(MAX_DIFF.items()):
        print(f"max |diff| {name}: {diff:.2e}")


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so no weight sits at a special init (layer scale 1e-6, unit norms, zero biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def _load_back(path: Path, cls: type, **kwargs: Any) -> Any:
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _text_ids(vocab: int, eos: int, lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad = eos, as CLIP and SigLIP tokenizers do) with an eos after each text."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), eos)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        body = torch.randint(0, vocab, (length,), generator=generator)
        ids[row, :length] = torch.where(body == eos, (body + 1) % vocab, body)
        mask[row, : length + 1] = 1
    return ids, mask


# --- dual encoders

CLIP_CASES = {
    # legacy eos_token_id == 2: argmax pooling (the eos is the largest id, as in OpenAI's vocabulary)
    "clip_argmax_quickgelu": dict(
        vision=dict(image_size=40, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                  max_position_embeddings=10, hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1),
        projection_dim=16, eos=49, logit_scale=2.6592,
    ),
    # first-eos pooling with an eos that is not the largest id; scale above vlkit's default clamp of 100
    "clip_eos_gelu": dict(
        vision=dict(image_size=36, patch_size=12, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                    num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-6),
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=12, hidden_act="gelu_new", eos_token_id=40, pad_token_id=40,
                  layer_norm_eps=1e-6),
        projection_dim=24, eos=40, logit_scale=4.9,
    ),
}  # fmt: skip

SIGLIP_CASES = {
    "siglip_tanh": dict(
        vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4),
        text=dict(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=12, projection_size=32, eos_token_id=1, pad_token_id=1),
        eos=1, logit_scale=0.3,
    ),
    # image size not a multiple of the patch (so400m: 384 px, 14 px patches); scale above vlkit's clamp
    "siglip_ragged_gelu": dict(
        vision=dict(image_size=45, patch_size=14, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
                    num_attention_heads=3, hidden_act="gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=30, hidden_size=48, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=9, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=3),
        eos=3, logit_scale=4.8,
    ),
}  # fmt: skip


def _dual_reference(kind: str, case: dict[str, Any], seed: int) -> Any:
    if kind == "clip":
        config = transformers.CLIPConfig(
            text_config=case["text"], vision_config=case["vision"], projection_dim=case["projection_dim"]
        )
        model = transformers.CLIPModel(config)
    else:
        model = transformers.SiglipModel(
            transformers.SiglipConfig(text_config=case["text"], vision_config=case["vision"])
        )
    _randomise(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(case["logit_scale"])
    return model


def _dual_parity(name: str, reference: Any, model: DualEncoder, case: dict[str, Any], mask: bool) -> None:
    size = case["vision"]["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    width = case["text"]["max_position_embeddings"]
    ids, attention = _text_ids(case["text"]["vocab_size"], case["eos"], [2, width - 1, 4, 5], width, seed=2)
    attention_arg = attention if mask else None
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels, attention_mask=attention_arg)
        _close(f"{name} image_embeds", model.encode_image(pixels, normalize=True), out.image_embeds)
        _close(f"{name} text_embeds", model.encode_text(ids, attention_arg, normalize=True), out.text_embeds)
        _close(f"{name} logits", model.logits(pixels, ids, attention_arg), out.logits_per_image)
        features = reference.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        _close(f"{name} image_features", model.encode_image(pixels), features)


@pytest.mark.parametrize("name", [*CLIP_CASES, *SIGLIP_CASES])
def test_dual_encoder_parity_both_directions(name: str, tmp_path: Path) -> None:
    kind = "clip" if name in CLIP_CASES else "siglip"
    case = {**CLIP_CASES, **SIGLIP_CASES}[name]
    reference = _dual_reference(kind, case, seed=len(name))
    model = vlkit.from_pretrained(_save(reference, tmp_path / "hf")).eval()
    assert isinstance(model, DualEncoder) and model.config.loss == kind
    if kind == "clip":
        legacy = case["text"]["eos_token_id"] == 2
        assert model.config.text.pool == ("argmax" if legacy else "eos")
    assert model.config.max_logit_scale >= math.exp(case["logit_scale"]) * (1 - 1e-6)
    _dual_parity(name, reference, model, case, mask=True)
    if kind == "siglip":
        _dual_parity(f"{name} no mask", reference, model, case, mask=False)

    exported = vlkit.export_hf(model, tmp_path / "export")
    specific = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    for cls in (transformers.AutoModel, specific):
        back = _load_back(exported, cls)
        assert type(back) is specific
        _dual_parity(f"{name} exported", back, model, case, mask=True)
    assert json.loads((exported / "config.json").read_text())["architectures"] == [specific.__name__]


def test_vlkit_siglip_preset_exports_to_transformers(tmp_path: Path) -> None:
    model = _randomise(vlkit.create_model("test_siglip"), seed=5)
    back = _load_back(vlkit.export_hf(model, tmp_path), transformers.SiglipModel)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _text_ids(100, 1, [3, 7], 16, seed=3)
    with torch.no_grad():
        _close("test_siglip preset logits", back(input_ids=ids, pixel_values=pixels, attention_mask=mask)
               .logits_per_image, model.logits(pixels, ids, mask))  # fmt: skip
        _close("test_siglip preset reimport", vlkit.from_pretrained(tmp_path).eval().logits(pixels, ids, mask),
               model.logits(pixels, ids, mask))  # fmt: skip


def test_vlkit_clip_preset_with_argmax_pool_exports(tmp_path: Path) -> None:
    config = vlkit.get_config("test_clip", {"text.pool": "argmax", "text.eos_token_id": 99})
    model = _randomise(DualEncoder(config), seed=6)
    back = _load_back(vlkit.export_hf(model, tmp_path), transformers.CLIPModel)
    assert back.config.text_config.eos_token_id == 2  # transformers' switch to argmax pooling
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _text_ids(100, 99, [3, 9, 1], 16, seed=4)
    with torch.no_grad():
        _close("test_clip preset logits", back(input_ids=ids, pixel_values=pixels, attention_mask=mask)
               .logits_per_image, model.logits(pixels, ids, mask))  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("test_clip", {}, "legacy argmax"),  # pool='eos' with eos id 2 means argmax to transformers
        ("test_convnext_clip", {}, "ConvNeXtConfig image tower"),
        ("test_vit", {}, "pool='mean'"),
        ("test_clip", {"text.pool": "argmax", "vision.qkv_bias": False}, "qkv_bias"),
        ("test_siglip", {"text.causal": True}, "text.causal"),
        ("test_convnext", {"vision.norm_eps": 1e-5}, "norm_eps"),
    ],
)
def test_export_refuses_what_the_format_cannot_express(
    preset: str, overrides: dict[str, Any], message: str, tmp_path: Path
) -> None:
    model = vlkit.create_model(preset, **overrides)
    with pytest.raises(ConversionError, match=message):
        vlkit.export_hf(model, tmp_path)


# --- image classifiers


def _vit(num_labels: int | None, **changes: Any) -> Any:
    base = dict(image_size=40, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2)  # fmt: skip
    base.update(changes)
    if num_labels is None:
        return transformers.ViTConfig(**base)
    names = {i: f"class {i}" for i in range(num_labels)}
    return transformers.ViTConfig(
        **base, num_labels=num_labels, id2label=names, label2id={v: k for k, v in names.items()}
    )


def _convnext(num_labels: int | None, **changes: Any) -> Any:
    base = dict(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3)
    base.update(changes)
    return transformers.ConvNextConfig(**base, **({"num_labels": num_labels} if num_labels else {}))


CLASSIFIER_CASES = {
    "vit_classifier": (lambda: transformers.ViTForImageClassification(_vit(5)), 40),
    "vit_classifier_no_qkv_bias": (
        lambda: transformers.ViTForImageClassification(
            _vit(3, image_size=36, patch_size=12, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
                 num_attention_heads=4, hidden_act="gelu_new", qkv_bias=False, layer_norm_eps=1e-6)
        ),
        36,
    ),
    "vit_model_without_pooler": (
        lambda: transformers.ViTModel(_vit(None, hidden_act="quick_gelu"), add_pooling_layer=False),
        40,
    ),
    "vit_non_square_image": (lambda: transformers.ViTForImageClassification(_vit(2, image_size=[24, 40])), (24, 40)),
    "convnext_classifier": (lambda: transformers.ConvNextForImageClassification(_convnext(7, image_size=64)), 64),
    "convnext_model_no_layer_scale": (
        lambda: transformers.ConvNextModel(
            _convnext(None, hidden_sizes=[8, 12], depths=[2, 1], num_stages=2, patch_size=2, layer_scale_init_value=0.0,
                      layer_norm_eps=1e-6, drop_path_rate=0.2)
        ),
        24,
    ),
}  # fmt: skip


def _classifier_output(reference: Any, pixels: torch.Tensor) -> torch.Tensor:
    out = reference(pixel_values=pixels)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(reference, transformers.ConvNextModel):
        return out.pooler_output
    return out.last_hidden_state[:, 0]


@pytest.mark.parametrize("name", list(CLASSIFIER_CASES))
def test_classifier_parity_both_directions(name: str, tmp_path: Path) -> None:
    build, size = CLASSIFIER_CASES[name]
    reference = _randomise(build(), seed=len(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be dropped silently or noisily here
        model = vlkit.from_pretrained(_save(reference, tmp_path / "hf")).eval()
    assert isinstance(model, ImageClassifier)
    num_labels = reference.config.num_labels if hasattr(reference, "classifier") else 0
    assert model.config.num_classes == num_labels
    if num_labels:
        assert model.config.class_names == tuple(reference.config.id2label[i] for i in range(num_labels))
    height, width = size if isinstance(size, tuple) else (size, size)
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _classifier_output(reference, pixels)
        _close(name, model(pixels), expected)

    exported = vlkit.export_hf(model, tmp_path / "export")
    specific = type(reference)
    extra = {"add_pooling_layer": False} if specific is transformers.ViTModel else {}
    classes = [specific] if extra else [transformers.AutoModelForImageClassification if num_labels else
                                        transformers.AutoModel, specific]  # fmt: skip
    for cls in classes:
        back = _load_back(exported, cls, **extra)
        assert type(back) is specific
        with torch.no_grad():
            _close(f"{name} exported", _classifier_output(back, pixels), expected)


def test_vit_model_pooler_is_dropped_with_a_warning(tmp_path: Path) -> None:
    reference = _randomise(transformers.ViTModel(_vit(None)), seed=3)  # has the dense+tanh pooler
    with pytest.warns(UserWarning, match=r"pooler \(pooler.dense.bias, pooler.dense.weight\)"):
        model = vlkit.from_pretrained(_save(reference, tmp_path)).eval()
    pixels = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        _close("vit_model_with_pooler", model(pixels), reference(pixel_values=pixels).last_hidden_state[:, 0])


def test_vit_reads_transformers5_native_key_layout(tmp_path: Path) -> None:
    reference = _randomise(transformers.ViTForImageClassification(_vit(4)), seed=4)
    _save(reference, tmp_path)
    renames = (("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
               ("output.dense", "mlp.fc2"))  # fmt: skip
    weights = load_file(tmp_path / "model.safetensors")
    native = {}
    for key, value in weights.items():
        for old, new in renames:
            key = key.replace(old, new)
        native[key] = value
    assert "vit.layers.0.attention.q_proj.weight" in native
    save_file(native, tmp_path / "model.safetensors")
    pixels = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        _close(
            "vit native layout", vlkit.from_pretrained(tmp_path).eval()(pixels), reference(pixel_values=pixels).logits
        )


def test_convnext_preset_exports(tmp_path: Path) -> None:
    model = _randomise(vlkit.create_model("test_convnext"), seed=8)
    back = _load_back(vlkit.export_hf(model, tmp_path), transformers.ConvNextForImageClassification)
    assert back.config.drop_path_rate == pytest.approx(0.1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close("test_convnext preset", back(pixel_values=pixels).logits, model(pixels))


def test_auto_dtype_keeps_a_dual_encoders_stored_dtype(tmp_path: Path) -> None:
    """A bf16 SigLIP directory: float32 by default, its stored bf16 with ``dtype="auto"`` (transformers' meaning), and
    exported from there as bf16, which transformers reads back as it was stored."""
    case = SIGLIP_CASES["siglip_tanh"]
    reference = _dual_reference("siglip", case, seed=3).to(torch.bfloat16)
    _save(reference, tmp_path / "hf")
    assert next(vlkit.from_pretrained(tmp_path / "hf").parameters()).dtype == torch.float32
    model = vlkit.from_pretrained(tmp_path / "hf", dtype="auto").eval()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    exported = vlkit.export_hf(model, tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.SiglipModel.from_pretrained(exported, dtype="auto").eval()
    assert next(back.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))  # fmt: skip
    # ... and a vlkit directory holding bf16 weights the same way.
    model.save_pretrained(tmp_path / "own")
    assert next(vlkit.from_pretrained(tmp_path / "own").parameters()).dtype == torch.float32
    assert next(vlkit.from_pretrained(tmp_path / "own", dtype="auto").parameters()).dtype == torch.bfloat16


# --- files: sharding, tokenizer, errors


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    reference = _randomise(transformers.ViTForImageClassification(_vit(3)), seed=9)
    _save(reference, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    pixels = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        _close("vit sharded", vlkit.from_pretrained(tmp_path).eval()(pixels), reference(pixel_values=pixels).logits)


def _clip_tokenizer(max_len: int) -> Any:
    from tokenizers import pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"{char}</w>": len(vocab) + index for index, char in enumerate(sorted(vocab))})
    merges = [("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)


def test_clip_directory_with_tokenizer_round_trips(tmp_path: Path) -> None:
    tokenizer = _clip_tokenizer(max_len=77)
    vocab = len(tokenizer)
    case = dict(CLIP_CASES["clip_eos_gelu"])
    case["text"] = {**case["text"], "vocab_size": vocab, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id, "max_position_embeddings": 20}  # fmt: skip
    reference = _dual_reference("clip", case, seed=11)
    _save(reference, tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf").eval()
    assert model.tokenizer is not None
    assert (model.tokenizer.pad_token_id, model.tokenizer.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    assert model.tokenizer.max_len == 20  # the text tower's 20 positions cap the tokenizer's 77
    texts = ["a photo of a cat", "cat " * 30]
    batch = model.tokenizer(texts)
    expected = tokenizer(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    pixels = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        out = reference(input_ids=batch.input_ids, pixel_values=pixels, attention_mask=batch.attention_mask)
        _close("clip with tokenizer", model.logits(pixels, batch.input_ids, batch.attention_mask), out.logits_per_image)

    exported = vlkit.export_hf(model, tmp_path / "export")
    assert (exported / "tokenizer.json").exists()
    loaded = transformers.AutoTokenizer.from_pretrained(exported)
    again = loaded(texts, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], batch.input_ids)
    reloaded = vlkit.from_pretrained(exported)
    assert reloaded.tokenizer.max_len == 20 and reloaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    native = vlkit.from_pretrained(model.save_pretrained(tmp_path / "vlkit"))  # vlkit's own format keeps it too
    assert torch.equal(native.tokenizer(texts).input_ids, batch.input_ids)
    # Decoded as transformers' CLIPTokenizer decodes: its "</w>" word ends as spaces, here and on the export.
    ids = expected["input_ids"][0].tolist()
    assert model.tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert loaded.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert native.tokenizer.decode(ids) == "a photo of a cat"

    # transformers 5 reads a CLIP directory with CLIPTokenizer's own cleaning, whatever normalizer the file holds.
    document = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({**document, "normalizer": {"type": "NFC"}}))
    shouting = ["A PHOTO  of\ta CAT"]
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(
        shouting, padding="max_length", max_length=20, return_tensors="pt"
    )
    assert torch.equal(vlkit.from_pretrained(tmp_path / "hf").tokenizer(shouting).input_ids, expected["input_ids"])
    assert torch.equal(expected["input_ids"], batch.input_ids[:1])

    # open_clip's layout names "!" its pad token: transformers makes a named token special (split out of any text,
    # skipped in decoding), and so does vlkit.
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "!"}))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), vlkit.load_processor(tmp_path / "hf")
    exclaimed = ["a photo of a cat!", "wow!! a cat"]
    expected = theirs(exclaimed, padding="max_length", max_length=20, return_tensors="pt")
    assert torch.equal(ours(text=exclaimed).input_ids, expected["input_ids"])
    row = expected["input_ids"][0].tolist()
    assert ours.text_tokenizer().decode(row) == theirs.decode(row, skip_special_tokens=True) == "a photo of a cat"


@pytest.fixture(scope="module")
def clip_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("clip")
    return _save(_dual_reference("clip", CLIP_CASES["clip_argmax_quickgelu"], seed=12), directory)


def _copy_with(source: Path, target: Path, change: Any) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    change(weights)
    save_file(weights, target / "model.safetensors")
    return target


def test_missing_key_is_named(clip_directory: Path, tmp_path: Path) -> None:
    broken = _copy_with(clip_directory, tmp_path / "x", lambda w: w.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"missing keys: vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        vlkit.from_pretrained(broken)


def test_extra_key_is_named(clip_directory: Path, tmp_path: Path) -> None:
    broken = _copy_with(
        clip_directory, tmp_path / "x", lambda w: w.update({"text_model.adapter.weight": torch.ones(2)})
    )
    with pytest.raises(ConversionError, match=r"unexpected keys .*text_model\.adapter\.weight"):
        vlkit.from_pretrained(broken)


def test_wrong_shape_is_named(clip_directory: Path, tmp_path: Path) -> None:
    def shrink(weights: dict[str, torch.Tensor]) -> None:
        weights["text_projection.weight"] = weights["text_projection.weight"][:, :-1].contiguous()

    with pytest.raises(ConversionError, match=r"text_projection\.weight has shape \(16, 23\), expected \(16, 24\)"):
        vlkit.from_pretrained(_copy_with(clip_directory, tmp_path / "x", shrink))


def test_legacy_position_ids_buffers_are_checked(clip_directory: Path, tmp_path: Path) -> None:
    def add_ids(weights: dict[str, torch.Tensor]) -> None:
        weights["text_model.embeddings.position_ids"] = torch.arange(10)[None]
        weights["vision_model.embeddings.position_ids"] = torch.arange(26)[None]

    vlkit.from_pretrained(_copy_with(clip_directory, tmp_path / "ok", add_ids))

    def bad_ids(weights: dict[str, torch.Tensor]) -> None:
        weights["text_model.embeddings.position_ids"] = torch.arange(10).flip(0)[None]

    with pytest.raises(ConversionError, match="position_ids"):
        vlkit.from_pretrained(_copy_with(clip_directory, tmp_path / "bad", bad_ids))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(architectures=["CLIPVisionModel"]), "architecture CLIPVisionModel"),
        (lambda c: c.update(model_type="blip"), "model_type 'blip' has no converter"),
        (lambda c: c["vision_config"].update(hidden_act="silu"), "activation 'silu'"),
        (lambda c: c["vision_config"].update(num_channels=1), "num_channels=1"),
    ],
)
def test_unsupported_configs_are_refused(clip_directory: Path, tmp_path: Path, edit: Any, message: str) -> None:
    target = _copy_with(clip_directory, tmp_path / "x", lambda w: None)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        vlkit.from_pretrained(target)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match="never unpickles"):
        vlkit.from_pretrained(tmp_path)


# --- the public checkpoints' architectures, at full size on the meta device (no memory, no download)

PUBLIC = {
    "openai/clip-vit-base-patch32": ("clip", "clip_vit_base_patch32", dict(
        text_config=dict(eos_token_id=2), vision_config=dict(patch_size=32), projection_dim=512)),
    "openai/clip-vit-large-patch14": ("clip", "clip_vit_large_patch14", dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, eos_token_id=2),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14), projection_dim=768)),
    "google/siglip-base-patch16-224": ("siglip", "siglip_base_patch16_224", dict(text_config={}, vision_config={})),
    "google/siglip-so400m-patch14-384": ("siglip", "siglip_so400m_patch14_384", dict(
        text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14))),
    "google/vit-base-patch16-224": ("vit", "vit_base_patch16_224", dict(num_labels=1000)),
    "facebook/convnext-tiny-224": ("convnext", "convnext_tiny", dict(num_labels=1000)),
}  # fmt: skip
_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel", "vit": "ViTForImageClassification",
            "convnext": "ConvNextForImageClassification"}  # fmt: skip


@pytest.mark.filterwarnings("ignore:for logit_scale. copying from a non-meta parameter")
@pytest.mark.parametrize("checkpoint", list(PUBLIC))
def test_public_architectures_map_onto_vlkit_presets(checkpoint: str) -> None:
    model_type, preset, fields = PUBLIC[checkpoint]
    config_class = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        reference = getattr(transformers, _CLASSES[model_type])(config_class)
        weights = dict(reference.state_dict())
        if "logit_scale" in weights:
            weights["logit_scale"] = torch.zeros(weights["logit_scale"].shape, device="cpu")
        model = FORMATS[model_type].load(HFCheckpoint(config_class.to_dict(), weights), checkpoint)
    expected = vlkit.get_config(preset)
    if model_type in ("clip", "siglip"):
        # Token ids are tokenizer metadata, not architecture: compare the towers with the preset's ids.
        text = model.config.text.replace(
            eos_token_id=expected.text.eos_token_id, pad_token_id=expected.text.pad_token_id
        )
        assert model.config.vision == expected.vision
        assert text == expected.text
        assert model.config.embed_dim == expected.embed_dim
    else:
        assert model.config.vision == expected.vision
        assert model.config.num_classes == expected.num_classes
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())

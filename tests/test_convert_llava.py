"""LLaVA checkpoints: transformers' ``LlavaForConditionalGeneration`` directories <-> vlkit ``VisionLanguageModel``,
and ``vlkit.load_processor`` on them against transformers' ``LlavaProcessor``.

Each case builds the transformers model from a tiny random config (the cases vary every option the converter reads:
CLIP or SigLIP tower with or without its head, feature layer, "default" / "full", projector activation and bias,
image size, Llama or Qwen2, tied or untied head), saves it, loads it with ``vlkit.from_pretrained`` and checks logits
(fp32, 1e-4) and greedy generation on a left-padded batch (one sample text-only) token for token; then exports with
``vlkit.export_hf`` and loads that back with transformers. Real-size presets are compared with the public
architectures on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.bridges import LinearBridgeConfig, MLPBridgeConfig
from vlkit.convert import ConversionError, llava
from vlkit.data.processors import ProcessorOutput, VLMProcessor
from vlkit.encoders import ViTConfig
from vlkit.lm import LMConfig
from vlkit.models.vlm import VisionLanguageModel, VLMConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
VOCAB, IMAGE_TOKEN, PAD = 96, 95, 0
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=2, image_size=28, patch_size=7)  # fmt: skip
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
             eos_token_id=2, pad_token_id=PAD)  # fmt: skip
QWEN2 = {**LLAMA, "model_type": "qwen2", "num_key_value_heads": 1, "rope_theta": 1e6}
CASES: dict[str, dict[str, Any]] = {
    # LLaVA-1.5's options: CLIP, second-to-last layer, class token dropped, GELU projector with bias
    "clip_llama_layer-2_default": dict(vision_config=CLIP, text_config=LLAMA, vision_feature_layer=-2),
    "clip40_llama_layer-1_full_silu_nobias_tied": dict(
        vision_config={**CLIP, "image_size": 40, "hidden_act": "gelu"},
        text_config={**LLAMA, "tie_word_embeddings": True}, vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="silu", multimodal_projector_bias=False),
    "siglip_qwen2_layer-1_full_head_tied": dict(
        vision_config=SIGLIP, text_config={**QWEN2, "tie_word_embeddings": True}, vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu_pytorch_tanh"),
    "siglip42_qwen2_layer1_full_no_head_untied": dict(
        vision_config={**SIGLIP, "image_size": 42, "vision_use_head": False}, text_config=QWEN2,
        vision_feature_layer=1, vision_feature_select_strategy="full", projector_hidden_act="quick_gelu",
        multimodal_projector_bias=False),
    # Several hidden states concatenated along the features (the projector reads 3 x 32), the class token dropped
    # from each.
    "clip_llama_layers-1_0_-2_default": dict(vision_config=CLIP, text_config=LLAMA, vision_feature_layer=[-1, 0, -2]),
}  # fmt: skip


def _reference(options: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(**{"image_token_index": IMAGE_TOKEN, **options})
    model = transformers.LlavaForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no weight at a special init (unit norms, zero biases); large enough for decisive argmaxes
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _tokens_per_image(options: dict[str, Any]) -> int:
    vision = options["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    cls = int(vision["model_type"] == "clip_vision_model")
    return side * side + cls - int(cls and options.get("vision_feature_select_strategy", "default") == "default")


def _batch(options: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Three left-padded prompts: two with an image (placed differently), the middle one text-only."""
    generator = torch.Generator().manual_seed(seed)
    count = _tokens_per_image(options)
    rows = []
    for before, after, image in ((2, 3, True), (5, 4, False), (0, 6, True)):
        text = torch.randint(3, IMAGE_TOKEN, (before + after,), generator=generator).tolist()
        rows.append(text[:before] + [IMAGE_TOKEN] * count * image + text[before:])
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    size = options["vision_config"]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _max_difference(model: Any, reference: Any, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference(**inputs).logits
    real = inputs["attention_mask"].bool()  # padded positions' outputs are meaningless in both libraries
    torch.testing.assert_close(ours[real], theirs[real], **TOLERANCE)
    return float((ours[real] - theirs[real]).abs().max())


def _load_back(path: Path) -> Any:
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_directions(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = _reference(options)
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert isinstance(model, VisionLanguageModel)
    assert model.tokens_per_image() == _tokens_per_image(options)
    inputs = _batch(options)
    _max_difference(model, reference, inputs)

    ours = model.generate(**inputs, max_new_tokens=6)
    theirs = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)

    vlkit.export_hf(model, tmp_path / "out")
    back = _load_back(tmp_path / "out")
    _max_difference(model, back, inputs)
    assert vlkit.from_pretrained(tmp_path / "out").config == model.config


def test_older_and_runtime_key_layouts_load(tmp_path: Path) -> None:
    """``vision_tower.vision_model.*`` with a saved ``position_ids`` buffer (transformers 4.x), and the runtime
    layout (``model.vision_tower``, ``model.language_model``, top-level ``lm_head``)."""
    options = CASES["clip_llama_layer-2_default"]
    reference = _reference(options, seed=1)
    reference.save_pretrained(tmp_path / "hf")
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    inputs = _batch(options, seed=1)
    old = {key.replace("vision_tower.", "vision_tower.vision_model.", 1): value for key, value in saved.items()}
    old["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    runtime = {("lm_head.weight" if key.endswith("lm_head.weight") else "model." + key.replace(
        "language_model.model.", "language_model.")): value for key, value in saved.items()}  # fmt: skip
    assert "model.language_model.layers.0.mlp.up_proj.weight" in runtime and "lm_head.weight" in runtime
    for layout in (old, runtime):
        save_file(layout, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
        _max_difference(vlkit.from_pretrained(tmp_path / "hf"), reference, inputs)
    old["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17).flip(0)[None]
    save_file(old, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="position_ids"):
        vlkit.from_pretrained(tmp_path / "hf")


def test_stored_dtype_is_kept_and_dtype_casts(tmp_path: Path) -> None:
    options = CASES["siglip_qwen2_layer-1_full_head_tied"]
    _reference(options).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    inputs = _batch(options)
    assert model.generate(**inputs, max_new_tokens=2).shape == (3, inputs["input_ids"].shape[1] + 2)
    wide = vlkit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    fresh = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    _max_difference(wide, fresh, inputs)
    # vlkit's own directory of a VLM loads on the meta device too: the stored dtype stays.
    model.save_pretrained(tmp_path / "native")
    again = vlkit.from_pretrained(tmp_path / "native")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_vlkit_model_exports_to_transformers(tmp_path: Path) -> None:
    """The other direction from scratch: a vlkit VLM (CLIP-layout tower, Qwen2-layout LM) -> transformers."""
    vision = ViTConfig(image_size=24, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=48, act="quick_gelu",
                       norm_eps=1e-5, patch_bias=False, pre_norm=True, final_norm="pooled", pool="cls")  # fmt: skip
    lm = LMConfig(vocab_size=VOCAB, max_seq_len=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                  qkv_bias=True, bos_token_id=None, eos_token_ids=(2,), pad_token_id=PAD)  # fmt: skip
    config = VLMConfig(vision=vision, bridge=MLPBridgeConfig(act="gelu_tanh"), lm=lm, feature_layer=-2,
                       keep_class_token=True, image_token_id=IMAGE_TOKEN)  # fmt: skip
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    vlkit.export_hf(model, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf["vision_feature_select_strategy"], hf["text_config"]["model_type"]) == ("full", "qwen2")
    assert hf["projector_hidden_act"] == "gelu_pytorch_tanh" and hf["image_seq_length"] == 10
    options = {"vision_config": {"image_size": 24, "patch_size": 8, "model_type": "clip_vision_model"},
               "vision_feature_select_strategy": "full"}  # fmt: skip
    _max_difference(model, _load_back(tmp_path / "out"), _batch(options))


def test_unsupported_options_are_clear_errors(tmp_path: Path) -> None:
    base = {"model_type": "llava", "vision_config": CLIP, "text_config": LLAMA, "image_token_index": IMAGE_TOKEN}
    with pytest.raises(ConversionError, match="vision_feature_layer=-5 is outside the tower's hidden states"):
        llava.config_from_hf({**base, "vision_feature_layer": [-2, -5]}, "x")
    with pytest.raises(ConversionError, match="needs distinct layers"):
        llava.config_from_hf({**base, "vision_feature_layer": [-2, -2]}, "x")
    assert llava.config_from_hf({**base, "vision_feature_layer": [-1]}, "x").feature_layer == -1
    assert llava.config_from_hf({**base, "vision_feature_layer": [0, -1]}, "x").feature_layer == (0, -1)
    with pytest.raises(ConversionError, match="outside the tower's hidden states"):
        llava.config_from_hf({**base, "vision_feature_layer": -5}, "x")
    with pytest.raises(ConversionError, match="drops the first patch token"):
        llava.config_from_hf({**base, "vision_config": SIGLIP}, "x")
    with pytest.raises(ConversionError, match=r"text_config\.model_type 'opt'"):
        llava.config_from_hf({**base, "text_config": {"model_type": "opt"}}, "x")
    with pytest.raises(ConversionError, match=r"vision_config\.model_type 'dinov2'"):
        llava.config_from_hf({**base, "vision_config": {"model_type": "dinov2"}}, "x")
    with pytest.raises(ConversionError, match="'mish'"):
        llava.config_from_hf({**base, "projector_hidden_act": "mish"}, "x")
    with pytest.raises(ConversionError, match="outside the vocabulary"):
        llava.config_from_hf({**base, "image_token_index": VOCAB}, "x")
    # transformers' attribute alias for the placeholder id
    aliased = {k: v for k, v in base.items() if k != "image_token_index"} | {"image_token_id": 7}
    assert llava.config_from_hf(aliased, "x").image_token_id == 7
    # Export names every option LLaVA cannot express: test_llava's ViT has no pre-norm, a biased patch embedding.
    with pytest.raises(ConversionError, match=r"pre_norm.*patch_bias|patch_bias.*pre_norm"):
        vlkit.export_hf(vlkit.create_model("test_llava"), tmp_path / "odd")
    linear = vlkit.get_config("test_llava").replace(bridge=LinearBridgeConfig())
    with pytest.raises(ConversionError, match="two-layer MLP"):
        vlkit.export_hf(VisionLanguageModel(linear), tmp_path / "odd")
    bidirectional = vlkit.get_config("test_llava").replace(image_attention="bidirectional")
    with pytest.raises(ConversionError, match="image_attention='bidirectional'"):
        vlkit.export_hf(VisionLanguageModel(bidirectional), tmp_path / "odd")
    with pytest.raises(ConversionError, match="image_newline"):
        vlkit.export_hf(
            VisionLanguageModel(vlkit.get_config("test_llava").replace(image_newline=True)), tmp_path / "odd"
        )
    normed = vlkit.get_config("test_llava").replace(feature_layer=None)
    with pytest.raises(ConversionError, match="feature_layer=None"):
        vlkit.export_hf(VisionLanguageModel(normed), tmp_path / "odd")
    _reference(CASES["clip_llama_layer-2_default"]).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 4
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="k_proj"):
        vlkit.from_pretrained(tmp_path / "hf")


# --- processor


def _tokenizer() -> Any:
    """A tiny byte-level BPE with <image> as a special token and a <bos> before every prompt, as Llama's has."""
    from tokenizers import processors

    from vlkit.text import train_tokenizer

    texts = ["a red circle left of a blue square", "what colour is the small triangle above it"] * 20
    backend = train_tokenizer(texts, vocab_size=64, extra_special_tokens=["<image>"]).backend
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", padding_side="left")  # fmt: skip


PROCESSOR_CASES: dict[str, tuple[str, dict[str, Any], Any, dict[str, Any]]] = {
    # LLaVA-1.5's processor: CLIP resize + crop, one class token counted then dropped ("default")
    "clip_default": ("clip_llama_layer-2_default", CLIP, lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        {"vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}),
    # LLaVA's pad-to-square image processor in front of a CLIP tower that keeps its class token
    "clip40_full_padded": ("clip40_llama_layer-1_full_silu_nobias_tied", {**CLIP, "image_size": 40},
                           lambda: transformers.LlavaImageProcessor(size={"shortest_edge": 40}, do_pad=True,
                                                                    crop_size={"height": 40, "width": 40}),
                           {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 1}),
    "siglip_full": ("siglip_qwen2_layer-1_full_head_tied", SIGLIP, lambda: transformers.SiglipImageProcessor(
        size={"height": 28, "width": 28}), {"vision_feature_select_strategy": "full"}),
}  # fmt: skip


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(45, 60), (50, 38), (30, 30)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_processor_matches_llava_processor_and_feeds_generation(case: str, tmp_path: Path) -> None:
    model_case, vision, image_processor, settings = PROCESSOR_CASES[case]
    tokenizer = _tokenizer()
    text = {**CASES[model_case]["text_config"], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    options = {**CASES[model_case], "vision_config": vision, "image_token_index": image_token, "text_config": text}
    reference = _reference(options)
    processor = transformers.LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer,
                                            patch_size=vision["patch_size"], **settings)  # fmt: skip
    reference.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    ours = vlkit.load_processor(tmp_path)
    assert isinstance(ours, VLMProcessor)

    images = _images()
    prompts = ["<image>\nwhat colour is the circle", "a red square", "left of <image> a blue <image> above"]
    theirs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    out = ours(images=images, text=prompts)
    assert isinstance(out, ProcessorOutput) and sorted(out) == sorted(theirs.keys())
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(out[key], theirs[key]), key
    torch.testing.assert_close(out["pixel_values"], theirs["pixel_values"])
    assert int((out["input_ids"] == reference.config.image_token_index).sum()) == 3 * _tokens_per_image(options)
    assert out["attention_mask"][:, 0].tolist() == [0, 0, 1]  # left padding (the last prompt is the longest)

    model = vlkit.from_pretrained(tmp_path)
    assert model.tokenizer is not None
    generated = model.generate(**ours(images=images, text=prompts), max_new_tokens=5)
    assert torch.equal(generated, reference.generate(**theirs, max_new_tokens=5, do_sample=False))

    # Exported with its processor, the directory gives transformers the same processor back.
    vlkit.export_hf(model, tmp_path / "out", processor=ours)
    again = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(again).__name__ == "LlavaProcessor"
    redone = again(images=images, text=prompts, padding=True, return_tensors="pt")
    assert all(torch.equal(redone[key], theirs[key]) for key in ("input_ids", "attention_mask", "pixel_values"))
    # Exported without it, from a tokenizer that named no padding side (right, transformers' default for LLaVA's),
    # its prompts still pad on the left to generate.
    model.tokenizer.padding_side = "right"
    model.tokenizer.hf_settings.pop("padding_side", None)
    vlkit.export_hf(model, tmp_path / "bare")
    (tmp_path / "bare" / "preprocessor_config.json").write_text(json.dumps(ours.image_processor.to_hf_dict()))
    bare = vlkit.load_processor(tmp_path / "bare")(images=images, text=prompts)
    assert torch.equal(bare["input_ids"], out["input_ids"]) and bare["attention_mask"][:, 0].tolist() == [0, 0, 1]


# LLaVA-1.5's template as llava-hf ships it: the images first, then the text, "ASSISTANT:" as the generation prompt.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_chat_template_prompts_as_transformers_and_chat_uses_it(tmp_path: Path, capsys) -> None:
    """A LLaVA directory's Jinja chat template: ``apply_chat_template`` renders and prepares inputs as
    ``LlavaProcessor`` does (images from the content blocks), generation from them is transformers' token for token,
    ``vlkit chat`` prompts with it (and with the checkpoint's image processor), and the export keeps it."""
    from vlkit import cli
    from vlkit.serve.chat import ChatSession
    from vlkit.text.chat import Conversation, Turn, render

    model_case, vision, image_processor, settings = PROCESSOR_CASES["clip_default"]
    tokenizer = _tokenizer()
    text = {
        **CASES[model_case]["text_config"],
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "max_position_embeddings": 256,
    }  # Vicuna's system prompt fits
    options = {**CASES[model_case], "vision_config": vision, "text_config": text,
               "image_token_index": tokenizer.convert_tokens_to_ids("<image>")}  # fmt: skip
    reference = _reference(options)
    processor = transformers.LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer,
                                            patch_size=vision["patch_size"], chat_template=LLAVA_TEMPLATE,
                                            **settings)  # fmt: skip
    reference.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    ours = vlkit.load_processor(tmp_path)
    assert isinstance(ours, VLMProcessor) and ours.chat_template == LLAVA_TEMPLATE

    images = _images()
    photo = tmp_path / "photo.png"
    images[2].save(photo)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                      {"type": "text", "text": "what colour is the circle"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
         {"role": "user", "content": [{"type": "text", "text": "and the square"}]}],
        [{"role": "user", "content": [{"type": "image", "path": str(photo)},
                                      {"type": "text", "text": "a red square"}]}],
    ]  # fmt: skip
    for chat in conversations:
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == processor.apply_chat_template(
            chat, add_generation_prompt=True
        )
    begun = "{{ bos_token }}" + LLAVA_TEMPLATE  # a template that writes <bos> itself: none is added
    for template in (None, begun):
        out = ours.apply_chat_template(conversations, chat_template=template, add_generation_prompt=True,
                                       tokenize=True, return_dict=True)  # fmt: skip
        theirs = processor.apply_chat_template(conversations, chat_template=template, add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})  # fmt: skip
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(out[key], theirs[key]), key
        torch.testing.assert_close(out["pixel_values"], theirs["pixel_values"])
        assert int((out["input_ids"] == tokenizer.bos_token_id).sum()) == 2
    model = vlkit.from_pretrained(tmp_path)
    generated = model.generate(**out, max_new_tokens=5)
    assert torch.equal(generated, reference.generate(**theirs, max_new_tokens=5, do_sample=False))
    # Messages as dataclasses (or pydantic-style objects) prepare the same inputs.
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: Any

    objects = [[Message(**turn) for turn in chat] for chat in conversations]
    again = ours.apply_chat_template(objects, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert all(torch.equal(again[key], out[key]) for key in out)

    # vlkit chat: the template, the checkpoint's image processor, and transformers' answer.
    question = [{"role": "user", "content": [{"type": "image", "path": str(photo)},
                                             {"type": "text", "text": "what is it"}]}]  # fmt: skip
    theirs = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    session = ChatSession(model, photo, max_new_tokens=4, processor=ours)
    inputs = session.inputs("what is it")
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(inputs[key], theirs[key], rtol=0, atol=0)
    answer = reference.generate(**theirs, max_new_tokens=4, do_sample=False)[0, theirs["input_ids"].shape[1] :]
    stop = next((n for n, token in enumerate(answer.tolist()) if token in session.eos_ids), len(answer))
    expected = tokenizer.decode(answer[:stop]).strip()
    assert cli.main(["chat", "--model", str(tmp_path), "--image", str(photo), "--prompt", "what is it",
                     "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == expected == "".join(session.ask("what is it")).strip()
    # The answer is kept for the next turn, without any image token the model wrote.
    assert [turn.content for turn in session.turns] == ["what is it", expected.replace("<image>", "").strip() or "…"]

    # Exported with its processor, the template goes with it; transformers 4's chat_template.json is read too.
    vlkit.export_hf(model, tmp_path / "out", processor=ours)
    assert transformers.AutoProcessor.from_pretrained(tmp_path / "out").chat_template == LLAVA_TEMPLATE
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": begun}))
    assert vlkit.load_processor(tmp_path).chat_template == begun

    # A checkpoint that ships none is prompted with vlkit's template for its language model, as one text.
    (tmp_path / "chat_template.json").unlink()
    bare = vlkit.load_processor(tmp_path)
    assert isinstance(bare, VLMProcessor) and bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(question)
    prompt = render(Conversation([Turn("user", "<image>\nwhat is it")], [images[2]]), "vicuna_v1")
    assert prompt.startswith("A chat between") and prompt.endswith("USER: <image>\nwhat is it ASSISTANT: ")
    expected = processor(images=[images[2]], text=prompt, return_tensors="pt")
    inputs = ChatSession(model, photo, processor=bare).inputs("what is it")
    assert all(torch.equal(inputs[key], expected[key]) for key in ("input_ids", "attention_mask"))
    with pytest.raises(ValueError, match="downloads nothing"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]}],
                                 tokenize=True)  # fmt: skip


def test_processor_output_is_a_mapping(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    options = {**CASES["clip_llama_layer-2_default"], "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
               "text_config": {**LLAMA, "vocab_size": len(tokenizer)}}  # fmt: skip
    _reference(options).save_pretrained(tmp_path)
    transformers.LlavaProcessor(image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                crop_size={"height": 32, "width": 32}), tokenizer=tokenizer, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1
                                ).save_pretrained(tmp_path)  # fmt: skip
    processor = vlkit.load_processor(tmp_path)
    out = processor(images=_images()[:1], text=["<image> a red", "what colour is it"], padding_side="right")
    assert list(out.keys()) == ["pixel_values", "input_ids", "attention_mask"] and len(out) == 3
    assert dict(out) == out.as_dict() and "spatial_shapes" not in out and out.get("spatial_shapes") is None
    with pytest.raises(KeyError):
        out["spatial_shapes"]
    assert out.attention_mask is not None and out.attention_mask[:, 0].tolist() == [1, 1]  # padding_side="right"
    assert list(processor(text="a red circle")) == ["input_ids", "attention_mask"]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(images=_images()[:1], text=["<image> <image>"])
    # Without processor_config.json (older directories): patch size, class token and strategy from config.json.
    assert isinstance(processor, VLMProcessor) and processor.image_processor is not None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor.image_processor.to_hf_dict()))
    (tmp_path / "processor_config.json").unlink()
    again = vlkit.load_processor(tmp_path)
    assert isinstance(again, VLMProcessor) and (again.patch_size, again.extra_image_tokens) == (8, 1)
    redone = again(images=_images()[:1], text=["<image> a red", "what colour is it"], padding_side="right")
    assert all(torch.equal(redone[key], out[key]) for key in out)


# --- real-size presets on the meta device

PUBLIC: dict[str, tuple[dict[str, Any], int]] = {
    # llava-hf/llava-1.5-7b-hf's config.json
    "llava_1_5_7b": (dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                           num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768),
        text_config=dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False), 7_063_427_072),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf's towers in the plain Llava class
    "llava_siglip_qwen2_0_5b": (dict(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384, intermediate_size=4304,
                           num_attention_heads=16, num_hidden_layers=26, patch_size=14, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645),
        image_token_index=151646, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True), 893_674_656),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLIC))
def test_real_size_presets_match_the_public_architectures(name: str) -> None:
    options, count = PUBLIC[name]
    with torch.device("meta"):
        reference = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**options))
        model = vlkit.create_model(name)
    read = llava.config_from_hf(reference.config.to_dict(), name)
    # token ids and the chat template are tokenizer conventions, not architecture
    assert read.replace(lm=read.lm.replace(bos_token_id=model.config.lm.bos_token_id,
                                           eos_token_ids=model.config.lm.eos_token_ids,
                                           pad_token_id=model.config.lm.pad_token_id)) == model.config  # fmt: skip
    hf_shapes = {llava.canonical_key(key): tuple(value.shape) for key, value in reference.state_dict().items()}
    vlkit_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rules = llava.rules(model.config)
    for rule in rules:  # every vlkit tensor holds its foreign tensors' numbers
        foreign = [hf_shapes[key] for key in rule.hf]
        if rule.hf_shape is not None:
            assert foreign == [rule.hf_shape] and np.prod(rule.hf_shape) == np.prod(vlkit_shapes[rule.vlkit[0]])
            continue
        assert sum(s[0] for s in foreign) == sum(vlkit_shapes[key][0] for key in rule.vlkit), rule
    tied = {"language_model.lm_head.weight"} if model.config.lm.tie_embeddings else set()
    assert {key for r in rules for key in r.hf} == set(hf_shapes) - tied
    assert {key for r in rules for key in r.vlkit} == set(vlkit_shapes)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters()) == count

"""BLIP-2 checkpoints: transformers' ``Blip2ForConditionalGeneration`` directories <-> vlkit ``VisionLanguageModel``
with a Q-Former bridge, and ``vlkit.load_processor`` on them against transformers' ``Blip2Processor``.

Each case builds the transformers model from a tiny random config (the cases vary what the converter reads: number
of queries, cross-attention frequency, Q-Former narrower or wider than the tower, the tower's q/v biases and image
size, OPT / Llama / Qwen2 language models, tied or untied heads, OPT's embedding projection), saves it, loads it with
``vlkit.from_pretrained`` and checks logits (fp32, 1e-4) and greedy generation on a left-padded batch (one sample
text-only) token for token; then exports with ``vlkit.export_hf`` and loads that back with transformers. The real-size
preset is compared with the public architecture on the meta device.
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
from vlkit.bridges import MLPBridgeConfig, QFormerConfig
from vlkit.convert import ConversionError, blip2
from vlkit.data.processors import Blip2Processor, ProcessorOutput
from vlkit.models.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
VOCAB, IMAGE_TOKEN, PAD = 96, 95, 1
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)  # fmt: skip
QFORMER = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, vocab_size=50,
               max_position_embeddings=32)  # fmt: skip
OPT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2,
           eos_token_id=2, pad_token_id=PAD)  # fmt: skip
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2,
             eos_token_id=3, pad_token_id=PAD)  # fmt: skip
QWEN2 = {**LLAMA, "model_type": "qwen2", "num_key_value_heads": 1, "rope_theta": 1e6}
CASES: dict[str, dict[str, Any]] = {
    # BLIP-2 OPT's options: 4 queries, cross-attention every second layer, a Q-Former narrower than the tower
    "opt_q4_every2_narrow": dict(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=4),
    # every layer cross-attends, a Q-Former wider than the tower, no q/v biases, 40 px, untied head with OPT's
    # embedding projection
    "opt_q6_every1_wide_nobias_untied": dict(
        vision_config={**VISION, "qkv_bias": False, "image_size": 40},
        qformer_config={**QFORMER, "hidden_size": 48, "num_hidden_layers": 2, "cross_attention_frequency": 1},
        text_config={**OPT, "word_embed_proj_dim": 16, "tie_word_embeddings": False}, num_query_tokens=6),
    "llama_q3_every3_untied": dict(
        vision_config=VISION, qformer_config={**QFORMER, "num_hidden_layers": 3, "cross_attention_frequency": 3},
        text_config=LLAMA, num_query_tokens=3),
    "qwen2_q5_tied": dict(vision_config={**VISION, "hidden_act": "gelu_pytorch_tanh"},
                          qformer_config={**QFORMER, "hidden_size": 32},
                          text_config={**QWEN2, "tie_word_embeddings": True}, num_query_tokens=5),
}  # fmt: skip


def _reference(options: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.Blip2Config(**{"image_token_index": IMAGE_TOKEN, **options})
    model = transformers.Blip2ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no weight at a special init (zero queries, unit norms); large enough for decisive argmaxes
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _batch(options: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Three left-padded prompts, the queries' placeholders first as Blip2Processor places them; the middle one
    text-only."""
    generator = torch.Generator().manual_seed(seed)
    count = options["num_query_tokens"]
    rows = []
    for length, image in ((5, True), (9, False), (7, True)):
        text = torch.randint(4, IMAGE_TOKEN, (length,), generator=generator).tolist()
        rows.append([IMAGE_TOKEN] * count * image + [2] + text)
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    size = options["vision_config"].get("image_size", 32)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _max_difference(model: Any, reference: Any, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference(**inputs).logits
    real = inputs["attention_mask"].bool()  # padded positions' outputs are meaningless in both libraries
    torch.testing.assert_close(ours[real], theirs[real], **TOLERANCE)
    return float((ours[real] - theirs[real]).abs().max())


def _load_back(path: Path) -> Any:
    model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_directions(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = _reference(options)
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert isinstance(model, VisionLanguageModel) and isinstance(model.config.bridge, QFormerConfig)
    assert model.tokens_per_image() == options["num_query_tokens"]
    inputs = _batch(options)
    _max_difference(model, reference, inputs)

    ours = model.generate(**inputs, max_new_tokens=6)
    theirs = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)

    vlkit.export_hf(model, tmp_path / "out")
    back = _load_back(tmp_path / "out")
    _max_difference(model, back, inputs)
    assert vlkit.from_pretrained(tmp_path / "out").config == model.config


def test_stored_dtype_is_kept_and_dtype_casts(tmp_path: Path) -> None:
    options = CASES["opt_q4_every2_narrow"]
    _reference(options).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in model.parameters())
    wide = vlkit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    fresh = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    _max_difference(wide, fresh, _batch(options))


def test_unsupported_options_are_clear_errors(tmp_path: Path) -> None:
    base = {"model_type": "blip-2", "vision_config": VISION, "qformer_config": QFORMER, "text_config": OPT,
            "num_query_tokens": 4, "image_token_index": IMAGE_TOKEN}  # fmt: skip
    read = blip2.config_from_hf(base, "x")
    assert (read.feature_layer, read.keep_class_token, read.bridge.cross_attention_frequency) == (None, True, 2)
    with pytest.raises(ConversionError, match="predates transformers' image placeholders"):
        blip2.config_from_hf({k: v for k, v in base.items() if k != "image_token_index"}, "x")
    assert blip2.config_from_hf({**base, "image_token_index": None, "image_token_id": 7}, "x").image_token_id == 7
    with pytest.raises(ConversionError, match="use_qformer_text_input"):
        blip2.config_from_hf({**base, "qformer_config": {**QFORMER, "use_qformer_text_input": True}}, "x")
    with pytest.raises(ConversionError, match=r"text_config\.model_type 't5'"):
        blip2.config_from_hf({**base, "text_config": {"model_type": "t5"}}, "x")
    with pytest.raises(ConversionError, match="outside the vocabulary"):
        blip2.config_from_hf({**base, "image_token_index": VOCAB}, "x")
    # Export names every option BLIP-2 cannot express: the ShapesWorld BLIP-2 keeps its stage-1 parts, reads an
    # unnormed tower without class token.
    with pytest.raises(ConversionError, match=r"(?s)class_token.*text_input.*embed_dim"):
        vlkit.export_hf(vlkit.create_model("shapes_blip2", **{"lm.vocab_size": 64}), tmp_path / "odd")
    # A Q-Former VLM exports as BLIP-2, any other bridge as LLaVA.
    llava_like = vlkit.get_config("test_llava").replace(bridge=MLPBridgeConfig())
    with pytest.raises(ConversionError, match="pre_norm"):
        vlkit.export_hf(VisionLanguageModel(llava_like), tmp_path / "odd")
    _reference(CASES["opt_q4_every2_narrow"]).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_query_tokens"] = 5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="query_tokens"):
        vlkit.from_pretrained(tmp_path / "hf")


# --- processor


def _tokenizer() -> Any:
    """A tiny byte-level BPE with <image> as a special token and a <bos> before every prompt, as OPT's has."""
    from tokenizers import processors

    from vlkit.text import train_tokenizer

    texts = ["a red circle left of a blue square", "question: what colour is the small triangle? answer:"] * 20
    backend = train_tokenizer(texts, vocab_size=64, extra_special_tokens=["<image>"]).backend
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", padding_side="left")  # fmt: skip


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(45, 60), (50, 38)]]


@pytest.mark.parametrize("case", ["opt_q4_every2_narrow", "llama_q3_every3_untied"])
def test_processor_matches_blip2_processor_and_feeds_generation(case: str, tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    options = CASES[case]
    text = {**options["text_config"], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    options = {**options, "image_token_index": image_token, "text_config": text}
    reference = _reference(options)
    size = options["vision_config"]["image_size"]
    image_processor = transformers.BlipImageProcessor(size={"height": size, "width": size})
    processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            num_query_tokens=options["num_query_tokens"])  # fmt: skip
    reference.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    ours = vlkit.load_processor(tmp_path)
    assert isinstance(ours, Blip2Processor)

    prompts = ["question: what colour is the circle? answer:", "a red square"]
    theirs = processor(images=_images(), text=prompts, padding=True, return_tensors="pt")
    out = ours(images=_images(), text=prompts)
    assert isinstance(out, ProcessorOutput) and sorted(out) == sorted(theirs.keys())
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(out[key], theirs[key]), key
    torch.testing.assert_close(out["pixel_values"], theirs["pixel_values"])
    count = options["num_query_tokens"]
    assert out["input_ids"][:, :count].eq(image_token).all()  # the queries come first, before <bos> and padding
    assert out["attention_mask"][1, count] == 0  # the shorter prompt's padding sits between queries and text

    model = vlkit.from_pretrained(tmp_path)
    assert model.tokenizer is not None
    generated = model.generate(**ours(images=_images(), text=prompts), max_new_tokens=5)
    assert torch.equal(generated, reference.generate(**theirs, max_new_tokens=5, do_sample=False))
    # Captioning, BLIP-2's main use: images alone, the prompt (queries, then <bos>) built by generate as transformers'.
    captions = model.generate(**ours(images=_images()), max_new_tokens=5)
    expected = reference.generate(**processor(images=_images(), return_tensors="pt"), max_new_tokens=5,
                                  do_sample=False)  # fmt: skip
    assert torch.equal(captions, expected) and captions.shape == (2, count + 1 + 5)
    # Padded ids without their mask: transformers' BLIP-2 reads every token as real (it infers no mask); vlkit too.
    unmasked = {"input_ids": theirs["input_ids"], "pixel_values": theirs["pixel_values"]}
    assert torch.equal(model.generate(**unmasked, max_new_tokens=5),
                       reference.generate(**unmasked, max_new_tokens=5, do_sample=False))  # fmt: skip
    with pytest.raises(ValueError, match="generate needs input_ids"):  # a LLaVA's prompt comes from its template
        vlkit.create_model("test_llava").generate(pixel_values=torch.zeros(1, 3, 32, 32))
    # transformers' BLIP-2 decodes with its language model's defaults (text_config): a generation_config.json beside
    # it changes nothing there, and nothing in vlkit.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": int(expected[0, count + 2]),
                                                                 "repetition_penalty": 1.5}))  # fmt: skip
    again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(again.generate(**processor(images=_images(), return_tensors="pt"), max_new_tokens=5), expected)
    assert torch.equal(vlkit.from_pretrained(tmp_path).generate(**ours(images=_images()), max_new_tokens=5), expected)

    # vlkit chat on the checkpoint, which has no chat format: each turn captions the image as transformers' BLIP-2
    # does from images alone (its processor's pixels, the queries, then <bos>).
    from vlkit.serve.chat import ChatSession

    _images()[0].save(tmp_path / "photo.png")
    session = ChatSession(model, tmp_path / "photo.png", max_new_tokens=5, processor=ours)
    for question in ("what is it?", "and the colour?"):
        inputs = session.inputs(question)
        assert inputs["input_ids"].tolist() == [[image_token] * count + [tokenizer.bos_token_id]]
        torch.testing.assert_close(inputs["pixel_values"], theirs["pixel_values"][:1], rtol=0, atol=0)
        list(session.ask(question))

    # Exported with its processor, the directory gives transformers the same processor back.
    vlkit.export_hf(model, tmp_path / "out", processor=ours)
    again = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(again).__name__ == "Blip2Processor" and again.num_query_tokens == count
    redone = again(images=_images(), text=prompts, padding=True, return_tensors="pt")
    assert all(torch.equal(redone[key], theirs[key]) for key in ("input_ids", "attention_mask", "pixel_values"))
    with pytest.raises(ValueError, match="one image per prompt"):
        ours(images=_images()[:1], text=prompts)


# --- the real-size preset on the meta device

# Salesforce/blip2-opt-2.7b's config.json (transformers 4.47 revision, with image_token_index)
PUBLIC = dict(
    vision_config=dict(model_type="blip_2_vision_model", num_channels=3, projection_dim=512),
    qformer_config=dict(model_type="blip_2_qformer"),
    text_config=dict(model_type="opt", eos_token_id=50118, ffn_dim=10240, hidden_size=2560, num_attention_heads=32,
                     num_hidden_layers=32, vocab_size=50304, word_embed_proj_dim=2560),
    image_token_index=50265, num_query_tokens=32, image_text_hidden_size=256,
)  # fmt: skip


def test_blip2_opt_2_7b_matches_the_public_architecture() -> None:
    with torch.device("meta"):
        reference = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**PUBLIC))
        model = vlkit.create_model("blip2_opt_2_7b")
    read = blip2.config_from_hf(reference.config.to_dict(), "blip2-opt-2.7b")
    # token ids are tokenizer conventions, not architecture
    lm = read.lm.replace(bos_token_id=model.config.lm.bos_token_id, pad_token_id=model.config.lm.pad_token_id)
    assert read.replace(lm=lm) == model.config
    hf_shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    vlkit_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rules = blip2.rules(model.config)
    for rule in rules:  # every vlkit tensor holds its foreign tensors' numbers
        foreign = [hf_shapes[key] for key in rule.hf]
        if rule.hf_shape is not None:
            assert foreign == [rule.hf_shape] and np.prod(rule.hf_shape) == np.prod(vlkit_shapes[rule.vlkit[0]])
            continue
        assert sum(s[0] for s in foreign) == sum(vlkit_shapes[key][0] for key in rule.vlkit), rule
        assert {s[1:] for s in foreign} == {vlkit_shapes[key][1:] for key in rule.vlkit}, rule
    assert {key for r in rules for key in r.hf} == set(hf_shapes) - {"language_model.lm_head.weight"}  # tied
    assert {key for r in rules for key in r.vlkit} == set(vlkit_shapes)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 3_744_761_856

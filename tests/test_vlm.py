"""``VisionLanguageModel`` (placeholders, several / no images per sample, generation, save/load), the vlm task's data
and a tiny ``llava_shapes`` run end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import vlkit
from vlkit.data import shapes
from vlkit.data.shapes_vqa import InstructionItem, described_conversations, given_away, scene_layout
from vlkit.data.specs import ShapesInstructions, ShapesText
from vlkit.data.transforms import ImageTransform
from vlkit.lm import GenerationConfig
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes import InitFrom, get_recipe
from vlkit.recipes.contrastive import SHAPES_DATA
from vlkit.recipes.parts import init_parts
from vlkit.recipes.run import run_recipe
from vlkit.tasks.base import RunContext
from vlkit.tasks.vlm import (
    DescribedTextEvaluation,
    ShapesInstructionDataset,
    ShapesTextDataset,
    VisionLanguage,
    VLMEvaluation,
    _collate,
    _Question,
    _step,
    answer_is_right,
    answer_weights,
    decode_answer,
    plot_answers,
    shapes_chat_tokenizer,
)
from vlkit.text import train_tokenizer
from vlkit.text.chat import IGNORE_INDEX, Conversation, Turn, end_of_answer_ids, get_template, tokenize_conversation


def _model(seed: int = 0, **overrides: Any) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = vlkit.create_model("test_llava", **overrides).eval()
    assert isinstance(model, VisionLanguageModel)
    return model


def _ids(model: VisionLanguageModel, images_per_row: list[int], length: int = 40, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (len(images_per_row), length), generator=generator)
    m = model.tokens_per_image()
    for row, count in enumerate(images_per_row):
        for image in range(count):
            ids[row, 2 + image * (m + 1) : 2 + image * (m + 1) + m] = model.config.image_token_id
    return ids


def test_placeholders_are_filled_with_the_bridge_tokens_in_order() -> None:
    model = _model()
    ids = _ids(model, [2, 0, 1])  # two images, a text-only sample, one image
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
        image = model.embed_image(pixels).tokens  # (3, M, D)
        embeds = model.lm.embed(ids.masked_fill(ids == model.config.image_token_id, 0))
        m = model.tokens_per_image()
        embeds[0, 2 : 2 + m] = image[0]
        embeds[0, 3 + m : 3 + 2 * m] = image[1]
        embeds[2, 2 : 2 + m] = image[2]
        expected = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, expected)
    # The text-only row is the LM's own output on its tokens.
    torch.testing.assert_close(logits[1], model.lm(ids[1:2]).logits[0])


def test_feature_layer_and_class_token_choice() -> None:
    model = _model()
    pixels = torch.randn(2, 3, 32, 32)
    assert model.config.feature_layer == -2 and not model.config.keep_class_token
    encoder = model.encoder
    with torch.no_grad():
        tokens, _ = encoder.embed(pixels)
        tokens = encoder.norm_pre(tokens)
        for block in encoder.blocks[:-1]:
            tokens = block(tokens)
        features = encoder.forward_features(pixels, layer=-2)
        torch.testing.assert_close(features.tokens, tokens)
        bridged = model.embed_image(pixels).tokens
    assert bridged.shape == (2, model.tokens_per_image(), model.config.lm.dim) and model.tokens_per_image() == 16
    torch.testing.assert_close(bridged, model.bridge(tokens[:, 1:], torch.tensor([[4, 4], [4, 4]])).tokens)
    with pytest.raises(ValueError, match="hidden states"):
        encoder.forward_features(pixels, layer=5)


def test_several_feature_layers_are_concatenated_in_order() -> None:
    """``feature_layer`` as a tuple: the hidden states of one pass concatenated along the features (LLaVA's list of
    ``vision_feature_layer``), the bridge built D_vis x layers wide; bad tuples are config errors."""
    model = _model(feature_layer=[-1, 0])  # a --set override arrives as a list
    assert model.config.feature_layer == (-1, 0) and model.config.vision_feature_dim == 2 * model.config.vision.dim
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.image_tokens(pixels)
        last, first = (model.encoder.forward_features(pixels, layer=k).patch_tokens for k in (-1, 0))
    torch.testing.assert_close(tokens, torch.cat([last, first], dim=-1))
    assert model.bridge.linear_1.in_features == 2 * model.config.vision.dim
    config = vlkit.get_config("test_llava")
    for bad, message in (((), "at least one"), ((1, 1), "distinct"), ((0, 9), "feature_layer 9 is outside")):
        with pytest.raises(ValueError, match=message):
            config.replace(feature_layer=bad)


def test_image_newline_follows_each_row_of_the_bridge_grid(tmp_path: Path) -> None:
    model = _model(image_newline=True)
    pixels = torch.randn(2, 3, 32, 32)
    assert model.tokens_per_image() == 4 * 5  # a 4 x 4 grid, each row closed by the separator
    with torch.no_grad():
        out = model.embed_image(pixels)
        rows = model.bridge(*model.image_tokens(pixels)).tokens.view(2, 4, 4, -1)
    grid = out.tokens.view(2, 4, 5, -1)
    torch.testing.assert_close(grid[:, :, :4], rows)
    torch.testing.assert_close(grid[:, :, 4], model.image_newline.expand(2, 4, -1))
    assert out.grid.tolist() == [[4, 5], [4, 5]]
    # The separator trains, and the option survives save / load.
    ids = _ids(model, [1, 1])
    model(ids, pixel_values=pixels, labels=ids).loss.backward()
    assert model.image_newline.grad is not None and bool(model.image_newline.grad.abs().sum() > 0)
    model.save_pretrained(tmp_path / "m")
    loaded = vlkit.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)
    with pytest.raises(ValueError, match="image_newline"):
        vlkit.get_config("test_llava").replace(image_newline=True, keep_class_token=True)


def test_a_placeholder_count_that_does_not_match_names_the_sample() -> None:
    model = _model()
    ids = _ids(model, [1, 1])
    ids[1, 2] = 5  # one placeholder short
    with pytest.raises(ValueError, match="sample 1: 15 image placeholder"):
        model(ids, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(_ids(model, [1]))
    with pytest.raises(ValueError, match="3 images were given"):
        model(_ids(model, [1, 1]), pixel_values=torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_generation_with_the_cache_equals_recomputing_every_step(image_attention: str) -> None:
    model = _model(1, image_attention=image_attention)
    ids = _ids(model, [1, 1], length=24, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    pixels = torch.randn(2, 3, 32, 32)
    out = model.generate(ids, mask, pixels, max_new_tokens=5, stop_token_ids=())
    assert out.shape == (2, 29) and torch.equal(out[:, :24], ids)
    current, current_mask = ids, mask
    with torch.no_grad():
        for _ in range(5):
            logits = model(current, current_mask, pixels).logits[:, -1]
            current = torch.cat([current, logits.argmax(-1, keepdim=True)], dim=1)
            current_mask = torch.cat([current_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert torch.equal(out, current)


def test_bidirectional_image_attention_lets_image_tokens_see_their_whole_image_only() -> None:
    """Gemma 3's pattern: an image token sees the later tokens of its own image, never a later image or later text;
    text stays causal. With causal image attention nothing sees a later token."""
    ids = _ids(_model(), [2], length=40)  # image 0 at 2..17, text at 18, image 1 at 19..34, text after
    pixels = torch.randn(2, 3, 32, 32)
    for image_attention in ("causal", "bidirectional"):
        model = _model(image_attention=image_attention)
        blocks = model.attention_blocks(ids)
        with torch.no_grad():
            embeds = model.embed_inputs(ids, pixels)
            base = model.lm(inputs_embeds=embeds, attention_blocks=blocks).logits[0]
            torch.testing.assert_close(model(ids, pixel_values=pixels).logits[0], base)  # the VLM passes its blocks
            # A token inside image 0, inside image 1, in the text: the first position it reaches is its image's first
            # token (bidirectional) or itself.
            for position, block_start in ((10, 2), (25, 19), (36, 36)):
                moved = embeds.clone()
                moved[0, position] += 1.0
                logits = model.lm(inputs_embeds=moved, attention_blocks=blocks).logits[0]
                first = block_start if image_attention == "bidirectional" else position
                torch.testing.assert_close(logits[:first], base[:first])
                assert not torch.allclose(logits[first], base[first]), (image_attention, position)
    blocks = _model(image_attention="bidirectional").attention_blocks(ids)
    assert blocks is not None
    assert blocks[0, 2:18].eq(0).all() and blocks[0, 19:35].eq(1).all() and blocks[0, 18].item() == -1
    assert blocks[0, :2].eq(-1).all() and blocks[0, 35:].eq(-1).all()
    assert _model().attention_blocks(ids) is None
    # Two images with nothing between them ("<image><image>") are still two blocks.
    m = _model().tokens_per_image()
    adjacent = ids.clone()
    adjacent[0, 2 : 2 + 2 * m] = _model().config.image_token_id
    blocks = _model(image_attention="bidirectional").attention_blocks(adjacent)
    assert blocks is not None and blocks[0, 2 : 2 + m].eq(0).all() and blocks[0, 2 + m : 2 + 2 * m].eq(1).all()


def test_save_and_load_keep_weights_tokenizer_and_outputs(tmp_path: Path) -> None:
    model = _model(2)
    ids, pixels = _ids(model, [1]), torch.randn(1, 3, 32, 32)
    model.save_pretrained(tmp_path / "vlm")
    loaded = vlkit.from_pretrained(tmp_path / "vlm").eval()
    assert isinstance(loaded, VisionLanguageModel) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


TINY_VLM = {
    "model.lm.dim": 32, "model.lm.depth": 1, "model.lm.num_heads": 2, "model.lm.num_kv_heads": 2,
    "model.lm.head_dim": 16, "model.lm.mlp_dim": 64,
    "model.vision.dim": 32, "model.vision.depth": 2, "model.vision.num_heads": 2, "model.vision.mlp_dim": 64,
    "model.vision.image_size": 32, "train.steps": 2, "train.batch_size": 4, "train.eval_every": None,
    "data.eval_size": 2, "task.tokenizer_scenes": 20, "task.vocab_size": 300, "task.max_new_tokens": 6,
    "stages.text.data.train_size": 20,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    out = tmp_path_factory.mktemp("llava") / "run"
    # The image tower: a contrastive run of the same tiny vision config, trained first into OUT/pretrain.
    pretrain = {"train.steps": 2, "train.batch_size": 8, "data.train_size": 16, "data.eval_size": 8,
                "train.eval_every": None, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
                "model.text.mlp_dim": 64, "model.embed_dim": 16}  # fmt: skip
    init = {"encoder": {"kind": "init_from", "source": "recipe:siglip_shapes", "part": "image_encoder",
                        "share": ["vision"], "overrides": pretrain}}  # fmt: skip
    run_recipe(recipe.with_overrides({"stages.align.init": init}), out, progress=False, report=True)
    return out


def test_llava_shapes_trains_its_stages_and_writes_the_contract(tiny_llava: Path) -> None:
    metrics = json.loads((tiny_llava / "metrics.json").read_text())
    for key in ("vqa_accuracy", "grounding_acc50", "caption_f1", "train_seconds", "vqa_accuracy_heldout"):
        assert isinstance(metrics[key], float), key
    assert set(metrics["stages"]) == {"text", "align", "instruct"} and metrics["steps"] == 6
    assert (tiny_llava / "pretrain" / "siglip_shapes" / "metrics.json").exists()
    model = vlkit.from_pretrained(tiny_llava / "model")
    assert isinstance(model, VisionLanguageModel) and model.tokenizer is not None
    assert model.config.feature_layer == 2  # the recipe's override of the preset's last layer
    # The encoder is the contrastive run's tower, untouched by the frozen stages.
    tower = vlkit.from_pretrained(tiny_llava / "pretrain" / "siglip_shapes" / "model").image_encoder.state_dict()
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, tower[name]), name
    report = (tiny_llava / "report.html").read_text()
    assert "answers.png" in report and (tiny_llava / "answers.png").exists()


def test_a_language_model_starts_only_from_a_run_with_the_same_tokenizer(tiny_llava: Path) -> None:
    """``InitFrom`` copies a part's weights by name; an LM's embeddings mean tokens of its own tokenizer, so copying
    it into a model whose tokenizer numbers tokens differently is an error naming the source, while parts that read
    no token ids (the image tower) still copy."""
    source = str(tiny_llava / "model")
    target = vlkit.from_pretrained(tiny_llava / "model")
    assert isinstance(target, VisionLanguageModel) and target.tokenizer is not None
    torch.manual_seed(0)
    for parameter in target.parameters():
        torch.nn.init.normal_(parameter)
    init_parts(target, {"lm": InitFrom(source)})  # the same tokenizer: copied
    trained = vlkit.from_pretrained(tiny_llava / "model").lm.state_dict()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in target.lm.state_dict().items())
    # The same vocabulary size, other ids: a tokenizer fitted on other text.
    vocab = target.tokenizer.vocab_size
    words = [f"token{k} colour{k % 7} shape{k % 5}" for k in range(400)]
    target.tokenizer = train_tokenizer(words, vocab, target.tokenizer.max_len, split_digits=True)
    with pytest.raises(ValueError, match=f"{source}.*tokenizer differs"):
        init_parts(target, {"lm": InitFrom(source)})
    init_parts(target, {"encoder": InitFrom(source)})


def test_instruction_samples_train_on_the_answers_only(tiny_llava: Path) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")
    dataset = ShapesInstructionDataset(recipe.data, model, seed=0)
    sample = dataset[3]
    ids, labels = sample["input_ids"], sample["labels"]
    assert int((ids == model.config.image_token_id).sum()) == model.tokens_per_image()
    trained = ids[labels != IGNORE_INDEX].tolist()
    eos = model.tokenizer.eos_token_id
    turns = trained.count(eos)  # one end-of-turn per answer
    assert 1 <= turns <= recipe.data.turns
    answers = decode_answer(model.tokenizer, trained, stop_ids=()).replace("<eos>", "|")
    assert len([a for a in answers.split("|") if a.strip()]) == turns
    assert "user" not in answers and "assistant" not in answers
    RunContext(recipe, tiny_llava)  # the recipe's data spec is what the dataset read


def test_chat_answers_streams_and_refuses_bad_input(tiny_llava: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from vlkit import cli
    from vlkit.serve.chat import ChatSession, load_chat_model

    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), "white").save(image)
    assert cli.main(["chat", "--model", str(tiny_llava / "model"), "--image", str(image), "--prompt",
                     "what colour is the circle?", "--max-new-tokens", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    # What was streamed is what generate() answers for the same prompt.
    session = ChatSession(load_chat_model(tiny_llava / "model"), image, max_new_tokens=4)
    pieces = list(session.ask("what colour is the circle?"))
    assert printed.strip() == "".join(pieces).strip()
    assert [turn.role for turn in session.turns] == ["user", "assistant"]
    for args, reason in (
        (["--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--image", str(tmp_path)], str(tmp_path)),
    ):
        assert cli.main(["chat", "--model", str(tiny_llava / "model"), *args, "--prompt", "hi"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and reason in error and "Traceback" not in error
    not_a_vlm = tiny_llava / "pretrain" / "siglip_shapes" / "model"
    assert cli.main(["chat", "--model", str(not_a_vlm), "--image", str(image), "--prompt", "hi"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err


def test_chat_stops_at_the_templates_end_of_turn(tiny_llava: Path, tmp_path: Path, monkeypatch) -> None:
    """An end-of-turn id that is not the checkpoint's end-of-sequence (ChatML's ``<|im_end|>`` beside
    ``<|endoftext|>``) stops generation, and nothing after it reaches the answer or the next prompt."""
    from PIL import Image

    from vlkit.serve.chat import ChatSession, load_chat_model

    generate = importlib.import_module("vlkit.lm.generate")  # the module; vlkit.lm.generate is also its function

    Image.new("RGB", (64, 64), "white").save(tmp_path / "scene.png")
    session = ChatSession(load_chat_model(tiny_llava / "model"), tmp_path / "scene.png", max_new_tokens=8)
    tokenizer = session.model.tokenizer
    red, blue = tokenizer.encode_plain("red"), tokenizer.encode_plain(" blue")
    taken = {*red, *blue, *session.model.config.lm.eos_token_ids}
    end_of_turn = next(i for i in range(tokenizer.vocab_size) if i not in taken)
    session.eos_ids = {end_of_turn}
    seen: list[tuple[int, ...]] = []

    def scripted(lm, prompt, mask, embeds, config, attention_blocks=None):  # what a model would emit, unstopped
        seen.append(config.stop_token_ids)
        for token in (*red, end_of_turn, *blue, *blue):
            yield torch.tensor([token])

    monkeypatch.setattr(generate, "stream_generate", scripted)
    answer = "".join(session.ask("what colour is the circle?"))
    assert end_of_turn in seen[0] and set(session.model.config.lm.eos_token_ids) <= set(seen[0])
    assert answer.strip() == "red" and session.turns[-1].content == "red"


def test_load_processor_prompts_a_trained_vlm_as_evaluation_and_chat_do(tiny_llava: Path, tmp_path: Path) -> None:
    """``vlkit.load_processor`` on a directory ``vlkit train`` wrote: the model's own image transform and chat
    template, so ``processor(images=..., text=question)`` is the evaluation's prompt to the token, and
    ``model.generate(**processor(...))`` answers a batch as ``vlkit chat`` answers each question."""
    from vlkit.data.processors import ChatProcessor
    from vlkit.serve.chat import ChatSession, load_chat_model
    from vlkit.text.chat import IMAGE_PLACEHOLDER

    model = load_chat_model(tiny_llava / "model")
    processor = vlkit.load_processor(tiny_llava / "model")
    assert isinstance(processor, ChatProcessor) and processor.image_tokens == model.tokens_per_image()
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    asked = VLMEvaluation.build(recipe.data, model, max_new_tokens=4, batch_size=4).questions[:3]
    inputs = processor(images=[q.image for q in asked], text=[q.question for q in asked])
    assert torch.equal(inputs["pixel_values"], torch.stack([q.pixels for q in asked]))
    for row, question in enumerate(asked):
        mask = inputs["attention_mask"][row].bool()
        assert torch.equal(inputs["input_ids"][row][mask], question.prompt)
        assert mask[-len(question.prompt) :].all() and not mask[: -len(question.prompt)].any()  # padded on the left
    out = model.generate(**inputs, max_new_tokens=4)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])
    for number, question in enumerate(asked):
        path = tmp_path / f"image{number}.png"
        question.image.save(path)
        assert answers[number] == "".join(ChatSession(model, path, max_new_tokens=4).ask(question.question)).strip()
    # Placeholders of their own take the images in order; a text-only message has none.
    images = [q.image for q in asked[:2]]
    two = processor(images=images, text=f"{IMAGE_PLACEHOLDER} or {IMAGE_PLACEHOLDER}: which is red?")
    assert int((two["input_ids"] == model.config.image_token_id).sum()) == 2 * model.tokens_per_image()
    plain = processor(text="what is a circle?")
    assert "pixel_values" not in plain and not (plain["input_ids"] == model.config.image_token_id).any()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(images=images[:1], text=f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} which is red?")
    with pytest.raises(ValueError, match=r"2 images \(or lists of images\) for 1 messages"):
        processor(images=images, text="which is red?")


def test_a_trained_vlms_processor_takes_chat_messages(tiny_llava: Path, tmp_path: Path) -> None:
    """``apply_chat_template`` on a directory ``vlkit train`` wrote: the call a checkpoint's processor takes, with the
    model's own template, its ids segmented as training segments them; ``vlkit chat`` prompts through it."""
    from PIL import Image

    from vlkit.serve.chat import ChatSession, load_chat_model
    from vlkit.text.chat import Conversation, Turn, image_prompt, render, tokenize_conversation, tokenize_prompt

    model = load_chat_model(tiny_llava / "model")
    processor = vlkit.load_processor(tiny_llava / "model")
    template, tokenizer = model.config.chat_template, model.tokenizer
    image = Image.new("RGB", (40, 40), "red")
    question = "what colour is the circle?"
    asked = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    out = processor.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(images=image, text=question)
    assert sorted(out) == sorted(direct) and all(torch.equal(out[key], direct[key]) for key in direct)

    turns = [*asked, {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the square?"}]
    said = [Turn("user", image_prompt(template, question)), Turn("assistant", "red"), Turn("user", "and the square?")]
    conversation = Conversation(said, [image])
    ids = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    expected = tokenize_prompt(conversation, template, tokenizer, model.config.image_token_id, model.tokens_per_image())
    assert torch.equal(ids[0], expected)
    assert processor.apply_chat_template(turns, add_generation_prompt=True) == render(conversation, template)
    trained = tokenize_conversation(Conversation(said[:2], [image]), template, tokenizer, model.config.image_token_id,
                                    model.tokens_per_image()).input_ids  # fmt: skip
    assert torch.equal(processor.apply_chat_template(turns[:2], tokenize=True)[0], trained)  # ends with the answer

    image.save(tmp_path / "red.png")
    session = ChatSession(model, tmp_path / "red.png")
    session.turns = said[:2]
    session.turns[0] = Turn("user", question)  # the session keeps the question as asked
    assert torch.equal(session.inputs("and the square?")["input_ids"][0], expected)
    # Message objects as transformers takes them (dataclasses, pydantic-style), the same ids.
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: Any

    objects = [Message(turn["role"], turn["content"]) for turn in turns]
    assert torch.equal(processor.apply_chat_template(objects, add_generation_prompt=True, tokenize=True)[0], expected)
    # A session longer than the model's length goes on, as vlkit chat always did (rotary positions allow it); the
    # processor's own call still refuses a message that does not fit.
    session.turns = [turn for _ in range(40) for turn in (Turn("user", question), Turn("assistant", "red"))]
    assert session.inputs("and the square?")["input_ids"].shape[1] > tokenizer.max_len
    with pytest.raises(ValueError, match="at most"):
        processor(images=image, text=" ".join([question] * 40))
    with pytest.raises(ValueError, match="no continue_final_message, tools"):
        processor.apply_chat_template(asked, tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="'audio' block"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}])


def test_load_processor_feeds_a_trained_dual_encoder(tiny_llava: Path) -> None:
    from PIL import Image

    directory = tiny_llava / "pretrain" / "siglip_shapes" / "model"
    model = vlkit.from_pretrained(directory).eval()
    images = [Image.new("RGB", (48, 40), "white"), Image.new("RGB", (32, 32), "red")]
    texts = ["a red circle", "a small blue star"]
    inputs = vlkit.load_processor(directory)(images=images, text=texts)
    transform = ImageTransform(image_size=model.config.vision.image_size)
    tokens = model.tokenizer(texts)
    with torch.no_grad():
        expected = model.logits(torch.stack([transform(image) for image in images]), tokens.input_ids,
                                tokens.attention_mask)  # fmt: skip
        torch.testing.assert_close(model.logits(**inputs), expected, rtol=0, atol=0)


def test_eval_of_a_run_directory_uses_its_recorded_task_and_data(tiny_llava: Path, tmp_path: Path) -> None:
    from vlkit import cli

    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(tiny_llava / "model"), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    trained = json.loads((tiny_llava / "metrics.json").read_text())
    for key in ("vqa_accuracy", "grounding_acc50", "caption_f1", "vqa_accuracy_heldout"):
        assert evaluated[key] == pytest.approx(trained[key]), key


def test_answer_weights_weigh_each_answer_as_the_mode_says() -> None:
    ignore = IGNORE_INDEX
    # Row 0: two answers of 2 tokens, the second at the row's end; row 1: one of 3 tokens at its start (which must
    # not join row 0's last) and one of 1 token.
    labels = torch.tensor([[ignore, 5, 6, ignore, 7, 8], [1, 2, 3, ignore, ignore, 4]])
    answer = answer_weights(labels, "answer")
    expected = torch.tensor([[0, 0.5, 0.5, 0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3, 0, 0, 1]])
    torch.testing.assert_close(answer, expected)
    sqrt = answer_weights(labels, "sqrt")
    assert sqrt[1, :3].tolist() == pytest.approx([3**-0.5] * 3)
    assert torch.equal(answer_weights(labels, "token"), (labels != ignore).float())
    # Every answer weighs the same in "answer" mode: the sum is the number of answers.
    assert float(answer.sum()) == pytest.approx(4.0)


def test_answer_weighting_changes_the_loss_only_through_the_weights(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model").eval()
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    dataset = ShapesInstructionDataset(recipe.data, model, seed=0)
    samples = [dataset[index] for index in range(4)]
    pad = model.tokenizer.pad_token_id
    plain, weighted = _collate(pad)(samples), _collate(pad, "answer")(samples)
    assert "loss_weights" not in plain
    with torch.no_grad():
        token_loss = _step(model, plain).loss
        answer_loss = _step(model, weighted).loss
        # With all weights equal the weighted path is the plain mean.
        ones = dict(weighted, loss_weights=(weighted["labels"] != IGNORE_INDEX).float())
        assert float(_step(model, ones).loss) == pytest.approx(float(token_loss), rel=1e-5)
    assert float(answer_loss) != pytest.approx(float(token_loss), rel=1e-4)
    with pytest.raises(ValueError, match="answer_weighting"):
        VisionLanguage(answer_weighting="tokens")  # type: ignore[arg-type]


def test_described_text_samples_train_on_the_answers_only(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model")
    spec = ShapesText(SHAPES_DATA, train_size=3, described=True, turns=2)
    plain = ShapesTextDataset(ShapesText(SHAPES_DATA, train_size=3), model)
    dataset = ShapesTextDataset(spec, model)
    assert len(dataset) > len(plain) and torch.equal(dataset[0]["labels"], plain[0]["labels"])
    sample = dataset[len(plain)]  # the first described conversation
    ids, labels = sample["input_ids"], sample["labels"]
    assert model.config.image_token_id not in ids.tolist()
    text = decode_answer(model.tokenizer, ids.tolist(), stop_ids=())
    assert shapes.generate(SHAPES_DATA, "train", 0).captions[0] in text
    trained = decode_answer(model.tokenizer, ids[labels != IGNORE_INDEX].tolist(), stop_ids=())
    assert trained.count("<eos>") == 2 and "user" not in trained and "assistant" not in trained
    # Described by the layout (every object with its box), without the plain texts: conversations only.
    laid_out = ShapesTextDataset(dataclasses.replace(spec, layout=True, plain=False), model)
    scenes = [shapes.generate(SHAPES_DATA, "train", index) for index in range(3)]
    assert len(laid_out) == sum(len(described_conversations(s, SHAPES_DATA, "train", 2, True)) for s in scenes)
    first = decode_answer(model.tokenizer, laid_out[0]["input_ids"].tolist(), stop_ids=())
    assert scene_layout(scenes[0]).replace(" ", "") in first.replace(" ", "")
    # A conversation longer than the LM's context keeps the turns that fit, the described first one always.
    layout_only = dataclasses.replace(spec, layout=True, plain=False)
    full = laid_out[0]["input_ids"]
    one_turn = ShapesTextDataset(dataclasses.replace(layout_only, turns=1), model)[0]["input_ids"]
    assert len(one_turn) < len(full)
    model.tokenizer.max_len = len(full) - 1
    try:
        assert torch.equal(ShapesTextDataset(layout_only, model)[0]["input_ids"], one_turn)
        model.tokenizer.max_len = len(one_turn) - 1
        with pytest.raises(ValueError, match="described conversation 0"):
            ShapesTextDataset(layout_only, model)[0]
    finally:
        model.tokenizer.max_len = model.config.lm.max_seq_len
    with pytest.raises(ValueError, match="plain or described"):
        ShapesText(SHAPES_DATA, plain=False)


def test_described_text_context_weight_trains_every_token_with_the_answers_weighted_one(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model")
    spec = ShapesText(SHAPES_DATA, train_size=3, described=True, turns=2, layout=True)
    answers_only = ShapesTextDataset(spec, model)
    weighted = ShapesTextDataset(spec.replace(context_weight=0.25), model)
    plain = len(answers_only.texts)
    assert "loss_weights" not in answers_only[plain] and len(weighted) == len(answers_only)
    for index in (0, plain, len(weighted) - 1):
        before, after = answers_only[index], weighted[index]
        assert torch.equal(after["input_ids"], before["input_ids"])
        assert torch.equal(after["labels"], after["input_ids"])  # every token a target
        answer = before["labels"] != IGNORE_INDEX
        assert torch.equal(after["loss_weights"], torch.where(answer, 1.0, 0.25))
    # Plain texts keep weight 1 everywhere; the collated weights pad with 0, and the loss is their weighted mean.
    batch = _collate(model.tokenizer.pad_token_id, "token")([weighted[0], weighted[plain]])
    assert batch["loss_weights"].shape == batch["labels"].shape
    assert batch["loss_weights"][batch["attention_mask"] == 0].sum() == 0
    full = _collate(model.tokenizer.pad_token_id, "token")(
        [ShapesTextDataset(spec.replace(context_weight=1.0), model)[plain]]
    )
    with torch.no_grad():
        every_token = dict(full, labels=full["input_ids"].clone())
        del every_token["loss_weights"]
        assert float(_step(model, full).loss) == pytest.approx(float(_step(model, every_token).loss), rel=1e-5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="context_weight"):
            spec.replace(context_weight=bad)
    with pytest.raises(ValueError, match="need described"):
        ShapesText(SHAPES_DATA, context_weight=0.5)


def test_described_text_narrowed_to_kinds_and_scenes_of_several_objects(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model")
    spec = ShapesText(SHAPES_DATA, train_size=12, described=True, plain=False, turns=1, kinds=["colour", "shape"],
                      min_objects=2)  # fmt: skip
    assert spec.kinds == ("colour", "shape")  # a list from JSON or --set becomes a tuple
    dataset = ShapesTextDataset(spec, model)
    scenes = [shapes.generate(SHAPES_DATA, "train", index) for index in range(12)]
    several = [scene for scene in scenes if len(scene.objects) >= 2]
    assert several and len(several) < len(scenes)  # the filter has scenes to keep and to drop
    expected = [c for scene in several for c in described_conversations(scene, SHAPES_DATA, "train", 1, False)
                if c.meta["kinds"][0] in ("colour", "shape")]  # fmt: skip
    assert len(dataset) == len(expected) and all(len(c.turns) == 2 for c in dataset.conversations)

    def asked(conversations: list) -> list[tuple[str, ...]]:
        return sorted(tuple(turn.content for turn in c.turns) for c in conversations)

    assert asked(dataset.conversations) == asked(expected)
    first = decode_answer(model.tokenizer, dataset[0]["input_ids"].tolist(), stop_ids=())
    assert several[0].captions[0].replace(" ", "") in first.replace(" ", "")
    with pytest.raises(ValueError, match="unknown"):
        ShapesText(SHAPES_DATA, described=True, kinds=("colour", "weight"))
    with pytest.raises(ValueError, match="unknown \\['layout'\\]"):  # a layout in context would answer it
        ShapesText(SHAPES_DATA, described=True, kinds=("layout",))
    with pytest.raises(ValueError, match="need described"):
        ShapesText(SHAPES_DATA, kinds=("colour",))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesText(SHAPES_DATA, described=True, min_objects=0)
    with pytest.raises(ValueError, match="no samples"):
        ShapesTextDataset(spec.replace(train_size=1, min_objects=9), model)


def test_described_text_evaluation_scores_each_kind_by_teacher_forced_exact_match(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model")
    kinds = ("colour", "grounding")
    spec = ShapesText(SHAPES_DATA, described=True, plain=False, layout=True, kinds=kinds, min_objects=2, eval_size=6)
    evaluation = DescribedTextEvaluation.build(spec, model, batch_size=5)
    expected = [(split, c.meta["kinds"][0]) for split in ("test", "test_heldout") for index in range(6)
                for scene in [shapes.generate(SHAPES_DATA, split, index)] if len(scene.objects) >= 2
                for c in described_conversations(scene, SHAPES_DATA, split, 1, True, kinds)]  # fmt: skip
    assert [(split, kind) for split, kind, _, _ in evaluation.samples] == expected and len(expected) > 4

    def logits_of(predicted: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(predicted, model.config.lm.vocab_size).float())

    # An oracle (each position predicts the token that follows) is right on every answer, of every kind and split;
    # one that repeats the current token is right on none.
    model.forward = lambda ids, mask: logits_of(torch.cat([ids[:, 1:], ids[:, -1:]], dim=1))  # type: ignore[method-assign]
    right = evaluation(model).metrics
    assert set(right) == {f"text_accuracy{kind}{split}" for kind in ("", "_colour", "_grounding")
                          for split in ("", "_heldout")} and set(right.values()) == {1.0}  # fmt: skip
    model.forward = lambda ids, mask: logits_of(ids)  # type: ignore[method-assign]
    assert set(evaluation(model).metrics.values()) == {0.0}
    # The oracle wrong on one token of a box misses that answer alone.
    split, kind, ids, labels = next(sample for sample in evaluation.samples if sample[1] == "grounding")
    assert split == "test"
    evaluation.samples = [(split, kind, ids, labels)]
    box_token = int(torch.nonzero(labels != IGNORE_INDEX).flatten()[2])

    def oracle_but_one(ids: torch.Tensor, mask: torch.Tensor) -> types.SimpleNamespace:
        predicted = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        predicted[:, box_token - 1] = (ids[0, box_token] + 1) % model.config.lm.vocab_size
        return logits_of(predicted)

    model.forward = oracle_but_one  # type: ignore[method-assign]
    assert evaluation(model).metrics == {"text_accuracy": 0.0, "text_accuracy_grounding": 0.0}
    # A stage on plain text asks no question: evaluating it is a clear error naming the stage.
    recipe = get_recipe("llava_shapes")
    with pytest.raises(ValueError, match="stage text: plain ShapesText"):
        VisionLanguage().evaluation(RunContext(recipe, tiny_llava.parent), model, recipe.stage("text"))


def test_question_first_puts_the_first_question_before_the_image(tiny_llava: Path) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")
    image = model.config.image_token_id

    def asked_before_image(ids: torch.Tensor) -> bool:
        ids_list = ids.tolist()
        before = decode_answer(model.tokenizer, ids_list[: ids_list.index(image)], stop_ids=())
        return before.replace("<bos>", "").strip() != "user:"  # more than the template's opening

    layouts = {}
    for probability in (0.0, 0.5, 1.0):
        spec = dataclasses.replace(recipe.data, question_first=probability)
        dataset = ShapesInstructionDataset(spec, model, seed=0)
        layouts[probability] = {asked_before_image(dataset[k]["input_ids"]) for k in range(16)}
        evaluation = VLMEvaluation.build(spec, model, max_new_tokens=4, batch_size=4)
        assert {asked_before_image(q.prompt) for q in evaluation.questions} == {probability >= 0.5}
    assert layouts == {0.0: {False}, 0.5: {False, True}, 1.0: {True}}
    with pytest.raises(ValueError, match="question_first is a probability"):
        dataclasses.replace(recipe.data, question_first=1.5)


def test_a_scene_with_nothing_of_the_trained_kinds_is_a_clear_error(tiny_llava: Path) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")
    config = dataclasses.replace(recipe.data.config, min_objects=1, max_objects=1)
    spec = dataclasses.replace(recipe.data, config=config, kinds=("spatial",), kind_weights=())
    with pytest.raises(ValueError, match=re.escape("train scene 0 (1 objects) has nothing of the kinds ['spatial']")):
        ShapesInstructionDataset(spec, model, seed=0)[0]


def test_kind_weights_draw_the_weighted_kind_more_often(tiny_llava: Path) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")

    def grounding_turns(spec: ShapesInstructions) -> int:
        dataset = ShapesInstructionDataset(spec, model, seed=0)
        answers = [decode_answer(model.tokenizer, dataset[k]["input_ids"].tolist(), stop_ids=()) for k in range(24)]
        return sum("<box>" in answer for answer in answers)

    one_turn = dataclasses.replace(recipe.data, turns=1, kind_weights=())
    alike = grounding_turns(one_turn)
    assert alike <= 8  # one kind in eight, where the scene has a referring expression
    # The recipe's own mix (referring expressions weighing 4 against 1) draws them more often, a weight of 100 nearly
    # always.
    assert recipe.data.kind_weights == (("grounding", 4.0),)
    assert grounding_turns(dataclasses.replace(recipe.data, turns=1)) > alike
    assert grounding_turns(dataclasses.replace(one_turn, kind_weights=(("grounding", 100.0),))) >= 20
    # JSON and --set give lists; the recipe records pairs.
    weighted = recipe.with_overrides({"data.kind_weights": [["grounding", 3]]}).data
    assert weighted.kind_weights == (("grounding", 3.0),)
    assert ShapesInstructions.from_dict(weighted.to_dict()) == weighted
    for bad, message in (
        ([["groundin", 2]], "'groundin' is not one of the drawn kinds"),
        ([["grounding", 0]], "weight of 'grounding' must be positive"),
        ([["count", 2], ["count", 1]], "names the same kind twice"),
        ([["count"]], "holds \\(kind, weight\\) pairs"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(recipe.data, kind_weights=bad)


def test_training_scenes_are_made_once_and_read_alike(tiny_llava: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")
    spec = dataclasses.replace(recipe.data, object_weights=((2, 3.0),))  # redraws make scenes beside the index's
    generate = shapes.generate

    def items(cache: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
        made: list[int] = []
        monkeypatch.setattr(shapes, "generate", lambda *args: made.append(args[2]) or generate(*args))
        dataset = ShapesInstructionDataset(spec, model, seed=0, cache_scenes=cache)
        out = []
        for epoch in (0, 1):  # the second epoch draws other turns of the same scenes
            dataset.set_epoch(epoch)
            out += [dataset[index] for index in range(40)]
        return out, made

    (kept, made_kept), (fresh, made_fresh) = items(100), items(0)
    assert len(kept) == len(fresh) == 80
    for a, b in zip(kept, fresh, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(kept[k]["input_ids"], kept[40 + k]["input_ids"]) for k in range(40))
    assert sorted(made_kept) == sorted(set(made_fresh)) and len(made_fresh) > len(made_kept)


def test_object_weights_draw_two_object_scenes_more_often(tiny_llava: Path) -> None:
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")
    assert recipe.data.object_weights == () and recipe.data.config.max_objects == 2

    def scenes(spec: ShapesInstructions) -> list[int]:
        dataset = ShapesInstructionDataset(spec, model, seed=0)
        return [dataset.draw(k)[0] for k in range(300)]

    def two_object_share(indices: list[int]) -> float:
        return sum(len(shapes.generate(recipe.data.config, "train", i).objects) == 2 for i in indices) / len(indices)

    plain = scenes(recipe.data)
    assert plain == list(range(300))  # no weights: every scene is its own index, the stream as it always was
    base = two_object_share(plain)
    assert 0.25 < base < 0.45  # the generator's draw: about a third of the scenes hold two objects
    favoured = dataclasses.replace(recipe.data, object_weights=((2, 3.0),))
    # Three to one: 3 x 0.36 / (3 x 0.36 + 0.64) = 0.63 of the scenes drawn hold two objects.
    assert 0.53 < two_object_share(scenes(favoured)) < 0.73
    # The same odds written as a one-object weight under 1 draw the same scenes, and a redraw is seeded.
    assert scenes(dataclasses.replace(recipe.data, object_weights=((1, 1 / 3),))) == scenes(favoured)
    # An item is the weighted scene's conversation: the plain dataset's item for the scene the draw kept.
    dataset = ShapesInstructionDataset(favoured, model, seed=0)
    unweighted = ShapesInstructionDataset(recipe.data, model, seed=0)
    moved = next(k for k in range(300) if dataset.draw(k)[0] != k)
    assert torch.equal(dataset[moved]["pixel_values"], unweighted[dataset.draw(moved)[0]]["pixel_values"])
    # --set gives lists; the recipe records pairs.
    weighted = recipe.with_overrides({"data.object_weights": [[2, 2]]}).data
    assert weighted.object_weights == ((2, 2.0),)
    assert ShapesInstructions.from_dict(weighted.to_dict()) == weighted
    for bad, message in (
        ([[3, 2]], "the scenes hold 1-2 objects, not 3"),
        ([[2, 0]], "the weight of 2 must be positive"),
        ([[1, 2], [1, 1]], "names the same object count twice"),
        ([[2]], "holds \\(object count, weight\\) pairs"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(recipe.data, object_weights=bad)


def test_fresh_answers_leave_no_turn_that_the_text_before_it_answers(tiny_llava: Path) -> None:
    circle = InstructionItem("colour", "what colour is the circle?", "purple")
    assert given_away(circle, ["what shape is the purple object?", "circle"])
    assert not given_away(circle, ["what shape is the red object?", "circle"])
    assert not given_away(InstructionItem("existence", "is there a red star?", "yes"), ["is there a blue star?", "yes"])
    assert not given_away(InstructionItem("count", "how many stars are there?", "1"), ["how many objects?", "1"])
    recipe = get_recipe("llava_shapes").with_overrides(TINY_VLM)
    model = vlkit.from_pretrained(tiny_llava / "model")

    def conversations(spec: ShapesInstructions) -> list[list[InstructionItem]]:
        dataset = ShapesInstructionDataset(spec, model, seed=0)
        return [dataset.draw(k)[2] for k in range(200)]

    def given_away_turns(drawn: list[list[InstructionItem]]) -> int:
        earlier = lambda items: [text for item in items for text in (item.question, item.answer)]  # noqa: E731
        return sum(given_away(item, earlier(items[:n])) for items in drawn for n, item in enumerate(items))

    for data in (recipe.data, dataclasses.replace(recipe.data, kind_weights=())):  # weighted and unweighted draws
        plain = conversations(data)
        assert given_away_turns(plain) > 100  # most later colour and shape turns can be copied from the text
        fresh = conversations(dataclasses.replace(data, fresh_answers=True))
        assert given_away_turns(fresh) == 0
        # As many turns: the next kind stands in for one that had only given-away items.
        assert [len(items) for items in fresh] == [len(items) for items in plain]
        if not data.kind_weights:  # the unweighted draw orders every kind as before: the same first turns
            assert [items[0] for items in fresh] == [items[0] for items in plain]
    spec = recipe.with_overrides({"data.fresh_answers": True}).data
    assert spec.fresh_answers and ShapesInstructions.from_dict(spec.to_dict()) == spec
    assert ShapesInstructionDataset(spec, model, seed=0)[0]["input_ids"].numel() > 0


def test_evaluation_answers_greedily_whatever_decoding_defaults_the_model_carries(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model").eval()
    spec = get_recipe("llava_shapes").with_overrides(TINY_VLM).data
    evaluation = VLMEvaluation.build(spec, model, max_new_tokens=4, batch_size=4)
    greedy = evaluation.answer(model)
    # A checkpoint's generation_config.json that samples hot and penalises repeats does not reach the scores.
    model.generation_config = GenerationConfig(do_sample=True, temperature=50.0, repetition_penalty=3.0)
    torch.manual_seed(0)
    assert evaluation.answer(model) == greedy


def test_the_layout_kind_trains_and_is_scored_as_every_object_with_its_box(tiny_llava: Path, tmp_path: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model").eval()
    spec = get_recipe("llava_shapes").with_overrides(TINY_VLM).data
    assert "layout" not in spec.kinds  # no default mix holds it
    layouts = spec.replace(kinds=["caption", "layout"], turns=1, kind_weights=())
    dataset = ShapesInstructionDataset(layouts, model, seed=0)
    answers = [decode_answer(model.tokenizer, dataset[k]["input_ids"].tolist(), stop_ids=()) for k in range(16)]
    drawn = [answer for answer in answers if "<box>" in answer]
    assert 0 < len(drawn) < len(answers)  # captions and layouts
    for k, answer in enumerate(answers):
        if "<box>" in answer:
            assert scene_layout(dataset.draw(k)[1]).replace(" ", "") in answer.replace(" ", "")
    evaluation = VLMEvaluation.build(layouts, model, max_new_tokens=4, batch_size=8)
    asked = [q for q in evaluation.questions if q.kind == "layout"]
    scenes = [
        shapes.generate(layouts.config, split, k)
        for split in shapes.eval_splits(layouts.config, layouts.eval_split)
        for k in range(layouts.eval_size)
    ]
    assert [q.answer for q in asked] == [scene_layout(scene) for scene in scenes]
    # Room for every object's box, whatever the task's default.
    assert evaluation.max_new_tokens >= 27 * layouts.config.max_objects
    metrics = evaluation(model).metrics
    assert {"layout_acc50", "layout_named", "layout_acc50_heldout"} <= set(metrics)
    assert "vqa_accuracy" not in metrics  # a layout is not a VQA answer
    assert answer_is_right(asked[0], asked[0].answer) and not answer_is_right(asked[0], "a red circle")
    plot_answers([(asked[0], asked[0].answer), (asked[1], "")], tmp_path / "answers.png")  # every box drawn
    assert (tmp_path / "answers.png").stat().st_size > 0
    # A stage that trains on layouts is scored on them too, beside the recipe's mix; the other stages are not.
    recipe = get_recipe("llava_shapes").with_overrides({**TINY_VLM, "stages.align.data.kinds": ["caption", "layout"]})
    run = RunContext(recipe, tiny_llava.parent)
    for stage, scored in (("align", True), ("instruct", False)):
        evaluation = VisionLanguage().evaluation(run, model, recipe.stage(stage))
        kinds = {q.kind for q in evaluation.questions}  # type: ignore[attr-defined]
        assert ("layout" in kinds) == scored and {"colour", "grounding"} <= kinds


def test_evaluation_on_the_validation_split_asks_about_validation_scenes_only(tiny_llava: Path) -> None:
    model = vlkit.from_pretrained(tiny_llava / "model").eval()
    spec = get_recipe("llava_shapes").with_overrides(TINY_VLM).data
    test = VLMEvaluation.build(spec, model, max_new_tokens=4, batch_size=4)
    val = VLMEvaluation.build(dataclasses.replace(spec, eval_split="val"), model, max_new_tokens=4, batch_size=4)
    assert {q.split for q in test.questions} == {"test", "test_heldout"}
    assert {q.split for q in val.questions} == {"val", "val_heldout"}
    for split in ("val", "val_heldout"):
        scenes = [shapes.generate(spec.config, split, index) for index in range(spec.eval_size)]
        asked = {q.image.tobytes() for q in val.questions if q.split == split}
        assert asked == {scene.image.tobytes() for scene in scenes}
    assert not {q.image.tobytes() for q in val.questions} & {q.image.tobytes() for q in test.questions}
    # The same keys, _heldout ones included (per-kind keys follow the kinds a few scenes happen to ask).
    keys = {f"{key}{end}" for key in ("vqa_accuracy", "grounding_acc50", "caption_f1") for end in ("", "_heldout")}
    assert keys <= set(val(model).metrics) and keys <= set(test(model).metrics)
    # The number of VQA questions each accuracy is over (captions and referring expressions are scored apart).
    metrics = test(model).metrics
    for split, end in (("test", ""), ("test_heldout", "_heldout")):
        asked = [q for q in test.questions if q.split == split and q.kind not in ("caption", "grounding")]
        assert metrics[f"vqa_questions{end}"] == len(asked) > 0
    with pytest.raises(ValueError, match="eval_split must be one of"):
        dataclasses.replace(spec, eval_split="train")


def _bench(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_probe_reads_what_the_tokens_hold_and_probes_every_site(tiny_llava: Path, tmp_path: Path) -> None:
    probe = _bench("vlm_token_probe")
    # The probe: tokens that hold the label are read perfectly, tokens that hold none at about chance.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (400,), generator=generator)
    holding = torch.nn.functional.one_hot(labels, 8).float() + 0.1 * torch.randn(400, 8, generator=generator)
    noise = torch.randn(400, 8, generator=generator)
    assert probe.probe_accuracy(holding[:300], labels[:300], holding[300:], labels[300:]) == 1.0
    assert probe.probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.3
    # The token of a centre: row-major cells of the grid, the image's right and bottom edges in the last cell.
    assert probe._cell((0.0, 0.0), (64, 64), 4) == 0 and probe._cell((64.0, 64.0), (64, 64), 4) == 15
    assert probe._cell((40.0, 10.0), (64, 64), 4) == 2 and probe._cell((10.0, 40.0), (64, 64), 8) == 41
    # The centre probe: a linear function of the tokens is recovered (R^2 ~ 1), noise is not (R^2 <= ~0).
    centre = torch.rand(400, 2, generator=generator)
    linear = torch.cat([centre @ torch.randn(2, 6, generator=generator), noise[:, :2]], 1)
    assert min(probe.probe_r2(linear[:300], centre[:300], linear[300:], centre[300:])) > 0.99
    assert max(probe.probe_r2(noise[:300], centre[:300], noise[300:], centre[300:])) < 0.1
    out = tmp_path / "probe.json"
    probe.main(["--model", str(tiny_llava / "model"), "--out", str(out), "--train-scenes", "40", "--test-scenes", "20"])
    result = json.loads(out.read_text())
    depth = vlkit.from_pretrained(tiny_llava / "model").config.vision.depth
    assert set(result["accuracy"]) == {f"layer{k}" for k in range(depth + 1)} | {"bridge"}
    assert all(set(row) == set(probe.TARGETS) for row in result["accuracy"].values())
    lm_depth = vlkit.from_pretrained(tiny_llava / "model").config.lm.depth
    lm_sites = {f"lm_layer{k + 1}{end}" for k in range(lm_depth) for end in ("", "_one_object")}
    assert set(result["centre_r2"]) == set(result["accuracy"]) | lm_sites | {"bridge_all_tokens_one_object"}
    assert all(set(row) == set(probe.CENTRE) for row in result["centre_r2"].values())
    assert result["settings"]["referring_expressions"]["test"] > 0
    assert result["settings"]["train_objects"] > 0 and result["settings"]["test_objects"] > 0
    assert min(result["settings"]["one_object_scenes"].values()) > 0


def test_vlm_errors_sorts_attribute_answers_into_binding_and_prior(
    tiny_llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    errors = _bench("vlm_errors")
    square = shapes.ShapesObject(shape="square", colour="red", size="small", box=(0, 0, 16, 16))
    star = shapes.ShapesObject(shape="star", colour="blue", size="large", box=(32, 40, 64, 64))
    question = types.SimpleNamespace(kind="colour", answer="red", objects=[square, star])
    verdicts = {said: errors._attribute_answer(question, said, SHAPES_DATA.colours) for said in
                ("Red.", "blue", "green", "<box>(1,2),(3,4)</box>")}  # fmt: skip
    assert verdicts == {"Red.": "right", "blue": "other", "green": "absent", "<box>(1,2),(3,4)</box>": "else"}
    out = tmp_path / "errors.jsonl"
    errors.main(["--model", str(tiny_llava / "model"), "--out", str(out), "--split", "val", "--show", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    # One line per split, its wrong count the written rows' (the held-out split's are written too).
    for split in ("val", "val_heldout"):
        wrong = sum(row["split"] == split and row["kind"] in errors.ATTRIBUTES for row in rows)
        assert f"colour / shape / size answers, {split}: {wrong} wrong of " in printed


def test_oracle_tower_hands_the_bridge_each_patch_object(tiny_llava: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oracle = _bench("vlm_oracle")
    config = SHAPES_DATA
    square = shapes.ShapesObject(shape="square", colour="red", size="small", box=(0, 0, 16, 16))
    star = shapes.ShapesObject(shape="star", colour="blue", size="large", box=(32, 40, 64, 64))
    channels = oracle.oracle_channels(config)
    grid = oracle.oracle_map([square, star], (64, 64), config, (8, 8))  # 8 px patches: centres at 4, 12, 20, ...
    on_object = [[(r < 2 and c < 2) or (r >= 5 and c >= 4) for c in range(8)] for r in range(8)]
    assert grid.shape == (len(channels), 8, 8)
    assert grid.sum(0).tolist() == [[3.0 if hit else 1.0 for hit in row] for row in on_object]
    named = {channels[k] for k in grid[:, 0, 1].nonzero().flatten().tolist()}
    assert named == {"red", "square", "small"}
    assert {channels[k] for k in grid[:, 7, 7].nonzero().flatten().tolist()} == {"blue", "star", "large"}
    assert {channels[k] for k in grid[:, 3, 3].nonzero().flatten().tolist()} == {"background"}
    # Installed, the task's scenes reach the model as oracle maps, and the bridge reads them as tokens.
    model = vlkit.from_pretrained(tiny_llava / "model")
    oracle.install(config, model.config.vision.grid, monkeypatch.setattr)
    spec = get_recipe("llava_shapes").with_overrides(TINY_VLM).data
    evaluation = VLMEvaluation.build(spec, model, max_new_tokens=4, batch_size=4)
    question = evaluation.questions[0]
    grid_shape = model.config.vision.grid
    assert question.pixels.shape == (len(channels), *grid_shape)
    expected = oracle.oracle_map(question.objects, question.image.size, config, grid_shape)
    assert torch.equal(question.pixels, expected)
    with torch.no_grad():
        tokens = model.embed_image(question.pixels[None]).tokens
    assert tokens.shape == (1, model.tokens_per_image(), model.config.lm.dim)


@pytest.mark.parametrize("template", ["shapes", "chatml", "vicuna_v1"])
def test_an_answer_ends_where_training_ended_it(template: str) -> None:
    """The evaluation stops and cuts an answer at the ids training put after it (the template's end of turn), so a
    perfectly trained answer, followed by whatever the model writes next, decodes to exactly the answer."""
    tokenizer = shapes_chat_tokenizer(shapes.ShapesConfig(), template, 30, 512, 512)
    chat = get_template(template)
    conversation = Conversation([Turn("user", "<image>how many shapes are there?"), Turn("assistant", "3")], ["x"])
    ids, labels = tokenize_conversation(conversation, template, tokenizer, "<image>", 2)
    trained = [int(token) for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    following = tokenizer.backend.encode(chat.assistant_suffix + chat.user_prefix + "what", add_special_tokens=False)
    stop_ids = end_of_answer_ids(template, tokenizer)
    assert trained[-1] in stop_ids
    assert decode_answer(tokenizer, trained + following.ids, stop_ids) == "3"


def test_answers_are_marked_right_as_the_metrics_score_them() -> None:
    box = (468, 343, 703, 562)
    sample = shapes.generate(SHAPES_DATA, "test", 0)

    def question(kind: str, answer: str, target: tuple[int, int, int, int] | None = None) -> _Question:
        return _Question("test", kind, "?", answer, target, list(sample.objects), sample.image, torch.zeros(1), None)

    grounding = question("grounding", "<ref>the red star</ref><box>(468,343),(703,562)</box>", box)
    # The BPE decodes a right box with spaces inside the tags: still right, as its IoU of 1 says.
    assert answer_is_right(grounding, "<ref> the red star</ref><box> (468,343),(703,562)</box>")
    assert not answer_is_right(grounding, "<ref> the red star</ref><box> (0,0),(100,100)</box>")
    assert answer_is_right(question("colour", "red"), "Red.") and not answer_is_right(question("colour", "red"), "")
    assert answer_is_right(question("caption", sample.captions[0]), sample.captions[0])


def test_contrastive_and_classification_evaluations_read_the_validation_splits() -> None:
    from vlkit.data.specs import ShapesObjects, ShapesScenes
    from vlkit.eval.benchmarks import shapes_suite
    from vlkit.tasks.classification import ClassificationEval

    transform = ImageTransform(image_size=32)
    suite = shapes_suite(SHAPES_DATA, transform, size=6, retrieval_size=4, which="val")
    assert set(suite.zero_shot) == {"zero_shot", "zero_shot_heldout"}
    for key, split in (("zero_shot", "val"), ("zero_shot_heldout", "val_heldout")):
        expected = [shapes.single_object(SHAPES_DATA, split, index) for index in range(6)]
        labels = [shapes.class_index(SHAPES_DATA, s.objects[0].colour, s.objects[0].shape) for s in expected]
        assert suite.zero_shot[key].labels.tolist() == labels
    assert suite.retrieval is not None
    assert suite.retrieval.texts == [shapes.generate(SHAPES_DATA, "val", index).captions[0] for index in range(4)]
    test = ClassificationEval.build(SHAPES_DATA, transform, 4)
    val = ClassificationEval.build(SHAPES_DATA, transform, 4, "val")
    assert set(val.splits) == set(test.splits) == {"", "_heldout"}
    assert not torch.equal(val.splits["_heldout"].pixels, test.splits["_heldout"].pixels)
    for spec in (ShapesScenes, ShapesObjects):
        assert spec(eval_split="val").eval_split == "val"
        with pytest.raises(ValueError, match="eval_split must be one of"):
            spec(eval_split="train")


def test_a_config_without_held_out_combinations_evaluates_its_test_split(tiny_llava: Path) -> None:
    """``heldout=()`` is a valid ShapesWorld config: the evaluations read ``test`` alone and report no _heldout key."""
    from vlkit.eval.benchmarks import shapes_suite
    from vlkit.tasks.classification import ClassificationEval

    config = dataclasses.replace(SHAPES_DATA, heldout=())
    model = vlkit.from_pretrained(tiny_llava / "model")
    spec = dataclasses.replace(get_recipe("llava_shapes").with_overrides(TINY_VLM).data, config=config)
    evaluation = VLMEvaluation.build(spec, model, max_new_tokens=2, batch_size=8)
    assert {question.split for question in evaluation.questions} == {"test"}
    metrics = evaluation(model).metrics
    assert "vqa_accuracy" in metrics and not any(key.endswith("_heldout") for key in metrics)
    transform = ImageTransform(image_size=32)
    assert set(shapes_suite(config, transform, size=4, retrieval_size=4).zero_shot) == {"zero_shot"}
    assert set(ClassificationEval.build(config, transform, 4).splits) == {""}

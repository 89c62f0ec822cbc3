"""Chat templates: for every shipped template and for a Hugging Face tokenizer and vlkit's own, the trained-on tokens
are exactly the assistant's text + end-of-turn, each image expands to its token count, prompts tokenize as the
training sequence does, and a conversation that would train on nothing is an error."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from vlkit.data.shapes import ShapesConfig, generate
from vlkit.text import train_tokenizer
from vlkit.text.chat import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    Conversation,
    Turn,
    get_template,
    render,
    tokenize_conversation,
    tokenize_prompt,
)

IMAGE = "<image>"
SPECIAL = sorted({token for template in CHAT_TEMPLATES.values() for token in template.special_tokens} | {IMAGE})
CORPUS = [
    "USER: what colour is the circle? ASSISTANT: red",
    "you are a helpful assistant. a chat between a curious user and an artificial intelligence assistant.",
    "how many objects are there? 3 <ref>the red circle</ref><box>(12,40),(300,999)</box>",
    "user\nassistant\nsystem\nthe blue square is left of the green star. yes no",
] * 3


def _hf_tokenizer() -> HFTokenizer:
    """A tiny byte-level BPE (GPT-2 / Qwen style: no prefix space, lossless decoding) with the templates' tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", *SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


def _vlkit_tokenizer():
    """vlkit's ShapesWorld BPE (lower case, a space before every segment), with the chat tokens added."""
    config = ShapesConfig()
    captions = [caption for index in range(20) for caption in generate(config, "train", index).captions]
    tokenizer = train_tokenizer(captions + CORPUS, vocab_size=400)
    tokenizer.backend.add_special_tokens(SPECIAL)
    return tokenizer


TOKENIZERS = {"hf": _hf_tokenizer(), "vlkit": _vlkit_tokenizer()}


def _backend(kind: str) -> HFTokenizer:
    tokenizer = TOKENIZERS[kind]
    return tokenizer if kind == "hf" else tokenizer.backend


def _encode(kind: str, text: str) -> list[int]:
    return _backend(kind).encode(text, add_special_tokens=False).ids


def _decode(kind: str, ids: list[int]) -> str:
    return _backend(kind).decode(ids, skip_special_tokens=False)


def _conversations(template: str) -> dict[str, Conversation]:
    turns = [
        Turn("user", f"{IMAGE}\nwhat colour is the circle?"),
        Turn("assistant", "red"),
        Turn("user", f"and this one? {IMAGE} how many objects are there?"),
        Turn("assistant", "there are 3 objects."),
        Turn("user", "where is the red circle?"),
        Turn("assistant", "<ref>the red circle</ref><box>(12,40),(300,999)</box>"),
    ]
    cases = {
        "two_images": Conversation(turns, images=["a.png", "b.png"], id="two"),
        "text_only": Conversation([Turn("user", "is the sky blue?"), Turn("assistant", "yes")], id="text"),
    }
    if get_template(template).caption_only:  # one image, one caption
        pair = [Turn("user", f"{IMAGE}\ndescribe it."), Turn("assistant", "a red circle and a blue star")]
        cases["two_images"] = Conversation(pair, images=["a.png"], id="one")
    if get_template(template).system_format is not None:
        system = [Turn("system", "answer briefly.")]
        cases["system"] = Conversation(system + turns[:2], images=["a.png"], id="system")
    return cases


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, position))
            start = None
    return spans


@pytest.mark.parametrize("kind", ["hf", "vlkit"])
@pytest.mark.parametrize("template_name", sorted(CHAT_TEMPLATES))
def test_labels_are_exactly_the_answers(template_name: str, kind: str) -> None:
    template = CHAT_TEMPLATES[template_name]
    image_id = _encode(kind, IMAGE)[0]
    for case, conversation in _conversations(template_name).items():
        counts = [3, 5][: len(conversation.images)]
        ids, labels = tokenize_conversation(conversation, template_name, TOKENIZERS[kind], IMAGE, counts)
        ids, labels = ids.tolist(), labels.tolist()
        assert len(ids) == len(labels)
        # Images: one contiguous run per image, of its own length, never trained on.
        image_positions = [position for position, token in enumerate(ids) if token == image_id]
        assert len(image_positions) == sum(counts), case
        assert [end - start for start, end in _spans([1 if t == image_id else IGNORE_INDEX for t in ids])] == counts
        assert all(labels[position] == IGNORE_INDEX for position in image_positions)
        # Labels: one span per assistant turn, equal to the answer + end-of-turn tokenized on their own.
        answers = [turn.content for turn in conversation.turns if turn.role == "assistant"]
        spans = _spans(labels)
        assert len(spans) == len(answers), case
        for (start, end), answer in zip(spans, answers, strict=True):
            assert labels[start:end] == ids[start:end]
            assert ids[start:end] == _encode(kind, answer) + _encode(kind, template.end_of_turn)
            decoded = _decode(kind, ids[start:end])
            if kind == "hf":
                assert decoded == answer + template.end_of_turn, (case, decoded)
            else:  # vlkit's BPE puts a space before each segment and lower-cases
                assert decoded.split() == (answer + template.end_of_turn).lower().split(), (case, decoded)


@pytest.mark.parametrize("template_name", sorted(CHAT_TEMPLATES))
def test_lossless_tokenizer_decodes_to_the_rendered_text(template_name: str) -> None:
    template = CHAT_TEMPLATES[template_name]
    for conversation in _conversations(template_name).values():
        ids, _ = tokenize_conversation(conversation, template_name, TOKENIZERS["hf"], IMAGE, 4)
        image_id = _encode("hf", IMAGE)[0]
        collapsed = [t for p, t in enumerate(ids.tolist()) if t != image_id or p == 0 or ids[p - 1] != image_id]
        assert _decode("hf", collapsed) == template.begin + render(conversation, template, add_generation_prompt=False)


@pytest.mark.parametrize("kind", ["hf", "vlkit"])
@pytest.mark.parametrize("template_name", sorted(CHAT_TEMPLATES))
def test_prompt_tokens_equal_the_training_prefix(template_name: str, kind: str) -> None:
    """What the model sees at inference is exactly what preceded the answer in training."""
    for conversation in _conversations(template_name).values():
        ids, labels = tokenize_conversation(conversation, template_name, TOKENIZERS[kind], IMAGE, 2)
        last_answer_start = _spans(labels.tolist())[-1][0]
        without_answer = Conversation(conversation.turns[:-1], images=conversation.images, id=conversation.id)
        prompt = tokenize_prompt(without_answer, template_name, TOKENIZERS[kind], IMAGE, 2)
        assert prompt.tolist() == ids[:last_answer_start].tolist()


@pytest.mark.parametrize("kind", ["hf", "vlkit"])
@pytest.mark.parametrize("template_name", sorted(CHAT_TEMPLATES))
def test_nothing_to_train_on_is_an_error(template_name: str, kind: str) -> None:
    tokenizer = TOKENIZERS[kind]
    question_only = Conversation([Turn("user", f"{IMAGE}\nwhat is this?")], images=["a.png"], id="q1")
    with pytest.raises(ValueError, match=r"conversation 'q1': has no assistant turn"):
        tokenize_conversation(question_only, template_name, tokenizer, IMAGE, 4)
    unanswered = Conversation([Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")], item="data.json[7]")
    with pytest.raises(ValueError, match=r"data.json\[7\]: ends with a user turn"):
        tokenize_conversation(unanswered, template_name, tokenizer, IMAGE, 4)
    empty_answer = Conversation([Turn("user", "a"), Turn("assistant", "  ")], id="e")
    with pytest.raises(ValueError, match=r"turn 1 \(assistant\) is empty"):
        tokenize_conversation(empty_answer, template_name, tokenizer, IMAGE, 4)


def test_render_matches_the_published_formats() -> None:
    conversation = Conversation(
        [Turn("user", f"{IMAGE}\nWhat is it?"), Turn("assistant", "A cat."), Turn("user", "Colour?")], images=["x"]
    )
    vicuna = render(conversation, "vicuna_v1")
    system = CHAT_TEMPLATES["vicuna_v1"].default_system
    assert vicuna == f"{system} USER: {IMAGE}\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: "
    chatml = render(conversation, "chatml")
    assert chatml == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
    )
    caption = Conversation([Turn("user", f"{IMAGE}\nDescribe it."), Turn("assistant", "a red circle")], images=["x"])
    assert render(caption, "plain", add_generation_prompt=False) == f"{IMAGE}a red circle\n"
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        render(caption, "plain")


def test_bad_arguments_are_clear_errors() -> None:
    tokenizer = TOKENIZERS["hf"]
    conversation = Conversation([Turn("user", f"{IMAGE}{IMAGE} what?"), Turn("assistant", "red")], images=["a", "b"])
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 tokens_per_image"):
        tokenize_conversation(conversation, "chatml", tokenizer, IMAGE, [4])
    with pytest.raises(ValueError, match="not a single token"):
        tokenize_conversation(conversation, "chatml", tokenizer, "<img-not-in-vocab>", 4)
    with pytest.raises(ValueError, match="at most 10 fit"):
        tokenize_conversation(conversation, "chatml", tokenizer, IMAGE, 4, max_len=10)
    with pytest.raises(ValueError, match="unknown chat template"):
        tokenize_conversation(conversation, "llama9", tokenizer, IMAGE, 4)
    mismatch = Conversation([Turn("user", f"{IMAGE} what?"), Turn("assistant", "red")], images=["a", "b"], id="m")
    with pytest.raises(ValueError, match=r"'m': has 1 <image> placeholder\(s\) but 2 image\(s\)"):
        tokenize_conversation(mismatch, "chatml", tokenizer, IMAGE, 4)
    with pytest.raises(ValueError, match="has no system prompt"):
        tokenize_conversation(
            Conversation([Turn("system", "s"), *conversation.turns], ["a", "b"]), "plain", tokenizer, IMAGE, 4
        )
    several = Conversation([Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "d")])
    with pytest.raises(ValueError, match="takes one user turn and one answer"):
        tokenize_conversation(several, "plain", tokenizer, IMAGE, 4)
    swapped = Conversation([Turn("assistant", "hi"), Turn("user", "hello")])
    with pytest.raises(ValueError, match="roles do not alternate: turn 0 is assistant"):
        tokenize_conversation(swapped, "chatml", tokenizer, IMAGE, 4)
    # An image id that is not a token of the vocabulary (appended after it) is accepted as given.
    ids, labels = tokenize_conversation(conversation, "chatml", tokenizer, tokenizer.get_vocab_size(), 4)
    assert int((ids == tokenizer.get_vocab_size()).sum()) == 8
    assert int((labels != IGNORE_INDEX).sum()) == len(_encode("hf", "red<|im_end|>"))


def test_vlkit_tokenizer_remembers_what_it_encoded() -> None:
    tokenizer = _vlkit_tokenizer()
    text = "how many objects are there? 3 <ref>the red circle</ref>"
    plain = tokenizer.backend.encode(text, add_special_tokens=False).ids
    for _ in range(2):  # encoded, then remembered
        assert tokenizer.encode_plain(text) == plain
        assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids == [1, *plain, 2]
    tokenizer.encode_plain(text).append(7)  # the caller's own list: the memo keeps its ids
    assert tokenizer.encode_plain(text) == plain
    # A token added to the backend afterwards is read, not the ids from before it.
    tokenizer.backend.add_special_tokens(["<ref>the red circle</ref>"])
    added = tokenizer.backend.token_to_id("<ref>the red circle</ref>")
    assert tokenizer.encode_plain(text)[-1] == added and added not in plain


def test_transformers_tokenizer_gives_the_same_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=TOKENIZERS["hf"])
    conversation = _conversations("chatml")["two_images"]
    ours = tokenize_conversation(conversation, "chatml", TOKENIZERS["hf"], IMAGE, [3, 5])
    theirs = tokenize_conversation(conversation, "chatml", fast, IMAGE, [3, 5])
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert ours.labels.tolist() == theirs.labels.tolist()

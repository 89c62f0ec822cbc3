"""A checkpoint's Jinja chat template (``vlkit.text.jinja``), against transformers' ``apply_chat_template``.

The templates exercise what the Hub's templates use: ``trim_blocks`` / ``lstrip_blocks``, namespaces, loop controls,
the ``{% generation %}`` block, ``tojson`` on non-ASCII text, tools, content blocks with images in them,
``raise_exception``, and the special tokens as variables. Each is rendered and tokenized by vlkit from the directory
transformers saved, and compared with transformers' text and ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch
from PIL import Image

from vlkit.text.jinja import read_chat_templates, render_chat, write_chat_templates
from vlkit.text.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEMPLATE = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{ message['content'] | trim }}
{% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
{{ message['role'] | upper }} {{ ns.turns }}: {% if message['content'] is string %}{{ message['content'] }}
{%- else %}{% for block in message['content'] %}{% if block['type'] == 'image' %}<image>
{% else %}{{ block['text'] }}{% endif %}{% endfor %}{% endif %}
    {% if message['role'] == 'assistant' %}{% generation %} {{ eos_token }}{% endgeneration %}{% endif %}

    {% if ns.turns > 8 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }}
{% endif %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"""

CHATS: list[list[dict[str, Any]]] = [
    [
        {"role": "system", "content": "  be brief  "},
        {"role": "user", "content": "what colour is the circle"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (4, 4))},
                                     {"type": "text", "text": "and this one, é?"}]},
    ],
    [{"role": "user", "content": "a red square", "name": None}],  # a None key is dropped, as transformers drops it
]  # fmt: skip


def _tokenizer(template: Any) -> Any:
    """A tiny byte-level BPE with a ``<bos>`` before every text (Llama's habit) and the chat template."""
    from tokenizers import processors

    from vlkit.text import train_tokenizer

    texts = ["a red circle left of a blue square", "what colour is the small triangle above it"] * 20
    backend = train_tokenizer(texts, vocab_size=80, extra_special_tokens=["<image>"]).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", padding_side="left")  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("options", [{"add_generation_prompt": True}, {}, {"tools": [{"name": "f", "note": "ü<&>"}]}])
def test_tokenizer_renders_and_tokenizes_as_transformers(options: dict[str, Any], tmp_path: Path) -> None:
    theirs = _tokenizer(TEMPLATE)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    ours = load_tokenizer(tmp_path, max_len=128)
    assert ours is not None and ours.chat_template == TEMPLATE
    for chat in CHATS:
        text = ours.apply_chat_template(chat, tokenize=False, **options)
        assert text == theirs.apply_chat_template(chat, tokenize=False, **options)
        assert ours.apply_chat_template(chat, **options) == dict(theirs.apply_chat_template(chat, **options))
        ids = ours.apply_chat_template(chat, return_dict=False, **options)
        assert ids == theirs.apply_chat_template(chat, return_dict=False, **options)
        assert ids[0] == ours.backend.token_to_id("<bos>") and ids.count(ids[0]) == 1  # the template's, none added
    batch = ours.apply_chat_template(CHATS, return_tensors="pt", **options)
    expected = theirs.apply_chat_template(CHATS, padding=True, return_tensors="pt", **options)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    assert batch["attention_mask"][1, 0] == 0  # padded on the tokenizer's side: the left


def test_continue_final_message_and_named_templates(tmp_path: Path) -> None:
    theirs = _tokenizer({"default": TEMPLATE, "short": "{% for m in messages %}{{ m['content'] }};{% endfor %}"})
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "short.jinja").is_file()
    ours = load_tokenizer(tmp_path, max_len=128)
    assert ours is not None and sorted(ours.chat_template) == ["default", "short"]
    chat = CHATS[0][:3]
    for options in ({"continue_final_message": True}, {"chat_template": "short"}, {"chat_template": "{{ 1 + 1 }}"}):
        text = ours.apply_chat_template(chat, tokenize=False, **options)
        assert text == theirs.apply_chat_template(chat, tokenize=False, **options), options
    assert ours.apply_chat_template(chat, tokenize=False, continue_final_message=True).endswith(": red")
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template(chat, add_generation_prompt=True, continue_final_message=True)

    # transformers 4's layout: the templates in tokenizer_config.json, a list of named ones
    for file in (tmp_path / "chat_template.jinja", *(tmp_path / "additional_chat_templates").iterdir()):
        file.unlink()
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["chat_template"] = [{"name": name, "template": text} for name, text in theirs.chat_template.items()]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    again = load_tokenizer(tmp_path, max_len=128)
    assert again is not None and again.chat_template == theirs.chat_template
    short = again.apply_chat_template(chat, chat_template="short", tokenize=False)
    assert short == "  be brief  ;what colour is the circle;red;"
    # Written back as transformers 5 writes them, and nothing stale is left beside them.
    write_chat_templates(tmp_path, "{{ 'only' }}")
    assert read_chat_templates(tmp_path) == "{{ 'only' }}" and not (tmp_path / "additional_chat_templates").exists()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == "{{ 'only' }}"
    # An additional "default.jinja" beside chat_template.jinja: transformers' tokenizer takes it, its processor not.
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "default.jinja").write_text("{{ 'other' }}")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == "{{ 'other' }}"
    assert read_chat_templates(tmp_path) == "{{ 'other' }}"
    assert read_chat_templates(tmp_path, processor=True) == "{{ 'only' }}"


def test_the_sandbox_and_the_data_a_template_sees() -> None:
    image = Image.new("RGB", (2, 2))
    blocks = [{"role": "user", "content": [{"type": "image", "image": image}]}]
    assert render_chat("{{ messages[0]['content'][0]['image'] }}", blocks) == "<Image>"  # no object reaches it
    assert render_chat("{{ {'a': 'é'} | tojson }}", blocks) == '{"a": "é"}'
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__.__mro__ }}", blocks)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_hidden=1) %}", blocks)
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", blocks)
    with pytest.raises(TypeError, match="message 0 is a str"):
        render_chat("{{ messages }}", ["hello"])
    with pytest.raises(TypeError, match="JSON schemas"):
        render_chat("{{ tools }}", blocks, tools=[print])
    with pytest.raises(ValueError, match="does not parse"):
        render_chat("{% for m in messages %}", blocks)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer_without_template().apply_chat_template(blocks)


def load_tokenizer_without_template() -> Any:
    from vlkit.text import train_tokenizer

    return train_tokenizer(["a red circle"] * 4, vocab_size=40)


REASONING = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m.reasoning_content %} <think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if m.content is string and m.content.startswith(image_token) %} (an image){% endif %}\n{% endfor %}"
)


def test_message_objects_reasoning_named_tokens_and_lengths(tmp_path: Path) -> None:
    """What callers hand transformers besides plain dicts (str enums, dataclasses, pydantic-style objects, reasoning
    under any of its names, a field to continue), the model-specific named tokens a template reads, and the
    truncation and padding options: as transformers renders and tokenizes them."""
    import dataclasses
    import enum

    class Role(str, enum.Enum):  # noqa: UP042 (str() of such an enum is its name: the case to cover)
        USER = "user"
        ASSISTANT = "assistant"

    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    class SDKMessage:  # the OpenAI SDK's messages are pydantic models: model_dump() gives the dict
        def model_dump(self) -> dict[str, Any]:
            return {"role": "assistant", "content": "red", "reasoning": "the circle is red", "tool_calls": None}

    theirs = _tokenizer(REASONING)
    theirs.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["extra_special_tokens"] = {"image_token": "<image>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path, max_len=128)
    assert ours is not None and ours.special_tokens_map() == theirs.special_tokens_map
    chat = [{"role": Role.USER, "content": "<image> what colour"}, SDKMessage(), Message("user", "and this?")]
    for options in ({}, {"continue_final_message": "reasoning_content"}):
        cut = chat[:2] if options else chat
        text = ours.apply_chat_template(cut, tokenize=False, **options)
        assert text == theirs.apply_chat_template(cut, tokenize=False, **options), options
    assert "user: <image> what colour (an image)" in text and text.endswith("<think>the circle is red")
    for options in ({"truncation": True, "max_length": 9}, {"padding": "max_length", "max_length": 60},
                    {"padding": True}):  # fmt: skip
        batch = [chat, chat[:1]]
        assert ours.apply_chat_template(batch, **options) == dict(theirs.apply_chat_template(batch, **options))
    ours.truncation_side = theirs.truncation_side = "left"
    left = {"truncation": True, "max_length": 9}
    assert ours.apply_chat_template(chat, **left) == dict(theirs.apply_chat_template(chat, **left))
    with pytest.raises(ValueError, match="does not implement return_assistant_tokens_mask"):
        ours.apply_chat_template(chat, return_assistant_tokens_mask=True)

    # A model saved with this tokenizer keeps its template and the named tokens the template reads.
    import vlkit

    model = vlkit.create_model("test_llama_lm")
    model.tokenizer = ours
    model.save_pretrained(tmp_path / "saved")
    again = vlkit.from_pretrained(tmp_path / "saved").tokenizer
    assert again.chat_template == REASONING and again.special_tokens_map() == ours.special_tokens_map()
    assert again.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat, tokenize=False)


def test_a_llama_directory_names_its_classs_tokens(tmp_path: Path) -> None:
    """A Llama directory whose configuration names only its end token: transformers' LlamaTokenizer supplies <s> and
    <unk>, which Llama 2's template writes; a token set to null there is none."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]{{ unk_token }}"
    settings = {"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path, max_len=64, model_type="llama")
    assert ours is not None and ours.special_tokens_map() == theirs.special_tokens_map
    chat = [{"role": "user", "content": "w5 w6"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "unk_token": None}))
    unset = load_tokenizer(tmp_path, max_len=64, model_type="llama")
    assert unset is not None and "unk_token" not in unset.special_tokens_map()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).special_tokens_map == unset.special_tokens_map()

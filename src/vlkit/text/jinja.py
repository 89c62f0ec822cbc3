"""A checkpoint's own chat template: the Jinja text a Hugging Face directory stores, rendered as transformers does.

    read_chat_templates(directory, processor=False) -> str | dict[str, str] | None   what the directory stores
    write_chat_templates(directory, templates)                                      and back, as transformers 5
    pick_template(templates, name=None) -> str                                      the one to render
    render_chat(template, messages, add_generation_prompt=False, **variables) -> str
    render_chats(templates, conversation_or_batch, ...) -> (texts, batched)

vlkit's own models are prompted with ``vlkit.text.chat``'s templates, segment by segment, as they were trained. A
checkpoint converted from transformers is prompted with the template it ships, rendered to one text that is then
tokenized whole, as ``apply_chat_template`` does there: its ids are the ones the checkpoint was trained on.

The rules are transformers' (5.x), which the templates on the Hub are written against:

- the environment: a sandbox that cannot modify what it is given, ``trim_blocks`` and ``lstrip_blocks``, loop
  controls (``break``, ``continue``), the ``{% generation %}`` block (it marks the assistant's text and renders as its
  body), ``raise_exception``, ``strftime_now``, and a ``tojson`` that keeps non-ASCII text and escapes no HTML;
- the data: message keys whose value is None are dropped, and anything but plain JSON data (the images in content
  blocks) becomes a placeholder naming its type (``"<Image>"``), so a template sees no object it could call;
- where a template lives: for a tokenizer, ``chat_template.jinja`` and the named ``additional_chat_templates/*.jinja``
  over ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{"name", "template"}``); for a
  processor, ``processor_config.json``'s ``chat_template``, else the legacy ``chat_template.json``'s, else the files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlkit.files import read_json, write_text_atomic

ChatTemplates = str | dict[str, str]

# transformers marks the end of a message to continue with this text, then cuts the rendered chat there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# The names a message's reasoning is given under; templates read the first (Qwen3) or the second (gpt-oss).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_chat_templates(directory: Path, processor: bool = False) -> ChatTemplates | None:
    """The chat template(s) a directory stores for its tokenizer (``processor=False``) or its processor: one text, a
    dict of named texts (the unnamed one as ``"default"``), or None."""
    extra = directory / "additional_chat_templates"
    files = {file.stem: file.read_text(encoding="utf-8") for file in sorted(extra.glob("*.jinja"))}
    if (directory / "chat_template.jinja").is_file():
        # transformers' tokenizer lets an additional "default.jinja" replace it, its processor does not
        main = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        files = {**files, "default": main} if processor else {"default": main, **files}
    stored: Any = None
    if processor:
        for name in ("processor_config.json", "chat_template.json"):
            if stored is None and (directory / name).is_file():
                stored = read_json(directory / name).get("chat_template")
                if name == "chat_template.json" and files.keys() - {"default"}:
                    raise ValueError(f"{directory}: a legacy chat_template.json beside additional_chat_templates/; "
                                     "transformers refuses the pair too: keep one")  # fmt: skip
    elif not files and (directory / "tokenizer_config.json").is_file():
        stored = read_json(directory / "tokenizer_config.json").get("chat_template")
    if stored is None:
        return (files["default"] if list(files) == ["default"] else files) or None
    if isinstance(stored, list):  # [{"name": ..., "template": ...}], as tokenizer_config.json keeps several
        stored = {str(entry["name"]): str(entry["template"]) for entry in stored}
    if not isinstance(stored, str | dict):
        raise ValueError(f"{directory}: chat_template is a {type(stored).__name__}, not a text or named texts")
    return stored


def write_chat_templates(directory: Path, templates: ChatTemplates | None) -> None:
    """Store ``templates`` as transformers 5 does: ``chat_template.jinja`` (the unnamed or ``"default"`` one) and
    ``additional_chat_templates/NAME.jinja``. Files of an earlier template there are removed, so that what the
    directory holds is exactly ``templates``."""
    named = {"default": templates} if isinstance(templates, str) else dict(templates or {})
    extra = directory / "additional_chat_templates"
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    for stale in extra.glob("*.jinja") if extra.is_dir() else ():
        stale.unlink()
    for name, text in named.items():
        if Path(name).name != name or not name:
            raise ValueError(f"chat template name {name!r} cannot be a file name")
        file = directory / "chat_template.jinja" if name == "default" else extra / f"{name}.jinja"
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(file, text)
    if extra.is_dir() and not any(extra.iterdir()):
        extra.rmdir()


def pick_template(templates: ChatTemplates | None, name: str | None = None, tools: Any = None) -> str:
    """The template to render: ``name`` (a stored template's name, or a template's own text), else the stored one;
    of several, ``"tool_use"`` when tools are given and it exists, else ``"default"``."""
    if isinstance(templates, dict):
        if name is not None:
            return templates.get(name, name)
        chosen = "tool_use" if tools is not None and "tool_use" in templates else "default"
        if chosen not in templates:
            raise ValueError(f"several chat templates ({sorted(templates)}) and none named 'default': pass "
                             "chat_template=<name>")  # fmt: skip
        return templates[chosen]
    if name is not None:
        return name
    if templates is None:
        raise ValueError("no chat template: the directory stores none (chat_template.jinja); pass chat_template=")
    return templates


def render_chat(
    template: str,
    messages: Sequence[Any],
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    **variables: Any,
) -> str:
    """``messages`` (``{"role", "content"}`` dicts, dataclasses or pydantic-style objects; content a text or a list of
    blocks) as ``template`` renders them. ``variables`` (the tokenizer's special tokens, ``enable_thinking``, ...)
    are visible to the template. A message's reasoning, under any of ``reasoning_content``, ``thinking`` and
    ``reasoning``, is given under the first two. ``continue_final_message``: the text ends inside the last message's
    content (or the field it names, e.g. ``"reasoning_content"``), for the model to go on with it."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other")
    chat = [_plain(message_dict(message, number)) for number, message in enumerate(messages)]
    chat = [_with_reasoning({key: value for key, value in message.items() if value is not None}) for message in chat]
    if any(not isinstance(tool, Mapping) for tool in tools or ()):
        raise TypeError("tools must be JSON schemas (dicts); vlkit does not turn functions into schemas")
    final = ""
    if continue_final_message:
        final = _tag_final_message(
            chat, template, "content" if continue_final_message is True else continue_final_message
        )
    rendered = _compiled(template).render(
        messages=chat,
        tools=_plain(None if tools is None else list(tools)),
        documents=_plain(None if documents is None else list(documents)),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    if continue_final_message:
        if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError("continue_final_message: the template does not render the last message's text")
        end = rendered.rindex(_CONTINUE_TAG.strip())
        kept = rendered[end : end + len(_CONTINUE_TAG)] == _CONTINUE_TAG
        rendered = rendered[:end] if kept else rendered[:end].rstrip()
    return rendered


def render_chats(
    templates: ChatTemplates | None,
    conversation: Sequence[Any],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    **variables: Any,
) -> tuple[list[str], bool]:
    """``conversation`` (a list of messages, or a batch of such lists) rendered with the template ``pick_template``
    chooses -> (one text per conversation, whether a batch was given)."""
    template = pick_template(templates, chat_template, tools)
    batch, batched = conversations_of(conversation)
    texts = [
        render_chat(template, chat, add_generation_prompt, continue_final_message, tools, documents, **variables)
        for chat in batch
    ]
    return texts, batched


def refuse_unimplemented(options: Mapping[str, Any], names: Sequence[str]) -> None:
    """transformers' ``apply_chat_template`` options vlkit does not implement, given a value, are errors rather than
    template variables."""
    given = [name for name in names if options.get(name)]
    if given:
        raise ValueError(f"vlkit's apply_chat_template does not implement {', '.join(given)}")


def conversations_of(conversation: Sequence[Any]) -> tuple[list[list[Mapping[str, Any]]], bool]:
    """One conversation (a list of messages) or a batch of them -> (the batch, whether it was one)."""
    if not conversation:
        raise ValueError("an empty conversation: give at least one message")
    batched = isinstance(conversation[0], list | tuple)
    batch = [list(chat) for chat in conversation] if batched else [list(conversation)]
    return batch, batched


def _tag_final_message(chat: list[dict[str, Any]], template: str, field: str) -> str:
    """Marks where the last message's ``field`` ends (its text, or its last text block's; reasoning in each name it
    is given under); returns that text."""
    if not chat or chat[-1].get(field) is None:
        raise ValueError(f"continue_final_message: the last message has no {field!r} to continue")
    message = chat[-1]
    final = message[field]
    fields = [name for name in _REASONING_FIELDS if message.get(name) == final] if field in _REASONING_FIELDS else []
    fields = fields or [field]
    if not any(name in template for name in fields):
        raise ValueError(f"continue_final_message: the chat template reads no {field!r}")
    if isinstance(final, list | tuple):
        for block in reversed(final):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message: the last message has no text block to continue")
    for name in fields:
        message[name] = str(message[name]) + _CONTINUE_TAG
    return str(final)


def message_dict(message: Any, number: int = 0) -> Mapping[str, Any]:
    """A message as a mapping: a dict as it is, a dataclass or pydantic-style object (the OpenAI SDK's) by its
    fields."""
    if isinstance(message, Mapping):
        return message
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
    if callable(getattr(message, "model_dump", None)):
        return message.model_dump()
    raise TypeError(f"message {number} is a {type(message).__name__}, not a dict: {message!r}")


def _with_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """A message's reasoning, given under any of its names, under ``thinking`` and ``reasoning_content`` too."""
    reasoning = next((message[name] for name in _REASONING_FIELDS if message.get(name) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """``value`` rebuilt of plain JSON types; anything else (images, arrays) as ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (a str enum) back to the base type's value, not the enum's name
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' marker of the assistant's text; renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension API)

    def parse(self, parser: Any) -> nodes.Node:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (no way to CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's own signature trick, so namespace(self=...) works
        self, rest = args[0], args[1:]
        attributes = dict(*rest, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compiled(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda format: datetime.now().strftime(format),
        dict=_Dict(),
        namespace=_Namespace,
    )
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ValueError(f"the chat template does not parse (line {error.lineno}): {error.message}") from None

"""Chat templates: a conversation (roles, text, image placeholders) -> prompt text, or -> token ids with labels.

    render(conversation, template) -> str                     the prompt text, ending with the generation prompt
    tokenize_conversation(conversation, template, tokenizer, image_token, tokens_per_image)
        -> TokenizedConversation(input_ids (T,), labels (T,))  labels = ids on assistant text + end-of-turn, else -100
    tokenize_prompt(...) -> input_ids (T,)                     the same segments, ending with the generation prompt
    decode_answer(tokenizer, ids, end_of_answer_ids(...)) -> str  generated ids back to the answer's text

A template is a handful of literal strings (role prefixes, end-of-turn, ...). A conversation becomes a list of
segments, each a piece of text or one image, each marked trained-on or not; every text segment is tokenized on its
own and each ``<image>`` becomes ``tokens_per_image`` copies of the image token's id. Label boundaries are therefore
segment boundaries: nothing searches the rendered string for where an answer starts, so a tokenizer that merges
across a boundary, or a system prompt of unexpected length, cannot shift the labels. That is the failure LLaVA
guards against with its "tokenization mismatch" warning (Liu et al., 2023, "Visual Instruction Tuning"), whose
outcome is a sample that trains on nothing. Inference must use the same segmentation (``tokenize_prompt``), not a
tokenization of ``render``'s text, to see exactly the tokens the model was trained on.

Shipped templates: ``vicuna_v1`` (LLaVA-1.5's conversation format), ``chatml`` (Qwen's), ``plain`` (LLaVA's
stage-1 feature alignment: the image, then its caption, no roles) and ``shapes`` (vlkit's own BPE, which puts a
space before every segment and knows ``<bos>`` / ``<eos>``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from tokenizers import Tokenizer as _HFTokenizer

from vlkit.text.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass
class Conversation:
    """Turns plus the images their ``<image>`` placeholders stand for, in order of appearance.

    ``item`` names where the conversation came from ("data.json[17]"), so errors can point at it.
    """

    turns: list[Turn]
    images: list[str | Image.Image] = field(default_factory=list)
    id: str | None = None
    item: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.item or (f"conversation {self.id!r}" if self.id is not None else "conversation")


def conversation_problem(
    conversation: Conversation, expect: Literal["answer", "prompt", "any"] = "answer"
) -> str | None:
    """Why ``conversation`` cannot be used, or None. ``expect`` is what the last turn must be: an assistant answer
    (training data), a user message (a prompt to answer), or either."""
    turns = conversation.turns
    if not turns:
        return "has no turns"
    for number, turn in enumerate(turns):
        if turn.role not in ROLES:
            return f"turn {number} has unknown role {turn.role!r}; expected one of {list(ROLES)}"
        if not isinstance(turn.content, str) or not turn.content.strip():
            return f"turn {number} ({turn.role}) is empty"
        if turn.role == "system" and number != 0:
            return f"turn {number} is a system turn; only the first turn may be one"
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.content:
            return f"turn {number} ({turn.role}) holds {IMAGE_PLACEHOLDER}; images belong in user turns"
    offset = 1 if turns[0].role == "system" else 0
    dialogue = turns[offset:]
    if not dialogue:
        return "has only a system turn"
    for number, turn in enumerate(dialogue):
        expected = "user" if number % 2 == 0 else "assistant"
        if turn.role != expected:
            return f"roles do not alternate: turn {number + offset} is {turn.role}, expected {expected}"
    placeholders = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(conversation.images):
        return f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(conversation.images)} image(s)"
    last = dialogue[-1].role
    if expect == "answer" and last != "assistant":
        if any(turn.role == "assistant" for turn in dialogue):
            return "ends with a user turn that nothing answers; training data ends with an answer (drop the last turn)"
        return "has no assistant turn; training on it would learn nothing"
    if expect == "prompt" and last != "user":
        return "ends with an assistant turn; a prompt must end with the user's message"
    return None


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class ChatTemplate:
    """The literal strings around each turn. A user turn is ``user_prefix + content + user_suffix``; an assistant
    turn is ``assistant_prefix + content + end_of_turn + assistant_suffix`` and only ``content + end_of_turn`` is
    trained on. ``assistant_prefix`` is also the generation prompt. ``begin`` starts every token sequence but is
    left out of ``render``, whose text goes to tokenizers that add their own begin-of-sequence token.

    ``system_format`` (with ``{system}``) wraps the system prompt, the conversation's system turn or else
    ``default_system``; None means the format has no system prompt and a system turn is an error.
    ``image_separator`` follows an image that leads a user's message (``image_prompt``): LLaVA's ``"<image>\n"``.
    ``caption_only`` is LLaVA's ``plain`` pre-training format: one user turn and one answer, and of the user turn
    only its images are kept. ``special_tokens`` are the strings a tokenizer should hold as single tokens.
    """

    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    end_of_turn: str
    assistant_suffix: str = ""
    begin: str = ""
    system_format: str | None = None
    default_system: str = ""
    caption_only: bool = False
    special_tokens: tuple[str, ...] = ()
    image_separator: str = "\n"

    def __post_init__(self) -> None:
        if not self.end_of_turn:
            raise ValueError(f"template {self.name!r}: end_of_turn must be non-empty (it is how an answer stops)")
        if self.system_format is not None and "{system}" not in self.system_format:
            raise ValueError(f"template {self.name!r}: system_format must contain {{system}}")


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5 (conv_vicuna_v1): "SYSTEM USER: q ASSISTANT: a</s>USER: ..."; the Llama tokenizer's <s> begins it.
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        begin="<s>",
        system_format="{system} ",
        default_system=_VICUNA_SYSTEM,
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT: ",
        end_of_turn="</s>",
        special_tokens=("<s>", "</s>"),
    ),
    # Qwen: "<|im_start|>role\n...<|im_end|>\n" with Qwen2's default system prompt.
    "chatml": ChatTemplate(
        name="chatml",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        assistant_suffix="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    # LLaVA's stage-1 "plain" format: image tokens then the caption and "\n"; the user's words are dropped.
    "plain": ChatTemplate(
        name="plain",
        user_prefix="",
        user_suffix="",
        assistant_prefix="",
        end_of_turn="\n",
        caption_only=True,
    ),
    # vlkit's ShapesWorld BPE adds a space before every segment itself, so no segment ends with one.
    "shapes": ChatTemplate(
        name="shapes",
        begin="<bos>",
        user_prefix="user:",
        user_suffix="",
        assistant_prefix=" assistant:",
        end_of_turn="<eos>",
        special_tokens=("<bos>", "<eos>"),
        # The question straight after the image: this BPE spells a newline as two tokens of its own.
        image_separator="",
    ),
}


def image_prompt(template: ChatTemplate | str, text: str, images: int = 1) -> str:
    """A user's message that shows ``images`` images, then says ``text``: each ``<image>`` followed by the template's
    ``image_separator``, as the template's models are trained (vlkit's ShapesWorld conversations, LLaVA's data)."""
    return (IMAGE_PLACEHOLDER + get_template(template).image_separator) * images + text


def get_template(template: ChatTemplate | str) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose from {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[template]


# ---------------------------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class _Segment:
    text: str | None  # None: one image
    trained: bool = False


def _segments(
    conversation: Conversation, template: ChatTemplate, expect: Literal["answer", "prompt"], begin: bool
) -> list[_Segment]:
    problem = conversation_problem(conversation, expect)
    if problem is not None:
        raise ValueError(f"{conversation.name}: {problem}")
    turns = conversation.turns
    system = turns[0].content if turns[0].role == "system" else template.default_system
    if turns[0].role == "system" and template.system_format is None:
        raise ValueError(f"{conversation.name}: chat template {template.name!r} has no system prompt")
    if template.caption_only and sum(turn.role == "user" for turn in turns) != 1:
        raise ValueError(f"{conversation.name}: chat template {template.name!r} takes one user turn and one answer")
    segments = [_Segment(template.begin)] if begin else []
    if template.system_format is not None and system:
        segments.append(_Segment(template.system_format.format(system=system)))
    for turn in turns:
        if turn.role == "user":
            segments.append(_Segment(template.user_prefix))
            pieces = turn.content.split(IMAGE_PLACEHOLDER)
            for number, piece in enumerate(pieces):
                if number:
                    segments.append(_Segment(None))
                if not template.caption_only:
                    segments.append(_Segment(piece))
            segments.append(_Segment(template.user_suffix))
        elif turn.role == "assistant":
            segments += [_Segment(template.assistant_prefix), _Segment(turn.content, trained=True)]
            segments += [_Segment(template.end_of_turn, trained=True), _Segment(template.assistant_suffix)]
    if expect == "prompt":
        segments.append(_Segment(template.assistant_prefix))
    return [segment for segment in segments if segment.text != ""]


def render(conversation: Conversation, template: ChatTemplate | str, add_generation_prompt: bool = True) -> str:
    """The conversation as text, ``<image>`` placeholders kept (a processor expands them). With
    ``add_generation_prompt`` the conversation must end with a user turn and the text ends with the assistant's
    prefix; without it, it must end with an answer and the text is the full training sequence minus ``begin``."""
    template = get_template(template)
    segments = _segments(conversation, template, "prompt" if add_generation_prompt else "answer", begin=False)
    return "".join(IMAGE_PLACEHOLDER if segment.text is None else segment.text for segment in segments)


# ---------------------------------------------------------------------------------------------- tokenization


class TokenizedConversation(NamedTuple):
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long; IGNORE_INDEX except on assistant text and end-of-turn


def segment_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """text -> ids without any added special tokens, for vlkit's ``Tokenizer``, a ``tokenizers.Tokenizer`` or a
    transformers tokenizer (anything with ``encode(text, add_special_tokens=False)``)."""
    if isinstance(tokenizer, Tokenizer):  # remembers what it encoded
        return tokenizer.encode_plain
    backend = getattr(tokenizer, "backend", tokenizer)
    if isinstance(backend, _HFTokenizer):
        return lambda text: backend.encode(text, add_special_tokens=False).ids
    if callable(getattr(tokenizer, "encode", None)):
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False))
    raise TypeError(f"cannot tokenize with a {type(tokenizer).__name__}; pass a vlkit, tokenizers or HF tokenizer")


def single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when the tokenizer holds it as one token, else None."""
    ids = segment_encoder(tokenizer)(token)
    return ids[0] if len(ids) == 1 else None


def end_of_answer_ids(template: ChatTemplate | str, tokenizer: Any, eos_ids: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids an answer ends at: ``eos_ids``, the tokenizer's end-of-sequence token, and the template's end of
    turn where the tokenizer holds it as one token (what training puts after every assistant turn)."""
    ids = [
        *eos_ids,
        getattr(tokenizer, "eos_token_id", None),
        single_token_id(tokenizer, get_template(template).end_of_turn),
    ]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def decode_answer(tokenizer: Tokenizer, ids: Sequence[int], stop_ids: Collection[int]) -> str:
    """The text before the first of ``stop_ids`` (an answer's end), special tokens (``<ref>``, ``<box>``) kept."""
    ids = list(ids)
    end = next((position for position, token in enumerate(ids) if token in stop_ids), len(ids))
    return tokenizer.backend.decode(ids[:end], skip_special_tokens=False).strip()


def tokenize_conversation(
    conversation: Conversation,
    template: ChatTemplate | str,
    tokenizer: Any,
    image_token: str | int,
    tokens_per_image: int | Sequence[int],
    max_len: int | None = None,
) -> TokenizedConversation:
    """Token ids and labels for training: each ``<image>`` becomes ``tokens_per_image`` (one count for every image,
    or one per image in order) copies of ``image_token`` (a token string the tokenizer holds as one token, or an id).

    A conversation without an answer, or longer than ``max_len``, is an error rather than a sample whose labels are
    all ignored: the sequence is never cut, because a cut could remove every trained-on token.
    """
    template = get_template(template)
    segments = _segments(conversation, template, "answer", begin=True)
    return _tokenize(conversation, segments, tokenizer, image_token, tokens_per_image, max_len)


def tokenize_prompt(
    conversation: Conversation,
    template: ChatTemplate | str,
    tokenizer: Any,
    image_token: str | int,
    tokens_per_image: int | Sequence[int],
    max_len: int | None = None,
) -> torch.Tensor:
    """(T,) ids of a prompt ending with the generation prompt, segmented exactly as in training."""
    template = get_template(template)
    segments = _segments(conversation, template, "prompt", begin=True)
    return _tokenize(conversation, segments, tokenizer, image_token, tokens_per_image, max_len).input_ids


def _tokenize(
    conversation: Conversation,
    segments: list[_Segment],
    tokenizer: Any,
    image_token: str | int,
    tokens_per_image: int | Sequence[int],
    max_len: int | None,
) -> TokenizedConversation:
    encode = segment_encoder(tokenizer)
    image_id = image_token if isinstance(image_token, int) else single_token_id(tokenizer, image_token)
    if image_id is None:
        raise ValueError(
            f"image token {image_token!r} is not a single token of this tokenizer; add it as a special token"
        )
    num_images = sum(segment.text is None for segment in segments)
    counts = [tokens_per_image] * num_images if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if len(counts) != num_images:
        raise ValueError(f"{conversation.name}: {num_images} image(s) but {len(counts)} tokens_per_image entries")
    if any(count < 1 for count in counts):
        raise ValueError(f"{conversation.name}: tokens_per_image must be positive, got {counts}")
    input_ids: list[int] = []
    labels: list[int] = []
    images = iter(counts)
    for segment in segments:
        ids = [image_id] * next(images) if segment.text is None else encode(segment.text)
        input_ids += ids
        labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
    if max_len is not None and len(input_ids) > max_len:
        raise ValueError(f"{conversation.name}: {len(input_ids)} tokens; at most {max_len} fit")
    return TokenizedConversation(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))

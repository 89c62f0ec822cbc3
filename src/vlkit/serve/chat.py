"""Chat with a vision-language model about one image: ``vlkit chat --model DIR --image PATH [--prompt TEXT]``.

The prompt is rendered with the model's chat template (``VLMConfig.chat_template``), the ``<image>`` placeholder
expanded to the bridge's token count, and the answer is generated with the model's decoding defaults (a checkpoint's
``generation_config.json``: sampling, repetition penalty; greedy without one) with the tokens printed as they are
produced. Without ``--prompt`` the session is interactive: each question joins the conversation so far. A model
whose Q-Former reads the prompt (``VLMConfig.bridge_reads_prompt``) reads the latest question.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from vlkit.data.images import load_image
from vlkit.data.transforms import ImageTransform
from vlkit.models.vlm import VisionLanguageModel
from vlkit.text.chat import Conversation, Turn, end_of_answer_ids, image_prompt, tokenize_prompt

# An answer's token budget for a model without decoding defaults of its own.
CHAT_MAX_NEW_TOKENS = 64

__all__ = ["ChatSession", "load_chat_model"]


def load_chat_model(path: str | Path) -> VisionLanguageModel:
    from vlkit.hub import from_pretrained

    model = from_pretrained(path)
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a vision-language model: chat needs one")
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: chat needs one")
    return model.eval()


class ChatSession:
    """One image and the turns so far; ``ask`` streams the answer's text pieces and keeps the answer as a turn."""

    def __init__(
        self, model: VisionLanguageModel, image: str | Path, max_new_tokens: int | None = None, **options: Any
    ) -> None:
        """``max_new_tokens`` None: the model's ``generation_config``'s (``CHAT_MAX_NEW_TOKENS`` without one);
        ``options``: ``GenerationConfig`` fields over the model's decoding defaults."""
        self.model = model
        self.image = load_image(image)
        self.pixels = ImageTransform(image_size=model.config.vision.image_size)(self.image)[None]  # (1, 3, H, W)
        self.turns: list[Turn] = []
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.eos_ids = set(
            end_of_answer_ids(model.config.chat_template, model.tokenizer, model.config.lm.eos_token_ids)
        )

    def ask(self, question: str) -> Iterator[str]:
        text = question if self.turns else image_prompt(self.model.config.chat_template, question)
        conversation = Conversation([*self.turns, Turn("user", text)], [self.image])
        prompt = tokenize_prompt(conversation, self.model.config.chat_template, self.model.tokenizer,
                                 self.model.config.image_token_id, self.model.tokens_per_image())[None]  # fmt: skip
        produced: list[int] = []
        pieces: list[str] = []
        ended = False
        decode = self.model.tokenizer.backend.decode

        def streamer(tokens: torch.Tensor) -> None:
            nonlocal ended
            token = int(tokens[0])
            ended = ended or token in self.eos_ids  # the answer ends at its first end-of-turn token, shown or not
            if ended:
                return
            before = decode(produced, skip_special_tokens=False)
            produced.append(token)
            pieces.append(decode(produced, skip_special_tokens=False)[len(before) :])

        # A Q-Former that reads the prompt reads the question being asked (the image is embedded anew each turn).
        read = self.model.prompt_ids([question]) if self.model.config.bridge_reads_prompt else None
        answer = []
        for piece in _streamed(self.model, prompt, self.pixels, self.max_new_tokens, streamer, pieces, self.options,
                               read, self.eos_ids):  # fmt: skip
            answer.append(piece)
            yield piece
        self.turns += [Turn("user", text), Turn("assistant", "".join(answer).strip() or "…")]


def _streamed(
    model: VisionLanguageModel,
    prompt: torch.Tensor,
    pixels: torch.Tensor,
    max_new_tokens: int | None,
    streamer: Callable[[torch.Tensor], None],
    pieces: list[str],
    options: dict[str, Any],
    qformer_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
    end_of_turn: set[int] | frozenset[int] = frozenset(),
) -> Iterator[str]:
    """Yields each new piece of text as soon as its token exists (generation runs token by token in a generator).
    Generation stops at the model's stop tokens and at the template's ``end_of_turn`` ids (a ChatML checkpoint whose
    end-of-sequence is ``<|endoftext|>`` ends its turns with ``<|im_end|>``), rather than running on to the budget."""
    from vlkit.lm.generate import decoding_config, stream_generate

    # The checkpoint's decoding defaults (sampling, repetition penalty; greedy without them), the session's over them.
    if max_new_tokens is None and model.generation_config is None:
        max_new_tokens = CHAT_MAX_NEW_TOKENS
    config = decoding_config(model.lm, max_new_tokens, **options)
    stops = model.lm.config.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
    config = replace(config, stop_token_ids=tuple(dict.fromkeys([*stops, *sorted(end_of_turn)])))
    with torch.no_grad():  # the image's embeddings too: no graph through the tower is kept while the answer runs
        embeds = model.embed_inputs(prompt, pixels, *(qformer_prompt or ()))
        blocks = model.attention_blocks(prompt)
        for tokens in stream_generate(
            model.lm, prompt, torch.ones_like(prompt), embeds, config, attention_blocks=blocks
        ):
            streamer(tokens)
            while pieces:
                yield pieces.pop(0)


def run_chat(model_dir: str, image: str, prompt: str | None, max_new_tokens: int | None,
             out: TextIO | None = None, read: Callable[[str], str] = input) -> int:  # fmt: skip
    # sys.stdout as it is when called (None), not as it was at import: a redirected stdout gets the answer.
    out = sys.stdout if out is None else out
    session = ChatSession(load_chat_model(model_dir), image, max_new_tokens)
    questions = [prompt] if prompt is not None else None
    while True:
        if questions is not None:
            if not questions:
                return 0
            question = questions.pop(0)
        else:
            try:
                question = read("you> ").strip()
            except EOFError:
                return 0
            if question in ("", "exit", "quit"):
                return 0
        if questions is None:
            out.write("model> ")
        for piece in session.ask(question):
            out.write(piece)
            out.flush()
        out.write("\n")

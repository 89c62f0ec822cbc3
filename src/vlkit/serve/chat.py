"""Chat with a vision-language model about one image: ``vlkit chat --model DIR --image PATH [--prompt TEXT]``.

The directory's processor (``vlkit.load_processor``) prepares the image and the prompt, so the model sees what it
was trained on:

- a model vlkit trained: its image transform, and its chat template (``VLMConfig.chat_template``) segment by segment,
  as its training and evaluation prompt it;
- a converted checkpoint: its image processor, and the Jinja chat template it ships, rendered and tokenized as one
  text, as transformers' ``apply_chat_template`` does; one that ships none gets vlkit's template for its language
  model (``vicuna_v1``, ``chatml``; a BLIP-2 model's images alone, its question read by nothing else) as one text.

The answer is generated with the model's decoding defaults (a checkpoint's ``generation_config.json``: sampling,
repetition penalty; greedy without one), its tokens printed as they are produced. Without ``--prompt`` the session
is interactive: each question joins the conversation so far. A model whose Q-Former reads the prompt
(``VLMConfig.bridge_reads_prompt``) reads the latest question.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from vlkit.data.images import load_image
from vlkit.data.processors import (
    Blip2Processor,
    ChatProcessor,
    Processor,
    ProcessorOutput,
    VLMProcessor,
    load_processor,
)
from vlkit.models.vlm import VisionLanguageModel
from vlkit.text.chat import (
    IMAGE_PLACEHOLDER,
    Conversation,
    Turn,
    end_of_answer_ids,
    get_template,
    image_prompt,
    render,
)

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
        self, model: VisionLanguageModel, image: str | Path, max_new_tokens: int | None = None,
        processor: Processor | None = None, **options: Any,
    ) -> None:  # fmt: skip
        """``max_new_tokens`` None: the model's ``generation_config``'s (``CHAT_MAX_NEW_TOKENS`` without one);
        ``processor``: the model directory's (``vlkit.load_processor``), else the one a vlkit-trained model has;
        ``options``: ``GenerationConfig`` fields over the model's decoding defaults."""
        if processor is not None and not isinstance(processor, ChatProcessor | VLMProcessor):
            raise ValueError(f"a {type(processor).__name__} prepares no prompts: chat needs a vision-language model's")
        self.model = model
        self.processor = processor if processor is not None else ChatProcessor.for_model(model)
        self.image = load_image(image)
        self.turns: list[Turn] = []
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.eos_ids = set(
            end_of_answer_ids(model.config.chat_template, model.tokenizer, model.config.lm.eos_token_ids)
        )

    def inputs(self, question: str) -> ProcessorOutput:
        """The model's inputs for the conversation so far and ``question``: the image's in its first message."""
        turns = [*self.turns, Turn("user", question)]
        processor = self.processor
        if isinstance(processor, ChatProcessor) or processor.chat_template is not None:
            messages = [
                {"role": turn.role, "content": [*([{"type": "image", "image": self.image}] if number == 0 else []),
                                                {"type": "text", "text": turn.content}]}
                for number, turn in enumerate(turns)
            ]  # fmt: skip
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        # A converted checkpoint that ships no template: vlkit's for its language model, tokenized as one text.
        template = get_template(self.model.config.chat_template)
        if template.caption_only:  # BLIP-2's "plain": the image alone, each question asked afresh
            turns = turns[-1:]
        first = Turn("user", image_prompt(template, turns[0].content))
        text = render(Conversation([first, *turns[1:]], [self.image]), template)
        if isinstance(processor, Blip2Processor):  # its processor puts the image's queries in front of the text
            text = text.replace(IMAGE_PLACEHOLDER, "")
        return processor(images=[self.image], text=text)

    def ask(self, question: str) -> Iterator[str]:
        inputs = self.inputs(question)
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

        answer = []
        for piece in _streamed(self.model, inputs, self.max_new_tokens, streamer, pieces, self.options, self.eos_ids):
            answer.append(piece)
            yield piece
        # Kept for the next prompt, where an image token the model wrote would stand for an image that is not there.
        kept = "".join(answer).replace(getattr(self.processor, "image_token", IMAGE_PLACEHOLDER), "").strip()
        self.turns += [Turn("user", question), Turn("assistant", kept or "…")]


def _streamed(
    model: VisionLanguageModel,
    inputs: ProcessorOutput,
    max_new_tokens: int | None,
    streamer: Callable[[torch.Tensor], None],
    pieces: list[str],
    options: dict[str, Any],
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
    prompt = inputs["input_ids"]  # (1, T)
    reads = [inputs.get(name) for name in ("qformer_input_ids", "qformer_attention_mask")]
    with torch.no_grad():  # the image's embeddings too: no graph through the tower is kept while the answer runs
        embeds = model.embed_inputs(prompt, inputs.get("pixel_values"), *reads)
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
    session = ChatSession(load_chat_model(model_dir), image, max_new_tokens, load_processor(model_dir))
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

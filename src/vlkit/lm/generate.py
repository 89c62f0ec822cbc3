"""Batched generation with a preallocated KV cache: greedy, or sampling with temperature / top-k / top-p (Holtzman
et al., 2020), repetition penalty (Keskar et al., 2019), stop tokens and stop strings, streaming.

``stream_generate(model, input_ids (B, T), attention_mask, inputs_embeds, config)`` yields the new token of every row
per step (B,); ``generate`` collects them into prompt + new ids (B, T + steps), as transformers' decoder-only
``generate`` does: a finished row continues with ``pad_token_id``, and generation ends when every row has finished or
after ``max_new_tokens``. Prompts are left-padded. Per step the host does no more than the model's forward pass, one
argmax (or sampling) and, only when stop tokens exist, one check whether every row has finished.

Decoding defaults: a model may carry a ``generation_config`` (a checkpoint's ``generation_config.json``, read by
``vlkit.convert``). ``generate`` / ``stream_generate`` without a ``config`` start from it (greedy
``GenerationConfig()`` when the model has none); ``decoding_config(model, **options)`` puts a caller's fields over
it (``max_new_tokens=8`` keeps the checkpoint's repetition penalty), as transformers' ``generate(**kwargs)`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vlkit.lm.model import DecoderLM


@dataclass(frozen=True)
class GenerationConfig:
    """``stop_token_ids`` None: the model's end-of-sequence ids; ``()``: none (only ``stop_strings`` and
    ``max_new_tokens`` end an answer). ``pad_token_id`` None: a config that names its stop ids pads with the first of
    them (none when it names none), as transformers does with a generation config without a pad id; one that takes the
    model's stop ids takes its pad id too, else the first of its end-of-sequence ids. A pad id that is a stop id implies
    no attention mask (see ``_implied_mask``). ``temperature``, ``top_k`` and ``top_p`` apply only with ``do_sample``
    (transformers' defaults: top-k 50, no top-p; ``top_k`` None or 0 is no top-k, ``top_p`` 0 keeps the most likely
    token; ``temperature`` <= 0 is accepted when greedy); the repetition penalty applies to greedy decoding too.
    ``min_new_tokens``: the stop tokens cannot end an answer before that many new tokens (transformers'
    ``MinNewTokensLengthLogitsProcessor``)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError(f"max_new_tokens and min_new_tokens must be >= 0, got {self.max_new_tokens}, "
                             f"{self.min_new_tokens}")  # fmt: skip
        if self.temperature <= 0 and self.do_sample:  # greedy reads no temperature (transformers' 0.0 for greedy)
            raise ValueError(f"temperature must be positive (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings is a tuple of strings, not one string")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists); ``from_dict`` reads them back."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GenerationConfig fields {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("stop_token_ids", "stop_strings"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def decoding_config(model: Any, max_new_tokens: int | None = None, **options: Any) -> GenerationConfig:
    """``model``'s decoding defaults (its ``generation_config``, else greedy ``GenerationConfig()``) with the given
    fields over them; ``max_new_tokens`` None keeps the defaults' (the checkpoint's, else 32). As in transformers, the
    caller's stop ids leave the defaults' pad id as it was: defaults that take the model's stop ids (no checkpoint
    file, or vlkit's own) keep the model's pad id; those of a ``generation_config.json`` without a pad id pad with the
    first of the caller's."""
    config = getattr(model, "generation_config", None) or GenerationConfig()
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if "eos_token_id" in options:  # transformers' name for the stop tokens
        eos = options.pop("eos_token_id")
        options["stop_token_ids"] = None if eos is None else tuple(torch.as_tensor(eos).flatten().tolist())
    unknown = sorted(set(options) - {field.name for field in fields(GenerationConfig)})
    if unknown:
        raise TypeError(f"unknown generation options {unknown}")
    named = options.get("stop_token_ids") is not None and options.get("pad_token_id") is None
    if named and config.stop_token_ids is None and config.pad_token_id is None:
        options["pad_token_id"] = getattr(getattr(model, "config", None), "pad_token_id", None)
    return replace(config, **options) if options else config


def _special_ids(config: GenerationConfig, model_config: Any) -> tuple[tuple[int, ...], int | None]:
    """The stop ids and the pad id that ``config`` decodes with on a model of ``model_config`` (its
    ``eos_token_ids`` and ``pad_token_id``), by ``GenerationConfig``'s rule; the pad id is None where there is none."""
    if config.stop_token_ids is not None:
        stop_ids, fallback = tuple(config.stop_token_ids), None
    else:
        stop_ids, fallback = tuple(model_config.eos_token_ids), model_config.pad_token_id
    if config.pad_token_id is not None:
        return stop_ids, config.pad_token_id
    return stop_ids, fallback if fallback is not None else (stop_ids[0] if stop_ids else None)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the sequence: a positive logit is divided by ``penalty``, a negative one
    multiplied by it. ``logits`` (B, V), ``seen`` bool (B, V)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): ``warp_logits``, then a draw."""
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) fp32: temperature, then top-k, then top-p (nucleus), the dropped tokens at -inf, each as transformers'
    warpers compute it (ties included: which of equally likely tokens top-p keeps follows its sort)."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # From the least likely up: drop tokens while their cumulative probability stays within 1 - top_p, and keep
        # the most likely one whatever top_p is.
        ordered, order = torch.sort(logits, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _implied_mask(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad: int | None, stop_ids: Sequence[int]
) -> torch.Tensor | None:
    """Padded ids given without their mask: the mask the pad id implies, as transformers infers it (a pad id that is
    no stop id, and present in the ids); None where nothing is implied. A mask that is no left
    padding (a right-padded batch, or a prompt ending with the pad id's token) is refused by ``_check_prompt``."""
    if attention_mask is not None or input_ids is None or pad is None or pad in stop_ids:
        return attention_mask
    implied = input_ids != pad
    return None if bool(implied.all()) else implied.long()


def _check_prompt(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> tuple[int, int]:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("generate needs input_ids or inputs_embeds")
    shape = tuple(inputs_embeds.shape[:2]) if inputs_embeds is not None else tuple(input_ids.shape)  # type: ignore[union-attr]
    if input_ids is not None and tuple(input_ids.shape) != shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {shape} describe different prompts")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {shape}")
        if shape[1] and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: every row's last position must be a real token "
                             "(a processor pads so with padding_side='left'; ids given without attention_mask are "
                             "masked where they hold the pad id, as in transformers)")  # fmt: skip
    return shape  # type: ignore[return-value]


def stream_generate(
    model: DecoderLM,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    attention_blocks: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,) (``pad_token_id`` for rows that have finished).

    ``inputs_embeds`` (B, T, E), when given, is what the model reads for the prompt (a VLM's merged text and image
    embeddings); ``input_ids`` then only feed the repetition penalty. ``attention_blocks`` (B, T): the prompt's
    bidirectional blocks (``DecoderLM.forward_features``). Runs without autograd. ``config`` None: the model's
    decoding defaults (``decoding_config(model)``). Stop strings are matched in text decoded by ``decode``, by default
    the model's tokenizer (special tokens kept).
    """
    config = decoding_config(model) if config is None else config
    if config.stop_strings and decode is None:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("stop_strings need a decode function (a tokenizer's decode)")
        # The model's tokenizer, special tokens kept: "<|im_end|>" is a stop string as any other.
        decode = functools.partial(model.tokenizer.decode, skip_special_tokens=False)
    stop_ids, pad = _special_ids(config, model.config)
    attention_mask = _implied_mask(input_ids, attention_mask, pad, stop_ids)
    _check_prompt(input_ids, attention_mask, inputs_embeds)
    if config.max_new_tokens == 0:
        return iter(())
    # Without a pad id only stop strings can finish a row; it then continues with 0.
    steps = _steps(model, input_ids, attention_mask, inputs_embeds, attention_blocks, config, stop_ids,
                   0 if pad is None else pad, generator, decode)  # fmt: skip
    # The steps run in inference mode; cloned outside it, the tokens a caller receives are ordinary tensors (an
    # inference tensor cannot be saved for backward, e.g. by an embedding lookup of the generated ids).
    return (tokens.clone() for tokens in steps)


# Inference mode, not only no_grad: tensors skip version counting and autograd's dispatch, which takes ~0.5 ms off
# each decode step of bench/generate.py (of ~9-11 ms). As a decorator it is switched on and off around each step.
@torch.inference_mode()
def _steps(
    model: DecoderLM,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_blocks: torch.Tensor | None,
    config: GenerationConfig,
    stop_ids: tuple[int, ...],
    pad: int,
    generator: torch.Generator | None,
    decode: Callable[[Sequence[int]], str] | None,
) -> Iterator[torch.Tensor]:
    batch, prompt_len = _check_prompt(input_ids, attention_mask, inputs_embeds)
    device = model.token_embed.weight.device
    cache = model.new_cache(batch, prompt_len + config.max_new_tokens)
    view = cache.view(cache.allocate(batch))
    hidden = model.forward_features(
        None if inputs_embeds is not None else input_ids,
        attention_mask,
        inputs_embeds,
        cache=view,
        attention_blocks=attention_blocks,
    )
    # (B, V) in fp32, as transformers' generate takes them: a bf16 model's penalty and sampling then match its.
    logits = model.forward_head(hidden[:, -1]).float()  # the prompt's other positions need no logits
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        if input_ids is not None:
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            counts = torch.zeros(seen.shape, device=device).scatter_add_(
                1, input_ids.to(device), real.float().to(device)
            )
            seen = counts > 0
    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Stop strings are looked for in the last `window` ids of each row: at least one byte per token, so a window of
    # the longest stop string's bytes holds it even when every character takes several byte tokens. The prompt's
    # tail leads, so that a stop string begun in the prompt and completed by a new token stops (as transformers does).
    window = max((len(s.encode("utf-8")) for s in config.stop_strings), default=0) + 8
    texts: list[list[int]] = [[] for _ in range(batch)]
    if config.stop_strings and input_ids is not None:
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        texts = [row[keep].tolist()[-window:] for row, keep in zip(input_ids.cpu(), real.cpu(), strict=True)]
    for step in range(config.max_new_tokens):
        if seen is not None:
            logits = penalize_repetition(logits, seen, config.repetition_penalty)
        if step < config.min_new_tokens and stop_tensor is not None:  # ids past the vocabulary: nothing to hold back
            logits = logits.masked_fill(torch.isin(torch.arange(logits.shape[-1], device=device), stop_tensor),
                                        float("-inf"))  # fmt: skip
        if config.do_sample:
            tokens = sample_logits(logits, config.temperature, config.top_k, config.top_p, generator)
        else:
            tokens = logits.argmax(-1)
        if stop_tensor is not None or config.stop_strings:
            tokens = tokens.masked_fill(finished, pad)
        if stop_tensor is not None:
            finished |= torch.isin(tokens, stop_tensor)
        if config.stop_strings:
            finished |= _stop_string_hits(tokens, finished, texts, config.stop_strings, window, decode)  # type: ignore[arg-type]
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        yield tokens
        last = step == config.max_new_tokens - 1
        if last or ((stop_tensor is not None or config.stop_strings) and bool(finished.all())):
            return
        logits = model.decode_step(tokens[:, None], view).float()


def _stop_string_hits(
    tokens: torch.Tensor,
    finished: torch.Tensor,
    texts: list[list[int]],
    stop_strings: Sequence[str],
    window: int,
    decode: Callable[[Sequence[int]], str],
) -> torch.Tensor:
    """Rows (B,) bool where this step's token completes a stop string: one that ends in the text the token added to
    the last ``window`` ids (a stop string wholly inside the prompt, or earlier, ends before it)."""
    hits = torch.zeros_like(finished)
    done = finished.tolist()
    for row, token in enumerate(tokens.tolist()):
        if done[row]:
            continue
        ids = texts[row]
        ids.append(token)
        if len(ids) > 2 * window:
            del ids[:-window]
        recent = ids[-window:]
        text = decode(recent)
        found = [stop for stop in stop_strings if stop in text]
        if found:
            before = decode(recent[:-1])  # the text before this token: what of it the token left unchanged
            pairs = zip(before, text, strict=False)
            settled = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(before), len(text)))
            hits[row] = any(text.rfind(stop) + len(stop) > settled for stop in found)
    return hits


def generate(
    model: DecoderLM,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    streamer: Callable[[torch.Tensor], Any] | None = None,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    attention_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt + generated ids (B, T + steps); only the generated ids (B, steps) when the prompt came as
    ``inputs_embeds`` without ``input_ids``. ``streamer`` is called with each step's tokens (B,)."""
    steps = []
    stream = stream_generate(model, input_ids, attention_mask, inputs_embeds, config, generator, decode,
                             attention_blocks)  # fmt: skip
    for tokens in stream:
        if streamer is not None:
            streamer(tokens)
        steps.append(tokens)
    device = model.token_embed.weight.device
    batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]  # type: ignore[union-attr]
    new = torch.stack(steps, dim=1) if steps else torch.zeros(batch, 0, dtype=torch.long, device=device)
    return new if input_ids is None else torch.cat([input_ids.to(device), new], dim=1)

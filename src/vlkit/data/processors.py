"""Processors for model directories: images, text -> ``pixel_values``, ``input_ids``, ``attention_mask``.

``load_processor(path)`` reads ``preprocessor_config.json`` (+ ``tokenizer.json``) and prepares inputs the way
transformers' processor for that model does, so a checkpoint sees the numbers it was trained on:

- image: PIL RGB image (or uint8 array (H, W, 3)) -> float tensor (3, H, W); a batch -> (B, 3, H, W), as the
  directory's transformers image processor prepares it (``vlkit.data.image_processors``; SigLIP 2's NaFlex:
  patches, their mask and grid shapes).
- text: ids padded to ``max_length`` (the model's, capped by the tokenizer's own settings) with a mask, truncated
  with the end-of-text token kept.
- LLaVA (``VLMProcessor``, transformers' ``LlavaProcessor``): each ``<image>`` in a prompt expanded to the model's
  number of image features, prompts tokenized with their special tokens and padded to the longest on the left
  (``padding_side``), images as above (``LlavaImageProcessor`` adds LLaVA's pad-to-square with the mean colour).
- BLIP-2 (``Blip2Processor``, transformers' ``Blip2Processor``): the prompts tokenized and padded to the longest, then
  ``num_query_tokens`` image placeholders put before each (begin-of-text and padding included), one image per
  prompt; ``BlipImageProcessor`` resizes to a fixed (H, W) (bicubic) and normalises with CLIP's mean and std.

``ProcessorOutput`` is a mapping of the inputs present, so ``model(**processor(...))`` and
``model.generate(**processor(...))`` work as with transformers.

A directory vlkit wrote (``vlkit train``, ``vlkit demo``, ``save_pretrained``) gets the preprocessing its model was
trained with: ``ImageTransform`` at the image tower's size and the directory's tokenizer. A vision-language model's
is a ``ChatProcessor``: each text is a user's message, rendered with the model's chat template as ``vlkit chat`` and
the evaluation render it, and ``batch_decode`` turns generated ids back into answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlkit.data.image_processors import ImageProcessor, as_pil
from vlkit.data.images import load_image
from vlkit.data.transforms import ImageTransform
from vlkit.text.chat import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    Conversation,
    Turn,
    decode_answer,
    end_of_answer_ids,
    get_template,
    image_prompt,
    render,
    tokenize_conversation,
    tokenize_prompt,
)
from vlkit.text.jinja import (
    ChatTemplates,
    conversations_of,
    message_dict,
    pick_template,
    read_chat_templates,
    refuse_unimplemented,
    render_chat,
)
from vlkit.text.tokenizer import (
    TEXT_DEFAULTS,
    Padding,
    Tokenizer,
    pad_rows,
    read_json,
    read_tokenizer_directory,
)


@dataclass
class ProcessorOutput(Mapping[str, torch.Tensor]):
    """The model inputs; a mapping of the present ones by name, so ``model(**processor(...))`` works directly."""

    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) float32; NaFlex: (B, L, p*p*3)
    input_ids: torch.Tensor | None = None  # (B, T) long
    attention_mask: torch.Tensor | None = None  # (B, T) long, 1 = real token
    pixel_attention_mask: torch.Tensor | None = None  # (B, L) int32, NaFlex: 1 = real patch
    spatial_shapes: torch.Tensor | None = None  # (B, 2) long, NaFlex: (rows, cols) of each image's patch grid
    qformer_input_ids: torch.Tensor | None = None  # (I, T) long: each image's prompt, for a Q-Former that reads it
    qformer_attention_mask: torch.Tensor | None = None  # (I, T) long, 1 = real token

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The inputs that are present, by name (e.g. for a transformers model's ``**inputs``)."""
        return dict(self.items())

    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key, None) if key in _OUTPUT_FIELDS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key in _OUTPUT_FIELDS if getattr(self, key) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_OUTPUT_FIELDS = tuple(field.name for field in fields(ProcessorOutput))


@dataclass
class Processor:
    """``processor(images=..., text=...)`` -> ``ProcessorOutput``; either part may be absent."""

    image_processor: ImageProcessor | TransformImages | None = None
    tokenizer: Tokenizer | None = None
    padding: Padding = "max_length"

    def text_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a clear error when the directory had none."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer (no tokenizer.json)")
        return self.tokenizer

    def __call__(
        self,
        images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray] | None = None,
        text: str | Sequence[str] | None = None,
    ) -> ProcessorOutput:
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        out = ProcessorOutput()
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this processor has no image processor (no preprocessor_config.json)")
            batch = [images] if isinstance(images, Image.Image | np.ndarray) else list(images)
            if getattr(self.image_processor, "max_num_patches", None) is not None:
                out = ProcessorOutput(**self.image_processor.patches(batch)._asdict())
            else:
                out.pixel_values = self.image_processor.batch(batch)
        if text is not None:
            tokenizer = self.text_tokenizer()
            tokens = tokenizer(text)
            ids, mask = tokens.input_ids, tokens.attention_mask
            if self.padding == "longest":
                length = int(mask.sum(dim=1).max())
                kept = slice(ids.shape[1] - length, None) if tokenizer.padding_side == "left" else slice(0, length)
                ids, mask = ids[:, kept], mask[:, kept]
            out.input_ids, out.attention_mask = ids, mask
        return out


@dataclass
class VLMProcessor(Processor):
    """LLaVA's processor (transformers' ``LlavaProcessor``): images as the image processor prepares them, and each
    ``<image>`` in the prompts expanded to as many copies as the model has image features, the i-th placeholder of
    the batch taking the i-th image; prompts tokenized with the tokenizer's special tokens and padded to the longest
    on ``padding_side`` (left by default: generation appends at the right).

    Image features per image: (H // patch_size) * (W // patch_size) of the processed image, + ``extra_image_tokens``
    (the class token a CLIP tower adds), - 1 with the "default" strategy (which drops it): 576 for LLaVA-1.5.
    """

    image_token: str = "<image>"
    image_token_id: int = 0
    patch_size: int = 14
    extra_image_tokens: int = 0
    feature_select_strategy: Literal["default", "full"] = "default"
    padding_side: Literal["left", "right"] = "left"
    # The directory's Jinja chat template(s) (``vlkit.text.jinja``), for ``apply_chat_template``; None without one.
    chat_template: ChatTemplates | None = None

    def tokens_per_image(self, pixel_values: torch.Tensor) -> int:
        """Image features of one processed image (3, H, W)."""
        height, width = pixel_values.shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.extra_image_tokens
        return count - int(self.feature_select_strategy == "default")

    def to_hf_dict(self) -> dict[str, Any]:
        """``processor_config.json`` as transformers' ``LlavaProcessor`` writes it (without the image processor's
        settings, which go to ``preprocessor_config.json``)."""
        return {
            "processor_class": "LlavaProcessor",
            "image_token": self.image_token,
            "patch_size": self.patch_size,
            "num_additional_image_tokens": self.extra_image_tokens,
            "vision_feature_select_strategy": self.feature_select_strategy,
        }

    def __call__(  # type: ignore[override]
        self,
        images: Image.Image | np.ndarray | Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] | None = None,
        add_special_tokens: bool = True,
    ) -> ProcessorOutput:
        """``images``: one image, a list, or a list per prompt (flattened in order); ``text``: one prompt or a batch.
        -> ``input_ids`` / ``attention_mask`` (B, T) long, ``pixel_values`` (I, 3, H, W) float32."""
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        out = ProcessorOutput()
        counts: list[int] = []
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this processor has no image processor")
            flat = _flat_images(images)
            out.pixel_values = self.image_processor.batch(flat)  # (I, 3, H, W)
            counts = [self.tokens_per_image(pixels) for pixels in out.pixel_values]
        if text is None:
            return out
        tokenizer = self.text_tokenizer()
        prompts = [text] if isinstance(text, str) else list(text)
        placeholders = sum(prompt.count(self.image_token) for prompt in prompts)
        if placeholders != len(counts):
            raise ValueError(f"the prompts hold {placeholders} {self.image_token} placeholders but {len(counts)} "
                             "images were given; each image needs one")  # fmt: skip
        remaining = iter(counts)
        expanded = [
            "".join(part if k == 0 else self.image_token * next(remaining) + part
                    for k, part in enumerate(prompt.split(self.image_token)))
            for prompt in prompts
        ]  # fmt: skip
        encodings = tokenizer.backend.encode_batch(expanded, add_special_tokens=add_special_tokens)
        encoded = [encoding.ids for encoding in encodings]
        width = max(len(ids) for ids in encoded)
        if width > tokenizer.max_len:
            raise ValueError(f"a prompt has {width} tokens (images expanded), more than the model's "
                             f"{tokenizer.max_len} positions")  # fmt: skip
        left = (padding_side or self.padding_side) == "left"
        out.input_ids, out.attention_mask = pad_rows(encoded, tokenizer.pad_token_id, left)
        return out

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "auto",
        processor_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **variables: Any,
    ) -> Any:
        """transformers' processor ``apply_chat_template``: ``conversation`` (``{"role", "content"}`` messages whose
        content is a text or a list of ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": ...}``
        blocks; or a batch of such lists) rendered with the directory's template (``chat_template``: a stored one's
        name, or another template) and the tokenizer's special tokens (``variables`` over them) -> the text(s).
        With ``tokenize``, the processor's inputs for them: the images of the image blocks in order (a PIL image, an
        array, or a file's ``path``), the text tokenized whole, without a second begin-of-sequence token where the
        text starts with one, as transformers does; ``return_dict`` gives every input, else ``input_ids`` alone.
        Always tensors, padded to the longest (``processor_kwargs``: ``padding_side``), where transformers gives
        lists unless ``return_tensors="pt"``."""
        refuse_unimplemented(variables, ("return_assistant_tokens_mask", "sanitize_control_tokens"))
        if return_tensors not in ("auto", "pt", None):
            raise ValueError(f"vlkit's processors return torch tensors: return_tensors {return_tensors!r}")
        settings = dict(processor_kwargs or {})
        side = settings.pop("padding_side", None)
        if settings.pop("padding", True) not in (True, "longest") or settings:
            raise ValueError(f"processor_kwargs: vlkit takes padding_side (padding is to the longest), got "
                             f"{dict(processor_kwargs or {})}")  # fmt: skip
        tokenizer = self.text_tokenizer()
        template = pick_template(self.chat_template, chat_template)  # a processor takes its default, tools or not
        named = tokenizer.special_tokens_map()
        batch, batched = _with_image_blocks(conversation)
        texts = [render_chat(template, chat, add_generation_prompt, continue_final_message, tools, documents,
                             **{**named, **variables}) for chat in batch]  # fmt: skip
        if not tokenize:
            return texts if batched else texts[0]
        images = [_block_image(block) for chat in batch for block in _image_blocks(chat)]
        bos = named.get("bos_token")
        out = self(images=images or None, text=texts, padding_side=side,
                   add_special_tokens=not (bos and texts[0].startswith(bos)))  # fmt: skip
        return out if return_dict else out["input_ids"]


@dataclass
class Blip2Processor(VLMProcessor):
    """BLIP-2's processor (transformers' ``Blip2Processor``): the prompts tokenized with their special tokens and
    padded to the longest on ``padding_side``, then, when images are given (one per prompt), ``num_query_tokens``
    copies of the image token put in front of every row: before its begin-of-text token and before its padding, where
    the Q-Former's outputs take their place. (The LLaVA fields ``patch_size``, ``extra_image_tokens`` and
    ``feature_select_strategy`` play no part: the count is the number of queries, whatever the image size.)"""

    num_query_tokens: int = 32

    def tokens_per_image(self, pixel_values: torch.Tensor) -> int:
        return self.num_query_tokens

    def to_hf_dict(self) -> dict[str, Any]:
        """``processor_config.json`` as transformers' ``Blip2Processor`` writes it."""
        return {"processor_class": "Blip2Processor", "num_query_tokens": self.num_query_tokens}

    def __call__(  # type: ignore[override]
        self,
        images: Image.Image | np.ndarray | Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] | None = None,
        add_special_tokens: bool = True,
    ) -> ProcessorOutput:
        """``images``: one image or one per prompt; ``text``: one prompt or a batch. -> ``input_ids`` /
        ``attention_mask`` (B, M + T) long, ``pixel_values`` (B, 3, H, W) float32."""
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        out = ProcessorOutput()
        flat: list[Image.Image | np.ndarray] = []
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this processor has no image processor")
            flat = _flat_images(images)
            out.pixel_values = self.image_processor.batch(flat)  # (B, 3, H, W)
        if text is None:
            return out
        tokenizer = self.text_tokenizer()
        prompts = [text] if isinstance(text, str) else list(text)
        if images is not None and len(flat) != len(prompts):
            raise ValueError(f"{len(flat)} images for {len(prompts)} prompts: BLIP-2 takes one image per prompt")
        encodings = tokenizer.backend.encode_batch(prompts, add_special_tokens=add_special_tokens)
        encoded = [encoding.ids for encoding in encodings]
        width = max(len(ids) for ids in encoded)
        queries = self.num_query_tokens if images is not None else 0
        if queries + width > tokenizer.max_len:
            raise ValueError(f"a prompt has {queries + width} tokens (the queries included), more than the model's "
                             f"{tokenizer.max_len} positions")  # fmt: skip
        ids, mask = pad_rows(encoded, tokenizer.pad_token_id, (padding_side or self.padding_side) == "left")
        prefix = torch.full((len(encoded), queries), self.image_token_id, dtype=torch.long)  # (B, M)
        out.input_ids = torch.cat([prefix, ids], dim=1)  # (B, M + T)
        out.attention_mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
        return out


@dataclass(frozen=True)
class TransformImages:
    """A vlkit model's own image preprocessing (``ImageTransform``, as its training, evaluation and ``vlkit chat``
    use it) behind the image processor's interface: one image -> (3, H, W), a list -> (B, 3, H, W)."""

    transform: ImageTransform
    max_num_patches: None = None  # never NaFlex patches

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return self.transform(as_pil(image))

    def batch(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers image processor nearest to this transform, for an export (``CLIPImageProcessor``):
        ``"shortest_crop"`` as a shortest-edge resize and a centre crop, ``"squash"`` as a resize to (H, W), both
        bicubic, then the same rescale, mean and std. Their pixels are this transform's, except where the resized
        image is 3, 7, 11, ... pixels longer than the crop: there transformers' crop starts one pixel earlier (it
        floors half the margin, where vlkit rounds it to even, as OpenAI's CLIP preprocessing does), and for strips
        of extreme aspect ratio, which ``ImageTransform`` resamples from the cropped region only. (Compared with
        transformers' PIL backend, its default without torchvision.) ``"pad"`` and a non-square crop have no such
        processor: an error."""
        transform = self.transform
        height, width = transform.size
        out: dict[str, Any] = {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(transform.mean),
            "image_std": list(transform.std), "do_convert_rgb": True,
        }  # fmt: skip
        if transform.resize_mode == "squash":
            return {**out, "size": {"height": height, "width": width}, "do_center_crop": False}
        if transform.resize_mode == "shortest_crop" and height == width:
            return {**out, "size": {"shortest_edge": height}, "do_center_crop": True,
                    "crop_size": {"height": height, "width": width}}  # fmt: skip
        raise ValueError(f"a {transform.resize_mode!r} image transform at {height}x{width} has no transformers image "
                         "processor that prepares the same pixels")  # fmt: skip


@dataclass
class ChatProcessor(Processor):
    """The processor of a vision-language model vlkit trained (a ``vlkit train`` or ``vlkit demo`` directory): each
    text is a user's message, rendered with the model's chat template and ending with the generation prompt, exactly
    as ``vlkit chat`` and the evaluation prompt the model (``tokenize_prompt``), so that
    ``model.generate(**processor(images=..., text=...))`` answers as they do. ``processor.batch_decode`` turns the
    generated ids back into answers.

    Images: with no ``<image>`` in any message, one image per message (or a list per message) goes in front of it,
    as ``vlkit chat`` puts it; otherwise the ``<image>`` placeholders of the batch take the images in order. Each
    placeholder becomes ``image_tokens`` copies of ``image_token_id``. Prompts are padded on ``padding_side`` (left by
    default: generation appends at the right).
    """

    chat_template: str = "shapes"
    image_token_id: int = 0
    image_tokens: int = 1  # placeholders per image: the model's tokens_per_image()
    stop_token_ids: tuple[int, ...] = ()  # where an answer ends: end of sequence and the template's end of turn
    padding_side: Literal["left", "right"] = "left"
    # A Q-Former that reads each image's prompt (``VLMConfig.bridge_reads_prompt``): its text length, else None.
    qformer_max_len: int | None = None

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer | None = None) -> ChatProcessor:
        """The processor of a vision-language model vlkit trained (``tokenizer``: else the model's own): its image
        tower's ``ImageTransform``, its chat template and its image token count."""
        config = model.config
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if tokenizer is None:
            raise ValueError("a vision-language model's prompts need a tokenizer; this model has none")
        stops = end_of_answer_ids(config.chat_template, tokenizer, config.lm.eos_token_ids)
        reads = config.bridge.max_seq_len if config.bridge_reads_prompt else None
        images = TransformImages(ImageTransform(image_size=config.vision.image_size))
        return cls(images, tokenizer, "longest", chat_template=config.chat_template,
                   image_token_id=config.image_token_id, image_tokens=model.tokens_per_image(), stop_token_ids=stops,
                   qformer_max_len=reads)  # fmt: skip

    def __call__(  # type: ignore[override]
        self,
        images: Image.Image | np.ndarray | Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> ProcessorOutput:
        """``images``: one image, a list, or a list per message; ``text``: one message or a batch. -> ``input_ids`` /
        ``attention_mask`` (B, T) long, ``pixel_values`` (I, 3, H, W) float32."""
        if text is None:
            return super().__call__(images=images)
        messages = [text] if isinstance(text, str) else list(text)
        conversations = []
        for number, (message, group) in enumerate(zip(messages, self._images_per_message(images, messages),
                                                      strict=True)):  # fmt: skip
            if IMAGE_PLACEHOLDER not in message:
                message = image_prompt(self.chat_template, message, len(group))
            conversations.append(Conversation([Turn("user", message)], list(group), item=f"text[{number}]"))
        return self._encode(
            conversations, get_template(self.chat_template), True, padding_side, self.text_tokenizer().max_len
        )

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **variables: Any,
    ) -> Any:
        """The call a checkpoint's processor takes (``VLMProcessor.apply_chat_template``), with the model's own
        template (``vlkit.text.chat``; ``chat_template``: another of its names). A message's image blocks become
        ``<image>`` placeholders, each followed by the template's separator, as training writes them. -> the text
        (``vlkit.text.chat.render``: a prompt with ``add_generation_prompt``, else a conversation that ends with an
        answer). With ``tokenize``, the ids are the training's, tokenized segment by segment (not the text's own
        tokenization), so that the model sees the tokens it was trained on; as in transformers, without a length
        limit (``vlkit chat`` goes on past the model's length, which rotary positions allow)."""
        if continue_final_message or tools is not None or documents is not None or variables:
            raise ValueError("vlkit's chat templates take no continue_final_message, tools, documents or variables")
        template = get_template(chat_template or self.chat_template)
        batch, batched = _with_image_blocks(conversation)
        conversations = [_conversation(chat, template, f"conversation[{n}]") for n, chat in enumerate(batch)]
        if not tokenize:
            texts = [render(chat, template, add_generation_prompt) for chat in conversations]
            return texts if batched else texts[0]
        out = self._encode(conversations, template, add_generation_prompt, max_len=None)
        return out if return_dict else out["input_ids"]

    def _encode(
        self, conversations: list[Conversation], template: ChatTemplate, prompt: bool,
        padding_side: Literal["left", "right"] | None = None, max_len: int | None = None,
    ) -> ProcessorOutput:  # fmt: skip
        """Conversations -> their ids as training segments them (ending with the generation prompt where ``prompt``;
        longer than ``max_len``, an error), padded on ``padding_side``, with their images and, for a Q-Former that
        reads the prompt, each image's text: its conversation's last user message without the placeholders, as the
        evaluation and ``vlkit chat`` give it."""
        tokenizer = self.text_tokenizer()
        images = [image for chat in conversations for image in chat.images]
        out = super().__call__(images=images) if images else ProcessorOutput()
        encoded = []
        for chat in conversations:
            if prompt:
                ids = tokenize_prompt(chat, template, tokenizer, self.image_token_id, self.image_tokens, max_len)
            else:
                ids = tokenize_conversation(chat, template, tokenizer, self.image_token_id, self.image_tokens,
                                            max_len).input_ids  # fmt: skip
            encoded.append(ids.tolist())
        left = (padding_side or self.padding_side) == "left"
        out.input_ids, out.attention_mask = pad_rows(encoded, tokenizer.pad_token_id, left)
        if self.qformer_max_len is not None and images:
            from vlkit.models.vlm import qformer_prompt_ids  # here: models import data

            asked = [
                next(turn.content for turn in reversed(chat.turns) if turn.role == "user") for chat in conversations
            ]
            words = [said.replace(IMAGE_PLACEHOLDER, "").strip() for said in asked]
            prompts = [said for said, chat in zip(words, conversations, strict=True) for _ in chat.images]
            out.qformer_input_ids, out.qformer_attention_mask = qformer_prompt_ids(tokenizer, prompts,
                                                                                   self.qformer_max_len)  # fmt: skip
        return out

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids (B, N), the prompt cut off -> each row's answer: its text before the first stop id."""
        tokenizer = self.text_tokenizer()
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(row) for row in ids]
        return [decode_answer(tokenizer, row, self.stop_token_ids) for row in rows]

    @staticmethod
    def _images_per_message(images: Any, messages: list[str]) -> list[list[Image.Image | np.ndarray]]:
        if images is None:
            groups: list[list[Image.Image | np.ndarray]] = [[] for _ in messages]
        elif any(IMAGE_PLACEHOLDER in message for message in messages):
            flat = _flat_images(images)
            counts = [message.count(IMAGE_PLACEHOLDER) for message in messages]
            if sum(counts) != len(flat):
                raise ValueError(f"the messages hold {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but {len(flat)} "
                                 "images were given; each image needs one")  # fmt: skip
            starts = np.cumsum([0, *counts])
            groups = [flat[start : start + count] for start, count in zip(starts, counts, strict=False)]
        else:
            items = [images] if isinstance(images, Image.Image | np.ndarray) else list(images)
            if len(items) != len(messages):
                raise ValueError(f"{len(items)} images (or lists of images) for {len(messages)} messages: give one "
                                 f"per message, or place {IMAGE_PLACEHOLDER} in the messages")  # fmt: skip
            groups = [_flat_images(item) for item in items]
        return groups


def _flat_images(images: Any) -> list[Image.Image | np.ndarray]:
    if isinstance(images, Image.Image | np.ndarray):
        return [images]
    flat: list[Image.Image | np.ndarray] = []
    for item in images:
        flat += _flat_images(item)
    return flat


def _with_image_blocks(conversation: Sequence[Any]) -> tuple[list[list[dict[str, Any]]], bool]:
    """A conversation or a batch -> (the batch, whether one was given; ``conversations_of``), its messages as dicts
    (``vlkit.text.jinja.message_dict``: dataclasses and pydantic-style objects too) and OpenAI's ``{"type":
    "image_url", "image_url": {"url": ...}}`` blocks as ``{"type": "image", "url": ...}``, as transformers reads
    them."""

    def block(item: Any) -> Any:
        if isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item:
            where = item["image_url"]
            return {"type": "image", "url": where.get("url", "") if isinstance(where, Mapping) else where}
        return item

    def message(item: Mapping[str, Any]) -> Any:
        content = item.get("content")
        return {**item, "content": [block(b) for b in content]} if isinstance(content, list) else item

    batch, batched = conversations_of(conversation)
    return [[message(message_dict(item, number)) for number, item in enumerate(chat)] for chat in batch], batched


def _image_blocks(chat: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [block for message in chat if isinstance(message.get("content"), list) for block in message["content"]
            if isinstance(block, Mapping) and block.get("type") == "image"]  # fmt: skip


def _block_image(block: Mapping[str, Any]) -> Image.Image | np.ndarray:
    """An image block's image: the object itself (``image``), a file (``path``, or a ``url`` that is one), or
    base64 data. vlkit downloads nothing: a web address is an error that says so."""
    key = next((key for key in ("image", "url", "path", "base64") if key in block), None)
    if key is None:
        raise ValueError(f"an image block without its image (image, path, url or base64): {dict(block)!r}")
    value = block[key]
    if isinstance(value, Image.Image | np.ndarray):
        return value
    text = str(value)
    if text.startswith(("http://", "https://")):
        raise ValueError(f"image {text!r}: vlkit downloads nothing; save the image and pass its path, or the image")
    if key == "base64" or text.startswith("data:image"):
        import base64
        import io

        return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1]))).convert("RGB")
    return load_image(text)


def _conversation(chat: Sequence[Mapping[str, Any]], template: ChatTemplate, item: str) -> Conversation:
    """transformers-style messages -> a vlkit ``Conversation``: each image block an ``<image>`` placeholder and the
    template's separator, text blocks joined by spaces."""
    turns, images = [], []
    for message in chat:
        content = message.get("content")
        if content is None or isinstance(content, str):
            text = content or ""
        else:
            parts: list[str] = []
            for block in content:
                kind = block.get("type") if isinstance(block, Mapping) else None
                if kind == "image":
                    images.append(_block_image(block))
                    parts.append(IMAGE_PLACEHOLDER + template.image_separator)
                elif kind == "text":
                    follows_text = bool(parts) and not parts[-1].startswith(IMAGE_PLACEHOLDER)
                    parts.append(" " * follows_text + str(block.get("text", "")))
                else:
                    raise ValueError(f"{item}: a {kind!r} block; vlkit's chat templates take text and image blocks")
            text = "".join(parts)
        turns.append(Turn(message.get("role"), text))  # type: ignore[arg-type]
    return Conversation(turns, images, item=item)


def load_processor(path: str | Path) -> Processor:
    """The processor of a model directory. A Hugging Face one's (``preprocessor_config.json`` and/or
    ``tokenizer.json``) prepares inputs as transformers' processor does; a LLaVA directory's is a ``VLMProcessor``, a
    BLIP-2 one's a ``Blip2Processor``. A vlkit directory's (``vlkit train``, ``save_pretrained``) prepares them as the
    model was trained on: its ``ImageTransform`` and tokenizer, and for a vision-language model a ``ChatProcessor``."""
    directory = Path(path)
    if (directory / "config.json").exists() and "vlkit_format" in read_json(directory / "config.json"):
        return _vlkit_processor(directory)
    image_file = directory / "preprocessor_config.json"
    image_processor = (
        ImageProcessor.from_hf_dict(read_json(image_file), str(image_file)) if image_file.exists() else None
    )
    stored = _processor_settings(directory).get("image_processor")
    if image_processor is None and isinstance(stored, dict):  # transformers 5 keeps it in processor_config.json
        image_processor = ImageProcessor.from_hf_dict(stored, str(directory / "processor_config.json"))
    model_type, max_len = None, None
    config: dict[str, Any] = {}
    if (directory / "config.json").exists():
        config = read_json(directory / "config.json")
        model_type = config.get("model_type")
        text_config = config.get("text_config") or {}
        max_len = text_config.get("max_position_embeddings") or TEXT_DEFAULTS.get(str(model_type), (0, 0, None))[2]
    if model_type == "llava":
        return _llava_processor(directory, config, image_processor)
    if model_type == "blip-2":
        return _blip2_processor(directory, config, image_processor)
    loaded = read_tokenizer_directory(directory, max_len, model_type)
    if image_processor is None and loaded is None:
        raise FileNotFoundError(f"{directory}: neither preprocessor_config.json nor tokenizer.json")
    tokenizer, padding = loaded if loaded is not None else (None, "max_length")
    return Processor(image_processor, tokenizer, padding)


def _vlkit_processor(directory: Path) -> Processor:
    """A vlkit model directory's processor: ``ImageTransform`` at the image tower's size (what every vlkit task
    trains and evaluates with) and the directory's tokenizer; a ``ChatProcessor`` for a vision-language model."""
    from vlkit.models.base import build_model, read_vlkit_config, read_vlkit_tokenizer  # here: models import data

    config = read_vlkit_config(directory)
    tokenizer = read_vlkit_tokenizer(directory, config)
    vision = getattr(config, "vision", None) or (config if hasattr(config, "image_size") else None)
    images = None if vision is None else TransformImages(ImageTransform(image_size=vision.image_size))
    if config.kind != "vlm":
        if images is None and tokenizer is None:
            raise FileNotFoundError(f"{directory}: a {config.kind} model without tokenizer.json has nothing to process")
        return Processor(images, tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"{directory}: no tokenizer.json; a vision-language model's prompts need one")
    with torch.device("meta"):  # for its image token count only: no weights are made
        model = build_model(config)
    return ChatProcessor.for_model(model, tokenizer)


def _processor_settings(directory: Path) -> dict[str, Any]:
    settings_file = directory / "processor_config.json"
    return read_json(settings_file) if settings_file.exists() else {}


def _vlm_parts(
    directory: Path, settings: dict[str, Any], image_processor: ImageProcessor | None, model: Any, model_type: str,
    image_token: str,
) -> tuple[ImageProcessor, Tokenizer, str | None]:  # fmt: skip
    """What every VLM processor reads: the image processor (``preprocessor_config.json``, or transformers 5's
    ``processor_config.json``), the tokenizer, whose ``image_token`` must be the model's image token id, and the
    tokenizer's padding side (None when it names none)."""
    if image_processor is None:
        raise FileNotFoundError(f"{directory}: no image processor (preprocessor_config.json or processor_config.json)")
    loaded = read_tokenizer_directory(directory, model.lm.max_seq_len, model_type)
    if loaded is None:
        raise FileNotFoundError(f"{directory}: no tokenizer.json")
    tokenizer = loaded[0]
    token_id = tokenizer.backend.token_to_id(image_token)
    if token_id != model.image_token_id:
        raise ValueError(f"{directory}: the tokenizer's {image_token!r} is id {token_id}, the model's "
                         f"image_token_index {model.image_token_id}")  # fmt: skip
    tokenizer_config = directory / "tokenizer_config.json"
    side = (read_json(tokenizer_config) if tokenizer_config.exists() else {}).get("padding_side")
    return image_processor, tokenizer, side


def _llava_processor(directory: Path, config: dict[str, Any], image_processor: ImageProcessor | None) -> VLMProcessor:
    """``processor_config.json`` (transformers 5 keeps the image processor's settings there too) over what the model's
    config implies: the tower's patch size, its class token (counted, then dropped by "default") and the strategy."""
    from vlkit.convert.llava import config_from_hf, strategy  # here: vlkit.convert imports this module
    from vlkit.encoders import ViTConfig

    model = config_from_hf(config, str(directory / "config.json"))
    settings = _processor_settings(directory)
    image_token = str(settings.get("image_token") or "<image>")
    image_processor, tokenizer, side = _vlm_parts(directory, settings, image_processor, model, "llava", image_token)
    side = side or "left"
    assert isinstance(model.vision, ViTConfig)
    extra = settings.get("num_additional_image_tokens")
    return VLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        padding="longest",
        image_token=image_token,
        image_token_id=model.image_token_id,
        patch_size=int(settings.get("patch_size") or model.vision.patch_size),
        extra_image_tokens=int(extra if extra is not None else model.vision.class_token),
        feature_select_strategy=settings.get("vision_feature_select_strategy") or strategy(model),
        padding_side=side,
        chat_template=read_chat_templates(directory, processor=True),
    )


def _blip2_processor(directory: Path, config: dict[str, Any], image_processor: ImageProcessor | None) -> Blip2Processor:
    """``processor_config.json`` (``num_query_tokens``, the image processor in transformers 5) over the model's
    config (its number of queries and image token)."""
    from vlkit.convert.blip2 import config_from_hf  # here: vlkit.convert imports this module

    model = config_from_hf(config, str(directory / "config.json"))
    settings = _processor_settings(directory)
    image_token = "<image>"
    image_processor, tokenizer, side = _vlm_parts(directory, settings, image_processor, model, "blip-2", image_token)
    side = side or "right"
    queries = settings.get("num_query_tokens") or getattr(model.bridge, "num_queries")  # noqa: B009
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, padding="longest",
                          image_token=image_token, image_token_id=model.image_token_id, padding_side=side,
                          num_query_tokens=int(queries),
                          chat_template=read_chat_templates(directory, processor=True))  # fmt: skip

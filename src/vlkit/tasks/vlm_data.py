"""The vlm task's training data: ``ShapesTextDataset`` (text alone), ``ShapesInstructionDataset`` (ShapesWorld
conversations drawn per epoch), ``ConversationDataset`` (users' LLaVA conversations), and ``_collate``, which pads
their samples into a batch and weighs the answers (``answer_weights``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from vlkit.data import shapes
from vlkit.data.images import BadSampleError, load_image
from vlkit.data.shapes_vqa import (
    InstructionItem,
    described_conversations,
    given_away,
    instruction_items,
    item_turns,
    text_samples,
)
from vlkit.data.specs import ShapesInstructions, ShapesText
from vlkit.data.transforms import ImageTransform
from vlkit.models.vlm import VisionLanguageModel
from vlkit.seeding import mix_seed
from vlkit.text.chat import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Conversation,
    Turn,
    get_template,
    image_prompt,
    tokenize_conversation,
)

logger = logging.getLogger(__name__)

AnswerWeighting = Literal["token", "answer", "sqrt"]
_TURN_STREAM = 11  # which items a training conversation holds: a stream of its own
# Which training scene a weighted draw keeps (ShapesInstructions.object_weights); 99, the stream the forty-second
# session's measured runs drew on (docs/experiments.md).
_SCENE_STREAM = 99
_SCENE_TRIES = 20  # a weighted draw gives up after this many rejections
# A training scene and its instruction items are kept once made (~28 KB, where making them costs ~0.4 ms, a tenth of
# a sample's share of the demo's step), for the first this many scenes: the recipes' 10000 take ~280 MB.
SCENE_CACHE = 1 << 14


def answer_weights(labels: torch.Tensor, weighting: AnswerWeighting) -> torch.Tensor:
    """(B, T) loss weights for ``labels`` (B, T): each maximal run of trained positions is one answer (its text and
    end-of-turn); a token of an answer of n tokens weighs 1 (``"token"``), 1 / n (``"answer"``) or 1 / sqrt(n)
    (``"sqrt"``); untrained positions weigh 0."""
    trained = labels != IGNORE_INDEX
    flat = trained.flatten()
    # A run starts where a trained position follows an untrained one (or a row's start): number the runs.
    starts = flat & ~torch.cat([flat.new_zeros(1), flat[:-1]])
    starts.view_as(trained)[:, 0] = trained[:, 0]
    run = torch.cumsum(starts.long(), 0) - 1  # (B * T,) the run of each trained position
    lengths = torch.bincount(run[flat], minlength=int(starts.sum())).float()
    per_token = {"token": torch.ones_like(lengths), "answer": 1 / lengths, "sqrt": lengths.rsqrt()}[weighting]
    weights = torch.zeros(flat.shape)
    weights[flat] = per_token[run[flat]]
    return weights.view_as(labels)


def _described(spec: ShapesText, sample: shapes.ShapesSample, split: str, turns: int) -> list[Conversation]:
    """The described conversations ``spec`` asks about ``sample`` (none about a scene of fewer than
    ``spec.min_objects`` objects): what a stage on described text trains on, and what its evaluation asks."""
    if len(sample.objects) < spec.min_objects:
        return []
    return described_conversations(sample, spec.config, split, turns, spec.layout, spec.kinds)  # type: ignore[arg-type]


class ShapesTextDataset(torch.utils.data.Dataset):
    """Every ``text_samples`` string of the spec's scenes (``spec.plain``), tokenized ``<bos> ... <eos>``, all tokens
    trained on; with ``spec.described``, then every ``described_conversations`` conversation (the caption, or with
    ``spec.layout`` the scene's layout, in context) in the model's chat template, answers trained on (every other
    token too at ``spec.context_weight``: then each sample carries its ``loss_weights``), with as many of its turns
    as fit the LM's context."""

    def __init__(self, spec: ShapesText, model: VisionLanguageModel) -> None:
        assert model.tokenizer is not None
        self.tokenizer = model.tokenizer
        self.template = model.config.chat_template
        self.image_token = model.config.image_token_id
        self.context_weight = spec.context_weight
        self.texts: list[str] = []
        self.conversations: list[Conversation] = []
        for index in range(spec.train_size):  # each scene rendered once
            sample = shapes.generate(spec.config, "train", index)
            if spec.plain:
                self.texts += text_samples(sample, spec.config, "train")
            if spec.described:
                self.conversations += _described(spec, sample, "train", spec.turns)
        if not len(self):
            raise ValueError(f"ShapesText: no samples in {spec.train_size} scenes (kinds {spec.kinds}, "
                             f"min_objects {spec.min_objects})")  # fmt: skip

    def __len__(self) -> int:
        return len(self.texts) + len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index >= len(self.texts):
            conversation = self.conversations[index - len(self.texts)]
            # As many question-answer turns as fit the LM's context (the first, with the description, always).
            shorter = (dataclasses.replace(conversation, turns=conversation.turns[: 2 * pairs])
                       for pairs in range(len(conversation.turns) // 2, 0, -1))  # fmt: skip
            ids, labels = _longest_that_fits(
                shorter, lambda c: tokenize_conversation(c, self.template, self.tokenizer, self.image_token, 0),
                self.tokenizer.max_len, f"ShapesWorld described conversation {index - len(self.texts)}",
            )  # fmt: skip
        else:
            ids = torch.tensor(self.tokenizer.encode(self.texts[index])[: self.tokenizer.max_len], dtype=torch.long)
            labels = ids.clone()
        if not self.context_weight:
            return {"input_ids": ids, "labels": labels}
        # Every token a target: the answers (all of a plain text) at weight 1, the rest at context_weight.
        answers = (labels != IGNORE_INDEX).float()
        return {"input_ids": ids, "labels": ids.clone(), "loss_weights": answers + (1 - answers) * self.context_weight}


class _Scene(NamedTuple):
    """A training scene and its instruction items of the trained kinds."""

    sample: shapes.ShapesSample
    items: list[InstructionItem]


class ShapesInstructionDataset(torch.utils.data.Dataset):
    """Scene ``index`` rendered on demand, as a conversation of ``turns`` of its items of different kinds (a seeded
    draw per epoch). The first ``cache_scenes`` scenes made are kept with their items (``SCENE_CACHE``): later
    epochs draw their turns without making them again, and read the same."""

    def __init__(
        self, spec: ShapesInstructions, model: VisionLanguageModel, seed: int, cache_scenes: int = SCENE_CACHE
    ) -> None:
        self.spec = spec
        self.tokenizer = model.tokenizer
        self.template = model.config.chat_template
        self.tokens_per_image = model.tokens_per_image()
        self.image_token = model.config.image_token_id
        self.max_len = model.config.lm.max_seq_len
        self.transform = ImageTransform(image_size=model.config.vision.image_size)
        self.seed = seed
        self.epoch = 0
        self.cache_scenes = cache_scenes
        self._scenes: dict[int, _Scene] = {}
        # A Q-Former that reads the prompt (BLIP-2's VQA fine-tuning) gets the conversation's first question.
        self.prompt_ids = model.prompt_ids if model.config.bridge_reads_prompt else None

    def __len__(self) -> int:
        return self.spec.train_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index, sample, chosen, question_first = self.draw(index)
        # As many of the drawn turns as fit the LM's context; a single turn that does not fit is an error.
        shorter = (
            _conversation(chosen[:count], sample.image, question_first, self.template)
            for count in range(len(chosen), 0, -1)
        )
        ids, labels = _longest_that_fits(
            shorter, lambda c: tokenize_conversation(c, self.template, self.tokenizer, self.image_token,
                                                     self.tokens_per_image),
            self.max_len, f"ShapesWorld train scene {index}",
        )  # fmt: skip
        out = {"input_ids": ids, "labels": labels, "pixel_values": self.transform(sample.image)}
        if self.prompt_ids is not None:
            out["qformer_input_ids"] = self.prompt_ids([chosen[0].question])[0][0]
        return out

    def draw(self, index: int) -> tuple[int, shapes.ShapesSample, list[InstructionItem], bool]:
        """Item ``index``'s scene (its index and sample), the instruction items its conversation asks in order, and
        whether the first question comes before the image."""
        index, (sample, items) = self._weighted_sample(index)
        if not items:
            raise ValueError(f"ShapesWorld train scene {index} ({len(sample.objects)} objects) has nothing of the "
                             f"kinds {list(self.spec.kinds)} to ask (a one-object scene has no spatial question): add "
                             "a kind every scene has, or raise data.config.min_objects")  # fmt: skip
        rng = np.random.default_rng(mix_seed(_TURN_STREAM, self.seed, self.epoch, index))
        # Balanced by kind: a scene holds ~10 count questions and 2 grounding items, and uniform draws over items
        # would starve the kinds that have few (grounding, captions) of training turns.
        by_kind: dict[str, list[InstructionItem]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item)
        kinds = list(by_kind)
        # Every kind in the drawn order when a given-away turn may leave its kind out, so that the next one stands in.
        size = len(kinds) if self.spec.fresh_answers else min(self.spec.turns, len(kinds))
        if self.spec.kind_weights:
            weights = dict(self.spec.kind_weights)
            p = np.array([weights.get(kind, 1.0) for kind in kinds])
            drawn = rng.choice(len(kinds), size=size, replace=False, p=p / p.sum())
        else:  # unweighted: the stream as it was before weights existed
            drawn = rng.permutation(len(kinds))[:size]
        chosen: list[InstructionItem] = []
        for kind in drawn:
            if len(chosen) == self.spec.turns:
                break
            group = by_kind[kinds[kind]]
            item = group[int(rng.integers(len(group)))]
            if self.spec.fresh_answers:  # a given-away item: another of its kind, or the next kind
                earlier = [text for turn in chosen for text in (turn.question, turn.answer)]
                if given_away(item, earlier):
                    fresh = [other for other in group if not given_away(other, earlier)]
                    if not fresh:
                        continue
                    item = fresh[int(rng.integers(len(fresh)))]
            chosen.append(item)
        # No draw at 0 keeps the image-first stream as it was.
        question_first = self.spec.question_first > 0 and bool(rng.random() < self.spec.question_first)
        return index, sample, chosen, question_first

    def _weighted_sample(self, index: int) -> tuple[int, _Scene]:
        """Scene ``index`` (its index, sample and items), or under ``object_weights`` the first of ``index`` and
        seeded redraws that the weight of its object count keeps (rejection sampling: a scene is trained on in
        proportion to its weight; a count at the largest weight is kept without a draw, and the scene after
        ``_SCENE_TRIES`` rejections whatever it holds)."""
        scene = self._scene(index)
        if not self.spec.object_weights:
            return index, scene
        weights = dict(self.spec.object_weights)
        top = max(1.0, *weights.values())
        rng = np.random.default_rng(mix_seed(_SCENE_STREAM, self.seed, self.epoch, index))
        for _ in range(_SCENE_TRIES):
            keep = weights.get(len(scene.sample.objects), 1.0) / top
            if keep >= 1.0 or rng.random() >= 1.0 - keep:  # kept with probability `keep`
                break
            index = int(rng.integers(self.spec.train_size))
            scene = self._scene(index)
        return index, scene

    def _scene(self, index: int) -> _Scene:
        """Training scene ``index`` and its items of the trained kinds, made once for the first ``cache_scenes``."""
        scene = self._scenes.get(index)
        if scene is None:
            sample = shapes.generate(self.spec.config, "train", index)
            items = instruction_items(sample, self.spec.config, "train", layout="layout" in self.spec.kinds)
            scene = _Scene(sample, [item for item in items if item.kind in self.spec.kinds])
            if len(self._scenes) < self.cache_scenes:
                self._scenes[index] = scene
        return scene


class ConversationDataset(torch.utils.data.Dataset):
    """Users' own conversations (``data.conversations.read_conversations``: LLaVA's JSON) as training samples: each
    conversation's turns tokenized with the model's chat template (labels on the answers only), as many leading turns
    as fit the LM's context (cut after an answer), and the images those turns show loaded and transformed as the
    model's own data is (``ImageTransform`` at the tower's size). LLaVA's ``"<image>\n"`` becomes the image and the
    template's own ``image_separator``, as the model is prompted (``image_prompt``). A sample holds its images' pixels
    (k, 3, H, W), k = 0 for a text-only one. A conversation that cannot be used (an image that cannot be loaded, a
    turn the template cannot lay out, a first exchange longer than the context) is a ``BadSampleError`` naming it;
    with ``skip_bad`` the sample is None, which the collate function drops and counts."""

    def __init__(self, conversations: list[Conversation], model: VisionLanguageModel, skip_bad: bool = False) -> None:
        self.tokenizer = model.tokenizer
        self.template = model.config.chat_template
        separator = get_template(self.template).image_separator
        self.conversations = conversations if separator == "\n" else [_image_separated(c, separator)
                                                                       for c in conversations]  # fmt: skip
        self.tokens_per_image = model.tokens_per_image()
        self.image_token = model.config.image_token_id
        self.max_len = model.config.lm.max_seq_len
        self.image_size = model.config.vision.image_size
        self.transform = ImageTransform(image_size=self.image_size)
        self.skip_bad = skip_bad
        # A Q-Former that reads the prompt (BLIP-2's VQA fine-tuning) gets, for each image, the user turn showing it.
        self.prompt_ids = model.prompt_ids if model.config.bridge_reads_prompt else None

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        conversation = self.conversations[index]
        try:
            ids, labels, cut = self._longest_cut(conversation)
            images = [image if isinstance(image, Image.Image) else load_image(image) for image in cut.images]
        except BadSampleError as error:
            if not self.skip_bad:
                raise
            logger.warning("skipped %s", error)
            return None
        size = (3, self.image_size, self.image_size) if isinstance(self.image_size, int) else (3, *self.image_size)
        pixels = torch.stack([self.transform(image) for image in images]) if images else torch.empty(0, *size)
        out: dict[str, Any] = {"input_ids": ids, "labels": labels, "pixel_values": pixels}
        if self.prompt_ids is not None:  # one prompt per image shown, unpadded (the collate pads them)
            texts = [" ".join(turn.content.replace(IMAGE_PLACEHOLDER, " ").split()) for turn in cut.turns
                     for _ in range(turn.content.count(IMAGE_PLACEHOLDER))]  # fmt: skip
            rows = zip(*self.prompt_ids(texts), strict=True) if texts else ()
            out["qformer_input_ids"] = [row[mask.bool()] for row, mask in rows]
        return out

    def _longest_cut(self, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor, Conversation]:
        """The ids, labels and turns of the longest cut after an answer that the template lays out within the LM's
        context; a ``BadSampleError`` naming the conversation where none does."""
        length, problem = None, "no answer to train on"
        for count in range(len(conversation.turns), 0, -1):
            if conversation.turns[count - 1].role != "assistant":
                continue
            turns = conversation.turns[:count]
            shown = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in turns)
            cut = dataclasses.replace(conversation, turns=turns, images=conversation.images[:shown])
            try:
                ids, labels = tokenize_conversation(cut, self.template, self.tokenizer, self.image_token,
                                                    self.tokens_per_image)  # fmt: skip
            except ValueError as error:  # what the template cannot lay out (a system turn, several for "plain", ...)
                problem = str(error)
                continue
            if len(ids) <= self.max_len:
                return ids, labels, cut
            length = len(ids)
        if length is not None:
            problem = f"{length} tokens for its first exchange; the language model takes {self.max_len}"
        raise BadSampleError(conversation.name, problem)


def _image_separated(conversation: Conversation, separator: str) -> Conversation:
    """``conversation`` with LLaVA's ``"<image>\n"`` written as the image and ``separator``."""
    turns = [Turn(turn.role, turn.content.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER + separator))
             for turn in conversation.turns]  # fmt: skip
    return dataclasses.replace(conversation, turns=turns)


def _longest_that_fits(
    conversations: Iterable[Conversation],
    tokenize: Callable[[Conversation], tuple[torch.Tensor, torch.Tensor]],
    max_len: int,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and labels of the first of ``conversations`` (longest first, down to one turn) within ``max_len``
    tokens; an error naming ``name`` when not even the last fits."""
    length = None
    for conversation in conversations:
        ids, labels = tokenize(conversation)
        if len(ids) <= max_len:
            return ids, labels
        length = len(ids)
    if length is None:
        raise ValueError(f"{name}: no turn to train on")
    raise ValueError(f"{name}: {length} tokens for one turn; the LM takes {max_len}")


def _first_question(question: str, question_first: bool, template: str) -> str:
    """The first user message: the image, then the question as the template lays it out (``image_prompt``, what
    ``vlkit chat`` asks with), or the question, then the image."""
    return f"{question}{IMAGE_PLACEHOLDER}" if question_first else image_prompt(template, question)


def _conversation(items: list[InstructionItem], image: Any, question_first: bool, template: str) -> Conversation:
    first = _first_question(items[0].question, question_first, template)
    return Conversation(turns=item_turns(items, first), images=[image])


def _collate(
    pad_id: int, weighting: AnswerWeighting = "token"
) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    def collate(batch_samples: list[dict[str, torch.Tensor] | None]) -> dict[str, Any]:
        samples = [sample for sample in batch_samples if sample is not None]  # None: skipped (skip_bad)
        skipped = len(batch_samples) - len(samples)
        if not samples:
            empty = torch.empty(0, 0, dtype=torch.long)
            return {"input_ids": empty, "labels": empty, "attention_mask": empty, "skipped": skipped}
        ids = [sample["input_ids"] for sample in samples]
        batch: dict[str, Any] = {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),  # (B, T) right-padded
            "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX),
            "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        }
        if skipped:
            batch["skipped"] = skipped
        if "pixel_values" in samples[0]:
            pixels = [sample["pixel_values"] for sample in samples]
            if pixels[0].dim() == 3:  # one image per sample: (B, 3, H, W)
                batch["pixel_values"] = torch.stack(pixels)
            elif sum(len(p) for p in pixels):  # each sample's own images (k, 3, H, W), in order: (sum k, 3, H, W)
                batch["pixel_values"] = torch.cat(pixels)
        if "qformer_input_ids" in samples[0]:  # each image's prompt, for a Q-Former that reads it
            prompts = [sample["qformer_input_ids"] for sample in samples]
            if isinstance(prompts[0], list):  # each sample's images' own prompts, in order
                prompts = [prompt for own in prompts for prompt in own]
            if prompts:  # none where the batch shows no image
                batch["qformer_input_ids"] = pad_sequence(prompts, batch_first=True, padding_value=pad_id)
                ones = [torch.ones_like(prompt) for prompt in prompts]
                batch["qformer_attention_mask"] = pad_sequence(ones, batch_first=True, padding_value=0)
        if "loss_weights" in samples[0]:  # the samples' own (ShapesText.context_weight)
            batch["loss_weights"] = pad_sequence([s["loss_weights"] for s in samples], batch_first=True,
                                                 padding_value=0.0)  # fmt: skip
        elif weighting != "token":
            batch["loss_weights"] = answer_weights(batch["labels"], weighting)
        return batch

    return collate

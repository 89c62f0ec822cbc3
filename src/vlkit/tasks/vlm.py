"""The vision-language task: a ``VisionLanguageModel`` trained on conversations (and, in a text stage, on text alone),
evaluated by generating answers.

    scene --instruction items (data.shapes_vqa)--> conversation --chat template, <image> x M--> ids, labels
        --collate (right padding)--> batch --model(input_ids, attention_mask, pixel_values, labels)--> loss

Data kinds: ``ShapesInstructions`` (image + question-answer turns; labels on the answers only) and ``ShapesText``
(text-only samples, every token trained on: a language-model stage before the LM is frozen or joined to images).
The task fits one BPE for the run (digits spelled one by one, ``<image>`` and the template's markers as single tokens)
and sizes the preset's vocabulary and image token to it. Evaluation greedily answers one question of each kind about
test scenes of seen and of held-out colour x shape combinations: VQA exact match overall and per kind, grounding
accuracy at IoU >= 0.5 of the ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` answers, caption attribute F1.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlkit.data import shapes
from vlkit.data.conversations import read_conversations
from vlkit.data.images import BadSampleError, load_image
from vlkit.data.shapes_vqa import (
    CAPTION_PROMPT,
    InstructionItem,
    described_conversations,
    given_away,
    instruction_items,
    item_turns,
    layout_objects,
    text_samples,
)
from vlkit.data.specs import EXTRA_KINDS, Manifest, ShapesInstructions, ShapesText
from vlkit.data.transforms import ImageTransform
from vlkit.eval.captioning import caption_scores
from vlkit.eval.grounding import grounding_accuracy, layout_accuracy, parse_box, parse_layout
from vlkit.eval.result import EvalResult
from vlkit.eval.vqa import vqa_accuracy
from vlkit.models.base import build_model
from vlkit.models.vlm import VisionLanguageModel
from vlkit.registry import apply_overrides, get_config
from vlkit.seeding import mix_seed
from vlkit.tasks.base import RunContext, Task, TrainingInputs, register_task
from vlkit.text import Tokenizer, train_tokenizer
from vlkit.text.chat import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Conversation,
    Turn,
    decode_answer,
    end_of_answer_ids,
    get_template,
    image_prompt,
    tokenize_conversation,
    tokenize_prompt,
)
from vlkit.train import StepOutput

logger = logging.getLogger(__name__)

__all__ = ["AnswerWeighting", "DescribedTextEvaluation", "VisionLanguage", "answer_weights", "decode_answer"]

AnswerWeighting = Literal["token", "answer", "sqrt"]

GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>")
_TURN_STREAM = 11  # which items a training conversation holds: a stream of its own
_EVAL_STREAM = 12  # which item of each kind a test scene is asked
# Which training scene a weighted draw keeps (ShapesInstructions.object_weights); 99, the stream the forty-second
# session's measured runs drew on (docs/experiments.md).
_SCENE_STREAM = 99
_SCENE_TRIES = 20  # a weighted draw gives up after this many rejections
# A training scene and its instruction items are kept once made (~28 KB, where making them costs ~0.4 ms, a tenth of
# a sample's share of the demo's step), for the first this many scenes: the recipes' 10000 take ~280 MB.
SCENE_CACHE = 1 << 14
SPLIT_IDS = {"test": 0, "test_heldout": 1, "val": 2, "val_heldout": 3}


@register_task
@dataclass(frozen=True)
class VisionLanguage(Task):
    """``vocab_size`` of the fitted BPE; ``tokenizer_scenes`` training scenes whose text it is fitted on;
    ``max_new_tokens`` per evaluated answer; ``eval_batch_size`` prompts generated together.

    ``answer_weighting`` is how the loss weighs the answers of a batch (``answer_weights``): ``"token"`` every
    trained token alike (the plain mean, LLaVA's), ``"answer"`` every answer alike, ``"sqrt"`` a token of an
    answer of n tokens by 1 / sqrt(n) (InternVL 2.5's "square averaging", Chen et al., 2024)."""

    name: ClassVar[str] = "vlm"
    vocab_size: int = 1024
    tokenizer_scenes: int = 2000
    max_new_tokens: int = 40
    eval_batch_size: int = 64
    answer_weighting: AnswerWeighting = "token"

    def __post_init__(self) -> None:
        if self.answer_weighting not in ("token", "answer", "sqrt"):
            raise ValueError(f"answer_weighting must be 'token', 'answer' or 'sqrt', got {self.answer_weighting!r}")

    # ---------------------------------------------------------------------------------------------- model

    def build_model(self, run: RunContext) -> VisionLanguageModel:
        recipe = run.recipe
        if run.init is not None:
            from vlkit.hub import from_pretrained

            model = from_pretrained(run.init)
            if not isinstance(model, VisionLanguageModel) or model.tokenizer is None:
                raise ValueError(f"--init {run.init}: the vlm task continues a vision-language model with a tokenizer")
            return model
        base = apply_overrides(get_config(recipe.model), dict(recipe.model_overrides))
        tokenizer = self._tokenizer(run, base.chat_template, base.lm.max_seq_len)
        backend = tokenizer.backend
        overrides = {
            "lm.vocab_size": tokenizer.vocab_size,
            "lm.eos_token_ids": (tokenizer.eos_token_id,),
            "lm.pad_token_id": tokenizer.pad_token_id,
            "lm.bos_token_id": backend.token_to_id("<bos>"),
            "image_token_id": backend.token_to_id(IMAGE_PLACEHOLDER),
        }
        if getattr(base.bridge, "text_input", False):  # a Q-Former that reads text (BLIP-2 stage 1) shares the BPE
            overrides["bridge.vocab_size"] = tokenizer.vocab_size
        torch.manual_seed(recipe.stages[0].train.seed)
        model = build_model(apply_overrides(base, overrides))
        if not isinstance(model, VisionLanguageModel):
            raise ValueError(f"recipe {recipe.name}: preset {recipe.model} builds a {type(model).__name__}, but the "
                             "vlm task trains a VisionLanguageModel")  # fmt: skip
        model.tokenizer = tokenizer
        return model

    def _tokenizer(self, run: RunContext, template: str, max_len: int) -> Tokenizer:
        saved = run.out_dir / "tokenizer.json"
        if saved.exists():
            return Tokenizer.from_file(saved, max_len=max_len)
        config = _shapes_config(run.recipe.data)
        tokenizer = shapes_chat_tokenizer(config, template, self.tokenizer_scenes, self.vocab_size, max_len)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
        return tokenizer

    # ---------------------------------------------------------------------------------------------- training

    def training_inputs(self, run: RunContext, stage: Any, model: nn.Module) -> TrainingInputs:
        assert isinstance(model, VisionLanguageModel) and model.tokenizer is not None
        data = run.training_data(stage)
        seed = stage.train.seed
        if isinstance(data, ShapesText):
            dataset: torch.utils.data.Dataset = ShapesTextDataset(data, model)
        elif isinstance(data, ShapesInstructions):
            dataset = ShapesInstructionDataset(data, model, seed)
        elif isinstance(data, Manifest):  # --train-data: the user's LLaVA conversation JSON / JSONL
            read = read_conversations(data.path, skip_bad=data.skip_bad)
            if not read.conversations:
                raise ValueError(f"{data.path}: no usable conversations")
            dataset = ConversationDataset(read.conversations, model, skip_bad=data.skip_bad)
            collate = _collate(model.tokenizer.pad_token_id, self.answer_weighting)
            return TrainingInputs(dataset, collate, _step, stage.train.batch_size, skipped=len(read.skipped))
        else:
            raise ValueError(f"recipe {run.recipe.name}: the vlm task trains on ShapesInstructions, ShapesText or "
                             f"LLaVA conversations (--train-data), not {data.kind!r}")  # fmt: skip
        # Text samples train on every token: one answer each, which only the plain mean weighs as text.
        weighting = "token" if isinstance(data, ShapesText) else self.answer_weighting
        collate = _collate(model.tokenizer.pad_token_id, weighting)
        return TrainingInputs(dataset, collate, _step, stage.train.batch_size)

    # ---------------------------------------------------------------------------------------------- evaluation

    def evaluation(self, run: RunContext, model: nn.Module, stage: Any = None) -> Callable[[nn.Module], EvalResult]:
        """The instruction evaluation (``VLMEvaluation``) on the recipe's data, also after a stage that trains on
        captions alone (its zero-shot VQA), with any of ``EXTRA_KINDS`` the stage trains on; a stage on described
        text is scored as it trains, on its own data (``DescribedTextEvaluation``: can the LM answer from the
        description in its context?)."""
        assert isinstance(model, VisionLanguageModel)
        stage_data = None if stage is None else run.training_data(stage)
        if isinstance(stage_data, ShapesText):
            if not stage_data.described:
                raise ValueError(f"recipe {run.recipe.name}, stage {stage.name}: plain ShapesText asks no question "
                                 "to evaluate; set the stage's evaluate=False or described=True")  # fmt: skip
            return DescribedTextEvaluation.build(stage_data, model, self.eval_batch_size)
        data = run.recipe.data
        if not isinstance(data, ShapesInstructions):
            raise ValueError(f"recipe {run.recipe.name}: the vlm task evaluates on ShapesInstructions data")
        if isinstance(stage_data, ShapesInstructions):  # a kind only this stage trains on is scored too
            extra = [kind for kind in stage_data.kinds if kind in EXTRA_KINDS and kind not in data.kinds]
            data = data.replace(kinds=(*data.kinds, *extra))
        return VLMEvaluation.build(data, model, self.max_new_tokens, self.eval_batch_size)

    def report(self, run: RunContext, result: EvalResult, out_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
        samples = result.artifacts.get("samples")
        if not samples:
            return [], []
        path = out_dir / "answers.png"
        plot_answers(samples, path)
        caption = "Test scenes (seen combinations): the question, the model's answer, the true answer; boxes: " \
                  "green = true, red = predicted."  # fmt: skip
        return [(caption, path)], []


def _step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
    labels = batch["labels"]
    if not len(labels):  # every sample of the micro-batch was skipped (skip_bad): nothing to learn, a zero gradient
        zero = sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0  # its device
        return StepOutput(loss=zero, metrics={"tokens": 0.0}, weight=0.0)
    trained = labels != IGNORE_INDEX
    weights = batch.get("loss_weights")
    metrics = {"tokens": float(trained.sum())}
    # The loss alone: the LM head runs only where a target is (a fifth of the positions of an instruction sample).
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), labels,
                loss_weights=weights, return_logits=False, qformer_input_ids=batch.get("qformer_input_ids"),
                qformer_attention_mask=batch.get("qformer_attention_mask"))  # fmt: skip
    # A (weighted) mean over the predicted tokens (position t predicts t + 1): accumulated micro-batches and
    # processes weigh it by their sum.
    targets = trained[:, 1:]
    weight = float(targets.sum()) if weights is None else float(weights[:, 1:][targets].sum())
    loss = out.loss if batch.get("pixel_values") is not None else _with_the_bridge(model, out.loss)
    return StepOutput(loss=loss, metrics=metrics, weight=weight)


def _with_the_bridge(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` + 0 x the bridge's tokens for one blank image, where the bridge trains: a micro-batch without images
    (users' text-only conversations) still gives the bridge a gradient, of zeros. Without it a stage that trains the
    bridge alone has nothing to differentiate, and DDP, which waits for every trained parameter's gradient, falls out
    of step between processes."""
    inner: Any = getattr(model, "module", model)  # DDP's wrapper holds the model as .module
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in inner.bridge.parameters()):
        return loss
    size = inner.config.vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    blank = torch.zeros(1, 3, height, width, device=loss.device)
    prompt = [t.to(loss.device) for t in inner.prompt_ids(["?"])] if inner.config.bridge_reads_prompt else []
    return loss + 0.0 * inner.embed_image(blank, *prompt).tokens.float().sum()


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


def shapes_chat_tokenizer(
    config: shapes.ShapesConfig, template: str, scenes: int, vocab_size: int, max_len: int
) -> Tokenizer:
    """A BPE fitted to ``scenes`` ShapesWorld scenes' texts and the chat template's words, with the image placeholder,
    the template's special tokens and the grounding tags as single tokens; digits split (box corners are digits)."""
    chat = get_template(template)
    texts = [*scene_texts(config, scenes), chat.user_prefix + CAPTION_PROMPT + chat.assistant_prefix]
    specials = (IMAGE_PLACEHOLDER, *chat.special_tokens, *GROUNDING_TAGS)
    return train_tokenizer(texts, vocab_size, max_len, extra_special_tokens=specials, split_digits=True)


def scene_texts(config: shapes.ShapesConfig, count: int) -> list[str]:
    """``text_samples`` of training scenes 0 .. count - 1."""
    return [text for index in range(count) for text in text_samples(shapes.generate(config, "train", index), config,
                                                                     "train")]  # fmt: skip


def _shapes_config(data: Any) -> shapes.ShapesConfig:
    if not isinstance(data, ShapesInstructions | ShapesText):
        raise ValueError(f"the vlm task's tokenizer is fitted on ShapesWorld text, not {data.kind!r} data")
    return data.config


# ---------------------------------------------------------------------------------------------- datasets


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


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Question:
    split: str
    kind: str
    question: str
    answer: str
    box: tuple[int, int, int, int] | None
    objects: list[shapes.ShapesObject]
    image: Any
    prompt: torch.Tensor  # (T,)
    pixels: torch.Tensor  # (3, H, W)


# Generation room per object of a layout answer ("and a large red circle <box>(123,456),(789,999)</box>": ~27 tokens
# with digits spelled one by one).
_LAYOUT_TOKENS_PER_OBJECT = 32


@dataclass
class VLMEvaluation:
    """One question of each kind about each of ``eval_size`` scenes per split of the spec's ``eval_split`` (test or
    validation, seen and held-out combinations), rendered and tokenized once."""

    questions: list[_Question]
    max_new_tokens: int
    batch_size: int
    pad_id: int
    stop_ids: tuple[int, ...]  # end of sequence, and the chat template's end of turn

    @classmethod
    def build(
        cls, spec: ShapesInstructions, model: VisionLanguageModel, max_new_tokens: int, batch_size: int
    ) -> VLMEvaluation:
        tokenizer = model.tokenizer
        transform = ImageTransform(image_size=model.config.vision.image_size)
        questions = []
        layout = "layout" in spec.kinds
        for split in shapes.eval_splits(spec.config, spec.eval_split):
            for index in range(spec.eval_size):
                sample = shapes.generate(spec.config, split, index)  # type: ignore[arg-type]
                by_kind: dict[str, list[InstructionItem]] = {}
                for item in instruction_items(sample, spec.config, split, layout):  # type: ignore[arg-type]
                    if item.kind in spec.kinds:
                        by_kind.setdefault(item.kind, []).append(item)
                # One item of each kind, drawn (seeded by the scene): a scene's first item of a kind is not a fair
                # sample (its first spatial question is mostly answered "no", its first count one is the total).
                rng = np.random.default_rng(mix_seed(_EVAL_STREAM, SPLIT_IDS[split], index))
                pixels = transform(sample.image)
                for group in by_kind.values():
                    item = group[int(rng.integers(len(group)))]
                    question = _first_question(item.question, spec.question_first >= 0.5, model.config.chat_template)
                    asked = Conversation([Turn("user", question)], [sample.image])
                    prompt = tokenize_prompt(asked, model.config.chat_template, tokenizer, model.config.image_token_id,
                                             model.tokens_per_image())  # fmt: skip
                    questions.append(_Question(split, item.kind, item.question, item.answer, item.box,
                                               list(sample.objects), sample.image, prompt, pixels))  # fmt: skip
        stop_ids = end_of_answer_ids(model.config.chat_template, tokenizer)
        if "layout" in spec.kinds:  # a layout answer spells every object's box
            max_new_tokens = max(max_new_tokens, _LAYOUT_TOKENS_PER_OBJECT * spec.config.max_objects)
        return cls(questions, max_new_tokens, batch_size, tokenizer.pad_token_id, stop_ids)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        assert isinstance(model, VisionLanguageModel)
        answers = self.answer(model)
        metrics: dict[str, float] = {}
        for heldout, suffix in ((False, ""), (True, "_heldout")):
            rows = [
                (q, a) for q, a in zip(self.questions, answers, strict=True) if shapes.is_heldout(q.split) == heldout
            ]
            if not rows:
                continue  # no held-out combinations in this config
            vqa = [(q, a) for q, a in rows if q.kind not in ("caption", "grounding", "layout")]
            if vqa:
                result = vqa_accuracy([a for _, a in vqa], [q.answer for q, _ in vqa], [q.kind for q, _ in vqa])
                metrics |= {f"{key}{suffix}": value for key, value in result.as_dict().items()}
                # How many questions the accuracy is over (its binomial standard error: ~0.013 at 0.90 over 530).
                metrics[f"vqa_questions{suffix}"] = float(len(vqa))
            grounding = [(q, a) for q, a in rows if q.kind == "grounding"]
            if grounding:
                boxes = [q.box for q, _ in grounding]
                result = grounding_accuracy([a for _, a in grounding], boxes)  # type: ignore[arg-type]
                metrics |= {f"{key}{suffix}": value for key, value in result.as_dict().items()}
            layouts = [(q, a) for q, a in rows if q.kind == "layout"]
            if layouts:
                targets = [layout_objects(q.objects, q.image) for q, _ in layouts]
                result = layout_accuracy([a for _, a in layouts], targets)
                metrics |= {f"{key}{suffix}": value for key, value in result.as_dict().items()}
            captions = [(q, a) for q, a in rows if q.kind == "caption"]
            if captions:
                scores = caption_scores([a for _, a in captions], [q.objects for q, _ in captions])
                metrics |= {f"{key}{suffix}": value for key, value in scores.as_dict().items()}
        samples = [(q, a) for q, a in zip(self.questions, answers, strict=True) if not shapes.is_heldout(q.split)][:12]
        return EvalResult(metrics, {"samples": samples})

    def answer(self, model: VisionLanguageModel) -> list[str]:
        """Greedy answers, in question order; prompts of similar length are generated together (left-padded).
        Greedy whatever decoding defaults the model carries (a checkpoint's sampling or penalty): scores reproduce."""
        order = sorted(range(len(self.questions)), key=lambda i: len(self.questions[i].prompt))
        answers: list[str] = [""] * len(self.questions)
        device = next(model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            prompts = [self.questions[i].prompt for i in chunk]
            length = max(len(p) for p in prompts)
            ids = torch.full((len(chunk), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(prompts):
                ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = prompt, 1
            pixels = torch.stack([self.questions[i].pixels for i in chunk]).to(device)
            prompt_options = {}
            if model.config.bridge_reads_prompt:  # the Q-Former reads the question
                qformer_ids, qformer_mask = model.prompt_ids([self.questions[i].question for i in chunk])
                prompt_options = {"qformer_input_ids": qformer_ids.to(device),
                                  "qformer_attention_mask": qformer_mask.to(device)}  # fmt: skip
            out = model.generate(ids.to(device), mask.to(device), pixels, max_new_tokens=self.max_new_tokens,
                                 stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, do_sample=False,
                                 repetition_penalty=1.0, stop_strings=(), min_new_tokens=0,
                                 **prompt_options)  # fmt: skip
            for row, index in enumerate(chunk):
                answers[index] = decode_answer(model.tokenizer, out[row, length:].tolist(), self.stop_ids)
        return answers


@dataclass
class DescribedTextEvaluation:
    """The language model alone, asked about ``spec.eval_size`` test scenes (and as many of held-out combinations;
    validation scenes with ``spec.eval_split="val"``)
    with each scene described in its context as ``spec`` trains it (``described_conversations``: the caption or the
    layout, ``spec.kinds``, scenes of at least ``spec.min_objects`` objects), one question per conversation. An
    answer is right when every one of its tokens and the end of turn is the most likely after the ones before it
    (teacher-forced exact match, no generation): ``text_accuracy_<kind>`` per kind, ``text_accuracy`` over all
    answers, ``_heldout`` for the held-out combinations. Box answers (grounding) count only when copied exactly."""

    samples: list[tuple[str, str, torch.Tensor, torch.Tensor]]  # split, kind, input ids, labels
    batch_size: int
    pad_id: int

    @classmethod
    def build(cls, spec: ShapesText, model: VisionLanguageModel, batch_size: int) -> DescribedTextEvaluation:
        assert model.tokenizer is not None
        samples = []
        for split in shapes.eval_splits(spec.config, spec.eval_split):
            for index in range(spec.eval_size):
                sample = shapes.generate(spec.config, split, index)  # type: ignore[arg-type]
                for conversation in _described(spec, sample, split, 1):
                    ids, labels = tokenize_conversation(conversation, model.config.chat_template, model.tokenizer,
                                                        model.config.image_token_id, 0)  # fmt: skip
                    samples.append((split, conversation.meta["kinds"][0], ids, labels))
        if not samples:
            raise ValueError(f"ShapesText: no {spec.eval_split} question in {spec.eval_size} scenes "
                             f"(kinds {spec.kinds}, min_objects {spec.min_objects})")  # fmt: skip
        return cls(samples, batch_size, model.tokenizer.pad_token_id)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        assert isinstance(model, VisionLanguageModel)
        collate = _collate(self.pad_id)
        device = next(model.parameters()).device
        hits: dict[str, list[bool]] = {}
        for start in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[start : start + self.batch_size]
            batch = collate([{"input_ids": ids, "labels": labels} for _, _, ids, labels in chunk])
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
            predicted, targets = logits[:, :-1].argmax(-1).cpu(), batch["labels"][:, 1:]
            for row, (split, kind, _, _) in enumerate(chunk):
                trained = targets[row] != IGNORE_INDEX
                right = bool((predicted[row][trained] == targets[row][trained]).all())
                suffix = "_heldout" if shapes.is_heldout(split) else ""
                hits.setdefault(f"text_accuracy_{kind}{suffix}", []).append(right)
                hits.setdefault(f"text_accuracy{suffix}", []).append(right)
        return EvalResult({key: float(np.mean(values)) for key, values in sorted(hits.items())})


def answer_is_right(question: _Question, answer: str) -> bool:
    """Scored as the metrics score it: IoU >= 0.5 for a box (for every object's box in a layout), an exact caption,
    exact match after normalisation."""
    if question.kind == "grounding":
        return bool(grounding_accuracy([answer], [question.box]).accuracy)  # type: ignore[list-item]
    if question.kind == "layout":
        return layout_accuracy([answer], [layout_objects(question.objects, question.image)]).accuracy == 1.0
    if question.kind == "caption":
        return bool(caption_scores([answer], [question.objects]).exact)
    return vqa_accuracy([answer], [question.answer]).correct[0]


def plot_answers(samples: list[tuple[_Question, str]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    columns = 4
    rows = (len(samples) + columns - 1) // columns
    figure = Figure(figsize=(3.2 * columns, 3.6 * rows))
    FigureCanvasAgg(figure)
    for number, (question, answer) in enumerate(samples):
        axis = figure.add_subplot(rows, columns, number + 1)
        image = question.image
        axis.imshow(image)
        width, height = image.size
        if question.kind == "layout":  # every object's box, true and predicted
            boxes = [(box, "#1a7f37") for _, box in layout_objects(question.objects, image)]
            boxes += [(box, "#d1242f") for _, box in parse_layout(answer)]
        else:
            boxes = [(question.box, "#1a7f37"), (parse_box(answer), "#d1242f")]
        for box, colour in boxes:
            if box is not None:
                x1, y1, x2, y2 = (box[0] * width / 1000, box[1] * height / 1000, box[2] * width / 1000,
                                  box[3] * height / 1000)  # fmt: skip
                axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        right = answer_is_right(question, answer)
        shown = "".join(c if c.isprintable() else "?" for c in answer[:40])
        axis.set_title(f"{question.question}\nmodel: {shown}\ntrue: {question.answer[:40]}", fontsize=7,
                       color="#1a7f37" if right else "#333333")  # fmt: skip
        axis.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")

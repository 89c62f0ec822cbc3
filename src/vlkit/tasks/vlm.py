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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlkit.data import shapes
from vlkit.data.conversations import read_conversations
from vlkit.data.shapes_vqa import (
    CAPTION_PROMPT,
    InstructionItem,
    instruction_items,
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
from vlkit.tasks.vlm_data import (
    AnswerWeighting,
    ConversationDataset,
    ShapesInstructionDataset,
    ShapesTextDataset,
    _collate,
    _described,
    _first_question,
    answer_weights,
)
from vlkit.text import Tokenizer, train_tokenizer
from vlkit.text.chat import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Conversation,
    Turn,
    decode_answer,
    end_of_answer_ids,
    get_template,
    tokenize_conversation,
    tokenize_prompt,
)
from vlkit.train import StepOutput

logger = logging.getLogger(__name__)

__all__ = ["AnswerWeighting", "DescribedTextEvaluation", "VisionLanguage", "answer_weights", "decode_answer"]


GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>")
_EVAL_STREAM = 12  # which item of each kind a test scene is asked
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

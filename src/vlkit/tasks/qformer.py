"""BLIP-2's first stage as a task (Li et al., 2023, "BLIP-2", Sec. 3.2): the Q-Former of a ``VisionLanguageModel``
learns, against the frozen image encoder alone, to pull out the visual features the text is about. Three losses share
its weights, each with the attention pattern ``QFormer.encode`` gives it:

- image-text contrastive (ITC), "unimodal" (queries and text do not see each other): the similarity of an image and a
  text is the largest, over the M query outputs, of the cosine between a projected query output and the text's
  projected first-token (``<bos>``, BERT's [CLS]) output; a softmax over the batch both ways with a learnable
  temperature. Identical captions in a batch are positives of each other (targets spread evenly over them).
- image-text matching (ITM), "bidirectional" (all see all): every image gets a hard negative text and every text a
  hard negative image, drawn from the softmax of the contrastive similarities with the positives removed; a linear
  head's two logits, averaged over the query outputs, classify the B positive and 2B negative pairs.
- image-grounded text generation (ITG), "multimodal_causal" (the queries see each other; text position t sees the
  queries and text positions <= t): the next token from the Q-Former's text outputs, scored against its word
  embeddings (the head is tied to them) over the VLM's vocabulary.

    scene --image--> frozen encoder --> tokens (B, N, D_vis); --first caption, the VLM's tokenizer--> ids (B, T)
        --Q-Former, three patterns--> losses; loss = ITC + ITM + ITG, each logged

The model is the recipe's VLM (``shapes_blip2``: a Q-Former bridge with text input and ``QFormerHeads``); its
tokenizer is the one the vlm task fitted, and the Q-Former's word embeddings must cover it. Data: the first caption of
each ``ShapesInstructions`` training scene. Evaluation: image -> text and text -> image recall@1 with the contrastive
similarity on the test scenes' captions (a hit when the retrieved item carries the same caption), seen and held-out
colour x shape combinations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlkit.bridges import QFormer
from vlkit.data import shapes
from vlkit.data.specs import ShapesInstructions
from vlkit.data.transforms import ImageTransform
from vlkit.eval.result import EvalResult
from vlkit.models.vlm import QFormerHeads, VisionLanguageModel
from vlkit.tasks.base import RunContext, Task, TrainingInputs, register_task
from vlkit.text import Tokenizer
from vlkit.train import StepOutput, distributed

__all__ = [
    "QFormerLosses",
    "QFormerPretraining",
    "contrastive_loss",
    "generation_loss",
    "hard_negatives",
    "qformer_losses",
    "query_text_similarity",
]


@register_task
@dataclass(frozen=True)
class QFormerPretraining(Task):
    """``eval_batch_size``: scenes encoded together at evaluation."""

    name: ClassVar[str] = "qformer"
    eval_batch_size: int = 64

    def build_model(self, run: RunContext) -> nn.Module:
        raise ValueError(f"recipe {run.recipe.name}: the qformer task trains one stage of a vision-language recipe; "
                         "the recipe's own task (vlm) builds the model and fits its tokenizer")  # fmt: skip

    def training_inputs(self, run: RunContext, stage: Any, model: nn.Module) -> TrainingInputs:
        qformer, _, tokenizer = _parts(model)
        if distributed.get_world_size() > 1:
            # The step runs the model's parts, not its forward, which DDP's gradient reduction hooks into.
            raise ValueError(f"recipe {run.recipe.name}: the qformer stage trains in one process")
        data = run.training_data(stage)
        if not isinstance(data, ShapesInstructions):
            raise ValueError(f"recipe {run.recipe.name}: the qformer task trains on ShapesInstructions scenes' "
                             f"captions, not {data.kind!r}")  # fmt: skip
        assert isinstance(model, VisionLanguageModel)
        dataset = CaptionDataset(data, tokenizer, model.config.vision.image_size, qformer.config.max_seq_len)
        return TrainingInputs(dataset, _collate(tokenizer.pad_token_id), _step, stage.train.batch_size)

    def evaluation(self, run: RunContext, model: nn.Module, stage: Any = None) -> Callable[[nn.Module], EvalResult]:
        _, _, tokenizer = _parts(model)
        data = run.recipe.data
        if not isinstance(data, ShapesInstructions):
            raise ValueError(f"recipe {run.recipe.name}: the qformer task evaluates on ShapesInstructions scenes")
        assert isinstance(model, VisionLanguageModel)
        return RetrievalEvaluation.build(data, tokenizer, model, self.eval_batch_size)


def _parts(model: nn.Module) -> tuple[QFormer, QFormerHeads, Tokenizer]:
    """The Q-Former, its stage-1 heads and the tokenizer its word embeddings index, checked."""
    model = distributed.unwrap_model(model)
    if not isinstance(model, VisionLanguageModel) or not isinstance(model.bridge, QFormer):
        raise ValueError(f"the qformer task trains a VisionLanguageModel's Q-Former bridge, got {type(model).__name__}")
    if model.qformer_heads is None or not model.bridge.config.text_input:
        raise ValueError("the qformer task needs a Q-Former with text input and the stage-1 heads "
                         "(QFormerConfig.text_input=True, VLMConfig.embed_dim)")  # fmt: skip
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the qformer task reads captions with the VLM's tokenizer, and the model has none")
    if tokenizer.vocab_size > model.bridge.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the Q-Former's word embeddings "
                         f"{model.bridge.config.vocab_size}: set bridge.vocab_size to the tokenizer's")  # fmt: skip
    return model.bridge, model.qformer_heads, tokenizer


# ---------------------------------------------------------------------------------------------- losses


@dataclass
class QFormerLosses:
    itc: torch.Tensor  # () each
    itm: torch.Tensor
    itg: torch.Tensor
    itm_accuracy: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.itc + self.itm + self.itg


def query_text_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(I, M, E) query embeddings, (T, E) text embeddings, both unit -> (I, T): the best query's cosine per pair."""
    return torch.einsum("ime,te->itm", image_embeds, text_embeds).amax(dim=-1)


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Scaled similarities (B, B) images x texts; ``positives`` (B, B) bool (the diagonal and identical captions):
    cross-entropy against targets spread evenly over the positives, image -> text and text -> image, averaged."""
    targets = positives.to(logits.dtype)
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def hard_negatives(
    logits: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a text, and for each text an image, drawn from the softmax of the scaled similarities (B, B)
    over the candidates that are not positives. Returns (text per image (B,), image per text (B,)). A row whose
    every candidate is a positive (the whole batch holds one caption) draws uniformly; the ITM label then reads
    the pair's real status."""

    def draw(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # The softmax over the allowed candidates only: over all of them, a positive far above every negative (a
        # logit scale near its cap of 100) would leave the negatives' weights at exactly 0.
        weights = scores.float().masked_fill(~allowed, float("-inf")).softmax(dim=1)  # (B, B)
        weights = torch.where(allowed.any(dim=1, keepdim=True), weights, 1.0)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(logits, ~positives), draw(logits.T, ~positives.T)


def generation_loss(
    text_hidden: torch.Tensor, word_embed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy of the Q-Former's text outputs (B, T, D_q) scored against its word embeddings
    (V, D_q); position t predicts token t + 1 where that is a real token."""
    logits = text_hidden[:, :-1] @ word_embed.T  # (B, T - 1, V)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def qformer_losses(
    model: VisionLanguageModel, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> QFormerLosses:
    """The three stage-1 losses on a batch of images (B, 3, H, W) and their captions (B, T) (right-padded)."""
    qformer, heads = model.bridge, model.qformer_heads
    assert isinstance(qformer, QFormer) and heads is not None
    image, _ = model.image_tokens(pixel_values)  # (B, N, D_vis)
    image = image.to(qformer.queries.dtype)
    mask = attention_mask.bool()
    # Identical captions (the same padded ids) are each other's positives.
    positives = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)  # (B, B)

    unimodal = qformer.encode(image, text_ids=input_ids, text_mask=mask, attention_pattern="unimodal")
    assert unimodal.text is not None
    image_embeds = F.normalize(heads.image_proj(unimodal.queries), dim=-1)  # (B, M, E)
    text_embeds = F.normalize(heads.text_proj(unimodal.text[:, 0]), dim=-1)  # (B, E)
    scale = heads.logit_scale.exp()  # at most 100: QFormerHeads.after_optimizer_step
    logits = scale * query_text_similarity(image_embeds, text_embeds)  # (B, B)
    itc = contrastive_loss(logits, positives)

    negative_text, negative_image = hard_negatives(logits.detach(), positives)
    batch = torch.arange(input_ids.shape[0], device=input_ids.device)
    pair_image = torch.cat([batch, batch, negative_image])  # (3B,) positives, then each image's, each text's negative
    pair_text = torch.cat([batch, negative_text, batch])
    # index_select: a trained tower's gradient then sums the repeated images (hard negatives) in a fixed order
    matched = qformer.encode(image.index_select(0, pair_image), text_ids=input_ids[pair_text],
                             text_mask=mask[pair_text], attention_pattern="bidirectional")  # fmt: skip
    match_logits = heads.itm_head(matched.queries).mean(dim=1)  # (3B, 2)
    labels = positives[pair_image, pair_text].long()
    itm = F.cross_entropy(match_logits.float(), labels)

    grounded = qformer.encode(image, text_ids=input_ids, text_mask=mask, attention_pattern="multimodal_causal")
    assert grounded.text is not None
    itg = generation_loss(grounded.text, qformer.word_embed.weight, input_ids, attention_mask)
    accuracy = (match_logits.argmax(dim=-1) == labels).float().mean()
    return QFormerLosses(itc, itm, itg, accuracy.detach())


def _step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
    vlm = distributed.unwrap_model(model)
    assert isinstance(vlm, VisionLanguageModel)
    losses = qformer_losses(vlm, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    parts = {
        "itc_loss": losses.itc,
        "itm_loss": losses.itm,
        "itg_loss": losses.itg,
        "itm_accuracy": losses.itm_accuracy,
    }
    metrics = {name: float(value.detach()) for name, value in parts.items()}
    return StepOutput(loss=losses.total, metrics=metrics)


# ---------------------------------------------------------------------------------------------- data


class CaptionDataset(torch.utils.data.Dataset):
    """Training scene ``index`` rendered on demand: its image and its first caption, ``<bos> ... <eos>``."""

    def __init__(self, spec: ShapesInstructions, tokenizer: Tokenizer, image_size: int | tuple[int, int],
                 max_len: int) -> None:  # fmt: skip
        self.spec = spec
        self.tokenizer = tokenizer
        self.transform = ImageTransform(image_size=image_size)
        self.max_len = max_len

    def __len__(self) -> int:
        return self.spec.train_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = shapes.generate(self.spec.config, "train", index)
        ids = torch.tensor(self.tokenizer.encode(sample.captions[0])[: self.max_len], dtype=torch.long)
        return {"input_ids": ids, "pixel_values": self.transform(sample.image)}


def _collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = [sample["input_ids"] for sample in samples]
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),  # (B, T) right-padded
            "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),  # (B, 3, H, W)
        }

    return collate


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class RetrievalEvaluation:
    """``eval_size`` scenes per split of the spec's ``eval_split`` (seen / held-out combinations): pixels and first
    captions, made once."""

    splits: dict[str, tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]]  # suffix -> pixels, captions, batch
    batch_size: int

    @classmethod
    def build(
        cls, spec: ShapesInstructions, tokenizer: Tokenizer, model: VisionLanguageModel, batch_size: int
    ) -> RetrievalEvaluation:
        transform = ImageTransform(image_size=model.config.vision.image_size)
        assert isinstance(model.bridge, QFormer)
        max_len = model.bridge.config.max_seq_len
        splits = {}
        for split in shapes.eval_splits(spec.config, spec.eval_split):
            suffix = "_heldout" if shapes.is_heldout(split) else ""
            scenes = [shapes.generate(spec.config, split, index) for index in range(spec.eval_size)]  # type: ignore[arg-type]
            captions = [scene.captions[0] for scene in scenes]
            pixels = torch.stack([transform(scene.image) for scene in scenes])  # (S, 3, H, W)
            ids = [torch.tensor(tokenizer.encode(text)[:max_len], dtype=torch.long) for text in captions]
            splits[suffix] = (pixels, captions, _collate(tokenizer.pad_token_id)(
                [{"input_ids": i, "pixel_values": p} for i, p in zip(ids, pixels, strict=True)]))  # fmt: skip
        return cls(splits, batch_size)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        vlm = distributed.unwrap_model(model)
        assert isinstance(vlm, VisionLanguageModel)
        metrics: dict[str, float] = {}
        for suffix, (pixels, captions, batch) in self.splits.items():
            similarity = self.similarity(vlm, pixels, batch["input_ids"], batch["attention_mask"])  # (S, S)
            same = torch.tensor([[a == b for b in captions] for a in captions])  # (S, S): the same caption
            rows = torch.arange(len(captions))
            metrics[f"retrieval_i2t_r1{suffix}"] = float(same[rows, similarity.argmax(dim=1)].float().mean())
            metrics[f"retrieval_t2i_r1{suffix}"] = float(same[similarity.argmax(dim=0), rows].float().mean())
        return EvalResult(metrics)

    def similarity(
        self, model: VisionLanguageModel, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(S, S) images x texts: the ITC similarity, batch by batch ("unimodal": one pass gives both sides)."""
        qformer, heads = model.bridge, model.qformer_heads
        assert isinstance(qformer, QFormer) and heads is not None
        device = qformer.queries.device
        images, texts = [], []
        for start in range(0, len(pixels), self.batch_size):
            part = slice(start, start + self.batch_size)
            image, _ = model.image_tokens(pixels[part].to(device))
            out = qformer.encode(image.to(qformer.queries.dtype), text_ids=ids[part].to(device),
                                 text_mask=mask[part].to(device).bool(), attention_pattern="unimodal")  # fmt: skip
            assert out.text is not None
            images.append(F.normalize(heads.image_proj(out.queries).float(), dim=-1))  # (b, M, E)
            texts.append(F.normalize(heads.text_proj(out.text[:, 0]).float(), dim=-1))  # (b, E)
        return query_text_similarity(torch.cat(images), torch.cat(texts)).cpu()

"""Evaluation: zero-shot classification, image-text retrieval, VQA / grounding / captioning metrics, and the
ShapesWorld / digits benchmarks."""

from vlkit.eval.captioning import CaptionResult, caption_mentions, caption_scores
from vlkit.eval.grounding import (
    GroundingResult,
    LayoutResult,
    box_iou,
    grounding_accuracy,
    layout_accuracy,
    parse_box,
    parse_groundings,
    parse_layout,
)
from vlkit.eval.result import EvalResult
from vlkit.eval.retrieval import RetrievalResult, retrieval_metrics
from vlkit.eval.vqa import VQAResult, normalise_answer, vqa_accuracy
from vlkit.eval.zero_shot import ZeroShotResult, class_embeddings, encode_images, zero_shot_classify

__all__ = [
    "CaptionResult",
    "EvalResult",
    "GroundingResult",
    "LayoutResult",
    "RetrievalResult",
    "VQAResult",
    "ZeroShotResult",
    "box_iou",
    "caption_mentions",
    "caption_scores",
    "class_embeddings",
    "encode_images",
    "grounding_accuracy",
    "layout_accuracy",
    "normalise_answer",
    "parse_box",
    "parse_groundings",
    "parse_layout",
    "retrieval_metrics",
    "vqa_accuracy",
    "zero_shot_classify",
]

from vlkit.eval.benchmarks import EvalSuite, digits_suite, shapes_suite

__all__ += ["EvalSuite", "digits_suite", "shapes_suite"]

"""Evaluation: zero-shot classification, image-text retrieval, and the ShapesWorld / digits benchmarks."""

from vlkit.eval.retrieval import RetrievalResult, retrieval_metrics
from vlkit.eval.zero_shot import ZeroShotResult, class_embeddings, encode_images, zero_shot_classify

__all__ = [
    "RetrievalResult",
    "ZeroShotResult",
    "class_embeddings",
    "encode_images",
    "retrieval_metrics",
    "zero_shot_classify",
]

from vlkit.eval.benchmarks import EvalSuite, digits_suite, shapes_suite

__all__ += ["EvalSuite", "digits_suite", "shapes_suite"]

"""Retrieval recall@K and zero-shot accuracy on hand-made similarity matrices whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlkit.eval import retrieval_metrics, zero_shot_classify


def _features_for(similarity: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features whose dot products are exactly ``similarity`` (N, M): images are one-hot rows."""
    table = torch.tensor(similarity, dtype=torch.float64)
    return torch.eye(table.shape[0], dtype=torch.float64), table.T.contiguous()


# --- retrieval


def test_retrieval_perfect() -> None:
    features = torch.eye(4)
    result = retrieval_metrics(features, features, [0, 1, 2, 3], ks=(1, 5))
    assert result.image_to_text == {1: 1.0, 5: 1.0}
    assert result.text_to_image == {1: 1.0, 5: 1.0}
    torch.testing.assert_close(result.similarity, torch.eye(4))


def test_retrieval_reversed_ranks_correct_item_last() -> None:
    # Each image scores its own caption 0 and every other caption 1: the right answer is always ranked last (4th).
    images = torch.eye(4)
    texts = 1 - torch.eye(4)
    result = retrieval_metrics(images, texts, [0, 1, 2, 3], ks=(1, 3, 4))
    assert result.image_to_text == {1: 0.0, 3: 0.0, 4: 1.0}
    assert result.text_to_image == {1: 0.0, 3: 0.0, 4: 1.0}


def test_retrieval_several_captions_per_image() -> None:
    similarity = [
        [0.9, 0.1, 0.8, 0.2],  # image 0 owns texts 0, 1: its best caption (0.9) beats every wrong one
        [0.7, 0.6, 0.5, 0.65],  # image 1 owns texts 2, 3: best own caption 0.65 < text 0's 0.7 -> rank 2
    ]
    images, texts = _features_for(similarity)
    result = retrieval_metrics(images, texts, [0, 0, 1, 1], ks=(1, 2))
    assert result.image_to_text == {1: 0.5, 2: 1.0}
    # Texts: 0 -> rank 1 (0.9 > 0.7); 1 -> rank 2 (0.1 < 0.6); 2 -> rank 2 (0.5 < 0.8); 3 -> rank 1 (0.65 > 0.2).
    assert result.text_to_image == {1: 0.5, 2: 1.0}
    as_dict = result.as_dict()
    assert as_dict == {
        "retrieval_i2t_r1": 0.5,
        "retrieval_i2t_r2": 1.0,
        "retrieval_t2i_r1": 0.5,
        "retrieval_t2i_r2": 1.0,
    }


def test_retrieval_other_captions_of_the_same_image_are_not_competitors() -> None:
    # Image 0's two captions tie at 0.9: a tie with its own caption is not a tie with a wrong item.
    similarity = [
        [0.9, 0.9, 0.1],
        [0.6, 0.2, 0.3],
    ]
    images, texts = _features_for(similarity)
    result = retrieval_metrics(images, texts, [0, 0, 1], ks=(1,))
    # Image 0: best own 0.9, wrong text 2 has 0.1 -> hit. Image 1: own 0.3 < wrong text 0's 0.6 -> miss.
    assert result.image_to_text == {1: 0.5}
    # Text 0: 0.9 > 0.6, text 1: 0.9 > 0.2, text 2: 0.3 > 0.1 -> all hits.
    assert result.text_to_image == {1: 1.0}


def test_retrieval_ties_count_against_the_model() -> None:
    images, texts = _features_for([[0.5, 0.5], [0.2, 0.9]])
    result = retrieval_metrics(images, texts, [0, 1], ks=(1, 2))
    assert result.image_to_text == {1: 0.5, 2: 1.0}  # image 0: wrong text ties its own -> not a hit at 1
    assert result.text_to_image == {1: 1.0, 2: 1.0}


@pytest.mark.parametrize("count", [2, 3, 5])
def test_retrieval_collapsed_embedding_scores_zero(count: int) -> None:
    features = torch.ones(count, 4)
    result = retrieval_metrics(features, features, list(range(count)), ks=(1,))
    assert result.image_to_text == {1: 0.0}
    assert result.text_to_image == {1: 0.0}


def test_retrieval_single_item_is_trivially_right() -> None:
    result = retrieval_metrics(torch.ones(1, 3), torch.ones(1, 3), [0], ks=(1,))
    assert result.image_to_text == {1: 1.0} and result.text_to_image == {1: 1.0}


def test_retrieval_bfloat16_features_are_scored_in_float32() -> None:
    images, texts = _features_for([[0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.5, 0.65]])
    result = retrieval_metrics(images.bfloat16(), texts.bfloat16(), [0, 0, 1, 1], ks=(1, 2))
    assert result.similarity.dtype == torch.float32
    assert result.image_to_text == {1: 0.5, 2: 1.0}


@pytest.mark.parametrize("owners", [[0, 1], [0, 1, 3], [0, 1, -1]])
def test_retrieval_rejects_bad_text_to_image(owners: list[int]) -> None:
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(3), torch.eye(3), owners)


# --- zero-shot classification


def test_zero_shot_top1_top5_and_confusion() -> None:
    num_classes = 6
    class_features = torch.eye(num_classes)
    # Scores per image over 6 classes; the true class of each image is given by `labels`.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: top-1 hit
            [0.8, 0.7, 0.1, 0.2, 0.3, 0.0],  # label 1: predicted 0, within top 5
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: ranked 6th -> top-5 miss, predicted 5
            [0.0, 0.1, 0.2, 0.9, 0.3, 0.4],  # label 3: top-1 hit
            [0.5, 0.1, 0.6, 0.2, 0.3, 0.4],  # label 4: predicted 2, 4th -> top-5 hit
        ]
    )
    labels = [0, 1, 0, 3, 4]
    result = zero_shot_classify(scores, class_features, labels)
    assert result.top1 == pytest.approx(2 / 5)
    assert result.top5 == pytest.approx(4 / 5)
    np.testing.assert_array_equal(result.predictions, [0, 0, 5, 3, 2])
    np.testing.assert_array_equal(result.labels, labels)
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true, predicted in ((0, 0), (1, 0), (0, 5), (3, 3), (4, 2)):
        expected[true, predicted] += 1
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.confusion.sum() == len(labels)
    np.testing.assert_allclose(result.scores, scores.numpy())


def test_zero_shot_fewer_than_five_classes() -> None:
    class_features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    image_features = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.0], [-0.5, -0.2]])
    result = zero_shot_classify(image_features, class_features, [0, 1, 1, 2])
    np.testing.assert_array_equal(result.predictions, [0, 1, 0, 2])
    assert result.top1 == pytest.approx(3 / 4)
    assert result.top5 == 1.0  # with 3 classes every label is within the top "5"
    np.testing.assert_array_equal(result.confusion, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])

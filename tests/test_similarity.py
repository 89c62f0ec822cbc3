"""One similarity for the model, the evaluation and the claims bench: ``DualEncoder.similarity`` on encoded
features, reached from zero-shot, retrieval and the hard-negative scores through ``vlkit.eval.similarity``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlkit
from vlkit.bench.claims import HardNegativeSet, hard_negative_scores
from vlkit.eval.retrieval import evaluate_retrieval
from vlkit.eval.similarity import encode_texts, image_text_similarity, score_images
from vlkit.eval.zero_shot import evaluate_zero_shot
from vlkit.losses import filip_similarity
from vlkit.text import train_tokenizer

NAMES = ["red circle", "blue square", "green triangle"]
TEMPLATES = ["a {}.", "a photo of a {}."]
PROMPTS = [template.format(name) for name in NAMES for template in TEMPLATES]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a red circle.", "a blue square.", "a photo of a green triangle."], 300, max_len=12)


def _model(name: str, tokenizer) -> vlkit.models.DualEncoder:
    torch.manual_seed(0)
    return vlkit.create_model(name, **{"text.vocab_size": tokenizer.vocab_size}).eval()


def _pixels(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_zero_shot_of_a_filip_model_is_its_token_wise_similarity(tokenizer) -> None:
    model, pixels = _model("test_filip", tokenizer), _pixels(5)
    result = evaluate_zero_shot(model, tokenizer, NAMES, TEMPLATES, pixels.split(2), [0, 1, 2, 0, 1])
    batch = tokenizer(PROMPTS)
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(pixels)  # (5, n, E)
        text_tokens, text_mask = model.encode_text_tokens(batch.input_ids, batch.attention_mask)  # (6, T, E)
        i2t, t2i = model.similarity(image_tokens, text_tokens, text_mask)  # (5, 6) each
        pooled = model.encode_image(pixels, normalize=True) @ model.encode_text(batch.input_ids, normalize=True).T
    expected = i2t.view(5, len(NAMES), len(TEMPLATES)).mean(-1)
    torch.testing.assert_close(torch.from_numpy(result.scores), expected)
    # The check tells the directions and the similarities apart: scoring text -> image, or the pooled cosine (which
    # a FILIP model also has), would give other numbers.
    assert not torch.allclose(t2i.view(5, 3, 2).mean(-1), expected, atol=1e-3)
    assert not torch.allclose(pooled.view(5, 3, 2).mean(-1), expected, atol=1e-3)


def test_zero_shot_of_a_pooled_model_is_its_cosine_to_the_prompt_ensemble(tokenizer) -> None:
    model, pixels = _model("test_clip", tokenizer), _pixels(5)
    result = evaluate_zero_shot(model, tokenizer, NAMES, TEMPLATES, pixels.split(2), [0, 1, 2, 0, 1])
    batch = tokenizer(PROMPTS)
    with torch.no_grad():
        images = model.encode_image(pixels, normalize=True)  # (5, E)
        prompts = model.encode_text(batch.input_ids, batch.attention_mask, normalize=True)  # (6, E)
        classes = F.normalize(prompts.view(3, 2, -1).mean(1), dim=-1)  # (3, E): Radford et al.'s prompt ensemble
        image_to_text, text_to_image = model.similarity(images, classes)
        per_prompt, _ = model.similarity(images, prompts)
    assert image_to_text is text_to_image  # one cosine matrix ranks both ways
    torch.testing.assert_close(torch.from_numpy(result.scores), image_to_text)
    torch.testing.assert_close(image_to_text, images @ classes.T)
    # The ensemble is not the mean of per-prompt cosines; the check can see which one evaluation used.
    assert not torch.allclose(per_prompt.view(5, 3, 2).mean(-1), image_to_text, atol=1e-4)


@pytest.mark.parametrize("name", ["test_filip", "test_clip"])
def test_retrieval_and_hard_negatives_score_through_the_same_function(name: str, tokenizer) -> None:
    model, pixels = _model(name, tokenizer), _pixels(4, seed=2)
    captions, negatives = PROMPTS[:4], PROMPTS[2:]
    texts = captions + negatives
    i2t, t2i = image_text_similarity(model, tokenizer, pixels.split(3), texts)
    assert i2t.shape == t2i.shape == (4, 8)
    batch = tokenizer(texts)
    with torch.no_grad():
        if name == "test_filip":
            text_tokens, text_mask = model.encode_text_tokens(batch.input_ids, batch.attention_mask)
            want = filip_similarity(model.encode_image_tokens(pixels), text_tokens, text_mask)
        else:
            cosine = (
                model.encode_image(pixels, normalize=True)
                @ model.encode_text(batch.input_ids, batch.attention_mask, normalize=True).T
            )
            want = (cosine, cosine)
    torch.testing.assert_close(i2t, want[0])
    torch.testing.assert_close(t2i, want[1])

    owners = [0, 1, 2, 3, 0, 1, 2, 3]
    retrieval = evaluate_retrieval(model, tokenizer, pixels.split(3), texts, owners, batch_size=3)
    torch.testing.assert_close(retrieval.similarity, i2t)

    scores = hard_negative_scores(model, tokenizer, HardNegativeSet(pixels, captions, negatives))
    rows = torch.arange(4)
    assert scores["hard_negative_accuracy"] == float((i2t[rows, rows] > i2t[rows, rows + 4]).float().mean())
    best = i2t.argmax(dim=1).tolist()
    assert scores["hard_negative_r1"] == sum(texts[best[row]] == captions[row] for row in range(4)) / 4


def test_token_wise_images_are_scored_one_batch_at_a_time(tokenizer) -> None:
    # The image tokens of a whole test set need not fit at once: each pixel batch is encoded and scored on its own.
    model = _model("test_filip", tokenizer)
    seen: list[int] = []
    encode = model.encode_image_tokens

    def recording(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(len(pixels))
        return encode(pixels)

    model.encode_image_tokens = recording  # type: ignore[method-assign]
    i2t, _ = score_images(model, _pixels(5).split(2), encode_texts(model, tokenizer, PROMPTS))
    assert seen == [2, 2, 1] and i2t.shape == (5, 6)


def test_similarity_follows_the_model_and_rejects_the_other_kind_of_features(tokenizer) -> None:
    clip, filip = _model("test_clip", tokenizer), _model("test_filip", tokenizer)
    tokens = F.normalize(torch.randn(3, 4, 24), dim=-1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="pooled features"):
        clip.similarity(tokens, tokens, mask)
    with pytest.raises(ValueError, match="pooled features"):
        clip.similarity(tokens[:, 0], tokens[:, 0], mask)
    with pytest.raises(ValueError, match=r"\(B, N, E\)"):
        filip.similarity(tokens[:, 0], tokens[:, 0])
    i2t, t2i = filip.similarity(tokens, tokens, mask, chunk_size=2)
    want = filip_similarity(tokens, tokens, mask)
    torch.testing.assert_close(i2t, want[0])
    torch.testing.assert_close(t2i, want[1])

"""FILIP's token-wise similarity and loss against a slow pair-by-pair reference: values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlkit.losses import ClipLoss, FilipLoss, filip_similarity


def _tokens(
    batch: int, image_tokens: int, text_tokens: int, dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, image_tokens, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, text_tokens, dim, generator=generator, dtype=torch.float64), dim=-1)
    text_lengths = torch.randint(1, text_tokens + 1, (batch,), generator=generator)
    text_lengths[0] = text_tokens  # at least one text without padding
    image_lengths = torch.randint(1, image_tokens + 1, (batch,), generator=generator)
    text_mask = torch.arange(text_tokens)[None] < text_lengths[:, None]  # (B, T)
    image_mask = torch.arange(image_tokens)[None] < image_lengths[:, None]  # (B, N)
    return image.to(dtype), text.to(dtype), text_mask, image_mask


def _reference_similarity(
    image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's definition, one (image, text) pair at a time over only the real tokens."""
    rows_i2t, rows_t2i = [], []
    for i in range(image.shape[0]):
        row_i2t, row_t2i = [], []
        for j in range(text.shape[0]):
            scores = image[i][image_mask[i]] @ text[j][text_mask[j]].T  # (n_i, t_j)
            row_i2t.append(scores.max(dim=1).values.mean())
            row_t2i.append(scores.max(dim=0).values.mean())
        rows_i2t.append(torch.stack(row_i2t))
        rows_t2i.append(torch.stack(row_t2i))
    return torch.stack(rows_i2t), torch.stack(rows_t2i)


def _reference_loss(image, text, scale, text_mask, image_mask) -> torch.Tensor:
    i2t, t2i = _reference_similarity(image, text, text_mask, image_mask)
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(scale * i2t, labels) + F.cross_entropy(scale * t2i.T, labels)) / 2


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16])
def test_similarity_matches_reference_values_and_grads(chunk_size: int) -> None:
    image, text, text_mask, image_mask = _tokens(5, 4, 6, 3, torch.float64, seed=0)
    # Unequal image / text batches: retrieval scores N images against M texts.
    text, text_mask = torch.cat([text, text[:2].flip(1)]), torch.cat([text_mask, text_mask[:2]])
    leaves = [image.clone().requires_grad_(True), text.clone().requires_grad_(True)]
    i2t, t2i = filip_similarity(*leaves, text_mask, image_mask, chunk_size=chunk_size)
    reference_leaves = [image.clone().requires_grad_(True), text.clone().requires_grad_(True)]
    want_i2t, want_t2i = _reference_similarity(*reference_leaves, text_mask, image_mask)
    assert i2t.shape == t2i.shape == (5, 7)
    torch.testing.assert_close(i2t, want_i2t)
    torch.testing.assert_close(t2i, want_t2i)
    assert not torch.allclose(i2t, t2i)  # the two directions really differ
    weights = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((weights[0] * i2t).sum() + (weights[1] * t2i).sum(), leaves)
    want = torch.autograd.grad((weights[0] * want_i2t).sum() + (weights[1] * want_t2i).sum(), reference_leaves)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_padding_tokens_do_not_matter() -> None:
    image, text, text_mask, image_mask = _tokens(4, 5, 6, 3, torch.float64, seed=2)
    assert not text_mask.all() and not image_mask.all()
    noisy_text = torch.where(text_mask[..., None], text, 10 * torch.ones_like(text))
    noisy_image = torch.where(image_mask[..., None], image, 10 * torch.ones_like(image))
    clean = filip_similarity(image, text, text_mask, image_mask, chunk_size=3)
    noisy = filip_similarity(noisy_image, noisy_text, text_mask, image_mask, chunk_size=3)
    for got, want in zip(noisy, clean, strict=True):
        torch.testing.assert_close(got, want)
    # Without the masks the padding is read and the similarities change.
    assert not torch.allclose(filip_similarity(noisy_image, noisy_text)[0], clean[0])


def test_similarity_gradcheck_float64() -> None:
    image, text, text_mask, image_mask = _tokens(3, 3, 4, 2, torch.float64, seed=3)
    inputs = (image.requires_grad_(True), text.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, y: filip_similarity(x, y, text_mask, image_mask, chunk_size=2), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filip_loss_matches_reference(dtype: torch.dtype) -> None:
    image, text, text_mask, image_mask = _tokens(6, 5, 7, 4, dtype, seed=4)
    log_scale = torch.tensor(2.0, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (image, text, log_scale)]
    loss = FilipLoss(chunk_size=4)(
        leaves[0], leaves[1], leaves[2].exp(), torch.tensor(-3.0, dtype=dtype), text_mask=text_mask,
        image_mask=image_mask,
    )  # fmt: skip
    reference_leaves = [t.clone().requires_grad_(True) for t in (image, text, log_scale)]
    want = _reference_loss(reference_leaves[0], reference_leaves[1], reference_leaves[2].exp(), text_mask, image_mask)
    assert loss.ndim == 0
    torch.testing.assert_close(loss.to(dtype), want)
    grads = torch.autograd.grad(loss, leaves)
    want_grads = torch.autograd.grad(want, reference_leaves)
    for name, got, expected in zip(("image", "text", "scale"), grads, want_grads, strict=True):
        assert got.dtype == dtype, name
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"grad {name}: {m}")


def test_one_token_each_is_clip() -> None:
    # With N = T = 1 the token-wise similarity is the cosine and both directions agree: FILIP reduces to CLIP.
    image, text, _, _ = _tokens(6, 1, 1, 5, torch.float64, seed=5)
    scale = torch.tensor(7.0, dtype=torch.float64)
    torch.testing.assert_close(FilipLoss()(image, text, scale), ClipLoss()(image[:, 0], text[:, 0], scale))


def test_bfloat16_runs_and_is_close_to_float32() -> None:
    image, text, text_mask, image_mask = _tokens(8, 6, 5, 16, torch.float32, seed=6)
    scale = torch.tensor(10.0)
    loss32 = FilipLoss(chunk_size=3)(image, text, scale, text_mask=text_mask, image_mask=image_mask)
    image16 = image.bfloat16().requires_grad_(True)
    loss16 = FilipLoss(chunk_size=3)(image16, text.bfloat16(), scale, text_mask=text_mask, image_mask=image_mask)
    loss16.backward()
    assert image16.grad is not None and image16.grad.dtype == torch.bfloat16
    assert torch.isfinite(image16.grad.float()).all()
    torch.testing.assert_close(loss16.float(), loss32, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise() -> None:
    image, text, text_mask, _ = _tokens(3, 4, 5, 3, torch.float32, seed=7)
    scale = torch.tensor(5.0)
    with pytest.raises(ValueError, match="at least one real"):
        FilipLoss()(image, text, scale, text_mask=torch.zeros_like(text_mask))
    with pytest.raises(ValueError, match="text_mask has shape"):
        FilipLoss()(image, text, scale, text_mask=text_mask[:, :2])
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        FilipLoss()(image, text[:2], scale)
    with pytest.raises(ValueError, match="need image tokens"):
        filip_similarity(image[:, 0], text)


# --- FILIP in the dual encoder and in evaluation


def _filip_model_and_tokenizer():
    import vlkit
    from vlkit.text import train_tokenizer

    tokenizer = train_tokenizer(["a red circle.", "a blue square.", "a photo of a green triangle."], 300, max_len=12)
    torch.manual_seed(0)
    return vlkit.create_model("test_filip", **{"text.vocab_size": tokenizer.vocab_size}).eval(), tokenizer


def test_token_model_outputs_feed_filip_loss() -> None:
    from vlkit.losses import build_contrastive_loss, contrastive_loss_inputs

    model, tokenizer = _filip_model_and_tokenizer()
    model.train()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = tokenizer(["a red circle.", "a blue square.", "a photo of a green triangle."])
    out = model(pixels, batch.input_ids, batch.attention_mask)
    grid = (32 // 8) ** 2
    assert out.image_tokens.shape == (3, grid, 24) and out.text_tokens.shape == (3, 12, 24)
    torch.testing.assert_close(out.image_tokens.norm(dim=-1), torch.ones(3, grid))
    torch.testing.assert_close(out.text_mask, batch.attention_mask.bool())
    assert not out.text_mask.all()  # padding is there to be masked
    torch.testing.assert_close(model.encode_image_tokens(pixels), out.image_tokens)
    torch.testing.assert_close(model.encode_text_tokens(batch.input_ids, batch.attention_mask)[0], out.text_tokens)
    torch.testing.assert_close(model.encode_image(pixels, normalize=True), out.image_features)  # pooled path intact
    loss_fn = build_contrastive_loss(model.config.loss, chunk_size=2)
    assert isinstance(loss_fn, FilipLoss)
    loss = loss_fn(**contrastive_loss_inputs(out))
    expected = _reference_loss(
        out.image_tokens, out.text_tokens, out.logit_scale, out.text_mask, torch.ones(3, grid).bool()
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The model's logits are scale * the image -> text token-wise similarity.
    with torch.no_grad():
        i2t, _ = _reference_similarity(out.image_tokens, out.text_tokens, out.text_mask, torch.ones(3, grid).bool())
        logits = model.logits(pixels, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(logits, out.logit_scale * i2t)


def test_filip_loss_needs_token_interaction() -> None:
    import vlkit

    with pytest.raises(ValueError, match="go together"):
        vlkit.get_config("test_clip", {"loss": "filip"})
    with pytest.raises(ValueError, match="go together"):
        vlkit.get_config("test_filip", {"loss": "clip"})


def test_eval_uses_token_similarity_for_token_models() -> None:
    from vlkit.eval.retrieval import evaluate_retrieval, similarity_retrieval_metrics
    from vlkit.eval.zero_shot import evaluate_zero_shot

    model, tokenizer = _filip_model_and_tokenizer()
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names, templates = ["red circle", "blue square", "green triangle"], ["a {}.", "a photo of a {}."]
    result = evaluate_zero_shot(model, tokenizer, names, templates, pixels.split(2), [0, 1, 2, 0, 1])
    prompts = tokenizer([template.format(name) for name in names for template in templates])
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(pixels)
        text_tokens, text_mask = model.encode_text_tokens(prompts.input_ids, prompts.attention_mask)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool)
        i2t, t2i = _reference_similarity(image_tokens, text_tokens, text_mask, image_mask)
    np_scores = i2t.view(5, 3, 2).mean(-1).numpy()
    assert result.scores.shape == (5, 3)
    torch.testing.assert_close(torch.from_numpy(result.scores), torch.from_numpy(np_scores))

    texts = [template.format(name) for name in names for template in templates]  # 6 captions, 5 images
    owners = [0, 1, 2, 3, 4, 0]
    retrieval = evaluate_retrieval(model, tokenizer, pixels.split(2), texts, owners, batch_size=4)
    torch.testing.assert_close(retrieval.similarity, i2t)
    expected = similarity_retrieval_metrics(i2t, t2i, owners)
    assert retrieval.image_to_text == expected.image_to_text
    assert retrieval.text_to_image == expected.text_to_image


def test_retrieval_ranks_each_direction_by_its_own_similarity() -> None:
    from vlkit.eval.retrieval import retrieval_metrics, similarity_retrieval_metrics

    right, wrong = torch.eye(3), 1 - torch.eye(3)
    result = similarity_retrieval_metrics(right, wrong, [0, 1, 2], ks=(1,))
    assert result.image_to_text == {1: 1.0} and result.text_to_image == {1: 0.0}
    # One matrix for both directions reproduces the pooled-feature metric.
    features = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    pooled = retrieval_metrics(features, features.flip(0), [0, 1, 2, 3])
    same = similarity_retrieval_metrics(features @ features.flip(0).T, features @ features.flip(0).T, [0, 1, 2, 3])
    assert pooled.as_dict() == same.as_dict()


def test_eval_global_models_keep_the_pooled_path() -> None:
    import vlkit
    from vlkit.eval import class_embeddings, encode_images, zero_shot_classify
    from vlkit.eval.zero_shot import evaluate_zero_shot

    _, tokenizer = _filip_model_and_tokenizer()
    torch.manual_seed(0)
    model = vlkit.create_model("test_clip", **{"text.vocab_size": tokenizer.vocab_size}).eval()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names, templates = ["red circle", "blue square"], ["a {}."]
    result = evaluate_zero_shot(model, tokenizer, names, templates, pixels.split(3), [0, 1, 1, 0])
    classes = class_embeddings(model, tokenizer, names, templates)
    expected = zero_shot_classify(encode_images(model, pixels.split(3)), classes, [0, 1, 1, 0])
    np.testing.assert_allclose(result.scores, expected.scores)

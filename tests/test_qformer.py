"""BLIP-2's Q-Former: parity with transformers' ``Blip2QFormerModel`` through the key map of
``vlkit.convert.blip2_qformer``, and the three stage-1 attention patterns.

The reference is built from a tiny random ``Blip2QFormerConfig`` (no download); its weights, a random
``query_tokens``, the text ``Blip2TextEmbeddings`` and a ``language_projection`` form the Hugging Face weight dict
that ``load_weights`` maps onto vlkit's ``QFormer``. The configs vary what the key map reads: the number of queries,
the cross-attention frequency, the Q-Former width against the vision width, and whether the text parts exist.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from vlkit.bridges import QFormer, QFormerConfig, build_bridge
from vlkit.convert.blip2_qformer import qformer_config_from_hf, qformer_config_to_hf, qformer_rules
from vlkit.convert.common import ConversionError, export_weights, load_weights

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings  # noqa: E402

PARITY = {"atol": 1e-5, "rtol": 1e-5}
LM = 20

HF_CONFIGS: dict[str, dict[str, Any]] = {
    # stage 1 (text input), cross-attention every other layer, Q-Former wider than the vision tokens
    "stage1_every_other": {"num_query_tokens": 5, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "intermediate_size": 48, "cross_attention_frequency": 2, "encoder_hidden_size": 24,
                           "use_qformer_text_input": True, "vocab_size": 40, "max_position_embeddings": 16},
    # stage 2 layout (no text parts), cross-attention in every layer, narrower than the vision tokens, tanh GELU
    "stage2_every_layer": {"num_query_tokens": 3, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 24, "cross_attention_frequency": 1, "encoder_hidden_size": 40,
                           "use_qformer_text_input": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
}  # fmt: skip


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _reference(name: str) -> tuple[Any, Blip2TextEmbeddings | None, dict[str, torch.Tensor], QFormer]:
    """The transformers Q-Former parts, their weight dict in BLIP-2's layout, and the vlkit QFormer loaded from it."""
    options = dict(HF_CONFIGS[name])
    num_queries = options.pop("num_query_tokens")
    hf_config = transformers.Blip2QFormerConfig(**options)
    torch.manual_seed(0)
    qformer = _randomise(transformers.Blip2QFormerModel(hf_config), 1)
    weights = {f"qformer.{key}": value for key, value in qformer.state_dict().items()}
    weights["query_tokens"] = torch.randn(1, num_queries, hf_config.hidden_size)
    projection = nn.Linear(hf_config.hidden_size, LM)
    weights.update({f"language_projection.{key}": value for key, value in projection.state_dict().items()})
    embeddings = None
    if hf_config.use_qformer_text_input:
        embeddings = _randomise(Blip2TextEmbeddings(hf_config), 2)
        weights.update({f"embeddings.{key}": value for key, value in embeddings.state_dict().items()})
    config = qformer_config_from_hf(hf_config.to_dict(), num_queries, name)
    model = build_bridge(config, hf_config.encoder_hidden_size, LM)
    assert isinstance(model, QFormer)
    load_weights(model, qformer_rules(config), weights, name)
    return qformer, embeddings, weights, model.eval()


def _image(name: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of 7 and 4 tokens in one batch (noise padding), and the key mask."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 7, HF_CONFIGS[name]["encoder_hidden_size"], generator=generator)
    return tokens, torch.tensor([[True] * 7, [True] * 4 + [False] * 3])


def _text(vocab: int, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 6), generator=generator)
    return ids, torch.tensor([[1] * 6, [1] * 3 + [0] * 3])


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_queries_match_transformers(name: str) -> None:
    qformer, _, weights, model = _reference(name)
    image, mask = _image(name)
    queries = weights["query_tokens"].expand(2, -1, -1)
    with torch.no_grad():
        expected = qformer(
            query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask.long()
        ).last_hidden_state
        actual = model.encode(image, mask).queries
        bridged = model(image, torch.tensor([[1, 7], [1, 4]]), mask)
    torch.testing.assert_close(actual, expected, **PARITY)
    projected = expected @ weights["language_projection.weight"].T + weights["language_projection.bias"]
    torch.testing.assert_close(bridged.tokens, projected, **PARITY)
    assert bridged.grid is None and bridged.mask is None
    torch.testing.assert_close(
        model.num_output_tokens(torch.tensor([[1, 7], [1, 4]])), torch.full((2,), len(queries[0]))
    )


def test_image_text_matching_and_text_alone_match_transformers() -> None:
    """'bidirectional' = transformers' queries + text run; 'unimodal' text = its text-only run (query_length 0).

    The images carry no padding here: transformers (5.x) builds the image key mask at the length of queries + text
    and fails to broadcast it onto the queries' cross-attention; padded images are compared in the queries test.
    """
    name = "stage1_every_other"
    qformer, embeddings, weights, model = _reference(name)
    assert embeddings is not None
    image, _ = _image(name)
    image_mask = torch.ones(image.shape[:2], dtype=torch.bool)
    ids, text_mask = _text(HF_CONFIGS[name]["vocab_size"])
    queries = weights["query_tokens"].expand(2, -1, -1)
    num_queries, real = queries.shape[1], text_mask.bool()
    with torch.no_grad():
        joint = qformer(
            query_embeds=embeddings(input_ids=ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([torch.ones(2, num_queries, dtype=torch.long), text_mask], dim=1),
            encoder_hidden_states=image,
        ).last_hidden_state
        text_alone = qformer(
            query_embeds=embeddings(input_ids=ids), query_length=0, attention_mask=text_mask
        ).last_hidden_state
        matching = model.encode(image, image_mask, ids, text_mask, attention_pattern="bidirectional")
        unimodal = model.encode(image, image_mask, ids, text_mask, attention_pattern="unimodal")
        queries_alone = model.encode(image, image_mask).queries
    assert matching.text is not None and unimodal.text is not None
    torch.testing.assert_close(matching.queries, joint[:, :num_queries], **PARITY)
    torch.testing.assert_close(matching.text[real], joint[:, num_queries:][real], **PARITY)
    torch.testing.assert_close(unimodal.text[real], text_alone[real], **PARITY)
    torch.testing.assert_close(unimodal.queries, queries_alone, **PARITY)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_export_gives_back_the_transformers_weights_exactly(name: str) -> None:
    _, _, weights, model = _reference(name)
    exported = export_weights(model, qformer_rules(model.config))
    assert set(exported) == set(weights)
    for key, value in weights.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_translation_round_trips_and_builds_the_same_shapes(name: str) -> None:
    qformer, _, _, model = _reference(name)
    vision_dim = HF_CONFIGS[name]["encoder_hidden_size"]
    hf_dict = qformer_config_to_hf(model.config, vision_dim)
    rebuilt = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**hf_dict))
    shapes = {key: value.shape for key, value in rebuilt.state_dict().items()}
    assert shapes == {key: value.shape for key, value in qformer.state_dict().items()}
    assert qformer_config_from_hf(hf_dict, model.config.num_queries, name) == model.config


def test_key_map_refuses_a_checkpoint_with_missing_or_extra_layers() -> None:
    _, _, weights, model = _reference("stage2_every_layer")
    extra = dict(weights, **{"qformer.encoder.layer.9.output_query.dense.bias": torch.zeros(16)})
    with pytest.raises(ConversionError, match="unexpected keys"):
        load_weights(model, qformer_rules(model.config), extra, "extra")
    missing = {k: v for k, v in weights.items() if "crossattention" not in k}
    with pytest.raises(ConversionError, match="missing keys"):
        load_weights(model, qformer_rules(model.config), missing, "missing")


# --- attention patterns (BLIP-2 stage 1)

PATTERN_CONFIG = QFormerConfig(
    num_queries=3, dim=16, depth=2, num_heads=2, mlp_dim=24, text_input=True, vocab_size=30, max_seq_len=10
)


def _pattern_model() -> QFormer:
    torch.manual_seed(0)
    model = build_bridge(PATTERN_CONFIG, 12, LM)
    assert isinstance(model, QFormer)
    return _randomise(model, 5)  # type: ignore[return-value]


def _encode(
    model: QFormer, image: torch.Tensor, ids: torch.Tensor, pattern: str, text_mask: torch.Tensor | None = None
):
    with torch.no_grad():
        return model.encode(image, None, ids, text_mask, attention_pattern=pattern)  # type: ignore[arg-type]


def test_unimodal_queries_and_text_do_not_see_each_other() -> None:
    model = _pattern_model()
    image, other_image = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    ids = torch.randint(0, 30, (1, 6))
    other_ids = torch.randint(0, 30, (1, 6))
    base = _encode(model, image, ids, "unimodal")
    torch.testing.assert_close(_encode(model, image, other_ids, "unimodal").queries, base.queries)
    torch.testing.assert_close(_encode(model, other_image, ids, "unimodal").text, base.text)
    # The same changes do reach the other side under image-text matching's pattern.
    assert not torch.allclose(_encode(model, image, other_ids, "bidirectional").queries, base.queries, atol=1e-4)
    assert not torch.allclose(_encode(model, other_image, ids, "bidirectional").text, base.text, atol=1e-4)


def test_multimodal_causal_text_sees_queries_and_only_earlier_text() -> None:
    model = _pattern_model()
    image, other_image = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    ids = torch.randint(0, 30, (1, 7))
    base = _encode(model, image, ids, "multimodal_causal")
    for t in range(ids.shape[1]):
        changed = ids.clone()
        changed[0, t:] = (changed[0, t:] + 1) % 30
        out = _encode(model, image, changed, "multimodal_causal")
        assert out.text is not None and base.text is not None
        torch.testing.assert_close(out.text[:, :t], base.text[:, :t])  # earlier positions do not see position t
        assert not torch.allclose(out.text[:, t], base.text[:, t], atol=1e-4)
        torch.testing.assert_close(out.queries, base.queries)  # queries never see the text
    moved = _encode(model, other_image, ids, "multimodal_causal")
    assert moved.text is not None and base.text is not None
    assert not torch.allclose(moved.text[:, 0], base.text[:, 0], atol=1e-4)  # the first token sees the queries


def test_padded_text_is_never_attended_to() -> None:
    model = _pattern_model()
    image = torch.randn(2, 5, 12)
    ids = torch.randint(0, 30, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    noisy = ids.clone()
    noisy[1, 4:] = (noisy[1, 4:] + 7) % 30
    for pattern in ("bidirectional", "unimodal", "multimodal_causal"):
        a, b = _encode(model, image, ids, pattern, mask), _encode(model, image, noisy, pattern, mask)
        assert a.text is not None and b.text is not None
        torch.testing.assert_close(a.queries, b.queries)
        torch.testing.assert_close(a.text[:, :4], b.text[:, :4])
    empty = _encode(model, image, ids, "unimodal", torch.zeros(2, 6, dtype=torch.long))
    assert empty.text is not None and torch.isfinite(empty.text).all()  # an all-padding text gives no NaN


def test_text_errors_are_clear() -> None:
    model = _pattern_model()
    image = torch.randn(1, 5, 12)
    with pytest.raises(ValueError, match="exceeds the Q-Former's max_seq_len 10"):
        model.encode(image, None, torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attention pattern"):
        model.encode(image, None, torch.zeros(1, 3, dtype=torch.long), attention_pattern="causal")  # type: ignore[arg-type]
    no_text = build_bridge(PATTERN_CONFIG.replace(text_input=False), 12, LM)
    assert isinstance(no_text, QFormer)
    with pytest.raises(ValueError, match="without text input"):
        no_text.encode(image, None, torch.zeros(1, 3, dtype=torch.long))

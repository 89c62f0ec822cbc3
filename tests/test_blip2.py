"""BLIP-2's stage-1 losses (``vlkit.tasks.qformer``) against slow, obvious references, and tiny end-to-end runs of
``blip2_shapes`` and ``honeybee_c_shapes``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlkit
from vlkit.bridges import MLPBridgeConfig, QFormer, QFormerConfig
from vlkit.encoders import ViTConfig
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.recipes import get_recipe
from vlkit.recipes.run import run_recipe
from vlkit.serve.chat import ChatSession
from vlkit.tasks.qformer import generation_loss, hard_negatives, qformer_losses
from vlkit.tasks.vlm import ConversationDataset, ShapesInstructionDataset, VLMEvaluation, _collate, _step
from vlkit.text.chat import Conversation, Turn

VOCAB, PAD = 40, 0


def _model(seed: int = 0) -> VisionLanguageModel:
    vision = ViTConfig(image_size=16, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32, class_token=True,
                       final_norm="tokens")  # fmt: skip
    qformer = QFormerConfig(num_queries=3, dim=24, depth=2, num_heads=2, mlp_dim=32, cross_attention_frequency=1,
                            text_input=True, vocab_size=VOCAB, max_seq_len=16)  # fmt: skip
    lm = vlkit.get_config("test_llama_lm").replace(vocab_size=VOCAB)
    config = VLMConfig(vision=vision, bridge=qformer, lm=lm, feature_layer=None, keep_class_token=True,
                       image_token_id=VOCAB - 1, embed_dim=8)  # fmt: skip
    torch.manual_seed(seed)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():  # away from the initialisation's symmetries (zero biases, unit norms)
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four images with right-padded captions; captions 1 and 3 are identical (each other's positives)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [6, 4, 5, 4]
    ids = torch.full((4, 6), PAD)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, VOCAB - 1, (length,), generator=generator)
    ids[3] = ids[1]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
    return {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator), "input_ids": ids, "attention_mask": mask}


def test_contrastive_loss_equals_a_per_pair_reference() -> None:
    model, batch = _model(), _batch()
    qformer, heads = model.bridge, model.qformer_heads
    assert isinstance(qformer, QFormer) and heads is not None
    with torch.no_grad():
        losses = qformer_losses(model, **batch)
        # Each image and each text through the Q-Former alone: the unimodal pattern lets neither see the other.
        image_tokens, _ = model.image_tokens(batch["pixel_values"])
        queries, texts = [], []
        for i in range(4):
            queries.append(F.normalize(heads.image_proj(qformer.encode(image_tokens[i : i + 1]).queries[0]), dim=-1))
            length = int(batch["attention_mask"][i].sum())
            alone = qformer.encode(image_tokens[:1], text_ids=batch["input_ids"][i : i + 1, :length],
                                   attention_pattern="unimodal").text  # fmt: skip
            assert alone is not None
            texts.append(F.normalize(heads.text_proj(alone[0, 0]), dim=-1))
        scale = math.exp(float(heads.logit_scale))
        similarity = torch.tensor([[max(float(q @ texts[j]) for q in queries[i]) for j in range(4)] for i in range(4)])
        logits = scale * similarity
        positive = [[i == j or {i, j} == {1, 3} for j in range(4)] for i in range(4)]
        total = 0.0
        for i in range(4):  # image -> text, then text -> image, each against its positives shared evenly
            owned = [j for j in range(4) if positive[i][j]]
            total += -sum(float(logits[i].log_softmax(0)[j]) for j in owned) / len(owned) / 4 / 2
            total += -sum(float(logits[:, i].log_softmax(0)[j]) for j in owned) / len(owned) / 4 / 2
    assert float(losses.itc) == pytest.approx(total, rel=1e-5)
    for value in (losses.itm, losses.itg):
        assert torch.isfinite(value) and float(value) > 0


def test_hard_negatives_are_never_positives_and_follow_the_similarities() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=generator) * 3
    logits[0, 4] = 20.0  # text 4 is image 0's hardest negative by far
    positives = torch.eye(5, dtype=torch.bool)
    positives[1, 2] = positives[2, 1] = True  # a duplicated caption
    chosen_texts, chosen_images = [], []
    for _ in range(200):
        texts, images = hard_negatives(logits, positives, generator)
        chosen_texts.append(texts)
        chosen_images.append(images)
    texts, images = torch.stack(chosen_texts), torch.stack(chosen_images)  # (draws, B)
    rows = torch.arange(5).expand_as(texts)
    assert not positives[rows, texts].any() and not positives[images, rows].any()
    assert (texts[:, 0] == 4).float().mean() > 0.95  # drawn from the softmax, not uniformly
    assert (images[:, 4] == 0).float().mean() > 0.95  # text 4's hardest image is image 0
    assert len(set(texts[:, 3].tolist())) > 1  # a draw, not the argmax
    # A positive far above every negative (the logit scale at its cap): the negatives are still the ones drawn.
    far = torch.full((4, 4), -20.0) + 110.0 * torch.eye(4)
    texts, images = hard_negatives(far, torch.eye(4, dtype=torch.bool), generator)
    assert not texts.eq(torch.arange(4)).any() and not images.eq(torch.arange(4)).any()
    # A batch of one caption has no negative: the draw is uniform and the label says "matched".
    texts, images = hard_negatives(logits, torch.ones(5, 5, dtype=torch.bool), generator)
    assert texts.shape == images.shape == (5,)


def test_generation_pattern_hides_later_text_and_shows_the_queries() -> None:
    model, batch = _model(1), _batch(1)
    qformer = model.bridge
    assert isinstance(qformer, QFormer)
    with torch.no_grad():
        image, _ = model.image_tokens(batch["pixel_values"])
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        changed = ids.clone()
        changed[:, 3] = (changed[:, 3] + 7) % (VOCAB - 1)  # a different token at position 3
        for pattern in ("multimodal_causal", "bidirectional"):
            before = qformer.encode(image, text_ids=ids, text_mask=mask, attention_pattern=pattern)
            after = qformer.encode(image, text_ids=changed, text_mask=mask, attention_pattern=pattern)
            assert before.text is not None and after.text is not None
            seen_later = not torch.allclose(before.text[0, :3], after.text[0, :3], atol=1e-6)
            # Causal text: position t never sees t + 1; bidirectional: it does (the test can tell them apart).
            assert seen_later == (pattern == "bidirectional")
            assert not torch.allclose(before.text[0, 3:], after.text[0, 3:])
            assert torch.allclose(before.queries, after.queries) == (pattern == "multimodal_causal")
        # The text sees the queries (so the image) in the generation pattern, not in the contrastive one.
        other = image.flip(0)
        for pattern, sees in (("multimodal_causal", True), ("unimodal", False)):
            a = qformer.encode(image, text_ids=ids, text_mask=mask, attention_pattern=pattern).text
            b = qformer.encode(other, text_ids=ids, text_mask=mask, attention_pattern=pattern).text
            assert a is not None and b is not None
            assert (not torch.allclose(a[0, :4], b[0, :4], atol=1e-6)) == sees

        # The loss: each real next token scored by the word embeddings, one position at a time.
        hidden = qformer.encode(image, text_ids=ids, text_mask=mask, attention_pattern="multimodal_causal").text
        assert hidden is not None
        table = qformer.word_embed.weight
        terms = [-float((hidden[b, t] @ table.T).log_softmax(0)[ids[b, t + 1]])
                 for b in range(4) for t in range(5) if mask[b, t + 1]]  # fmt: skip
        loss = generation_loss(hidden, table, ids, batch["attention_mask"])
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_the_losses_train_the_qformer_and_heads_only() -> None:
    model = _model(2).train()
    model.encoder.requires_grad_(False)
    losses = qformer_losses(model, **_batch(2))
    losses.total.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[name] is None for name in grads if name.startswith(("encoder.", "lm.")))
    for name in ("qformer_heads.image_proj.weight", "qformer_heads.itm_head.weight", "qformer_heads.logit_scale",
                 "bridge.word_embed.weight", "bridge.layers.0.cross_attn.kv.weight", "bridge.queries"):  # fmt: skip
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["bridge.projection.weight"] is None  # the LM-side projection is stage 2's


def test_embed_dim_needs_a_qformer_with_text_input() -> None:
    config = _model().config
    with pytest.raises(ValueError, match="embed_dim"):
        config.replace(bridge=MLPBridgeConfig())
    with pytest.raises(ValueError, match="embed_dim"):
        config.replace(bridge=config.bridge.replace(text_input=False))


class _Words:
    """A tokenizer stand-in for ``prompt_ids``: one id per word (1 + its length), no specials."""

    pad_token_id = PAD

    def encode(self, text: str) -> list[int]:
        return [1 + len(word) for word in text.split()]


def _reading_model(seed: int = 0) -> VisionLanguageModel:
    model = _model(seed)
    model.config = model.config.replace(bridge_reads_prompt=True)
    model.tokenizer = _Words()
    return model


def test_a_qformer_that_reads_the_prompt_conditions_its_tokens_on_it() -> None:
    """BLIP-2's question-conditioned Q-Former (Sec. 4.3): the prompt changes the image's tokens, its padding does not,
    and the LM's loss trains the Q-Former's text embeddings."""
    model = _reading_model(3)
    ids, mask = model.prompt_ids(["what colour is it", "is there a big red circle here"])
    assert ids.shape == (2, 7) and mask.tolist() == [[1] * 4 + [0] * 3, [1] * 7]
    assert ids[0].tolist() == [5, 7, 3, 3, PAD, PAD, PAD]
    pixels = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)  # one image, asked two questions
    tokens = model.embed_image(pixels, ids, mask).tokens
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)
    alone = model.embed_image(pixels[:1], *model.prompt_ids(["what colour is it"])).tokens
    torch.testing.assert_close(alone[0], tokens[0], atol=1e-5, rtol=1e-5)

    model.train()
    placeholders = torch.full((2, 3), model.config.image_token_id)
    input_ids = torch.cat([placeholders, torch.randint(1, VOCAB - 1, (2, 4))], dim=1)
    model(input_ids, pixel_values=pixels, labels=input_ids, qformer_input_ids=ids,
          qformer_attention_mask=mask).loss.backward()  # fmt: skip
    used = model.bridge.word_embed.weight.grad
    assert used is not None and used[ids[mask.bool()]].abs().sum(-1).min() > 0


def test_a_qformer_that_reads_the_prompt_needs_it() -> None:
    model = _reading_model()
    pixels = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="qformer_input_ids"):
        model.embed_image(pixels)
    with pytest.raises(ValueError, match="one prompt per image"):
        model.embed_image(pixels, *model.prompt_ids(["one question"]))
    with pytest.raises(ValueError, match="does not read the prompt"):
        _model().embed_image(pixels, *model.prompt_ids(["a", "b"]))
    config = model.config
    with pytest.raises(ValueError, match="bridge_reads_prompt"):
        config.replace(bridge=config.bridge.replace(text_input=False), embed_dim=None)
    with pytest.raises(ValueError, match="bridge_reads_prompt"):
        config.replace(bridge=config.bridge.replace(vocab_size=VOCAB + 1))


# --- tiny end-to-end runs

TINY = {
    "model.lm.dim": 32, "model.lm.depth": 1, "model.lm.num_heads": 2, "model.lm.num_kv_heads": 2,
    "model.lm.head_dim": 16, "model.lm.mlp_dim": 64,
    "model.vision.dim": 32, "model.vision.depth": 1, "model.vision.num_heads": 2, "model.vision.mlp_dim": 64,
    "model.vision.image_size": 32, "train.steps": 2, "train.batch_size": 4, "train.eval_every": None,
    "data.eval_size": 2, "task.tokenizer_scenes": 20, "task.vocab_size": 300, "task.max_new_tokens": 6,
    "stages.text.data.train_size": 20,
}  # fmt: skip
TINY_BLIP2 = {
    **TINY, "model.bridge.dim": 32, "model.bridge.depth": 2, "model.bridge.num_heads": 2, "model.bridge.mlp_dim": 64,
    "model.bridge.num_queries": 4, "model.bridge.vocab_size": 300, "model.embed_dim": 16,
    "stages.read.data.train_size": 20,
}  # fmt: skip
# The tiny tower has one block: the recipe's layer 2 (llava_shapes') is read as layer 1 here.
TINY_HONEYBEE = {**TINY, "model.bridge.dim": 32, "model.bridge.depth": 1, "model.bridge.num_queries": 4,
                 "model.feature_layer": 1}  # fmt: skip


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny contrastive run's image tower (the tiny VLMs' vision config), shared by both runs."""
    out = tmp_path_factory.mktemp("tower") / "siglip"
    pretrain = {"train.steps": 2, "train.batch_size": 8, "data.train_size": 16, "data.eval_size": 8,
                "train.eval_every": None, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
                "model.text.mlp_dim": 64, "model.embed_dim": 16, "model.vision.dim": 32, "model.vision.depth": 1,
                "model.vision.num_heads": 2, "model.vision.mlp_dim": 64, "model.vision.image_size": 32}  # fmt: skip
    run_recipe(get_recipe("siglip_shapes").with_overrides(pretrain), out, progress=False, report=False)
    return out / "model"


def _init(tower: Path) -> dict[str, object]:
    return {"encoder": {"kind": "init_from", "source": str(tower), "part": "image_encoder"}}


def test_blip2_shapes_trains_its_stages_and_writes_the_contract(tower: Path, tmp_path: Path) -> None:
    recipe = get_recipe("blip2_shapes").with_overrides({**TINY_BLIP2, "stages.qformer.init": _init(tower)})
    out = tmp_path / "blip2"
    run_recipe(recipe, out, progress=False, report=False)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("vqa_accuracy", "grounding_acc50", "caption_f1", "vqa_accuracy_heldout"):
        assert isinstance(metrics[key], float), key
    assert set(metrics["stages"]) == {"text", "read", "qformer", "generate", "instruct"} and metrics["steps"] == 10
    for name in ("text", "read"):  # the LM stages report what the LM answers from a layout in its context
        text_metrics = metrics["stages"][name]
        assert {"text_accuracy", "text_accuracy_grounding", "text_accuracy_count_heldout"} <= set(text_metrics), name
        assert all(0.0 <= text_metrics[key] <= 1.0 for key in text_metrics if key.startswith("text_accuracy")), name
    stage1 = metrics["stages"]["qformer"]
    assert {"retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_i2t_r1_heldout"} <= set(stage1)
    logged = [json.loads(line) for line in (out / "stages" / "2-qformer" / "log.jsonl").read_text().splitlines()]
    steps = [record for record in logged if "itc_loss" in record]
    assert len(steps) == 2 and all(record["itm_loss"] > 0 and record["itg_loss"] > 0 for record in steps)

    model = vlkit.from_pretrained(out / "model")
    assert isinstance(model, VisionLanguageModel) and model.tokenizer is not None
    text_stage = vlkit.from_pretrained(out / "stages" / "0-text" / "model").state_dict()
    read_stage = vlkit.from_pretrained(out / "stages" / "1-read" / "model").state_dict()
    stage1_model = vlkit.from_pretrained(out / "stages" / "2-qformer" / "model").state_dict()
    tower_state = vlkit.from_pretrained(tower.parent / "model").image_encoder.state_dict()
    final = model.state_dict()
    for name, tensor in final.items():
        if name.startswith("lm."):  # the LM is frozen after its text stages (BLIP-2 never trains it)
            assert torch.equal(tensor, read_stage[name]), name
        elif name.startswith("encoder."):
            assert torch.equal(tensor, tower_state[name.removeprefix("encoder.")]), name
        elif name.startswith("qformer_heads."):  # trained in stage 1 only
            assert torch.equal(tensor, stage1_model[name]) and not torch.equal(tensor, text_stage[name]), name
    # Stage 2 trains the Q-Former on captions (the paper's stage 2), the instruct stage on the mix after it.
    assert recipe.stage("generate").data.kinds == ("caption",) and recipe.stage("instruct").data is None
    stage2_model = vlkit.from_pretrained(out / "stages" / "3-generate" / "model").state_dict()
    read = recipe.stage("read").data
    assert not read.plain and read.layout and read.context_weight == 0.1
    assert recipe.stage("read").train.schedule == "wsd"  # the read LM ends on a decayed rate
    moved = [name for name in final if not torch.equal(text_stage[name], read_stage[name])]
    assert moved and all(name.startswith("lm.") for name in moved)  # the reading stage trains the LM alone
    for before, after in ((stage1_model, stage2_model), (stage2_model, final)):
        assert [n for n in final if n.startswith("bridge.layers.") and not torch.equal(after[n], before[n])]

    # The same model with its Q-Former reading the question: training samples, evaluation and chat hand it over.
    model.config = model.config.replace(bridge_reads_prompt=True)
    spec = recipe.data.replace(turns=2)
    sample = ShapesInstructionDataset(spec, model, seed=0)[0]
    first_question = model.tokenizer.decode(sample["qformer_input_ids"].tolist())
    assert first_question and first_question in model.tokenizer.decode(sample["input_ids"].tolist())
    batch = _collate(model.tokenizer.pad_token_id)([ShapesInstructionDataset(spec, model, seed=0)[i] for i in range(3)])
    assert batch["qformer_input_ids"].shape == batch["qformer_attention_mask"].shape
    assert batch["qformer_input_ids"].shape[0] == 3 and math.isfinite(float(_step(model, batch).loss))
    # The user's own conversations: each image's prompt is the user turn that shows it; a text-only one has none.
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    own = [
        Conversation([Turn("user", "<image>what colour is it?"), Turn("assistant", "red")], images=[red]),
        Conversation([Turn("user", "what colour is a red square?"), Turn("assistant", "red")]),
        Conversation([Turn("user", "<image><image>which is blue?"), Turn("assistant", "the second"),
                      Turn("user", "<image>and this?"), Turn("assistant", "red")], images=[red, blue, red]),
    ]  # fmt: skip
    dataset = ConversationDataset(own, model)
    batch = _collate(model.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == batch["qformer_input_ids"].shape[0] == 4
    rows = zip(batch["qformer_input_ids"], batch["qformer_attention_mask"], strict=True)
    prompts = [model.tokenizer.decode(row[mask.bool()].tolist()).strip() for row, mask in rows]
    assert prompts == ["what colour is it?", "which is blue?", "which is blue?", "and this?"]
    assert math.isfinite(float(_step(model, batch).loss.detach()))
    assert "qformer_input_ids" not in _collate(model.tokenizer.pad_token_id)([dataset[1]])
    evaluation = VLMEvaluation.build(spec, model, max_new_tokens=3, batch_size=4)
    assert "vqa_accuracy" in evaluation(model).metrics
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), "white").save(image)
    assert isinstance("".join(ChatSession(model, image, max_new_tokens=3).ask("what colour is the square?")), str)
    # Saved, its processor hands the Q-Former each image's question too, so generate answers as chat does.
    model.save_pretrained(tmp_path / "reads")
    processor = vlkit.load_processor(tmp_path / "reads")
    inputs = processor(images=Image.open(image), text="what colour is the square?")
    for name, expected in zip(("qformer_input_ids", "qformer_attention_mask"),
                              model.prompt_ids(["what colour is the square?"]), strict=True):  # fmt: skip
        assert torch.equal(inputs[name], expected), name
    out = model.generate(**inputs, max_new_tokens=3)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0]
    assert answer == "".join(ChatSession(model, image, max_new_tokens=3).ask("what colour is the square?")).strip()


def test_honeybee_c_shapes_trains_its_stages_and_writes_the_contract(tower: Path, tmp_path: Path) -> None:
    recipe = get_recipe("honeybee_c_shapes").with_overrides({**TINY_HONEYBEE, "stages.align.init": _init(tower)})
    out = tmp_path / "honeybee"
    run_recipe(recipe, out, progress=False, report=False)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("vqa_accuracy", "grounding_acc50", "caption_f1"):
        assert isinstance(metrics[key], float), key
    assert set(metrics["stages"]) == {"text", "align", "instruct"}
    model = vlkit.from_pretrained(out / "model")
    assert model.config.bridge.kind == "c_abstractor" and model.tokens_per_image() == 4
    assert model.config.feature_layer == 1  # TINY_HONEYBEE's stand-in for the recipe's layer 2
    for name in ("honeybee_c_shapes", "honeybee_d_shapes"):  # llava_shapes' layer override, inherited
        assert get_recipe(name).model_overrides == get_recipe("llava_shapes").model_overrides == {"feature_layer": 2}
    assert get_recipe("honeybee_d_shapes").model == "shapes_honeybee_d"
    # llava_shapes' mix weights referring expressions, and so does the D-Abstractor's; the C-Abstractor's does not,
    # the rest of its data being llava_shapes'.
    data = {name: get_recipe(name).data for name in ("llava_shapes", "honeybee_c_shapes", "honeybee_d_shapes")}
    assert data["llava_shapes"].kind_weights == data["honeybee_d_shapes"].kind_weights == (("grounding", 4.0),)
    assert data["honeybee_d_shapes"] == data["llava_shapes"]
    assert data["honeybee_c_shapes"].kind_weights == ()
    assert dataclasses.replace(data["honeybee_c_shapes"], kind_weights=(("grounding", 4.0),)) == data["llava_shapes"]
    assert vlkit.get_config("shapes_honeybee_d").bridge.num_queries == 16

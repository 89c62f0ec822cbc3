"""The dual-encoder family recipes (FILIP, LiT, EVA-CLIP, NaViT), the classification task and ``vlkit bench claims``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlkit import cli, from_pretrained, get_config
from vlkit.bench.claims import CLAIMS, QUICK, ClaimsBench, claims_table, describe, hard_negative_set, load_claims
from vlkit.data import shapes
from vlkit.data.transforms import ImageTransform
from vlkit.recipes import LayerDecay, get_recipe, list_recipes
from vlkit.recipes.base import lock_rules
from vlkit.recipes.contrastive import SHAPES_BUDGET, SHAPES_COLOURLESS_COPIES, SHAPES_DATA
from vlkit.recipes.parts import source_part
from vlkit.recipes.run import run_recipe, stage_dir
from vlkit.tasks.base import RunContext
from vlkit.train import TrainConfig
from vlkit.train import trainer as trainer_module
from vlkit.train.optim import Lamb

TINY_MODEL = {
    "model.vision.image_size": 32, "model.vision.dim": 32, "model.vision.depth": 2, "model.vision.num_heads": 2,
    "model.vision.mlp_dim": 64, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
    "model.text.mlp_dim": 64, "model.embed_dim": 32,
}  # fmt: skip
TINY_TRAIN = {"train.steps": 2, "train.batch_size": 8, "data.train_size": 16, "data.eval_size": 8,
              "train.eval_every": None}  # fmt: skip
TINY = TINY_MODEL | TINY_TRAIN
# The classification tower LiT and EVA-CLIP start from, at the same tiny size.
TINY_TOWER = {"image_encoder": {"kind": "init_from", "source": "recipe:classify_shapes", "share": ["vision"],
                                "overrides": TINY_TRAIN}}  # fmt: skip


def _with_tiny_tower(recipe):
    from vlkit.recipes import InitFrom

    init = {part: InitFrom.from_dict(spec) for part, spec in TINY_TOWER.items()}
    return recipe.with_overrides({"stages.train.init": init})


def _tiny(name: str, **extra: object):
    return get_recipe(name).with_overrides(TINY | extra)


def _cli_set(overrides: dict[str, object]) -> list[str]:
    return ["--set", *(f"{key}={json.dumps(value)}" for key, value in overrides.items())]


def test_recipes_are_registered_and_share_the_shapes_budget_and_data() -> None:
    assert {"filip_shapes", "lit_shapes", "evaclip_shapes", "navit_shapes", "classify_shapes"} <= set(list_recipes())
    filip, lit, eva, navit = (get_recipe(f"{name}_shapes") for name in ("filip", "lit", "evaclip", "navit"))
    train = {name: recipe.stages[0].train for name, recipe in zip("flen", (filip, lit, eva, navit), strict=True)}
    assert train["l"] == train["n"] == SHAPES_BUDGET
    recipes = (filip, lit, eva, navit, get_recipe("clip_shapes"), get_recipe("siglip_shapes"))
    assert {recipe.data.colourless_copies for recipe in recipes} == {SHAPES_COLOURLESS_COPIES}
    assert get_config("navit_shapes").loss == "clip"
    assert train["f"] == dataclasses.replace(
        SHAPES_BUDGET, steps=train["f"].steps, warmup_steps=train["f"].warmup_steps
    )
    assert train["f"].steps == SHAPES_BUDGET.steps // 2 and train["f"].warmup_steps == SHAPES_BUDGET.warmup_steps // 2
    assert train["e"] == dataclasses.replace(SHAPES_BUDGET, optimizer="lamb", lr=train["e"].lr)
    assert filip.data.config == lit.data.config == eva.data.config == SHAPES_DATA
    assert (
        navit.data.config == dataclasses.replace(SHAPES_DATA, aspect_ratios=(0.5, 2.0)) and navit.task.inputs == "pack"
    )
    assert get_config("shapes_filip") == get_config("shapes_clip").replace(interaction="token", loss="filip")
    assert lit.stages[0].rules == lock_rules("image")
    assert lit.stages[0].init["image_encoder"].source == eva.stages[0].init["image_encoder"].source
    assert lit.stages[0].init["image_encoder"].source == "recipe:classify_shapes"
    (decay,) = eva.stages[0].rules
    assert eva.model_overrides["vision.patch_dropout"] == 0.5 and isinstance(decay, LayerDecay)
    assert decay.part == "image_encoder" and 0.75 <= decay.decay <= 0.85
    with pytest.raises(ValueError, match=r"task\.inputs"):
        lit.with_overrides({"task.inputs": "stretch"})
    # --lock replaces the recipe's locks in every stage; "none" removes them.
    assert lit.with_overrides({"lock": "none"}).stages[0].rules == ()
    assert lit.with_overrides({"lock": "text"}).stages[0].rules == lock_rules("text")


def test_filip_recipe_trains_with_the_token_wise_loss(tmp_path: Path) -> None:
    result = run_recipe(_tiny("filip_shapes"), tmp_path / "filip", progress=False, report=False)
    metrics = json.loads((tmp_path / "filip" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["recipe"] == "filip_shapes" and "zero_shot_top1" in metrics
    assert result.model.config.loss == "filip" and result.model.config.interaction == "token"


def test_lit_trains_the_text_tower_against_a_locked_pretrained_image_tower(tmp_path: Path) -> None:
    out = tmp_path / "lit"
    overrides = TINY | {"stages.train.init": TINY_TOWER}
    assert cli.main(["train", "--recipe", "lit_shapes", "--out", str(out), "--quiet", *_cli_set(overrides)]) == 0
    pretrain = out / "pretrain" / "classify_shapes"
    assert json.loads((pretrain / "metrics.json").read_text())["recipe"] == "classify_shapes"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    trained = from_pretrained(out / "model")
    # The image tower is the classifier's, bit for bit, after training.
    pretrained = source_part(pretrain / "model", "image_encoder").state_dict()
    for name, tensor in trained.image_encoder.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    # No image head (LiT's): the image embedding is the locked tower's pooled representation, so nothing on the
    # image side trained.
    assert not any(name.startswith("image_projection") for name in trained.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(trained.image_encoder(images), dim=-1)
        assert torch.equal(trained.encode_image(images, normalize=True), pooled)
    # The text tower moved away from its (seeded, reproducible) initialisation.
    recipe = get_recipe("lit_shapes").with_overrides(TINY)
    initial = recipe.task.build_model(RunContext(recipe, out, progress=False))
    changed = [not torch.equal(tensor, initial.text_encoder.state_dict()[name])
               for name, tensor in trained.text_encoder.state_dict().items()]  # fmt: skip
    assert all(changed)


def test_evaclip_uses_lamb_layer_decay_patch_dropout_and_the_pretrained_tower(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    build_optimizer = trainer_module.build_optimizer

    def spy(groups, *args, **kwargs):
        # Before the first step: record each group's lr scale and the image tower as the trainer receives it.
        seen["scales"] = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
        seen["weights"] = {name: tensor.detach().clone() for group in groups
                           for name, tensor in zip(group["param_names"], group["params"], strict=True)}  # fmt: skip
        seen["optimizer"] = build_optimizer(groups, *args, **kwargs)
        return seen["optimizer"]

    monkeypatch.setattr(trainer_module, "build_optimizer", spy)
    recipe = _with_tiny_tower(_tiny("evaclip_shapes"))
    result = run_recipe(recipe, tmp_path / "eva", progress=False, report=False)
    assert isinstance(seen["optimizer"], Lamb)
    decay, depth = recipe.stages[0].rules[0].decay, 2
    scales = seen["scales"]
    stem = [name for name in scales if name.startswith("image_encoder.patch_embed.")]
    assert stem and all(scales[name] == pytest.approx(decay ** (depth + 1)) for name in stem)
    for block in range(depth):
        assert scales[f"image_encoder.blocks.{block}.mlp.fc1.weight"] == pytest.approx(decay ** (depth - block))
    assert scales["image_encoder.norm.weight"] == 1.0 and scales["text_encoder.blocks.0.mlp.fc1.weight"] == 1.0
    pretrained = source_part(tmp_path / "eva" / "pretrain" / "classify_shapes" / "model", "image_encoder").state_dict()
    assert torch.equal(seen["weights"]["image_encoder.blocks.1.mlp.fc2.weight"], pretrained["blocks.1.mlp.fc2.weight"])
    # Unlocked: the tower trains on from there; patch dropout is the saved model's training setting.
    assert not torch.equal(
        result.model.image_encoder.blocks[1].mlp.fc2.weight.cpu(), pretrained["blocks.1.mlp.fc2.weight"]
    )
    assert result.model.config.vision.patch_dropout == 0.5


def test_navit_packs_native_aspect_ratios_and_reports_padding(tmp_path: Path) -> None:
    # The preset's 64-pixel images (8 x 8 patches): per-image budgets from 16 to 64 patches leave room to pack.
    recipe = _tiny("navit_shapes", **{"train.steps": 3, "model.vision.image_size": 64})
    run_recipe(recipe, tmp_path / "navit", progress=False, report=False)
    metrics = json.loads((tmp_path / "navit" / "metrics.json").read_text())
    log = stage_dir(tmp_path / "navit", recipe, recipe.stages[0]) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    logged = [record["padding_fraction"] for record in records if "padding_fraction" in record]
    assert len(logged) == 3 and metrics["padding_fraction"] == pytest.approx(np.mean(logged))
    assert 0.0 <= metrics["padding_fraction"] < 1.0
    # Oversampled batches (1.5 x 8 sequences) put more than one image into some sequences.
    assert max(record["images_per_sequence"] for record in records if "images_per_sequence" in record) > 1.0
    sizes = {(json.loads(line)["width"], json.loads(line)["height"])
             for line in (tmp_path / "navit" / "data" / "train.jsonl").read_text().splitlines()}  # fmt: skip
    assert len(sizes) > 1 and "zero_shot_top1" in metrics


def test_cli_trains_a_classification_recipe_with_its_task(tmp_path: Path) -> None:
    out = tmp_path / "classify"
    tiny = TINY_TRAIN | {key: value for key, value in TINY_MODEL.items() if key.startswith("model.vision.")}
    assert cli.main(["train", "--recipe", "classify_shapes", "--out", str(out), "--quiet", *_cli_set(tiny)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "colour_top1", "shape_top1_heldout"} <= set(metrics) and metrics["steps"] == 2
    assert type(from_pretrained(out / "model")).__name__ == "ImageClassifier"
    code = cli.main(["train", "--recipe", "classify_shapes", "--out", str(tmp_path / "x"), "--init", str(out)])
    assert code == 2


def test_hard_negatives_change_exactly_one_attribute_of_one_object() -> None:
    config = SHAPES_DATA
    data = hard_negative_set(config, ImageTransform(image_size=32), 12)
    assert data.pixels.shape == (12, 3, 32, 32)
    vocabulary = set(config.colours) | set(config.shapes)
    for caption, negative in zip(data.captions, data.negatives, strict=True):
        words, changed = caption.split(), negative.split()
        diff = [(a, b) for a, b in zip(words, changed, strict=True) if a != b]
        assert len(diff) == 1 and diff[0][0] in vocabulary and diff[0][1] in vocabulary, (caption, negative)
        assert " and " in caption
    # The caption is ShapesWorld's own short caption of the scene.
    scene = shapes.generate(dataclasses.replace(config, min_objects=2), "test", 0)
    assert describe(sorted(scene.objects, key=lambda item: item.centre)) == scene.captions[3]


def test_bench_claims_quick_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "claims"
    assert cli.main(["bench", "claims", "--out", str(out), "--quick", "--quiet"]) == 0
    data = json.loads((out / "claims.json").read_text())
    assert [row["key"] for row in data["claims"]] == list(CLAIMS)
    table = (out / "claims.md").read_text()
    for row in data["claims"]:
        assert isinstance(row["reproduced"], bool) and row["numbers"] and row["rule"] in table
        assert f"| {'yes' if row['reproduced'] else 'no'} |" in table
    assert claims_table(load_claims(out / "claims.json")) in table
    numbers = {row["key"]: row["numbers"] for row in data["claims"]}
    assert set(numbers["sigmoid_vs_softmax"]) == {f"{loss}_b{batch}" for loss in ("sigmoid", "softmax")
                                                  for batch in QUICK.batch_sizes}  # fmt: skip
    assert 0.0 <= numbers["filip_fine_grained"]["filip_hard_negative_accuracy"] <= 1.0
    assert numbers["navit_packing"]["resize_square_padding"] == 0.0
    assert 0.0 < numbers["navit_packing"]["pad_square_padding"] < 0.5
    eva = numbers["eva_patch_dropout"]
    assert eva["speedup"] == pytest.approx(eva["throughput_pd05"] / eva["throughput_pd0"])
    # A second bench reuses every finished run (the same numbers, nothing retrained) ...
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert cli.main(["bench", "claims", "--out", str(out), "--quick", "--quiet"]) == 0
    assert json.loads((out / "claims.json").read_text()) == data
    assert sorted(path.name for path in (out / "runs").iterdir()) == runs
    # ... also one whose recipe.json predates a field that is now at its default ...
    path = out / "runs" / "clip_b8" / "recipe.json"
    saved = json.loads(path.read_text())
    train = saved["stages"][0]["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    del train[next(key for key, value in train.items() if key in defaults and value == defaults[key])]
    path.write_text(json.dumps(saved))
    reused = ClaimsBench(out, QUICK).run("clip_b8", "clip_shapes", {"train.batch_size": 8})
    assert reused == json.loads((out / "runs" / "clip_b8" / "metrics.json").read_text())
    # ... and refuses one trained with other settings.
    other = ClaimsBench(out, dataclasses.replace(QUICK, overrides={**QUICK.overrides, "train.lr": 0.5}))
    with pytest.raises(ValueError, match="other settings"):
        other.run("clip_b8", "clip_shapes", {"train.batch_size": 8})

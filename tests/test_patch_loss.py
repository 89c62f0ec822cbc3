"""The contrastive task's per-patch objective (``task.patch_loss``): labels from object boxes, a training-only head
beside the model (``WithHeads``), and a run that trains it, resumes it and saves the plain model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from run_utils import TINY_DUAL_ENCODER, interrupt_after
from vlkit import from_pretrained
from vlkit.data.readers import ImageTextRecord
from vlkit.data.transforms import ImageTransform
from vlkit.models import DualEncoder
from vlkit.models.base import build_model
from vlkit.recipes import get_recipe
from vlkit.recipes.run import run_recipe, stage_dir
from vlkit.registry import get_config
from vlkit.tasks.base import WithHeads
from vlkit.tasks.contrastive import Contrastive, patch_labels

TINY = {**TINY_DUAL_ENCODER, "train.batch_size": 16, "train.eval_every": None, "train.precision": "fp32",
        "data.train_size": 48, "data.eval_size": 8, "task.patch_loss": 1.0}  # fmt: skip


def record(objects: list[dict], width: int, height: int) -> ImageTextRecord:
    return ImageTextRecord("unused.png", ["a scene"], "line 1", {"objects": objects, "width": width, "height": height})


def test_patch_labels_follow_the_boxes_through_the_resize_and_crop() -> None:
    # 128 x 64 -> scaled by 1/2 to 64 x 32 -> the centre 32 x 32 kept (16 pixels cut on the left): a 4 x 4 grid of
    # 8-pixel patches whose centres sit at 4, 12, 20, 28 in the crop, i.e. x = 40, 56, 72, 88 and y = 8, 24, 40, 56.
    red = {"colour": "red", "shape": "circle", "size": "large", "box": [32, 0, 64, 32]}  # columns 0-1, rows 0-1
    blue = {"colour": "blue", "shape": "star", "size": "small", "box": [50, 20, 80, 64]}  # columns 1-2, rows 1-3
    labels = patch_labels([record([red, blue], 128, 64)], ("colour", "shape"), ImageTransform(image_size=32), (4, 4))
    assert labels.classes == {"colour": ["background", "blue", "red"], "shape": ["background", "circle", "star"]}
    colour = labels.targets[0, 0].view(4, 4)
    expected = torch.tensor([[2, 2, 0, 0], [2, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]])  # blue, drawn last, on top
    assert torch.equal(colour, expected)
    shape = torch.tensor([[1, 1, 0, 0], [1, 2, 2, 0], [0, 2, 2, 0], [0, 2, 2, 0]])  # circle 1, star 2
    assert torch.equal(labels.targets[0, 1].view(4, 4), shape)
    # Boxes in the crop, as fractions of its side: red (16, 0, 32, 16) - 16 -> (0, 0, 16, 16); blue (9, 10, 24, 32).
    boxes = labels.boxes[0].view(4, 4, 4)
    assert torch.equal(boxes[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(boxes[1, 1], torch.tensor([9 / 32, 10 / 32, 24 / 32, 1.0]))
    assert boxes[expected == 0].isnan().all() and not boxes[expected != 0].isnan().any()


def test_patch_labels_name_the_record_without_boxes() -> None:
    bare = ImageTextRecord("unused.png", ["a scene"], "manifest.jsonl:7", {})
    with pytest.raises(ValueError, match=r"manifest.jsonl:7: task.patch_loss needs each record's 'objects'"):
        patch_labels([bare], ("colour",), ImageTransform(image_size=32), (4, 4))
    no_box = record([{"colour": "red"}], 64, 64)
    with pytest.raises(ValueError, match=r"line 1: an object without a .colour. or .box."):
        patch_labels([no_box], ("colour",), ImageTransform(image_size=32), (4, 4))


def test_patch_loss_needs_square_inputs() -> None:
    with pytest.raises(ValueError, match=r"task\.patch_loss needs task\.inputs=.square."):
        Contrastive(inputs="pack", patch_loss=1.0)
    with pytest.raises(ValueError, match=r"task\.patch_loss must be >= 0"):
        Contrastive(patch_loss=-1.0)


def test_with_heads_trains_the_models_own_parameters_under_their_names() -> None:
    model = build_model(get_config("shapes_siglip"))
    heads = nn.ModuleDict({"colour": nn.Linear(128, 3)})
    wrapped = WithHeads(model, heads, lambda m, h, x: h["colour"](m.image_encoder.forward_features(x).patch_tokens))
    names = dict(wrapped.named_parameters())
    assert set(names) == set(dict(model.named_parameters())) | {"heads.colour.weight", "heads.colour.bias"}
    assert all(names[name] is parameter for name, parameter in model.named_parameters())
    assert wrapped.config is model.config and wrapped.encode_image.__self__ is model
    assert set(wrapped.state_dict()) - set(model.state_dict()) == {"heads.colour.weight", "heads.colour.bias"}
    assert wrapped(torch.randn(2, 3, 64, 64)).shape == (2, 64, 3)
    wrapped.eval()
    assert not model.image_encoder.training and not heads.training


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patch") / "run"
    run_recipe(patch_recipe(), out, progress=False, report=False)
    return out


def patch_recipe():
    recipe = get_recipe("siglip_shapes").with_overrides(TINY)
    train = dataclasses.replace(recipe.stages[0].train, steps=200, warmup_steps=2, lr=3e-3, save_every=100)
    return dataclasses.replace(recipe, stages=(dataclasses.replace(recipe.stages[0], train=train),))


def log_of(out: Path) -> list[dict]:
    recipe = patch_recipe()
    lines = (stage_dir(out, recipe, recipe.stages[0]) / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def test_patch_loss_trains_the_patch_tokens_beside_the_contrastive_loss(finished: Path) -> None:
    log = log_of(finished)
    for step in log:  # the step's loss is the contrastive loss plus the weighted patch loss, each logged
        assert step["loss"] == pytest.approx(step["contrastive_loss"] + step["patch_loss"], rel=1e-5)

    def mean(key: str, steps: list[dict]) -> float:
        return sum(step[key] for step in steps) / len(steps)

    first, last = log[:20], log[-20:]  # one step's 16 images hold few object patches: average 20 steps
    assert mean("patch_loss", last) < 0.5 * mean("patch_loss", first)
    # On the patches that hold an object (chance: 1/9 for a colour of 8 + grey, predicting background scores 0),
    # which labels from another record's boxes could not teach.
    assert mean("patch_colour_accuracy", last) > 0.45 > 0.2 > mean("patch_colour_accuracy", first)
    assert mean("patch_box_error", last) < 0.5 * mean("patch_box_error", first)


def test_the_saved_model_is_the_plain_dual_encoder(finished: Path) -> None:
    with safe_open(finished / "model" / "model.safetensors", "pt") as handle:
        saved = set(handle.keys())
    model = from_pretrained(finished / "model")
    assert isinstance(model, DualEncoder) and saved == set(model.state_dict())
    assert not any(name.startswith("heads.") for name in saved)


def test_a_resumed_patch_loss_run_ends_as_the_uninterrupted_one(finished: Path, tmp_path: Path) -> None:
    recipe = patch_recipe()
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    interrupt_after(out, stage_dir(out, recipe, recipe.stages[0]), step=100)
    run_recipe(recipe, out, progress=False, report=False, resume=True)
    # The heads come back from the checkpoint too: a fresh head would give other losses from step 101 on.
    assert [step["loss"] for step in log_of(out)] == [step["loss"] for step in log_of(finished)]
    resumed, uninterrupted = (from_pretrained(run / "model").state_dict() for run in (out, finished))
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


@pytest.mark.parametrize("preset", ["shapes_siglip", "shapes_filip"])
def test_patch_tokens_come_from_the_forward_pass_the_features_do(preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(get_config(preset)).eval()
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(3, 100, (2, 12))
    ids[:, -1] = model.config.text.eos_token_id
    plain = model(pixels, ids)
    out = model(pixels, ids, output_patch_tokens=True)
    assert plain.patch_tokens is None
    assert torch.allclose(out.image_features, plain.image_features, atol=1e-6)
    assert torch.allclose(out.text_features, plain.text_features, atol=1e-6)
    expected = model.image_encoder.forward_features(pixels).patch_tokens
    assert out.patch_tokens is not None and torch.allclose(out.patch_tokens, expected, atol=1e-6)

"""What the image tokens of a ShapesWorld VLM hold about each object: a linear probe per tower layer and on the bridge.

For every two-object scene, the token at each object's centre (the tower's patch grid, or the bridge's output grid
where it has one: not a Q-Former's) is probed for the object's own colour, its own shape, and the *other* object's
colour. Logistic-regression probes are fitted on ``--train-scenes`` training scenes and scored on ``--test-scenes``
test scenes. A token that predicts the other object's colour carries scene-level information beside its own object's:
the experiment log's (docs/experiments.md) "Learning curves" reads the VLM's binding errors against this (the answer
"blue" to "what colour is the star?" when the other object is the blue one).

Where a box is read: ridge-regression probes (R^2 on the test scenes) for the object's centre, x and y as fractions
of the image side, from the same tokens; and from the language model's hidden state after each of its layers at the
token before the first digit of a teacher-forced grounding answer (``<ref>the red star</ref><box>(x1,...``, one
referring expression per scene), for the referred object's centre: what the LM has gathered from the image when it
writes x1. README, "Where the column is lost", reads ``llava_shapes``' boxes against this. On the one-object scenes,
where only the object's own tokens can place it, the same centre probe reads all the bridge's output tokens at once
(any bridge, a Q-Former's too) and the LM before x1: whether the bridge passes the position on, and whether the LM
takes it. Writes ``--out`` (JSON).

    python bench/vlm_token_probe.py --model RUN/model --out token_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlkit.data import shapes
from vlkit.data.shapes_vqa import CAPTION_PROMPT, instruction_items
from vlkit.data.transforms import ImageTransform
from vlkit.files import read_json
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.base import recipe_from_dict
from vlkit.text.chat import (
    Conversation,
    Turn,
    image_prompt,
    segment_encoder,
    single_token_id,
    tokenize_conversation,
)

TARGETS = ("own_colour", "own_shape", "other_colour")
CENTRE = ("centre_x", "centre_y")


def _cell(centre: tuple[float, float], size: tuple[int, int], grid: int) -> int:
    """The index of the token whose cell of a ``grid`` x ``grid`` raster holds ``centre``."""
    row = min(int(centre[1] / size[1] * grid), grid - 1)
    column = min(int(centre[0] / size[0] * grid), grid - 1)
    return row * grid + column


@torch.no_grad()
def collect(
    model: VisionLanguageModel, config: shapes.ShapesConfig, split: str, count: int, batch_size: int = 128
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per probed site (tower layer k, bridge): the (N, D) tokens at object centres, and the (N, 3) labels."""
    transform = ImageTransform(image_size=model.config.vision.image_size)
    colours, kinds = sorted(config.colours), sorted(config.shapes)
    scenes = [shapes.generate(config, split, index) for index in tqdm(range(count), desc=f"{split} scenes")]  # type: ignore[arg-type]
    scenes = [sample for sample in scenes if len(sample.objects) == 2]
    sites = [f"layer{k}" for k in range(len(model.encoder.blocks) + 1)]
    features: dict[str, list[torch.Tensor]] = {}
    labels, centres = [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        pixels = torch.stack([transform(sample.image) for sample in chunk])
        tokens = {site: model.encoder.forward_features(pixels, layer=k).patch_tokens for k, site in enumerate(sites)}
        # A Q-Former reads a prompt (the caption's, as its caption stage) and has no output grid: no token sits at an
        # object's centre, so only the tower is probed.
        prompt = model.prompt_ids([CAPTION_PROMPT] * len(chunk)) if model.config.bridge_reads_prompt else ()
        bridged = model.embed_image(pixels, *prompt)
        if bridged.grid is not None:
            tokens["bridge"] = bridged.tokens
        for row, sample in enumerate(chunk):
            size = (sample.image.width, sample.image.height)
            first, second = sample.objects
            for obj, other in ((first, second), (second, first)):
                for site, grid_tokens in tokens.items():
                    grid = round(grid_tokens.shape[1] ** 0.5)
                    features.setdefault(site, []).append(grid_tokens[row, _cell(obj.centre, size, grid)].float())
                labels.append((colours.index(obj.colour), kinds.index(obj.shape), colours.index(other.colour)))
                centres.append((obj.centre[0] / size[0], obj.centre[1] / size[1]))
    return {site: torch.stack(rows) for site, rows in features.items()}, torch.tensor(labels), torch.tensor(centres)


@torch.no_grad()
def collect_bridge_outputs(
    model: VisionLanguageModel, config: shapes.ShapesConfig, split: str, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-object scenes among the first ``count``: all the bridge's output tokens, flattened (N, M * D), and the
    object's (N, 2) centre. Whether the bridge passes the position on at all, grid or not (a Q-Former's queries have
    none; it reads the caption prompt, as in its caption stage)."""
    transform = ImageTransform(image_size=model.config.vision.image_size)
    rows, centres = [], []
    for index in tqdm(range(count), desc=f"{split} bridge"):
        sample = shapes.generate(config, split, index)  # type: ignore[arg-type]
        if len(sample.objects) != 1:
            continue
        prompt = model.prompt_ids([CAPTION_PROMPT]) if model.config.bridge_reads_prompt else ()
        rows.append(model.embed_image(transform(sample.image)[None], *prompt).tokens[0].float().flatten())
        (obj,) = sample.objects
        centres.append((obj.centre[0] / sample.image.width, obj.centre[1] / sample.image.height))
    return torch.stack(rows), torch.tensor(centres)


@torch.no_grad()
def collect_answer_states(
    model: VisionLanguageModel, config: shapes.ShapesConfig, split: str, count: int, one_object: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per LM layer: the (N, D) hidden states at the token before x1's first digit of a teacher-forced grounding
    answer, one referring expression per scene (of the first ``count``; with ``one_object`` the one-object scenes
    only, where nothing but the object's own tokens can place it); and the (N, 2) centre of the referred object
    (fractions of the side)."""
    transform = ImageTransform(image_size=model.config.vision.image_size)
    tokenizer, config_vlm = model.tokenizer, model.config
    box_id = single_token_id(tokenizer, "<box>")
    encode = segment_encoder(tokenizer)
    digits = {encode(str(d))[-1] for d in range(10)}  # a byte-level BPE may put a space token first
    if box_id is None or len(digits) != 10:
        raise SystemExit("error: the model's tokenizer does not spell boxes as <box> and single digits")
    states: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: states.append(out[0, -1].float()))
             for block in model.lm.blocks]  # fmt: skip
    labels = []
    try:
        for index in tqdm(range(count), desc=f"{split} answers"):
            sample = shapes.generate(config, split, index)  # type: ignore[arg-type]
            items = [item for item in instruction_items(sample, config, split) if item.kind == "grounding"]  # type: ignore[arg-type]
            if not items or (one_object and len(sample.objects) != 1):
                continue
            item = items[0]
            asked = image_prompt(config_vlm.chat_template, item.question)
            turns = [Turn("user", asked), Turn("assistant", item.answer)]
            ids = tokenize_conversation(Conversation(turns, [sample.image]), config_vlm.chat_template, tokenizer,
                                        config_vlm.image_token_id, model.tokens_per_image()).input_ids  # fmt: skip
            start = int((ids == box_id).nonzero()[0])
            first_digit = next(i for i in range(start, len(ids)) if int(ids[i]) in digits)
            prompt = {}
            if config_vlm.bridge_reads_prompt:  # the Q-Former reads the question, as in evaluation
                prompt_ids, prompt_mask = model.prompt_ids([item.question])
                prompt = {"qformer_input_ids": prompt_ids, "qformer_attention_mask": prompt_mask}
            model(ids[None, :first_digit], pixel_values=transform(sample.image)[None], **prompt)
            x1, y1, x2, y2 = item.box  # type: ignore[misc]
            labels.append(((x1 + x2) / 2000, (y1 + y2) / 2000))  # [0, 1000) coordinates -> fractions of the side
    finally:
        for hook in hooks:
            hook.remove()
    depth = len(model.lm.blocks)
    layers = {f"lm_layer{k + 1}": torch.stack(states[k::depth]) for k in range(depth)}
    return layers, torch.tensor(labels, dtype=torch.float64)


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted (L-BFGS) on standardised ``train``."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(-1) == test_y).float().mean())


def probe_r2(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor) -> list[float]:
    """Test R^2 per column of ``train_y`` (N, K) of a ridge regression (lambda 1) on standardised ``train``."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = [torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1).double() for x in (train, test)]
    gram = train.T @ train + torch.eye(train.shape[1], dtype=torch.float64)
    predicted = test @ torch.linalg.solve(gram, train.T @ train_y.double())
    test_y = test_y.double()
    residual = (predicted - test_y).pow(2).sum(0) / (test_y - test_y.mean(0)).pow(2).sum(0)
    return [round(float(1 - r), 3) for r in residual]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a ShapesWorld VLM model directory (a run's model)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=600)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = from_pretrained(args.model).eval()
    if not isinstance(model, VisionLanguageModel):
        raise SystemExit(f"error: {args.model} is not a vision-language model")
    config = recipe_from_dict(read_json(Path(args.model) / "recipe.json")).data.config  # the data it was trained on
    train, train_y, train_centre = collect(model, config, "train", args.train_scenes)
    test, test_y, test_centre = collect(model, config, "test", args.test_scenes)
    results: dict[str, dict[str, float]] = {}
    centre_r2: dict[str, dict[str, float]] = {}
    for site in train:
        results[site] = {
            target: round(probe_accuracy(train[site], train_y[:, k], test[site], test_y[:, k]), 3)
            for k, target in enumerate(TARGETS)
        }
        centre_r2[site] = dict(zip(CENTRE, probe_r2(train[site], train_centre, test[site], test_centre), strict=True))
        print(site, results[site], "centre R^2", centre_r2[site], flush=True)
    train_states, train_referred = collect_answer_states(model, config, "train", args.train_scenes)
    test_states, test_referred = collect_answer_states(model, config, "test", args.test_scenes)
    for site in train_states:
        r2 = probe_r2(train_states[site], train_referred, test_states[site], test_referred)
        centre_r2[site] = dict(zip(CENTRE, r2, strict=True))
        print(site, "(before x1) referred object's centre R^2", centre_r2[site], flush=True)
    # One-object scenes: all the bridge's tokens, and the LM before x1, for the one object's centre.
    train_bridge, train_single = collect_bridge_outputs(model, config, "train", args.train_scenes)
    test_bridge, test_single = collect_bridge_outputs(model, config, "test", args.test_scenes)
    r2 = probe_r2(train_bridge, train_single, test_bridge, test_single)
    centre_r2["bridge_all_tokens_one_object"] = dict(zip(CENTRE, r2, strict=True))
    print("bridge, all tokens, one-object scenes: centre R^2", centre_r2["bridge_all_tokens_one_object"], flush=True)
    train_states, train_one = collect_answer_states(model, config, "train", args.train_scenes, one_object=True)
    test_states, test_one = collect_answer_states(model, config, "test", args.test_scenes, one_object=True)
    for site in train_states:
        r2 = probe_r2(train_states[site], train_one, test_states[site], test_one)
        centre_r2[f"{site}_one_object"] = dict(zip(CENTRE, r2, strict=True))
        print(site, "(before x1), one-object scenes: centre R^2", centre_r2[f"{site}_one_object"], flush=True)
    settings = {
        "model": args.model,
        "train_objects": len(train_y),
        "test_objects": len(test_y),
        "chance_colour": round(1 / len(config.colours), 3),
        "chance_shape": round(1 / len(config.shapes), 3),
    }
    settings["referring_expressions"] = {"train": len(train_referred), "test": len(test_referred)}
    settings["one_object_scenes"] = {"train": len(train_single), "test": len(test_single)}
    output = {"settings": settings, "accuracy": results, "centre_r2": centre_r2}
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What the image tokens of a ShapesWorld VLM hold about each object: a linear probe per tower layer and on the bridge.

For every two-object scene, the token at each object's centre (the tower's patch grid, or the bridge's output grid)
is probed for the object's own colour, its own shape, and the *other* object's colour. Logistic-regression probes
are fitted on ``--train-scenes`` training scenes and scored on ``--test-scenes`` test scenes. A token that predicts
the other object's colour carries scene-level information beside its own object's: the experiment log's
(docs/experiments.md) "Learning curves" reads the VLM's binding errors against this (the answer "blue" to "what colour
is the star?" when the other object is the blue one). Writes ``--out`` (JSON).

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
from vlkit.data.transforms import ImageTransform
from vlkit.files import read_json
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.base import recipe_from_dict

TARGETS = ("own_colour", "own_shape", "other_colour")


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
    sites = [f"layer{k}" for k in range(len(model.encoder.blocks) + 1)] + ["bridge"]
    features: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    labels = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        pixels = torch.stack([transform(sample.image) for sample in chunk])
        tokens = {
            site: model.encoder.forward_features(pixels, layer=k).patch_tokens for k, site in enumerate(sites[:-1])
        }
        tokens["bridge"] = model.embed_image(pixels).tokens
        for row, sample in enumerate(chunk):
            size = (sample.image.width, sample.image.height)
            first, second = sample.objects
            for obj, other in ((first, second), (second, first)):
                for site, grid_tokens in tokens.items():
                    grid = round(grid_tokens.shape[1] ** 0.5)
                    features[site].append(grid_tokens[row, _cell(obj.centre, size, grid)].float())
                labels.append((colours.index(obj.colour), kinds.index(obj.shape), colours.index(other.colour)))
    return {site: torch.stack(rows) for site, rows in features.items()}, torch.tensor(labels)


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
    train, train_y = collect(model, config, "train", args.train_scenes)
    test, test_y = collect(model, config, "test", args.test_scenes)
    results: dict[str, dict[str, float]] = {}
    for site in train:
        results[site] = {
            target: round(probe_accuracy(train[site], train_y[:, k], test[site], test_y[:, k]), 3)
            for k, target in enumerate(TARGETS)
        }
        print(site, results[site], flush=True)
    settings = {
        "model": args.model,
        "train_objects": len(train_y),
        "test_objects": len(test_y),
        "chance_colour": round(1 / len(config.colours), 3),
        "chance_shape": round(1 / len(config.shapes), 3),
    }
    Path(args.out).write_text(json.dumps({"settings": settings, "accuracy": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Where a ShapesWorld dual encoder's held-out colour x shape errors come from: the image tower, the text one, or both.

The experiment log's (docs/experiments.md) "The patch tower's held-out combinations over five seeds" section. On the
single-object images of the held-out split (``val_heldout`` by default, so that nothing is chosen on a test split) and
of the seen one (``val``) it reports:

- ``top1``: the 40-way zero-shot accuracy (the recipe's own ``zero_shot_top1[_heldout]``);
- ``shape_within_colour``: the shape chosen among the five prompts of the image's true colour; equal to ``top1`` when
  every error is a shape read as another shape of the same colour;
- ``grey_prompt_shape``: the shape chosen among "grey circle" ... "grey hexagon" (the colourless copies' words);
- ``image_probe_shape``: a linear shape probe fitted on the pooled embeddings of ``--fit`` seen training images;
- ``text_probe_shape`` (per split's class names): that image-fitted probe applied to the class prompts' embeddings,
  i.e. whether the text tower puts "green square" where the image tower puts squares.

    python bench/heldout_probe.py --model RUN/model [RUN2/model ...] --out probe.json [--split val] [--size 400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vlkit.data import shapes
from vlkit.data.transforms import ImageTransform
from vlkit.eval.benchmarks import SHAPES_TEMPLATES
from vlkit.eval.zero_shot import class_embeddings, encode_images
from vlkit.hub import from_pretrained
from vlkit.models import DualEncoder
from vlkit.recipes.contrastive import SHAPES_DATA

BATCH = 100


def _images(model: DualEncoder, config: shapes.ShapesConfig, split: str, size: int):
    """(N, E) pooled image embeddings of ``size`` one-object scenes of ``split``, their shape and colour names."""
    transform = ImageTransform(image_size=model.config.vision.image_size)
    samples = [shapes.single_object(config, split, index) for index in range(size)]
    pixels = torch.stack([transform(sample.image) for sample in samples])
    features = encode_images(model, pixels.split(BATCH))
    return features.float(), [s.objects[0].shape for s in samples], [s.objects[0].colour for s in samples]


def _prompts(model: DualEncoder, names: list[str]) -> torch.Tensor:
    return class_embeddings(model, model.tokenizer, names, SHAPES_TEMPLATES).float()


def _fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 500) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(features), labels).backward()
        optimizer.step()
    return probe.requires_grad_(False)


@torch.no_grad()
def _accuracy(scores: torch.Tensor, truth: list[int]) -> float:
    return float((scores.argmax(dim=1) == torch.tensor(truth)).float().mean())


def probe_model(model: DualEncoder, config: shapes.ShapesConfig, which: str, size: int, fit: int) -> dict:
    shape_index = {shape: k for k, shape in enumerate(config.shapes)}
    train, train_shapes, _ = _images(model, config, "train", fit)
    probe = _fit_probe(train, torch.tensor([shape_index[s] for s in train_shapes]), len(config.shapes))
    names = shapes.class_names(config)
    classes = _prompts(model, names)
    grey = _prompts(model, [f"grey {shape}" for shape in config.shapes])
    per_colour = {colour: _prompts(model, [f"{colour} {s}" for s in config.shapes]) for colour in config.colours}
    result = {}
    for split in shapes.eval_splits(config, which):
        features, shape_names, colours = _images(model, config, split, size)
        truth_shape = [shape_index[s] for s in shape_names]
        within = torch.stack([features[k] @ per_colour[colours[k]].T for k in range(len(colours))])
        split_names = [f"{c} {s}" for c, s in shapes.allowed_combos(config, split)]
        split_classes = classes[[names.index(name) for name in split_names]]
        truth_class = [names.index(f"{c} {s}") for c, s in zip(colours, shape_names, strict=True)]
        result[split] = {
            "top1": _accuracy(features @ classes.T, truth_class),
            "shape_within_colour": _accuracy(within, truth_shape),
            "grey_prompt_shape": _accuracy(features @ grey.T, truth_shape),
            "image_probe_shape": _accuracy(probe(features), truth_shape),
            "text_probe_shape": _accuracy(probe(split_classes), [shape_index[n.split()[1]] for n in split_names]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True, help="dual-encoder model directories")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="val: val + val_heldout")
    parser.add_argument("--size", type=int, default=400, help="images per split")
    parser.add_argument("--fit", type=int, default=2000, help="seen training images the image probe is fitted on")
    args = parser.parse_args()
    results = {}
    for path in args.model:
        model = from_pretrained(path).eval()
        if not isinstance(model, DualEncoder):
            raise SystemExit(f"{path}: not a dual encoder ({type(model).__name__})")
        results[path] = probe_model(model, SHAPES_DATA, args.split, args.size, args.fit)
        for split, row in results[path].items():
            print(path, split, " ".join(f"{key} {value:.3f}" for key, value in row.items()))
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""An oracle image tower: does the language model bind attributes to objects when the image tokens are perfect?

The ShapesWorld VLM answers "what colour is the square?" with the other object's colour (docs/experiments.md, "Where
the binding fails"): its tower's tokens carry the other object's colour and hold their own shape only 70-80 % of the
time. This script replaces the tower by an oracle, so that only the bridge and the language model are left to learn:
the token of each patch (8 x 8 of them in the recipes) is the one-hot of the colour, shape and size of the object whose
box holds the patch centre (or "background"), zero-padded to the tower's width. The image never enters the model; the
oracle map travels in ``pixel_values`` as (8 colours + 5 shapes + 2 sizes + 1, rows, columns).

Everything else is ``bench/vlm_ablation.py``'s retrained-align run from a finished ``honeybee_c_shapes`` run: its
text stage and tokenizer are copied, the align and instruct stages train again (on the oracle), and every evaluation
asks the usual test questions. If the LM reaches VQA >= 0.90 here within the usual steps, the tower is what holds the
VLM back; if not, the LM is.

    python bench/vlm_oracle.py --from RUN --out OUT --tower RUN_TOWER [--steps 1200] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlkit.data import shapes
from vlkit.models.vlm import VisionLanguageModel

sys.path.insert(0, str(Path(__file__).parent))
import vlm_ablation


def oracle_channels(config: shapes.ShapesConfig) -> list[str]:
    """The oracle's channel names: each colour, each shape, each size, then background."""
    return [*config.colours, *config.shapes, *(name for name, _ in config.sizes), "background"]


def oracle_map(
    objects: list[shapes.ShapesObject], size: tuple[int, int], config: shapes.ShapesConfig, grid: tuple[int, int]
) -> torch.Tensor:
    """(channels, rows, columns): per patch, the one-hot colour, shape and size of the object whose box holds the
    patch centre (or background)."""
    channels = oracle_channels(config)
    index = {name: i for i, name in enumerate(channels)}
    (width, height), (rows, columns) = size, grid
    out = torch.zeros(len(channels), rows, columns)
    out[index["background"]] = 1.0
    for row in range(rows):
        for col in range(columns):
            x, y = (col + 0.5) * width / columns, (row + 0.5) * height / rows
            for item in objects:
                x1, y1, x2, y2 = item.box
                if x1 <= x < x2 and y1 <= y < y2:
                    out[:, row, col] = 0.0
                    for name in (item.colour, item.shape, item.size):
                        out[index[name], row, col] = 1.0
    return out


class OracleTransform:
    """Stands in for ``ImageTransform`` in the vlm task: an image that carries its scene's objects becomes the oracle
    map, any other image goes through the real transform."""

    def __init__(self, real: Any, config: shapes.ShapesConfig, grid: tuple[int, int]) -> None:
        self.real, self.config, self.grid = real, config, grid

    def __call__(self, image: Any) -> torch.Tensor:
        objects = getattr(image, "oracle_objects", None)
        return self.real(image) if objects is None else oracle_map(objects, image.size, self.config, self.grid)


def oracle_image_tokens(self: VisionLanguageModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``VisionLanguageModel.image_tokens`` for oracle maps (I, C, rows, columns): (I, N, D_vis) one-hot tokens,
    zero-padded, and their grid (I, 2)."""
    rows, columns = pixel_values.shape[2:]
    tokens = pixel_values.flatten(2).transpose(1, 2)  # (I, N, C)
    tokens = F.pad(tokens, (0, self.config.vision.dim - tokens.shape[-1]))
    return tokens, torch.tensor([[rows, columns]], device=tokens.device).expand(tokens.shape[0], 2)


def install(
    config: shapes.ShapesConfig, grid: tuple[int, int], patch: Callable[[Any, str, Any], None] = setattr
) -> None:
    """Route every ShapesWorld scene of the vlm task through the oracle, on the tower's ``grid`` (``patch``: how
    attributes are replaced, e.g. pytest's ``monkeypatch.setattr``, which undoes it)."""
    import vlkit.tasks.vlm as task
    import vlkit.tasks.vlm_data as task_data

    generate = shapes.generate

    def generate_with_objects(*args: Any, **kwargs: Any) -> shapes.ShapesSample:
        sample = generate(*args, **kwargs)
        sample.image.oracle_objects = sample.objects  # PIL images take attributes; the report still draws the image
        return sample

    real_transform = task.ImageTransform
    patch(shapes, "generate", generate_with_objects)

    def oracle(**kwargs: Any) -> OracleTransform:
        return OracleTransform(real_transform(**kwargs), config, grid)

    patch(task, "ImageTransform", oracle)  # evaluation's images
    patch(task_data, "ImageTransform", oracle)  # training's
    patch(VisionLanguageModel, "image_tokens", oracle_image_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a finished honeybee_c_shapes run (its OUT)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tower", required=True, help="any image tower directory (loaded, never run)")
    parser.add_argument("--recipe", default="honeybee_c_shapes")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from vlkit.recipes import get_recipe
    from vlkit.registry import get_config

    recipe = get_recipe(args.recipe)
    install(recipe.data.config, get_config(recipe.model).vision.grid)  # type: ignore[union-attr]
    forwarded = ["--from", args.source, "--out", args.out, "--recipe", args.recipe, "--feature-layer", "-1",
                 "--tower", args.tower, "--set", *args.set]  # fmt: skip
    vlm_ablation.main(forwarded + (["--steps", str(args.steps)] if args.steps else []))


if __name__ == "__main__":
    main()

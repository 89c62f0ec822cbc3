"""One change to the instruct stage of a finished ShapesWorld VLM run, everything before it reused.

The experiment log's (docs/experiments.md) "Why existence, spatial and grounding stay low" table: each row retrains
only the last stage of a ``llava_shapes`` / ``honeybee_c_shapes`` run (its ``text`` and ``align`` stages and tokenizer
are copied from ``--from``, so every row starts from the same LM, bridge and tower; a change that alters what ``align``
sees, ``--feature-layer``, copies only ``text`` and retrains ``align`` on the tower ``--tower`` names). A run of
another model (a ``honeybee_c_shapes`` run for ``--recipe honeybee_d_shapes``) lends only its text stage's LM:
``align`` starts the LM from it and the image tower from ``--tower``, and every later stage trains again. The runner's
``--resume`` skips the copied stages. Writes ``OUT/metrics.json`` as ``vlkit train`` does.

    python bench/vlm_ablation.py --from RUN --out OUT [--recipe honeybee_c_shapes] [--train-tower 0.1]
        [--feature-layer -2 --tower SIGLIP_RUN/model] [--set task.answer_weighting=answer ...]
        [--kinds existence --turns 1] [--steps 600]
    python bench/vlm_ablation.py --from DEMO/vlm --out OUT --recipe honeybee_c_shapes --tower DEMO/contrastive/model
    python bench/vlm_ablation.py --from BLIP2_RUN --out OUT --recipe blip2_shapes (--train-lm | --drop-stage qformer)
    python bench/vlm_ablation.py --from DEMO/vlm --out OUT --recipe honeybee_d_shapes --tower DEMO/contrastive/model
        --text-seed 1 [--text-products] --steps 900 --set stages.instruct.train.schedule=wsd data.eval_split=val

A stage's training settings are ``--set`` overrides as in ``vlkit train``: ``--set
stages.instruct.train.attention_products=true`` fine-tunes with the bf16 products attention (``TrainConfig``), as the
demo's instruct stage does on CPUs without AMX (docs/experiments.md, the forty-eighth session).

``--text-seed N`` trains every stage again, the text stage at seed N (the image tower from ``--tower``): how much the
VLM depends on its language model's draw. ``--text-products`` trains that text stage with the language model's bf16
products attention on (``CausalSelfAttention.bf16_products``; the later stages without): docs/experiments.md, the
thirty-eighth session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from vlkit.cli import _parse_overrides
from vlkit.files import read_json
from vlkit.recipes import InitFrom, Recipe, get_recipe
from vlkit.recipes.run import run_recipe, stage_dir
from vlkit.recipes.vlm import FROZEN_LM
from vlkit.train import ParamGroupRule


def _with_last_rules(recipe: Recipe, rules: tuple[Any, ...]) -> Recipe:
    """``recipe`` with its last stage's parameter rules replaced."""
    last = dataclasses.replace(recipe.stages[-1], rules=rules)
    return dataclasses.replace(recipe, stages=(*recipe.stages[:-1], last))


def _train_text_with_products(recipe: Recipe, out: Path) -> None:
    """``recipe``'s first stage alone with the LM's bf16 products on, its model where the whole recipe's resume finds
    a finished first stage."""
    from vlkit.lm.model import CausalSelfAttention

    text = recipe.stages[0]
    folder = stage_dir(out, recipe, text)
    if (folder / "model" / "model.safetensors").exists():
        return
    shipped, CausalSelfAttention.bf16_products = CausalSelfAttention.bf16_products, True
    try:
        run_recipe(dataclasses.replace(recipe, stages=(text,)), out, resume=True, report=False)
    finally:
        CausalSelfAttention.bf16_products = shipped
    shutil.move(out / "model", folder / "model")  # a one-stage run keeps its model at OUT/model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a finished run of --recipe (its OUT)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="llava_shapes")
    parser.add_argument("--steps", type=int, help="the instruct stage's steps (default: the recipe's)")
    parser.add_argument("--train-tower", type=float, help="train the image tower at this lr scale (default: frozen)")
    parser.add_argument("--train-lm", action="store_true", help="train the LM in the last stage (BLIP-2 freezes it)")
    parser.add_argument("--drop-stage", help="leave this stage out, its init going to the next (BLIP-2 w/o stage 1)")
    parser.add_argument("--feature-layer", type=int, help="read the tower here (retrains align; needs --tower)")
    parser.add_argument("--tower", help="the image tower's model directory (for a retrained align)")
    parser.add_argument("--kinds", nargs="*", help="train on these question kinds only")
    parser.add_argument("--turns", type=int)
    parser.add_argument("--text-seed", type=int, help="train every stage again, the text stage at this seed")
    parser.add_argument("--text-products", action="store_true", help="with --text-seed: the text stage's attention "
                        "as bf16 products (CausalSelfAttention.bf16_products), the later stages without")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    args = parser.parse_args(argv)

    recipe = get_recipe(args.recipe)
    last = recipe.stages[-1]
    overrides: dict[str, Any] = _parse_overrides(args.set)  # as `vlkit train --set` reads them
    reused = [stage.name for stage in recipe.stages[:-1]]  # by name: --set may change a reused stage's fields
    if args.feature_layer is not None:
        if not args.tower:
            parser.error("--feature-layer retrains the align stage: give --tower")
        overrides["model.feature_layer"] = args.feature_layer
        align = recipe.stages[-2]
        overrides[f"stages.{align.name}.init"] = {"encoder": InitFrom(args.tower, part="image_encoder")}
        reused = reused[:-1]
    if args.text_products and args.text_seed is None:
        parser.error("--text-products trains the text stage again: give --text-seed")
    if args.text_seed is not None:
        if not args.tower:
            parser.error("--text-seed trains every stage again: give --tower")
        text, align = recipe.stages[0], recipe.stages[1]
        overrides[f"stages.{text.name}.train.seed"] = args.text_seed
        overrides[f"stages.{align.name}.init"] = {"encoder": InitFrom(args.tower, part="image_encoder")}
        reused = []
    if args.kinds:
        overrides["data.kinds"] = tuple(args.kinds)
    if args.turns:
        overrides["data.turns"] = args.turns
    if args.steps:
        overrides[f"stages.{last.name}.train.steps"] = args.steps
    source, out = Path(args.source), Path(args.out)
    source_recipe = read_json(source / "recipe.json")
    if source_recipe["model"] != recipe.model:  # another bridge: only the text stage's LM carries over
        if not args.tower:
            parser.error(f"--from {source} trained {source_recipe['model']}, not {recipe.model}: give --tower")
        text, align = recipe.stages[0], recipe.stages[1]
        lm = InitFrom(str(stage_dir(source, recipe, text) / "model"), part="lm")
        overrides[f"stages.{align.name}.init"] = {"encoder": InitFrom(args.tower, part="image_encoder"), "lm": lm}
        recipe = dataclasses.replace(recipe, stages=recipe.stages[1:])
        reused = []
    recipe = recipe.with_overrides(overrides)
    if args.train_tower is not None:
        recipe = _with_last_rules(recipe, (ParamGroupRule(r"encoder\..*", lr_scale=args.train_tower),))
    if args.train_lm:
        recipe = _with_last_rules(recipe, tuple(rule for rule in recipe.stages[-1].rules if rule != FROZEN_LM))

    if args.drop_stage:
        names = [stage.name for stage in recipe.stages]
        if args.drop_stage not in names[:-1]:
            parser.error(f"--drop-stage {args.drop_stage!r}: the stages before the last are {names[:-1]}")
        index = names.index(args.drop_stage)
        dropped, following = recipe.stages[index], recipe.stages[index + 1]
        # The next stage takes its parts from where the dropped one did (BLIP-2's stage 1 brings the image tower).
        following = dataclasses.replace(following, init={**dropped.init, **following.init})
        recipe = dataclasses.replace(recipe, stages=(*recipe.stages[:index], following, *recipe.stages[index + 2 :]))
        reused = [name for name in reused if names.index(name) < index]  # every later stage trains again

    if not out.exists():
        out.mkdir(parents=True)
        shutil.copy(source / "tokenizer.json", out / "tokenizer.json")
        if (source / "pretrain").is_dir():  # the same image tower (and any other pretrained part)
            shutil.copytree(source / "pretrain", out / "pretrain")
        for stage in (stage for stage in recipe.stages if stage.name in reused):
            shutil.copytree(stage_dir(source, recipe, stage), stage_dir(out, recipe, stage))
    if args.text_products:
        _train_text_with_products(recipe, out)
    metrics = run_recipe(recipe, out, resume=True, report=False).metrics
    keys = ("vqa_accuracy", "vqa_accuracy_existence", "vqa_accuracy_spatial", "grounding_acc50", "caption_f1")
    print(json.dumps({key: round(metrics[key], 3) for key in keys if key in metrics}))


if __name__ == "__main__":
    main()

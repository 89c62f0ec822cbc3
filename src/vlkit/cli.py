"""The ``vlkit`` command: models, data, train, eval, demo, bench.

Errors a user can fix (bad input, unknown names, missing files) print one line ``vlkit: error: ...`` and exit 2,
without a traceback; ``VLKIT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vlkit.files import write_json

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _parse_value(text: str) -> Any:
    """JSON (``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{"kind": ...}``), Python's spellings of the same (``True``,
    ``None``, ``.001``), else the text as a string; each override is then checked against its field's type."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    word = text.strip()
    if word.lower() in _WORDS:
        return _WORDS[word.lower()]
    for number in (int, float):
        try:
            value = number(word)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = _parse_value(value)
    return overrides


def cmd_models(args: argparse.Namespace) -> int:
    from vlkit import get_config, list_models

    for name in list_models(args.pattern):
        config = get_config(name)
        print(f"{name:32s} {type(config).__name__}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from vlkit.recipes import get_recipe, list_recipes

    for name in list_recipes():
        print(f"{name:20s} {get_recipe(name).description}")
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` / ``name=VALUE``."""
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == name:
            skip_next = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def _launch_workers(args: argparse.Namespace) -> int:
    """``vlkit train --nproc N ...``: the same command under ``torchrun --standalone --nproc_per_node N``."""
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc launches its own processes; under torchrun leave it out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "vlkit", *_without_option(args.argv, "--nproc")]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from vlkit.recipes import get_recipe
    from vlkit.recipes.base import describe_changes
    from vlkit.recipes.run import run_recipe
    from vlkit.train.distributed import distributed_context

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    overrides = _parse_overrides(args.set or [])
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.save_every is not None:
        overrides["train.save_every"] = args.save_every
    if args.precision is not None:
        overrides["train.precision"] = args.precision
    if args.lock is not None:
        overrides["lock"] = args.lock
    base = get_recipe(args.recipe)
    recipe = base.with_overrides(overrides)
    if args.nproc is not None and args.nproc > 1:
        return _launch_workers(args)
    # Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) this joins the process group; alone it is a no-op.
    with distributed_context(None if args.device == "auto" else args.device) as info:
        if info.is_main:
            # What the overrides resolved to, e.g. the warmup that a new train.steps scaled.
            for line in describe_changes(base, recipe, given=overrides):
                print(f"recipe {recipe.name}: {line}", file=sys.stderr)
        result = run_recipe(
            recipe,
            args.out,
            train_data=args.train_data,
            skip_bad=args.skip_bad,
            resume=args.resume,
            init=args.init,
            progress=not args.quiet,
            strategy=args.strategy,
            device=info.device,
        )
    if info.is_main:
        _print_metrics(result.metrics)
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from vlkit.bench.claims import QUICK, Scale, run_claims

    scale = QUICK if args.quick else Scale(steps=args.steps_scale)
    if args.set:
        changes = _parse_overrides(args.set)
        vlm = None if scale.vlm_overrides is None else {**scale.vlm_overrides, **changes}
        scale = dataclasses.replace(scale, overrides={**scale.overrides, **changes}, vlm_overrides=vlm)
    if args.suite == "bridges":
        from vlkit.bench.bridges import bridges_table, run_bridges

        print(bridges_table(run_bridges(args.out, scale, only=args.only, progress=not args.quiet)), end="")
        print(f"bridges: {Path(args.out) / 'bridges.md'}")
        return 0
    results = run_claims(args.out, scale, only=args.only, progress=not args.quiet)
    for result in results:
        print(f"  {result.key:22s} reproduced: {'yes' if result.reproduced else 'no'}")
    print(f"claims: {Path(args.out) / 'claims.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vlkit import from_pretrained
    from vlkit.data.transforms import ImageTransform
    from vlkit.eval import digits_suite, shapes_suite
    from vlkit.recipes import get_recipe

    if (Path(args.model) / "recipe.json").exists():
        return _eval_recorded(args)
    model = from_pretrained(args.model).eval()
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ValueError(f"{args.model} holds a {type(model).__name__} without a recipe.json: a directory without one "
                         "evaluates as a dual encoder (zero-shot); a VLM evaluates from a vlkit run's model/ "
                         "directory, and `vlkit chat` talks with any")  # fmt: skip
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: zero-shot evaluation needs one")
    transform = ImageTransform(image_size=model.config.vision.image_size)
    shapes_config = get_recipe(args.recipe).data.config
    if args.suite == "digits":
        if args.split != "test":
            raise ValueError("--suite digits has no validation split: its evaluation reads scikit-learn's test fifth")
        suite = digits_suite(transform)
    else:
        suite = shapes_suite(shapes_config, transform, 400 if args.size is None else args.size, which=args.split)
    metrics = suite(model, model.tokenizer).metrics
    _print_metrics(metrics)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _eval_recorded(args: argparse.Namespace) -> int:
    """A model directory a recipe run wrote: its recipe.json names the task and the data to evaluate on."""
    import tempfile

    import torch

    from vlkit import from_pretrained
    from vlkit.files import read_json
    from vlkit.recipes.base import recipe_from_dict
    from vlkit.tasks.base import RunContext

    recipe = recipe_from_dict(read_json(Path(args.model) / "recipe.json"))
    # --split decides, not the split the run compared on during training (--set data.eval_split=val).
    if hasattr(recipe.data, "eval_split"):
        recipe = recipe.with_overrides({"data.eval_split": args.split})
    elif args.split != "test":
        raise ValueError(f"{args.model}: its data ({recipe.data.kind}) has no validation split to evaluate on")
    if args.size is not None:
        if not hasattr(recipe.data, "eval_size"):
            raise ValueError(f"{args.model}: its data ({recipe.data.kind}) has no eval_size for --size to set")
        recipe = recipe.with_overrides({"data.eval_size": args.size})
    model = from_pretrained(args.model).eval()
    with tempfile.TemporaryDirectory() as scratch:
        evaluation = recipe.task.evaluation(RunContext(recipe, Path(scratch), progress=False), model)
        if evaluation is None:
            raise ValueError(f"{args.model}: the {recipe.task.name} task has no evaluation")
        with torch.no_grad():
            metrics = evaluation(model).metrics
    _print_metrics(metrics)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from vlkit.serve.chat import run_chat

    return run_chat(args.model, args.image, args.prompt, args.max_new_tokens)


# The demo's budgets on this machine kind, so that SigLIP and the VLM fit 15 minutes (README, "`make demo`"; the runs
# behind each number are in docs/experiments.md).
# The VLM trains fewer instruct steps than its recipe's 1800, holding the rate until the last 20 % (warmup-stable-
# decay, which beat the cosine schedule on the validation split at 600 and at 1500 steps): 1500 where bf16 runs on
# matrix units (a CPU with AMX tiles, a CUDA GPU; with the C-Abstractor the whole demo in 773-799 s on a 2-core AMX
# Xeon, VQA 0.927, grounding 0.70), 1200 elsewhere, fine-tuning the language model with its attention as bf16
# products (TrainConfig.attention_products: 0.30 s a D-Abstractor step against 0.34 on a 2-core AVX-512 EPYC, the
# stage 374-376 s against 900 steps' 311-315). There, on the validation split over three paired seeds against 900
# steps with the kernel, VQA 0.899 against 0.880 (every seed higher), held-out 0.819 against 0.783, grounding 0.53
# against 0.31 (the forty-eighth session; 900 steps had read 0.845 / 0.63 with the C-Abstractor, the thirty-fourth).
# The tower trains its recipe's 2400 steps on matrix units and 1600 (warmup 225, as the recipe's) elsewhere, where
# 2400 would add ~155 s (the EPYC's 1600 took 314-320 s). 1600 steps hold out less: 88.75 % on average over five
# validation seeds on the AMX Xeon against 2400's 93.1 % (the twenty-eighth session), 82.55 % over five on the EPYC
# (the fiftieth). The tower keeps the fp32 attention kernel there: its steps as bf16 products were 1.20x faster, but
# those five seeds held out 75.45 % with them.
# The VLM: LLaVA's stages with Honeybee's D-Abstractor (16 image tokens, which train 1.3-1.7x faster than the MLP's
# 64), referring expressions drawn four times as often. It replaced the C-Abstractor (honeybee_c_shapes) in the
# forty-fourth session: on the demo's own tower and text-stage LM, validation split, 1000 scenes per split, five paired
# instruct seeds at 1500 steps, VQA 0.915 against 0.902 (every seed 0.899 or more, against 0.879), held-out VQA 0.789
# against 0.782, grounding 0.726 against 0.735; at 900 steps, three seeds, VQA 0.891 against 0.814, held-out 0.801
# against 0.654, grounding 0.627 against 0.442, at the same step time (docs/experiments.md).
DEMO_VLM_RECIPE = "honeybee_d_shapes"
DEMO_BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "matrix units": {"tower": {}, "instruct": {"steps": 1500, "schedule": "wsd"}},
    "other": {
        "tower": {"steps": 1600, "warmup_steps": 225},
        "instruct": {"steps": 1200, "schedule": "wsd", "attention_products": True},
    },
}


def demo_budget() -> dict[str, dict[str, Any]]:
    """The demo's training settings on this machine (``DEMO_BUDGETS``): ``tower`` for the SigLIP recipe's stage,
    ``instruct`` for the VLM's instruct stage."""
    import torch

    from vlkit.cpuinfo import amx_tiles

    return DEMO_BUDGETS["matrix units" if torch.cuda.is_available() or amx_tiles() else "other"]


def cmd_demo(args: argparse.Namespace) -> int:
    """SigLIP on ShapesWorld, then the LLaVA-style VLM on its image tower; one report with both."""
    from vlkit.recipes import InitFrom, get_recipe
    from vlkit.recipes.run import run_recipe, stage_dir
    from vlkit.train import write_report

    out = Path(args.out)
    start = time.perf_counter()
    budget = demo_budget()
    # The tower's budget on this machine kind (DEMO_BUDGETS); --set train.steps=N (with train.warmup_steps) wins.
    tower_budget = {f"train.{key}": value for key, value in budget["tower"].items()}
    recipe = get_recipe(args.recipe).with_overrides({**tower_budget, **_parse_overrides(args.set or [])})
    result = run_recipe(recipe, out / "contrastive", resume=True, progress=not args.quiet)
    metrics: dict[str, Any] = {"contrastive": result.metrics}
    figures = [(caption, out / "contrastive" / name) for caption, name in _DEMO_FIGURES]
    notes = [
        f"A SigLIP dual encoder trained from scratch on ShapesWorld (recipe {args.recipe}, "
        f"{recipe.stages[-1].train.steps} steps: the demo trains the recipe's own on a CPU with AMX or a GPU, "
        f"{DEMO_BUDGETS['other']['tower']['steps']} elsewhere, to fit 15 minutes: "
        f"{recipe.description})",
        "zero_shot_top1: single-object test images over all colour x shape classes; "
        "zero_shot_top1_heldout: colour x shape combinations never seen in training.",
        f"Full training report: {out / 'contrastive' / 'report.html'}",
    ]
    if not args.no_vlm:
        tower = {"encoder": InitFrom(str(out / "contrastive" / "model"), part="image_encoder")}
        # Fewer instruct steps than the recipe's, so that both parts fit 15 minutes (DEMO_BUDGETS);
        # --vlm-set stages.instruct.train.steps=N (or .schedule=...) overrides it.
        # A setting of the user's, for every stage or for this one, wins over the demo's (a stage's own setting wins
        # over one for every stage, so --vlm-set train.steps=N would otherwise leave the instruct stage's).
        given = _parse_overrides(args.vlm_set or [])
        instruct = {f"stages.instruct.train.{key}": value for key, value in budget["instruct"].items()
                    if f"train.{key}" not in given}  # fmt: skip
        demo = {"stages.align.init": tower, **instruct}
        vlm_recipe = get_recipe(args.vlm_recipe).with_overrides({**demo, **given})
        vlm = run_recipe(vlm_recipe, out / "vlm", resume=True, progress=not args.quiet)
        metrics["vlm"] = vlm.metrics
        figures.append(
            ("The VLM's answers on test scenes (boxes: green true, red predicted).", out / "vlm" / "answers.png")
        )
        notes += [
            f"A LLaVA-style VLM (recipe {args.vlm_recipe}, {vlm_recipe.stages[-1].train.steps} instruct steps: the "
            f"demo trains {DEMO_BUDGETS['matrix units']['instruct']['steps']} on a CPU with AMX or a GPU, "
            f"{DEMO_BUDGETS['other']['instruct']['steps']} elsewhere, to fit 15 minutes) on the SigLIP's image tower: "
            "vqa_accuracy (exact match over vqa_questions questions: +-0.013 at 0.90 over 530), "
            "grounding_acc50 (IoU >= 0.5 of the <box> answers), caption_f1 (colour-shape mentions); the _heldout "
            "keys are test scenes of held-out colour x shape combinations.",
            f"Full VLM report: {out / 'vlm' / 'report.html'}",
        ]
    metrics["demo_seconds"] = time.perf_counter() - start
    write_json(out / "metrics.json", metrics)
    write_report(
        out,
        "vlkit demo · SigLIP and a LLaVA-style VLM on ShapesWorld",
        metrics,
        stage_dir(out / "contrastive", recipe, recipe.stages[-1]) / "log.jsonl",
        [(caption, path) for caption, path in figures if path.exists()],
        notes,
    )
    _print_metrics(result.metrics)
    if "vlm" in metrics:
        _print_metrics(metrics["vlm"])
    print(f"report: {out / 'report.html'}")
    return 0


_DEMO_FIGURES = (
    ("Confusion matrix, seen combinations.", "confusion_zero_shot.png"),
    ("Confusion matrix, held-out combinations.", "confusion_zero_shot_heldout.png"),
    ("Image -> text retrieval on test scenes (green = correct).", "retrieval.png"),
)


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:28s} {value:.4f}")


def _add_train_parser(train: argparse.ArgumentParser) -> None:
    train.add_argument("--recipe", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--steps", type=int, help="every stage's steps (each warmup scaled by the same factor)")
    train.add_argument("--save-every", type=int)
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    train.add_argument("--train-data", help="a JSONL manifest or CSV to train on instead of the recipe's data")
    train.add_argument("--skip-bad", action="store_true", help="skip (and count) bad samples instead of stopping")
    train.add_argument("--init", help="start from a vlkit or Hugging Face model directory")
    train.add_argument("--lock", choices=["none", "image", "text"], help="freeze a tower (LiT: image)")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="auto (default): bf16 only where a short measurement finds it faster")  # fmt: skip
    train.add_argument("--nproc", type=int, help="launch N processes on this machine (torchrun --standalone)")
    train.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                       help="ddp (replicated weights) or fsdp (FSDP2, sharded); default ddp")  # fmt: skip
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto: the local rank's GPU when CUDA is available, else the CPU")  # fmt: skip
    train.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                       help="recipe overrides, e.g. train.lr=1e-3 (a new train.steps scales the warmup unless "
                       "train.warmup_steps is given too); each change is printed before training")  # fmt: skip
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list model presets")
    models.add_argument("pattern", nargs="?", default="*")
    models.set_defaults(func=cmd_models)

    recipes = sub.add_parser("recipes", help="list training recipes")
    recipes.set_defaults(func=cmd_recipes)

    data = sub.add_parser("data", help="generate datasets (vlkit data shapes --out DIR ...)")
    data.add_argument("dataset", choices=["shapes"])
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(func=None)

    _add_train_parser(sub.add_parser("train", help="train a recipe"))

    evaluate = sub.add_parser("eval", help="evaluate a saved model (a run's model/ evaluates on its own task and data)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--suite", choices=["shapes", "digits"], default="shapes")
    evaluate.add_argument(
        "--size", type=int,
        help="ShapesWorld scenes per split (a run's model: its data's eval_size unless given; else 400). The VLM "
        "evaluation's 100 scenes read VQA to about +-0.013 (binomial); --size 1000 to about +-0.004",
    )  # fmt: skip
    evaluate.add_argument(
        "--split", choices=("test", "val"), default="test",  # vlkit.data.shapes.EVAL_SPLITS, without importing torch
        help="ShapesWorld: the test splits (seen and held-out combinations), or the validation ones to compare on",
    )  # fmt: skip
    evaluate.add_argument("--recipe", default="siglip_shapes", help="the recipe whose ShapesWorld settings to use")
    evaluate.add_argument("--out", help="write the metrics as JSON here")
    evaluate.set_defaults(func=cmd_eval)

    chat = sub.add_parser("chat", help="talk with a vision-language model about an image (tokens streamed)")
    chat.add_argument("--model", required=True, help="a VLM directory (a vlkit run's model/ or a LLaVA checkpoint)")
    chat.add_argument("--image", required=True)
    chat.add_argument("--prompt", help="ask once and exit; without it the session is interactive")
    chat.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation_config.json, else 64"
    )
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="train SigLIP, then a LLaVA-style VLM, on ShapesWorld and write a report")
    demo.add_argument("--out", default="runs/demo")
    # SigLIP with the per-patch objective: its tokens say which object they hold, which the VLM's bridge reads
    # (README, "The image tower, trained patch by patch"); --recipe siglip_shapes for the sigmoid loss alone.
    demo.add_argument("--recipe", default="siglip_patch_shapes", help="the contrastive recipe (the VLM's tower)")
    demo.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                      help="overrides for the SigLIP recipe (win over the demo's tower budget)")  # fmt: skip
    vlm_help = "the VLM recipe (honeybee_c_shapes: the C-Abstractor; llava_shapes: the MLP bridge)"
    demo.add_argument("--vlm-recipe", default=DEMO_VLM_RECIPE, help=vlm_help)
    demo.add_argument("--vlm-set", nargs="*", action="extend", metavar="KEY=VALUE", help="overrides for the VLM recipe")
    demo.add_argument("--no-vlm", action="store_true", help="the SigLIP part only")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="the papers' claims; every bridge under one budget (bench claims/bridges)")
    bench.add_argument("suite", choices=["claims", "bridges"])
    bench.add_argument("--out", required=True, help="runs go to OUT/runs/<name>; finished runs are reused")
    bench.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the wiring only")
    bench.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's training steps")
    bench.add_argument(
        "--only", nargs="*", action="extend", metavar="NAME", help="run only these claims / bridge rows (default: all)"
    )
    bench.add_argument(
        "--set", nargs="*", action="extend", metavar="KEY=VALUE", help="every run: e.g. train.save_every=200"
    )
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The raw arguments, for `train --nproc` to hand on to the processes it launches.
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.command == "data":
        from vlkit.data.shapes import shapes_main

        return shapes_main(args.rest)
    try:
        return int(args.func(args))
    # FloatingPointError: training stopped at a non-finite loss, with a message saying what to do.
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError) as error:
        if os.environ.get("VLKIT_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"vlkit: error: {f'[rank {rank}] ' if rank is not None else ''}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

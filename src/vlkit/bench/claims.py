"""Small controlled comparisons of the papers' claims on ShapesWorld: ``vlkit bench claims --out DIR``.

Each claim is a handful of recipe runs that differ in one thing (the loss, a locked tower, the interaction, patch
dropout, the input policy) and share everything else: the recipes' ShapesWorld data and budget (``SHAPES_DATA`` /
``SHAPES_BUDGET``, whatever they are when the bench runs). Runs go to ``DIR/runs/<name>``; one whose
``metrics.json`` exists is reused, so an interrupted bench resumes, and runs shared by claims (the CLIP baseline,
the pretrained image tower) train once. A reused run must have been trained with the recipe the bench would train
now; otherwise the bench stops and names it.

    sigmoid_vs_softmax  SigLIP (Zhai et al., 2023): the sigmoid loss is at least as good as softmax at small batches
    lit                 LiT (Zhai et al., 2022): a locked pretrained image tower beats training both from scratch
    filip_fine_grained  FILIP (Yao et al., 2021): token-wise interaction is better at fine-grained matching
    eva_patch_dropout   EVA-CLIP / FLIP (Sun et al., 2023; Li et al., 2023): patch dropout 0.5 buys throughput
                        at little accuracy cost, and wins at equal wall time
    navit_packing       NaViT (Dehghani et al., 2023): packing native aspect ratios beats resize / pad to square at
                        equal token slots per batch
    honeybee_locality   Honeybee (Cha et al., 2023): a locality-preserving bridge (C-Abstractor) answers spatial
                        questions better than a resampler at equal M
    blip2_stage1        BLIP-2 (Li et al., 2023): a Q-Former trained in stage 1 makes stage 2 into a frozen LM better

The last two are rows of ``vlkit bench bridges`` (``vlkit.bench.bridges``, where they are defined): they read the
bridges bench's runs in the same ``DIR/runs``, so running both benches trains nothing twice.

Every claim states its rule for "reproduced" next to the numbers in ``DIR/claims.md``; ``DIR/claims.json`` holds the
same as data. ``claims_table`` renders the table for a README.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.data import shapes
from vlkit.data.transforms import ImageTransform
from vlkit.eval.similarity import image_text_similarity
from vlkit.models import DualEncoder
from vlkit.recipes import get_recipe
from vlkit.recipes.base import InitFrom, Recipe, recipe_from_dict
from vlkit.recipes.run import run_recipe
from vlkit.registry import get_config
from vlkit.text import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "CLAIMS",
    "QUICK",
    "ClaimResult",
    "ClaimsBench",
    "HardNegativeSet",
    "Scale",
    "claims_markdown",
    "claims_table",
    "hard_negative_scores",
    "hard_negative_set",
    "load_claims",
    "run_claims",
]

# The SigLIP paper's "small batch" regime, where the sigmoid loss should hold its own against softmax.
SMALL_BATCH = 128
# One percentage point: the tolerance of the "at least as good" rules (ShapesWorld test sets hold a few hundred).
TOLERANCE = 0.01


@dataclass(frozen=True)
class Scale:
    """How big the bench's runs are: ``steps`` multiplies every recipe's training steps, ``overrides`` go to every
    run (a ``model.*`` key a recipe's preset lacks is left out for it), ``batch_sizes`` is the loss sweep."""

    steps: float = 1.0
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    hard_negative_size: int = 500
    report: bool = True
    label: str | None = None  # how claims.md names the scale; by default the steps factor
    # The vision-language runs' (``vlkit bench bridges``, the VLM claims) overrides in place of ``overrides``;
    # None: ``overrides``. A quick scale shrinks a VLM differently (its bridges are sized to the tower's 8 x 8 grid).
    vlm_overrides: Mapping[str, Any] | None = None
    # Test scenes per split the vision-language claims read their runs' models on. A run's own evaluation asks 100
    # (``ShapesInstructions.eval_size``): ~530 VQA questions, 40 of them spatial, one question 2.5 pt of a spatial
    # accuracy, where the rules ask 1 pt; 1000 scenes (361 spatial questions) put a spatial accuracy's standard error
    # near 2.6 pt and VQA's near 0.7 pt.
    claim_scenes: int = 1000

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"the steps scale must be > 0, got {self.steps}")
        if self.claim_scenes < 1:
            raise ValueError(f"claim_scenes must be >= 1, got {self.claim_scenes}")


# Tiny towers and a few steps: every run and every claim row end to end in seconds; the numbers mean nothing.
QUICK = Scale(
    batch_sizes=(4, 8, 16),
    overrides={
        "train.steps": 2, "train.batch_size": 8, "train.eval_every": None, "data.train_size": 32, "data.eval_size": 16,
        "model.vision.image_size": 32, "model.vision.dim": 32, "model.vision.depth": 2, "model.vision.num_heads": 2,
        "model.vision.mlp_dim": 64, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
        "model.text.mlp_dim": 64, "model.embed_dim": 32,
    },
    hard_negative_size=16,
    report=False,
    label="quick (tiny models, a few steps: the numbers check the wiring, not the claims)",
    # Tiny towers and LM, the image size (and so the 8 x 8 grid every bridge row is sized to) kept; the bridges keep
    # their own widths. A few scenes and tokens: one evaluation is a few short generations.
    vlm_overrides={
        "train.steps": 2, "train.batch_size": 4, "train.eval_every": None, "data.train_size": 16,
        "data.eval_size": 3, "model.vision.dim": 32, "model.vision.depth": 1, "model.vision.num_heads": 2,
        "model.vision.mlp_dim": 64, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
        "model.text.mlp_dim": 64, "model.lm.dim": 32, "model.lm.depth": 1, "model.lm.num_heads": 2,
        "model.lm.num_kv_heads": 2, "model.lm.head_dim": 16, "model.lm.mlp_dim": 64, "task.tokenizer_scenes": 20,
        "task.max_new_tokens": 6, "stages.text.data.train_size": 20,
    },
    claim_scenes=4,
)  # fmt: skip


@dataclass
class ClaimResult:
    key: str
    claim: str
    setting: str
    numbers: dict[str, float]
    summary: str  # the numbers as the table shows them
    rule: str
    reproduced: bool


Results = dict[str, dict[str, Any]]


class ClaimsBench:
    """Runs recipes into ``out/runs/<name>`` at a ``Scale``, reusing finished runs, and measures them."""

    def __init__(self, out_dir: str | Path, scale: Scale, progress: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.scale = scale
        self.progress = progress
        # The machine each run this bench read trained on (None: a run from before vlkit recorded it).
        self.machines: dict[str, str | None] = {}

    def run_dir(self, name: str) -> Path:
        return self.out_dir / "runs" / name

    def recipe(self, recipe: str | Recipe, overrides: Mapping[str, Any] | None = None) -> Recipe:
        """The recipe (a name, or one built here) with the scale's overrides, those it can take (a ``model.*`` key
        its preset has, a ``task.*`` key its task has, a ``stages.NAME.*`` key of a stage it has), then
        ``overrides``."""
        recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        task_fields = dataclasses.fields(recipe.task) if dataclasses.is_dataclass(recipe.task) else ()
        takes = {
            "model": {item.name for item in dataclasses.fields(get_config(recipe.model))},
            "task": {item.name for item in task_fields},
            "stages": {name for index, stage in enumerate(recipe.stages) for name in (stage.name, str(index))},
        }
        changes = {}
        for key, value in self.scale.overrides.items():
            head, _, rest = key.partition(".")
            if head not in takes or rest.partition(".")[0] in takes[head]:
                changes[key] = value
        changes |= dict(overrides or {})
        if "train.steps" not in changes and self.scale.steps != 1.0:
            for stage in recipe.stages:
                changes[f"stages.{stage.name}.train.steps"] = max(1, round(stage.train.steps * self.scale.steps))
        return recipe.with_overrides(changes)

    def run(self, name: str, recipe: str | Recipe, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train (or reuse) run ``name`` of ``recipe`` (a name or one built by the caller, at the recipes' own
        scale: the bench applies its own) and return its metrics."""
        recipe = self.recipe(recipe, overrides)
        run_dir = self.run_dir(name)
        metrics_file = run_dir / "metrics.json"
        if metrics_file.exists():
            # Read back through the recipe classes, so that a field added since (at its default) is no change.
            saved = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text())).to_dict()
            if json.loads(json.dumps(saved)) != json.loads(json.dumps(recipe.to_dict())):
                raise ValueError(f"{run_dir} was trained with other settings than the bench's {recipe.name} now; "
                                 "delete it to retrain, or bench into a new --out")  # fmt: skip
            metrics = json.loads(metrics_file.read_text())
        else:
            logger.info("claims: training %s (%s) in %s", name, recipe.name, run_dir)
            metrics = run_recipe(recipe, run_dir, resume=True, progress=self.progress, report=self.scale.report).metrics
        self.machines[name] = metrics.get("machine")
        return metrics

    def batch_size(self, name: str) -> int:
        return int(json.loads((self.run_dir(name) / "recipe.json").read_text())["stages"][-1]["train"]["batch_size"])

    def samples_per_second(self, name: str) -> float:
        metrics = json.loads((self.run_dir(name) / "metrics.json").read_text())
        return metrics["steps"] * self.batch_size(name) / metrics["train_seconds"]

    def hard_negatives(self, name: str) -> dict[str, float]:
        """``hard_negative_scores`` of run ``name``'s model, computed once and kept in its folder."""
        cached = self.run_dir(name) / "hard_negatives.json"
        if cached.exists():
            return json.loads(cached.read_text())
        from vlkit.hub import from_pretrained

        model = from_pretrained(self.run_dir(name) / "model").eval()
        assert isinstance(model, DualEncoder) and model.tokenizer is not None
        saved = json.loads((self.run_dir(name) / "recipe.json").read_text())
        config = shapes.ShapesConfig.from_dict(saved["data"]["config"])
        transform = ImageTransform(image_size=model.config.vision.image_size)
        data = hard_negative_set(config, transform, self.scale.hard_negative_size)
        scores = hard_negative_scores(model, model.tokenizer, data)
        cached.write_text(json.dumps(scores, indent=2) + "\n")
        return scores

    def letterbox_fraction(self, name: str) -> float:
        """The share of a square letterboxed image that is padding, averaged over run ``name``'s training images."""
        manifest = self.run_dir(name) / "data" / "train.jsonl"
        fractions = []
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            width, height = record["width"], record["height"]
            fractions.append(1.0 - min(width, height) / max(width, height))
        return float(np.mean(fractions))


# ---------------------------------------------------------------------------------------------- hard negatives


@dataclass
class HardNegativeSet:
    """Multi-object scenes, each with its caption and a hard negative that changes one object's colour or shape."""

    pixels: torch.Tensor  # (N, 3, H, W)
    captions: list[str]
    negatives: list[str]


def describe(objects: Sequence[shapes.ShapesObject]) -> str:
    """ "a red circle and a blue square": ShapesWorld's short caption, objects from left to right."""
    phrases = [("an " if item.colour[0] in "aeiou" else "a ") + f"{item.colour} {item.shape}" for item in objects]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _hard_negative(
    config: shapes.ShapesConfig, objects: list[shapes.ShapesObject], rng: np.random.Generator
) -> list[shapes.ShapesObject]:
    """``objects`` with one object's colour or shape changed to a seen combination no object of the scene has."""
    seen = set(shapes.allowed_combos(config, "train"))
    present = {(item.colour, item.shape) for item in objects}
    for number in rng.permutation(len(objects)):
        item = objects[number]
        attributes = ["colour", "shape"] if rng.random() < 0.5 else ["shape", "colour"]
        for attribute in attributes:
            values = config.colours if attribute == "colour" else config.shapes
            options = []
            for value in values:
                changed = dataclasses.replace(item, **{attribute: value})
                if (changed.colour, changed.shape) in seen - present:
                    options.append(changed)
            if options:
                swapped = list(objects)
                swapped[number] = options[int(rng.integers(len(options)))]
                return swapped
    raise ValueError("no object of the scene can change one attribute into a new seen combination")


def hard_negative_set(config: shapes.ShapesConfig, transform: ImageTransform, size: int) -> HardNegativeSet:
    """``size`` square ``test`` scenes with at least two objects (so "which object has which colour" matters)."""
    multi = dataclasses.replace(config, aspect_ratios=None, min_objects=2, max_objects=max(2, config.max_objects))
    pixels, captions, negatives = [], [], []
    index = 0
    while len(captions) < size:
        sample = shapes.generate(multi, "test", index)
        index += 1
        if len(sample.objects) < 2:  # an object that found no free spot was dropped
            continue
        ordered = sorted(sample.objects, key=lambda item: item.centre)
        rng = np.random.default_rng([config.seed, index])
        pixels.append(transform(sample.image))
        captions.append(describe(ordered))
        negatives.append(describe(_hard_negative(multi, ordered, rng)))
    return HardNegativeSet(torch.stack(pixels), captions, negatives)


def hard_negative_scores(model: DualEncoder, tokenizer: Tokenizer, data: HardNegativeSet) -> dict[str, float]:
    """``hard_negative_accuracy``: the share of images scoring their caption above its hard negative;
    ``hard_negative_r1``: the share whose best text among all captions and negatives is their caption."""
    count = len(data.captions)
    texts = data.captions + data.negatives
    similarity, _ = image_text_similarity(model, tokenizer, data.pixels.split(256), texts)  # (N, 2N) image -> text
    rows = torch.arange(count)
    accuracy = (similarity[rows, rows] > similarity[rows, rows + count]).float().mean()
    best = similarity.argmax(dim=1).tolist()
    recall = np.mean([texts[best[index]] == data.captions[index] for index in range(count)])
    return {"hard_negative_accuracy": float(accuracy), "hard_negative_r1": float(recall)}


# ---------------------------------------------------------------------------------------------- the claims


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _base_batch(bench: ClaimsBench) -> int:
    return int(bench.scale.overrides.get("train.batch_size", get_recipe("clip_shapes").stages[0].train.batch_size))


def _clip_baseline(bench: ClaimsBench) -> tuple[str, dict[str, Any]]:
    """CLIP from scratch at the recipes' own batch: the sweep's run at that batch, trained once."""
    batch = _base_batch(bench)
    name = f"clip_b{batch}"
    return name, bench.run(name, "clip_shapes", {"train.batch_size": batch})


def _pretrained_tower(bench: ClaimsBench) -> dict[str, Any]:
    """Start LiT's and EVA-CLIP's image tower from ``classify_shapes``, trained once for the whole bench."""
    bench.run("classify_shapes", "classify_shapes")
    return {"stages.train.init": {"image_encoder": InitFrom(str(bench.run_dir("classify_shapes") / "model"))}}


def sigmoid_vs_softmax(bench: ClaimsBench) -> ClaimResult:
    numbers, parts, holds = {}, [], []
    for batch in bench.scale.batch_sizes:
        clip = bench.run(f"clip_b{batch}", "clip_shapes", {"train.batch_size": batch})["zero_shot_top1"]
        siglip = bench.run(f"siglip_b{batch}", "siglip_shapes", {"train.batch_size": batch})["zero_shot_top1"]
        numbers |= {f"softmax_b{batch}": clip, f"sigmoid_b{batch}": siglip}
        parts.append(f"b{batch}: sigmoid {_pct(siglip)} / softmax {_pct(clip)}")
        if batch <= SMALL_BATCH:
            holds.append(siglip >= clip - TOLERANCE)
    return ClaimResult(
        key="sigmoid_vs_softmax",
        claim="SigLIP: the sigmoid loss is at least as good as softmax (CLIP) at small batch sizes",
        setting=f"clip_shapes vs siglip_shapes, batch {', '.join(map(str, bench.scale.batch_sizes))}, equal steps",
        numbers=numbers,
        summary="zero-shot top-1 (%): " + "; ".join(parts),
        rule=f"sigmoid >= softmax - {_pct(TOLERANCE)} pt at every batch <= {SMALL_BATCH}",
        reproduced=bool(holds) and all(holds),
    )


def lit(bench: ClaimsBench) -> ClaimResult:
    scratch_name, scratch = _clip_baseline(bench)
    locked = bench.run("lit_locked", "lit_shapes", _pretrained_tower(bench))
    numbers = {"lit_top1": locked["zero_shot_top1"], "scratch_top1": scratch["zero_shot_top1"],
               "lit_top1_heldout": locked["zero_shot_top1_heldout"],
               "scratch_top1_heldout": scratch["zero_shot_top1_heldout"]}  # fmt: skip
    return ClaimResult(
        key="lit",
        claim="LiT: a locked pretrained image tower beats training both towers from scratch at equal steps",
        setting=f"lit_shapes (tower from classify_shapes, locked) vs {scratch_name} (clip_shapes), equal steps",
        numbers=numbers,
        summary=f"zero-shot top-1 (%): LiT {_pct(numbers['lit_top1'])} / scratch {_pct(numbers['scratch_top1'])}; "
        f"held-out: {_pct(numbers['lit_top1_heldout'])} / {_pct(numbers['scratch_top1_heldout'])}",
        rule=f"LiT top-1 >= scratch top-1 + {_pct(TOLERANCE)} pt",
        reproduced=numbers["lit_top1"] >= numbers["scratch_top1"] + TOLERANCE,
    )


def filip_fine_grained(bench: ClaimsBench) -> ClaimResult:
    clip_name, _ = _clip_baseline(bench)
    batch = _base_batch(bench)
    bench.run(f"filip_b{batch}", "filip_shapes", {"train.batch_size": batch})
    clip, filip = bench.hard_negatives(clip_name), bench.hard_negatives(f"filip_b{batch}")
    numbers = {f"clip_{key}": value for key, value in clip.items()} | {
        f"filip_{key}": value for key, value in filip.items()
    }
    return ClaimResult(
        key="filip_fine_grained",
        claim="FILIP: token-wise late interaction matches fine-grained multi-object captions better than CLIP",
        setting=f"filip_shapes vs clip_shapes at batch {batch}; {bench.scale.hard_negative_size} two-object test "
        "scenes, each caption vs a hard negative with one object's colour or shape changed",
        numbers=numbers,
        summary=f"caption beats its hard negative (%): FILIP {_pct(filip['hard_negative_accuracy'])} / CLIP "
        f"{_pct(clip['hard_negative_accuracy'])}; R@1 over captions + negatives: FILIP "
        f"{_pct(filip['hard_negative_r1'])} / CLIP {_pct(clip['hard_negative_r1'])}",
        rule=f"FILIP hard-negative accuracy >= CLIP's + {_pct(TOLERANCE)} pt",
        reproduced=filip["hard_negative_accuracy"] >= clip["hard_negative_accuracy"] + TOLERANCE,
    )


def eva_patch_dropout(bench: ClaimsBench) -> ClaimResult:
    tower = _pretrained_tower(bench)
    base = bench.run("evaclip_pd0", "evaclip_shapes", {**tower, "model.vision.patch_dropout": 0.0})
    dropped = bench.run("evaclip_pd05", "evaclip_shapes", {**tower, "model.vision.patch_dropout": 0.5})
    speedup = bench.samples_per_second("evaclip_pd05") / bench.samples_per_second("evaclip_pd0")
    # Equal wall time: the dropout run gets the steps its throughput buys in the time the full run took.
    steps = max(1, round(base["steps"] * speedup))
    timed = bench.run("evaclip_pd05_equal_time", "evaclip_shapes",
                      {**tower, "model.vision.patch_dropout": 0.5, "train.steps": steps})  # fmt: skip
    numbers = {"throughput_pd0": bench.samples_per_second("evaclip_pd0"),
               "throughput_pd05": bench.samples_per_second("evaclip_pd05"), "speedup": speedup,
               "top1_pd0": base["zero_shot_top1"], "top1_pd05_equal_steps": dropped["zero_shot_top1"],
               "top1_pd05_equal_time": timed["zero_shot_top1"], "steps_pd05_equal_time": float(steps)}  # fmt: skip
    return ClaimResult(
        key="eva_patch_dropout",
        claim="EVA-CLIP / FLIP: patch dropout 0.5 trains faster at a small accuracy cost per step, and at equal "
        "wall time matches or beats no dropout",
        setting="evaclip_shapes (classify_shapes tower, LAMB, layer decay) with patch dropout 0 vs 0.5; equal steps, "
        "and 0.5 for the steps its throughput buys in the 0 run's time",
        numbers=numbers,
        summary=f"images/s: {numbers['throughput_pd0']:.0f} -> {numbers['throughput_pd05']:.0f} (x{speedup:.2f}); "
        f"top-1 (%): pd0 {_pct(numbers['top1_pd0'])}, pd0.5 equal steps {_pct(numbers['top1_pd05_equal_steps'])}, "
        f"equal time ({steps} step{'s' if steps > 1 else ''}) {_pct(numbers['top1_pd05_equal_time'])}",
        rule=f"speedup >= 1.5 and pd0.5 top-1 at equal time >= pd0 top-1 - {_pct(TOLERANCE)} pt",
        reproduced=speedup >= 1.5 and numbers["top1_pd05_equal_time"] >= numbers["top1_pd0"] - TOLERANCE,
    )


def navit_packing(bench: ClaimsBench) -> ClaimResult:
    numbers = {}
    for policy in ("pack", "resize_square", "pad_square"):
        metrics = bench.run(f"navit_{policy}", "navit_shapes", {"task.inputs": policy})
        numbers[f"{policy}_top1"] = metrics["zero_shot_top1"]
    # Token padding for packing; letterbox pixels for pad-to-square (a resized square has none).
    numbers["pack_padding"] = json.loads((bench.run_dir("navit_pack") / "metrics.json").read_text())["padding_fraction"]
    numbers["resize_square_padding"] = 0.0
    numbers["pad_square_padding"] = bench.letterbox_fraction("navit_pad_square")
    best_square = max(numbers["resize_square_top1"], numbers["pad_square_top1"])
    return ClaimResult(
        key="navit_packing",
        claim="NaViT: packing images at native aspect ratio beats resizing or padding them to a square at equal "
        "compute",
        setting="navit_shapes (aspect ratios 1:2 to 2:1) with task.inputs pack / resize_square / pad_square, "
        "equal token slots per batch; square test images",
        numbers=numbers,
        summary="zero-shot top-1 (%) / padding (%): "
        + "; ".join(
            f"{policy} {_pct(numbers[f'{policy}_top1'])} / {_pct(numbers[f'{policy}_padding'])}"
            for policy in ("pack", "resize_square", "pad_square")
        ),
        rule="pack top-1 >= the better square policy's top-1",
        reproduced=numbers["pack_top1"] >= best_square,
    )


def _bridges_claim(name: str) -> Callable[[ClaimsBench], ClaimResult]:
    """A claim about bridges, defined with the bridges bench whose runs it reads (imported late: it imports this)."""

    def claim(bench: ClaimsBench) -> ClaimResult:
        from vlkit.bench import bridges

        return getattr(bridges, name)(bench)

    claim.__name__ = name
    return claim


CLAIMS: dict[str, Callable[[ClaimsBench], ClaimResult]] = {
    "sigmoid_vs_softmax": sigmoid_vs_softmax,
    "lit": lit,
    "filip_fine_grained": filip_fine_grained,
    "eva_patch_dropout": eva_patch_dropout,
    "navit_packing": navit_packing,
    "honeybee_locality": _bridges_claim("honeybee_locality"),
    "blip2_stage1": _bridges_claim("blip2_stage1"),
}


# ---------------------------------------------------------------------------------------------- output


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_table(results: Sequence[ClaimResult]) -> str:
    """The markdown table: claim, setting, vlkit's numbers, the rule, reproduced yes/no."""
    lines = ["| claim | setting | vlkit's numbers | rule | reproduced |", "|---|---|---|---|---|"]
    for result in results:
        cells = (result.claim, result.setting, result.summary, result.rule, "yes" if result.reproduced else "no")
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def load_claims(path: str | Path) -> list[ClaimResult]:
    """The results a bench wrote to ``claims.json`` (``claims_table(load_claims(...))`` renders them for a README)."""
    return [ClaimResult(**row) for row in json.loads(Path(path).read_text())["claims"]]


def machines_line(machines: Mapping[str, str | None]) -> str:
    """The markdown line naming the machines a bench's runs trained on (a table's times hold on those alone)."""
    known = sorted({machine for machine in machines.values() if machine})
    unknown = sorted(name for name, machine in machines.items() if not machine)
    text = "; ".join(known) if known else "not recorded"
    if known and unknown:
        text += f" (not recorded for {', '.join(unknown)}: trained before vlkit recorded it)"
    return f"Trained on: {text}.\n"


def claims_markdown(results: Sequence[ClaimResult], scale: Scale, machines: Mapping[str, str | None]) -> str:
    size = scale.label or f"the recipes' own budget x {scale.steps:g} steps"
    return (
        "# vlkit: the papers' claims on ShapesWorld\n\n"
        f"Scale: {size}. Each row's runs share data, model size and budget and differ in the one thing the claim is "
        'about; "reproduced" applies the row\'s rule to the numbers beside it. Zero-shot top-1 is on single-object '
        "test scenes of seen colour x shape combinations; VQA is exact match on one question of each kind per test "
        "scene of seen combinations.\n\n" + claims_table(results) + "\n" + machines_line(machines)
    )


def run_claims(
    out_dir: str | Path, scale: Scale = Scale(), only: Sequence[str] | None = None, progress: bool = True
) -> list[ClaimResult]:
    """Run the claims (all, or ``only``) and write ``out_dir/claims.json`` and ``out_dir/claims.md``."""
    unknown = sorted(set(only or ()) - set(CLAIMS))
    if unknown:
        raise KeyError(f"unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")
    out_dir = Path(out_dir)
    bench = ClaimsBench(out_dir, scale, progress)
    results = []
    for key, claim in CLAIMS.items():
        if only and key not in only:
            continue
        results.append(claim(bench))
        # Written after every claim: a long bench shows its finished rows while the next one trains.
        data = {"scale": dataclasses.asdict(scale), "claims": [dataclasses.asdict(result) for result in results],
                "machines": bench.machines}  # fmt: skip
        (out_dir / "claims.json").write_text(json.dumps(data, indent=2) + "\n")
        (out_dir / "claims.md").write_text(claims_markdown(results, scale, bench.machines))
    return results

"""Every bridge under one budget on ShapesWorld: ``vlkit bench bridges --out DIR``.

Each row is ``llava_shapes`` with one bridge in place of its MLP, at M output tokens per image from the image tower's
8 x 8 = 64 patch tokens; M = 16 and M = 64 where the bridge allows it:

    linear, MLP (LLaVA, LLaVA-1.5)                                       M = 64       one output per patch token
    pixel shuffle, attention pooling (Molmo), patch merger (Qwen2-VL)    M = 16       one output per 2 x 2 window
    Q-Former (BLIP-2), resampler (Qwen-VL), C- / D-Abstractor (Honeybee) M = 16, 64   learned queries / pooled grid
    Q-Former + stage 1 (BLIP-2)                                          M = 16       its representation stage first

Everything else is shared: one image tower (the ``recipe:`` run ``llava_shapes`` starts its encoder from, trained
once), one language model with its tokenizer (``llava_shapes``' text stage alone, trained once: ``llava_text``), and
``llava_shapes``' other stages (align, instruct) with their budgets as the recipe defines them when the bench runs,
but ``INSTRUCT_STEPS`` (600) instruct steps, where the recipe trains 1800, so that the 14 rows fit two hours, and
its instruction mix without the kind weights (every kind drawn alike, as the table was measured before the recipe
weighted referring expressions);
the Q-Former + stage 1 row runs ``blip2_shapes``' Q-Former stage before them. Every row reads the encoder where
``shapes_llava`` does (its ``feature_layer``), BLIP-2's Q-Former included. The rows take the bridge settings of the
presets that have them (``shapes_llava``'s MLP, ``shapes_blip2``'s Q-Former, ``shapes_honeybee_c`` / ``_d``'s
abstractors) with their M; the others are sized from the tower and the LM.

Runs go to ``DIR/runs/<name>`` through ``ClaimsBench`` (a finished run is reused; one trained with another recipe
than the bench's now stops the bench, named): the tower (``siglip_patch_b64``; ``vlm_siglip_patch_b4`` at the quick
scale; a tower recipe the claims bench also trains, at its scale, would be its run of that name), ``llava_text``, and
one run per row
(``linear_m64``, ..., ``qformer_m16_stage1``). ``DIR/bridges.json`` holds a row per run (bridge, M, the bridge's
parameters, the last stage's median seconds per step, VQA accuracy overall / on spatial / on counting questions,
grounding acc@0.5, the row's own training seconds); ``DIR/bridges.md`` the table (``bridges_table``).

Two rows of ``vlkit bench claims`` are defined here, on these runs (so both benches train each run once):
``honeybee_locality`` (Cha et al., 2023: the C-Abstractor beats the resampler on spatial questions at M = 16) and
``blip2_stage1`` (Li et al., 2023: stage 1 makes the Q-Former's stage into a frozen LM better; read after the rows'
frozen-LM stage, align, as BLIP-2 reads zero-shot VQA after its stage 2 on captions). Both read the runs' models
again on the scale's ``claim_scenes`` test scenes per split (``Scale.claim_scenes``: the runs' own evaluations ask
100, about 40 spatial questions, too few for a 1-point rule).

A row's model is a preset registered here (``bench_bridges_<row>``): a recipe names its model by preset, and a
recipe override cannot put a bridge config of another kind into one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlkit.bench.claims import TOLERANCE, ClaimResult, ClaimsBench, Scale, machines_line
from vlkit.bridges import (
    AttentionPoolConfig,
    BridgeConfig,
    LinearBridgeConfig,
    PatchMergerConfig,
    PixelShuffleConfig,
    QFormerConfig,
    ResamplerConfig,
    build_bridge,
)
from vlkit.config import config_from_dict
from vlkit.data.specs import ShapesText
from vlkit.files import load_safetensors, read_json
from vlkit.models.vlm import VLMConfig
from vlkit.recipes import get_recipe
from vlkit.recipes.base import InitFrom, Recipe, Stage, recipe_from_dict
from vlkit.recipes.blip2 import FROZEN_HEADS
from vlkit.recipes.parts import TRAINING_ONLY
from vlkit.recipes.run import stage_dir
from vlkit.registry import get_config, register_preset
from vlkit.tasks.base import RunContext
from vlkit.tasks.qformer import QFormerPretraining
from vlkit.train import ParamGroupRule

__all__ = [
    "INSTRUCT_STEPS",
    "ROWS",
    "BridgeRow",
    "BridgesBench",
    "blip2_result",
    "blip2_stage1",
    "bridge_parameters",
    "bridges_markdown",
    "bridges_table",
    "frozen_lm_stage",
    "honeybee_locality",
    "honeybee_result",
    "load_bridges",
    "median_step_seconds",
    "run_bridges",
]

LLAVA = "llava_shapes"
BLIP2 = "blip2_shapes"
LM_RUN = "llava_text"
PRESET_PREFIX = "bench_bridges_"
# Instruct steps of every row (llava_shapes trains 1800): at 600 the 14 rows fit the bench's two hours on a 2-core CPU.
INSTRUCT_STEPS = 600


# ---------------------------------------------------------------------------------------------- the rows


def _llava_with(bridge: BridgeConfig) -> VLMConfig:
    return get_config("shapes_llava").replace(bridge=bridge)


def _qformer(tokens: int, stage1: bool = False) -> VLMConfig:
    """``shapes_blip2``'s Q-Former with ``tokens`` queries; text input and the stage-1 heads only where stage 1 runs
    (BLIP-2's stage-2 Q-Former reads no text)."""
    blip2 = get_config("shapes_blip2")
    bridge = blip2.bridge.replace(num_queries=tokens, text_input=stage1)
    return get_config("shapes_llava").replace(bridge=bridge, embed_dim=blip2.embed_dim if stage1 else None)


def _abstractor(preset: str, tokens: int) -> VLMConfig:
    return _llava_with(get_config(preset).bridge.replace(num_queries=tokens))


def _resampler(tokens: int) -> VLMConfig:
    # Qwen-VL's: 2D sin-cos positions on queries and keys, as wide as the LM.
    return _llava_with(ResamplerConfig(num_queries=tokens))


def _attention_pool() -> VLMConfig:
    # Molmo's pooling attention has its ViT's heads (16 of 64 in ViT-L): here the tower's.
    vision = get_config("shapes_llava").vision
    return _llava_with(AttentionPoolConfig(window=2, num_heads=vision.num_heads))


@dataclass(frozen=True)
class BridgeRow:
    """One bridge at one M (``tokens``): ``name`` is its run's folder in ``DIR/runs``, ``label`` its name in the
    table, ``config`` builds its VLM config; ``stage1`` runs BLIP-2's Q-Former stage first."""

    name: str
    label: str
    tokens: int
    config: Callable[[], VLMConfig]
    stage1: bool = False

    @property
    def preset(self) -> str:
        return PRESET_PREFIX + self.name


ROWS: tuple[BridgeRow, ...] = (
    BridgeRow("linear_m64", "linear", 64, partial(_llava_with, LinearBridgeConfig())),
    BridgeRow("mlp_m64", "MLP", 64, partial(get_config, "shapes_llava")),
    BridgeRow("pixel_shuffle_m16", "pixel shuffle (2x2)", 16, partial(_llava_with, PixelShuffleConfig(factor=2))),
    BridgeRow("attention_pool_m16", "attention pooling (2x2)", 16, _attention_pool),
    BridgeRow("patch_merger_m16", "patch merger (2x2)", 16, partial(_llava_with, PatchMergerConfig(factor=2))),
    BridgeRow("qformer_m16", "Q-Former", 16, partial(_qformer, 16)),
    BridgeRow("qformer_m64", "Q-Former", 64, partial(_qformer, 64)),
    BridgeRow("qformer_m16_stage1", "Q-Former + stage 1", 16, partial(_qformer, 16, stage1=True), stage1=True),
    BridgeRow("resampler_m16", "resampler", 16, partial(_resampler, 16)),
    BridgeRow("resampler_m64", "resampler", 64, partial(_resampler, 64)),
    BridgeRow("c_abstractor_m16", "C-Abstractor", 16, partial(_abstractor, "shapes_honeybee_c", 16)),
    BridgeRow("c_abstractor_m64", "C-Abstractor", 64, partial(_abstractor, "shapes_honeybee_c", 64)),
    BridgeRow("d_abstractor_m16", "D-Abstractor", 16, partial(_abstractor, "shapes_honeybee_d", 16)),
    BridgeRow("d_abstractor_m64", "D-Abstractor", 64, partial(_abstractor, "shapes_honeybee_d", 64)),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def _register_presets() -> None:
    for row in ROWS:

        def build(row: BridgeRow = row) -> VLMConfig:
            return row.config()

        build.__name__ = row.preset
        register_preset(build)


_register_presets()


# ---------------------------------------------------------------------------------------------- the bench


class BridgesBench(ClaimsBench):
    """A ``ClaimsBench`` at its scale's vision-language overrides, with the runs every row shares and the rows."""

    def __init__(self, out_dir: str | Path, scale: Scale, progress: bool = True) -> None:
        own = scale.vlm_overrides is None
        vlm = scale if own else dataclasses.replace(scale, overrides=scale.vlm_overrides, vlm_overrides=None)
        super().__init__(out_dir, vlm, progress)
        self.shares_scale = own

    @classmethod
    def of(cls, bench: ClaimsBench) -> BridgesBench:
        if isinstance(bench, BridgesBench):
            return bench
        bridges = cls(bench.out_dir, bench.scale, bench.progress)
        bridges.machines = bench.machines  # the claims' table names the machines of the runs they read here too
        return bridges

    def tower_run(self) -> tuple[str, str, dict[str, Any], str | None]:
        """The run ``llava_shapes`` starts its encoder from: its name here, the ``recipe:`` source, the overrides the
        source takes (the model overrides it shares, its own) and the part to read."""
        llava = self.recipe(LLAVA)
        spec = _tower_source(llava)
        source = spec.source.removeprefix("recipe:")
        shared = {f"model.{key}": value for key, value in llava.model_overrides.items()
                  if key.partition(".")[0] in spec.share and key.rpartition(".")[2] not in TRAINING_ONLY}  # fmt: skip
        overrides = {**shared, **spec.overrides}
        batch = self.recipe(source, overrides).stages[-1].train.batch_size
        # The source recipe as it is, at the claims bench's scale, is the claims bench's run of this name.
        prefix = "" if self.shares_scale and not overrides else "vlm_"
        return f"{prefix}{source.removesuffix('_shapes')}_b{batch}", source, overrides, spec.part

    def tower(self) -> InitFrom:
        """Train (or reuse) the tower run and return where every row's encoder starts."""
        name, source, overrides, part = self.tower_run()
        self.run(name, source, overrides)
        return InitFrom(str(self.run_dir(name) / "model"), part=part)

    def language_model(self) -> tuple[InitFrom, Path]:
        """Train (or reuse) ``llava_shapes``' text stage alone; return where every row's LM starts and the tokenizer
        that stage fitted (a row must tokenize with it)."""
        llava = get_recipe(LLAVA)
        description = f"{LLAVA}' text stage alone: the LM the bridges bench shares."
        # The rows read the presets' feature layer, not llava_shapes' override (model_overrides={} there too).
        recipe = dataclasses.replace(llava, name=f"{LLAVA}_text", description=description, model_overrides={},
                                     stages=(_text_stage(llava),))  # fmt: skip
        self.run(LM_RUN, recipe)
        return InitFrom(str(self.run_dir(LM_RUN) / "model"), part="lm"), self.run_dir(LM_RUN) / "tokenizer.json"

    def row_recipe(self, row: BridgeRow, tower: InitFrom, lm: InitFrom) -> Recipe:
        """``llava_shapes`` without its text stage, on ``row``'s preset, its first stage starting the encoder and LM
        from the shared runs (at the recipes' own scale: ``run`` applies the bench's)."""
        llava = get_recipe(LLAVA)
        text = _text_stage(llava)
        stages = [stage for stage in llava.stages if stage is not text]
        if row.stage1:
            # The stage-1 heads train in stage 1 only, as in blip2_shapes.
            later = [dataclasses.replace(stage, rules=(*stage.rules, FROZEN_HEADS)) for stage in stages]
            stages = [_stage1(get_recipe(BLIP2)), *later]
        first = _with_init(stages[0], {"encoder": tower, "lm": lm})
        stages = [first, *(_with_init(stage, {}) for stage in stages[1:])]
        last = stages[-1]
        stages[-1] = dataclasses.replace(last, train=dataclasses.replace(last.train, steps=INSTRUCT_STEPS))
        names = " + ".join(stage.name for stage in stages)
        return dataclasses.replace(
            llava, name=f"bridges_{row.name}", model=row.preset, model_overrides={}, stages=tuple(stages),
            # Every kind drawn alike, the mix the table was measured on (llava_shapes has since weighted referring
            # expressions, GROUNDING_WEIGHTED, which lifts grounding for a bridge that learns it late).
            data=dataclasses.replace(llava.data, kind_weights=()),
            description=f"{LLAVA}' stages ({names}) with the {row.label} bridge at M = {row.tokens}, on the image "
            "tower and LM the bridges bench shares.",
        )  # fmt: skip

    def run_row(self, row: BridgeRow) -> dict[str, Any]:
        """Train (or reuse) ``row``'s run, and the shared runs before it; return its metrics."""
        tower = self.tower()
        lm, tokenizer = self.language_model()
        _share_tokenizer(tokenizer, self.run_dir(row.name))
        return self.run(row.name, self.row_recipe(row, tower, lm))

    def row_result(self, row: BridgeRow) -> dict[str, Any]:
        """``row``'s line of ``bridges.json``."""
        metrics = self.run_row(row)
        run_dir = self.run_dir(row.name)
        recipe = recipe_from_dict(read_json(run_dir / "recipe.json"))
        last = recipe.stages[-1]
        config = config_from_dict(VLMConfig, {k: v for k, v in read_json(run_dir / "model" / "config.json").items()
                                              if k != "vlkit_format"})  # fmt: skip
        return {
            "run": row.name,
            "bridge": row.label,
            "kind": config.bridge.kind,
            "tokens": row.tokens,
            "stage1": row.stage1,
            "bridge_parameters": bridge_parameters(config),
            "step_stage": last.name,
            "step_seconds": median_step_seconds(stage_dir(run_dir, recipe, last) / "log.jsonl", last.train.batch_size),
            "vqa_accuracy": metrics.get("vqa_accuracy"),
            "spatial_accuracy": metrics.get("vqa_accuracy_spatial"),
            "count_accuracy": metrics.get("vqa_accuracy_count"),
            "grounding_acc50": metrics.get("grounding_acc50"),
            "vqa_accuracy_heldout": metrics.get("vqa_accuracy_heldout"),
            "train_seconds": metrics["train_seconds"],
        }

    def stage_evaluation(
        self, name: str, stage_name: str | None = None, scenes: int | None = None, kinds: tuple[str, ...] | None = None
    ) -> dict[str, float]:
        """The recipe task's evaluation of run ``name``'s model as its stage ``stage_name`` (default: the last) left
        it (fp32), computed once and kept in the run's folder; on ``scenes`` scenes per split and questions of
        ``kinds`` where given (the run's own data's otherwise)."""
        run_dir = self.run_dir(name)
        recipe = recipe_from_dict(read_json(run_dir / "recipe.json"))
        stage = recipe.stages[-1] if stage_name is None else recipe.stage(stage_name)
        suffix = "".join(f"-{part}" for part in (*(kinds or ()), *((scenes,) if scenes else ())))
        cached = run_dir / f"eval-{stage.name}{suffix}.json"
        if cached.exists():
            return json.loads(cached.read_text())
        from vlkit.hub import from_pretrained

        changes = {"data.eval_size": scenes, "data.kinds": kinds}
        recipe = recipe.with_overrides({key: value for key, value in changes.items() if value is not None})
        stage = recipe.stage(stage.name)
        weights = run_dir / "model" if stage is recipe.stages[-1] else stage_dir(run_dir, recipe, stage) / "model"
        model = from_pretrained(weights).eval()
        evaluation = recipe.task.evaluation(RunContext(recipe, run_dir, progress=False), model)
        with torch.no_grad():
            metrics = evaluation(model).metrics
        cached.write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def _text_stage(recipe: Recipe) -> Stage:
    for stage in recipe.stages:
        if isinstance(stage.data, ShapesText):
            return stage
    raise ValueError(f"recipe {recipe.name} has no text stage (ShapesText data) for the bridges bench to share")


def _stage1(recipe: Recipe) -> Stage:
    for stage in recipe.stages:
        if isinstance(stage.task, QFormerPretraining):
            return stage
    raise ValueError(f"recipe {recipe.name} has no Q-Former stage (task qformer) for the stage-1 row")


def _tower_source(recipe: Recipe) -> InitFrom:
    for stage in recipe.stages:
        spec = stage.init.get("encoder")
        if spec is not None and spec.source.startswith("recipe:"):
            return spec
    raise ValueError(f"recipe {recipe.name}: no stage starts the encoder from a recipe run (recipe:NAME), which "
                     "the bridges bench would train once for every row")  # fmt: skip


def _with_init(stage: Stage, parts: Mapping[str, InitFrom]) -> Stage:
    """``stage`` starting ``parts`` from the shared runs; the encoder and LM it started elsewhere now continue."""
    init = {part: spec for part, spec in stage.init.items() if part not in ("encoder", "lm")} | dict(parts)
    for part, spec in init.items():
        if spec.source.startswith("recipe:"):
            raise ValueError(f"stage {stage.name} starts {part} from {spec.source}: the bridges bench shares only "
                             "the encoder's and the LM's sources")  # fmt: skip
    return dataclasses.replace(stage, init=init)


def _share_tokenizer(source: Path, run_dir: Path) -> None:
    """Put the shared LM's tokenizer where the vlm task looks for a run's (so it fits none of its own)."""
    target = run_dir / "tokenizer.json"
    if target.exists():
        if target.read_bytes() != source.read_bytes():
            raise ValueError(f"{run_dir} was trained with another tokenizer than the shared LM's ({source}); delete "
                             "it to retrain, or bench into a new --out")  # fmt: skip
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


def bridge_parameters(config: VLMConfig) -> int:
    """The parameters of ``config``'s bridge that the VLM's forward uses: a stage-1 Q-Former's text side (word
    embeddings, text feed-forward blocks) serves stage 1 only, so it counts as the Q-Former without it."""
    bridge = config.bridge
    if isinstance(bridge, QFormerConfig):
        bridge = bridge.replace(text_input=False)
    with torch.device("meta"):
        module = build_bridge(bridge, config.vision_feature_dim, config.lm.dim)
    return sum(parameter.numel() for parameter in module.parameters())


def median_step_seconds(log_path: Path, batch_size: int) -> float:
    """The median seconds per training step of a stage's ``log.jsonl`` (each step logs batch / seconds)."""
    seconds = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "samples_per_second" in record:
            seconds.append(batch_size / record["samples_per_second"])
    if not seconds:
        raise ValueError(f"{log_path}: no training step logged")
    return statistics.median(seconds)


# ---------------------------------------------------------------------------------------------- the claims


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def honeybee_result(
    c_abstractor: Mapping[str, Any], resampler: Mapping[str, Any], tokens: int, scenes: int | None = None
) -> ClaimResult:
    """The Honeybee row from the two runs' metrics: spatial accuracy, C-Abstractor against resampler (read on
    ``scenes`` test scenes per split where given; VQA over every kind from the runs' own evaluations)."""
    keys = {"spatial": "vqa_accuracy_spatial", "spatial_heldout": "vqa_accuracy_spatial_heldout", "vqa": "vqa_accuracy"}
    numbers = {f"{bridge}_{short}": float(metrics[key])
               for bridge, metrics in (("c_abstractor", c_abstractor), ("resampler", resampler))
               for short, key in keys.items() if metrics.get(key) is not None}  # fmt: skip
    c_spatial, r_spatial = numbers.get("c_abstractor_spatial"), numbers.get("resampler_spatial")
    read = f"{scenes} test scenes per split" if scenes else "the runs' own test scenes"
    return ClaimResult(
        key="honeybee_locality",
        claim="Honeybee: a locality-preserving bridge (C-Abstractor) beats a resampler on spatial questions at equal M",
        setting=f"llava_shapes' stages with the C-Abstractor vs the resampler (Qwen-VL's), both M = {tokens}, the "
        "same tower, LM and budget (the bridges bench's runs); one spatial question (left / right / above / below) "
        f"per test scene that has one, on {read}",
        numbers=numbers,
        summary=f"spatial accuracy (%): C-Abstractor {_pct(c_spatial)} / resampler {_pct(r_spatial)}; held-out "
        f"{_pct(numbers.get('c_abstractor_spatial_heldout'))} / {_pct(numbers.get('resampler_spatial_heldout'))}; "
        f"all VQA {_pct(numbers.get('c_abstractor_vqa'))} / {_pct(numbers.get('resampler_vqa'))}",
        rule=f"C-Abstractor spatial accuracy >= the resampler's + {_pct(TOLERANCE)} pt",
        reproduced=c_spatial is not None and r_spatial is not None and c_spatial >= r_spatial + TOLERANCE,
    )


def blip2_result(
    with_stage1: Mapping[str, Any],
    without: Mapping[str, Any],
    final_with: Mapping[str, Any],
    final_without: Mapping[str, Any],
    stage: str,
    steps: int,
    scenes: int | None = None,
) -> ClaimResult:
    """The BLIP-2 row: VQA after the frozen-LM stage ``stage`` (``steps`` steps in both runs) with and without
    stage 1 (read on ``scenes`` test scenes per split where given); the final (LM-trained) numbers beside them."""
    sources = {"vqa_stage1": with_stage1, "vqa_no_stage1": without, "final_vqa_stage1": final_with,
               "final_vqa_no_stage1": final_without}  # fmt: skip
    numbers = {key: float(m["vqa_accuracy"]) for key, m in sources.items() if m.get("vqa_accuracy") is not None}
    numbers["stage2_steps"] = float(steps)
    after, alone = numbers.get("vqa_stage1"), numbers.get("vqa_no_stage1")
    return ClaimResult(
        key="blip2_stage1",
        claim="BLIP-2: a Q-Former trained in stage 1 (representation learning) makes stage 2 into a frozen LM better "
        "than stage 2 alone at equal stage-2 steps",
        setting=f"shapes_blip2's Q-Former (M = 16) with blip2_shapes' Q-Former stage before llava_shapes' stages vs "
        f"without it (the bridges bench's runs); VQA read after {stage} ({steps} steps, the LM frozen: BLIP-2's "
        "stage 2 on captions, then zero-shot VQA as the paper reads it)",
        numbers=numbers,
        summary=f"VQA (%) after {stage}{f' on {scenes} test scenes' if scenes else ''}: stage 1 + {stage} "
        f"{_pct(after)} / {stage} alone {_pct(alone)}; after the "
        f"last stage (LM trained): {_pct(numbers.get('final_vqa_stage1'))} / "
        f"{_pct(numbers.get('final_vqa_no_stage1'))}",
        rule=f"VQA after {stage} with stage 1 >= without + {_pct(TOLERANCE)} pt",
        reproduced=after is not None and alone is not None and after >= alone + TOLERANCE,
    )


def frozen_lm_stage(recipe: Recipe, parameter_names: Sequence[str]) -> Stage:
    """The last stage trained with the recipe's own task whose rules freeze every ``lm.`` parameter (the first rule
    matching a name decides it, as in ``build_param_groups``): BLIP-2's stage 2, a bridge into a frozen LM."""

    def frozen(stage: Stage, name: str) -> bool:
        for rule in (*stage.rules, *stage.train.param_groups):
            if isinstance(rule, ParamGroupRule) and re.fullmatch(rule.pattern, name):
                return rule.freeze
        return False

    lm = [name for name in parameter_names if name.startswith("lm.")]
    found = None
    for stage in recipe.stages:
        own_task = stage.task is None or type(stage.task) is type(recipe.task)
        if own_task and lm and all(frozen(stage, name) for name in lm):
            found = stage
    if found is None:
        raise ValueError(f"recipe {recipe.name} has no stage that trains the bridge into a frozen LM (BLIP-2's stage "
                         "2), which the BLIP-2 claim reads")  # fmt: skip
    return found


def honeybee_locality(bench: ClaimsBench) -> ClaimResult:
    bridges = BridgesBench.of(bench)
    c_abstractor, resampler = ROWS_BY_NAME["c_abstractor_m16"], ROWS_BY_NAME["resampler_m16"]
    scenes, keys = bench.scale.claim_scenes, ("vqa_accuracy_spatial", "vqa_accuracy_spatial_heldout")
    rows = []
    for row in (c_abstractor, resampler):
        metrics = bridges.run_row(row)
        spatial = bridges.stage_evaluation(row.name, scenes=scenes, kinds=("spatial",))  # after the last stage
        rows.append({"vqa_accuracy": metrics.get("vqa_accuracy"), **{key: spatial.get(key) for key in keys}})
    return honeybee_result(*rows, c_abstractor.tokens, scenes)


def blip2_stage1(bench: ClaimsBench) -> ClaimResult:
    bridges = BridgesBench.of(bench)
    with_row, without_row = ROWS_BY_NAME["qformer_m16_stage1"], ROWS_BY_NAME["qformer_m16"]
    final_with, final_without = bridges.run_row(with_row), bridges.run_row(without_row)
    run_dir = bridges.run_dir(without_row.name)
    recipe = recipe_from_dict(read_json(run_dir / "recipe.json"))
    stage = frozen_lm_stage(recipe, list(load_safetensors(run_dir / "model" / "model.safetensors")))
    other = recipe_from_dict(read_json(bridges.run_dir(with_row.name) / "recipe.json")).stage(stage.name)
    if other.train != stage.train:
        raise ValueError(f"{with_row.name} and {without_row.name} trained {stage.name} differently; the BLIP-2 claim "
                         "compares them at equal stage-2 steps")  # fmt: skip
    scenes = bench.scale.claim_scenes
    return blip2_result(bridges.stage_evaluation(with_row.name, stage.name, scenes),
                        bridges.stage_evaluation(without_row.name, stage.name, scenes), final_with, final_without,
                        stage.name, stage.train.steps, scenes)  # fmt: skip


# ---------------------------------------------------------------------------------------------- output


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.2f} M" if parameters >= 1e6 else f"{parameters / 1e3:.1f} k"


def bridges_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table: bridge, M, parameters, the last stage's s/step, VQA, spatial, count, grounding, train s."""
    stage = rows[0]["step_stage"] if rows else "last stage"
    lines = [f"| bridge | M | parameters | {stage} s/step | VQA | spatial | count | grounding acc@0.5 | train s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        scores = (_score(row[key]) for key in ("vqa_accuracy", "spatial_accuracy", "count_accuracy", "grounding_acc50"))
        cells = (row["bridge"], str(row["tokens"]), _count(row["bridge_parameters"]), f"{row['step_seconds']:.3f}",
                 *scores, f"{row['train_seconds']:.0f}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bridges_markdown(rows: Sequence[Mapping[str, Any]], scale: Scale, machines: Mapping[str, str | None]) -> str:
    size = scale.label or f"the recipes' own budget x {scale.steps:g} steps"
    return (
        "# vlkit: every bridge under one budget on ShapesWorld\n\n"
        f"Scale: {size}. Every row is {LLAVA} with another bridge: the same image tower and language model (trained "
        f"once, not counted in train s: the tower's run and `{LM_RUN}`, {LLAVA}' text stage), {LLAVA}' other "
        f"stages and budget but {INSTRUCT_STEPS} instruct steps; the Q-Former + stage 1 row trains {BLIP2}' "
        "Q-Former stage first (counted). M: bridge tokens per image (of 64 patch tokens); parameters: the bridge's; "
        "s/step: the median over the last stage's steps; VQA: exact match, one question of each kind per test scene "
        "of seen combinations, spatial and count "
        "its questions of those kinds.\n\n" + bridges_table(rows) + "\n" + machines_line(machines)
    )


def load_bridges(path: str | Path) -> list[dict[str, Any]]:
    """The rows a bench wrote to ``bridges.json`` (``bridges_table(load_bridges(...))`` renders them)."""
    return list(json.loads(Path(path).read_text())["rows"])


def run_bridges(
    out_dir: str | Path, scale: Scale | None = None, only: Sequence[str] | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Run every row (or ``only`` these names) at ``scale`` (default: the recipes' own) and write
    ``out_dir/bridges.json`` and ``out_dir/bridges.md``."""
    scale = scale or Scale()
    unknown = sorted(set(only or ()) - set(ROWS_BY_NAME))
    if unknown:
        raise KeyError(f"unknown bridges row(s) {unknown}; known: {', '.join(ROWS_BY_NAME)}")
    out_dir = Path(out_dir)
    bench = BridgesBench(out_dir, scale, progress)
    rows = []
    for row in ROWS:
        if only and row.name not in only:
            continue
        rows.append(bench.row_result(row))
        # Written after every row: a long bench shows its finished rows while the next one trains.
        data = {"scale": dataclasses.asdict(scale), "rows": rows, "machines": bench.machines}
        (out_dir / "bridges.json").write_text(json.dumps(data, indent=2) + "\n")
        (out_dir / "bridges.md").write_text(bridges_markdown(rows, scale, bench.machines))
    return rows

"""Vision-language recipes on ShapesWorld.

``llava_shapes`` is LLaVA's recipe (Liu et al., 2023, "Visual Instruction Tuning") at ShapesWorld scale, in three
stages on the model ``shapes_llava`` (``shapes_siglip``'s image tower read at its layer 2 of 4, an MLP bridge, a
small Llama-style LM):

- ``text``: the language model alone on ShapesWorld text (captions, questions with answers, ``<ref>``/``<box>``
  strings), so that the LM the next stage freezes already speaks the answer formats;
- ``align``: feature alignment, the bridge alone on captions (image tower and LM frozen); the image tower starts
  from a ShapesWorld contrastive run (``recipe:siglip_patch_shapes``, trained first into ``OUT/pretrain`` unless
  given);
- ``instruct``: bridge and LM on the instruction mix (captions, questions of every kind, referring expressions answered
  with a box), the image tower still frozen. 1800 steps: reading the tower's last layer, three 1800-step runs reached
  VQA 0.90-0.93 in two and grounding acc@0.5 0.61 in one (0.36-0.48 in the others), where 1200 steps left them at 0.89 /
  0.32; reading its layer 2, as the recipe now does, two runs stood at 0.81-0.90 / 0.38-0.45 at 1200 steps and ended at
  0.914-0.915 / 0.59-0.60, and three more at 0.895-0.921 / 0.38-0.43 (docs/experiments.md, "The README's vision-language
  sections, to the fifty-first session"). Referring expressions drawn four times as often as another kind
  (``GROUNDING_WEIGHTED``, chosen on the validation split) took those three seeds to 0.919-0.925 / 0.61-0.73. The demo
  and the bridges bench train fewer to fit their time budgets.

On a 2-core CPU without AMX (the AVX-512 EPYC) the recipe takes 15.6-17.3 minutes given the tower; with the language
model's attention as bf16 products in the instruct stage (``--set stages.instruct.train.attention_products=true``)
14.3-15.4, with validation VQA 0.902 against 0.900 and grounding 0.780 against 0.750 over seeds 0 and 1, but 0.010
less held-out VQA, so it is not the default (docs/experiments.md, the fifty-second session).

The model is ``shapes_llava`` with one override, ``feature_layer=2``, which the Honeybee recipes (this recipe with
another bridge) inherit; the bridges bench clears it, so that its rows read the presets' last layer as they were
measured. ``honeybee_d_shapes`` draws with the same weights; ``honeybee_c_shapes`` and the bridges bench's rows draw
every kind alike.
"""

from __future__ import annotations

from vlkit.data.specs import ShapesInstructions, ShapesText
from vlkit.recipes.base import InitFrom, Recipe, Stage, register_recipe
from vlkit.recipes.contrastive import SHAPES_DATA
from vlkit.tasks.vlm import VisionLanguage
from vlkit.train import ParamGroupRule, TrainConfig

FROZEN_ENCODER = ParamGroupRule(r"encoder\..*", freeze=True)
FROZEN_LM = ParamGroupRule(r"lm\..*", freeze=True)
FROZEN_BRIDGE = ParamGroupRule(r"bridge\..*", freeze=True)
# The image tower of the demo's SigLIP, trained with the per-patch objective (README, "The image tower, trained patch
# by patch"): on siglip_shapes' tower the VLM binds attributes to the wrong object.
SHAPES_TOWER = {"encoder": InitFrom("recipe:siglip_patch_shapes", part="image_encoder", share=("vision",))}

TEXT_BUDGET = TrainConfig(steps=300, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_steps=30)
ALIGN_BUDGET = TrainConfig(steps=200, batch_size=32, lr=2e-3, weight_decay=0.0, warmup_steps=20)
INSTRUCT_BUDGET = TrainConfig(steps=1800, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=40)
# The instruction mix draws a conversation's kinds with referring expressions weighing 4 against 1 (in ~89 % of
# conversations instead of half). Grounding is learned in a jump whose step varies from seed to seed; drawn more often
# it comes sooner. llava_shapes on the AMX Xeon, validation split, seeds 0-2 (docs/experiments.md, the twenty-sixth
# session): grounding 0.71 / 0.67 / 0.69 against 0.41 / 0.38 / 0.44, VQA 0.888 / 0.867 / 0.882 against 0.871 / 0.901
# / 0.903; on the test split 0.925 / 0.73, 0.923 / 0.67, 0.919 / 0.61 against 0.895 / 0.43, 0.917 / 0.39, 0.921 / 0.38.
# honeybee_d_shapes took it first (the twenty-third session: 0.68 / 0.70 / 0.63 against 0.68 / 0.53 / 0.51).
GROUNDING_WEIGHTED = (("grounding", 4.0),)


CAPTIONS = ShapesInstructions(SHAPES_DATA, kinds=("caption",), turns=1)


@register_recipe
def llava_shapes() -> Recipe:
    return Recipe(
        name="llava_shapes",
        description="LLaVA on ShapesWorld: LM on ShapesWorld text, then the bridge on captions (feature alignment), "
        "then bridge + LM on the instruction mix (VQA of every kind, captions, grounding with boxes).",
        model="shapes_llava",
        # The tower's layer 2 of 4: its tokens are still about their own object, where layer 4's carry the whole
        # scene and the LM, matching the referred object against them, finds it everywhere (README, "Where the
        # column is lost").
        model_overrides={"feature_layer": 2},
        task=VisionLanguage(),
        data=ShapesInstructions(SHAPES_DATA, kind_weights=GROUNDING_WEIGHTED),
        stages=(
            Stage(
                TEXT_BUDGET,
                name="text",
                rules=(FROZEN_ENCODER, FROZEN_BRIDGE),
                data=ShapesText(SHAPES_DATA),
                evaluate=False,
            ),
            Stage(
                ALIGN_BUDGET,
                name="align",
                rules=(FROZEN_ENCODER, FROZEN_LM),
                data=CAPTIONS,
                init=SHAPES_TOWER,
                evaluate=False,
            ),
            Stage(INSTRUCT_BUDGET, name="instruct", rules=(FROZEN_ENCODER,)),
        ),
    )

"""BLIP-2 and Honeybee on ShapesWorld.

``blip2_shapes`` is BLIP-2's recipe (Li et al., 2023) at ShapesWorld scale on ``shapes_blip2`` (``shapes_siglip``'s
image tower, a 16-query Q-Former with text input, ``shapes_llava``'s LM), in five stages:

- ``text``: the language model alone on ShapesWorld text (BLIP-2 starts from a trained LM): ``llava_shapes``' text
  samples, which teach the answer formats, and every question asked with the scene's layout (each object with its
  box) standing where the image will (``ShapesText(layout=True)``), so that the LM that stage 2 freezes answers from
  a description in its context, which the Q-Former then has to write. 3000 steps (about 11 minutes on the AMX Xeon;
  the LM is trained once, as the tower is);
- ``read``: the LM alone on the layout-described questions without the plain text, 2000 steps, the rate decayed over
  the last 400 (about 12-13 minutes): counting, positions and box copying from the layout, which the mixed stage leaves
  half-learned; every token is trained on, the layout and the questions at a tenth of the answers' weight, as an LLM
  is pre-trained on all its text (``ShapesText.context_weight``);
- ``qformer``: stage 1, vision-language representation learning: the Q-Former (and its stage-1 heads) against the
  frozen image tower on captions, with the contrastive, matching and grounded-generation losses
  (``tasks.qformer``); the tower starts from ``recipe:siglip_patch_shapes`` as in ``llava_shapes``;
- ``generate``: stage 2, vision-to-language generative learning as the paper has it: the Q-Former and its projection
  into the frozen LM on captions alone (1600 steps, about 2.5 minutes);
- ``instruct``: the same two parts on the instruction mix (VQA of every kind, captions, grounding; 800 steps at
  3e-4), the image tower and LM still frozen.

The two LM stages report what the LM answers from a layout in its context (``DescribedTextEvaluation``:
``text_accuracy_<kind>``, box copying as ``text_accuracy_grounding``); the Q-Former stage reports retrieval, the two
after it the VLM's evaluation.

Measured on the AMX Xeon (docs/experiments.md, "The README's vision-language sections"; one run each on one tower): with
the 300-step plain text stage and stage 2 on the instruction mix alone the frozen-LM model answered at VQA 0.363; the
layout text stage took it to 0.543; stage 2 on captions first to 0.767 (0.731 zero-shot after the captions alone),
colour from 0.15 to 0.81; the read stage to 0.776 (0.805 zero-shot, counting 0.70 -> 0.90 after the captions). On the
2400-step tower the instruction stage at stage 2's 1e-3 lowered VQA from 0.742 zero-shot to 0.664; at 3e-4 (chosen on
the validation split) it reads 0.808. Grounding stays near 0 (0.04-0.11): captions carry no boxes, and the frozen LM
copies none from the Q-Former. Neither the tower read before its last block (BLIP-2's choice) or at layer 2, nor 32
queries, nor a 4000-step read stage answered better on validation (0.779-0.839 against 0.809-0.821 over two instruct
seeds; one or two runs each). Three seeds of the Q-Former stages on one tower and LM read 0.802-0.822 on validation
(mean 0.815); a position table on the image tokens (0.804 over three seeds), 64 queries (0.809; spatial 0.71 against
0.61), cross-attention in every layer (0.751), a Q-Former as wide as the LM (0.548), and in the instruction stage
grounding drawn four times as often, the tower trained at 0.1x or 1600 steps (0.793-0.796) did not raise it (the
thirty-first session, docs/experiments.md). Stage 2 on grounded descriptions as well (the ``layout`` kind, every object
with its box) left grounding at 0.084-0.092 against 0.088 and cost VQA (0.809-0.836 against 0.873, validation): a probe
reads a lone object's centre from the Q-Former's tokens at R^2 0.98 / 0.94, and from the frozen LM's state before it
writes the box at 0.21 / 0.03 (the forty-fifth session, docs/experiments.md).

``honeybee_c_shapes`` and ``honeybee_d_shapes`` are ``llava_shapes`` (its stages: text, align, instruct, and its reading
of the tower's layer 2) with Honeybee's locality-preserving bridges (Cha et al., 2023) in place of the MLP: the
C-Abstractor (``shapes_honeybee_c``) and the D-Abstractor (``shapes_honeybee_d``), each with M = 16 output tokens (4 x 4
from the tower's 8 x 8), and the same 1800 instruct steps: 16 bridge tokens make their step 1.3-1.7x cheaper than the
MLP's 64. Reading the tower's last layer, 1800 steps took ``honeybee_c_shapes`` to VQA 0.89-0.93 and grounding acc@0.5
0.64-0.73 (three runs); reading layer 2 it stood at 0.925 / 0.73 at step 1200 and 0.927 / 0.73 at 1800
(docs/experiments.md, "The README's vision-language sections"). ``honeybee_d_shapes`` draws referring expressions four
times as often as another kind (``GROUNDING_WEIGHTED``), which steadied its grounding over seeds, as ``llava_shapes``
now does; ``honeybee_c_shapes`` keeps the unweighted mix.
"""

from __future__ import annotations

import dataclasses

from vlkit.data.specs import ShapesInstructions, ShapesText
from vlkit.recipes.base import Recipe, Stage, register_recipe
from vlkit.recipes.contrastive import SHAPES_DATA
from vlkit.recipes.vlm import (
    CAPTIONS,
    FROZEN_BRIDGE,
    FROZEN_ENCODER,
    FROZEN_LM,
    GROUNDING_WEIGHTED,
    SHAPES_TOWER,
    TEXT_BUDGET,
    llava_shapes,
)
from vlkit.tasks.qformer import QFormerPretraining
from vlkit.tasks.vlm import VisionLanguage
from vlkit.train import ParamGroupRule, TrainConfig

# The stage-1 heads train in the qformer stage only; the stages after it never read them.
FROZEN_HEADS = ParamGroupRule(r"qformer_heads\..*", freeze=True)

# The LM's stage: llava_shapes' text budget at ten times the steps (and warmup), on plain and layout-described text.
BLIP2_TEXT_BUDGET = dataclasses.replace(TEXT_BUDGET, steps=3000, warmup_steps=300)
LAYOUT_TEXT = ShapesText(SHAPES_DATA, described=True, layout=True)
# Then reading alone: the layout-described questions without the plain text (the text probe's continuation,
# ``bench/vlm_text_probe.py --steps 2000 --layout``, which taught counting, spatial questions and box copying that the
# mixed stage had not). 4000 steps read layouts better (the LM's answers from a layout 0.808 -> 0.850 on the test
# split's scenes) but did not make the frozen-LM model answer better: validation VQA 0.839 (2000 + 2000 steps) and
# 0.779 (4000 in this stage) against 0.809-0.821 (the thirtieth session, docs/experiments.md).
# Warmup-stable-decay (no warmup: the text stage's LM), not the probe's constant rate, which leaves the LM wherever
# its last steps at 1e-3 put it: over three read-stage seeds the frozen-LM model's validation VQA 0.804 / 0.789 / 0.830
# -> 0.826 / 0.832 / 0.841 (held-out 0.68 -> 0.75); test 0.853 / 0.825 / 0.846 -> 0.836 / 0.852 / 0.844 (the
# thirty-third session, docs/experiments.md).
READ_BUDGET = TrainConfig(steps=2000, batch_size=64, lr=1e-3, weight_decay=0.05, schedule="wsd")
# Every token of the described conversations trained on, the layout and questions at a tenth of the answers' weight
# (an LLM is pre-trained on every token): over three Q-Former seeds the frozen-LM model's validation VQA 0.815 -> 0.823
# (spatial 0.61 -> 0.77, existence 0.82 -> 0.70) and test VQA 0.814 -> 0.860; every token at full weight 0.815 / 0.822
# on two seeds (existence 0.56-0.62), the layout alone at 0.1 0.759 (the thirty-second session, docs/experiments.md).
READ_TEXT = dataclasses.replace(LAYOUT_TEXT, plain=False, context_weight=0.1)
QFORMER_BUDGET = TrainConfig(steps=300, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_steps=30)
GENERATE_BUDGET = TrainConfig(steps=1600, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=50)
# The instruction stage at 3e-4, not stage 2's 1e-3: continuing the caption-trained Q-Former at 1e-3 lost what
# stage 2 had taught (validation VQA 0.770 after the captions, 0.664 after the mix at 1e-3, 0.821 at 3e-4, 0.776 at
# 1e-4; one tower and LM, the twenty-ninth session, docs/experiments.md).
BLIP2_INSTRUCT_BUDGET = dataclasses.replace(GENERATE_BUDGET, steps=800, lr=3e-4)
# The text stages train the LM alone; stage 2 and the instruction stage the Q-Former and its projection only.
FROZEN_BUT_LM = (FROZEN_ENCODER, FROZEN_BRIDGE, FROZEN_HEADS)
FROZEN_BUT_BRIDGE = (FROZEN_ENCODER, FROZEN_LM, FROZEN_HEADS)


@register_recipe
def blip2_shapes() -> Recipe:
    return Recipe(
        name="blip2_shapes",
        description="BLIP-2 on ShapesWorld: LM on ShapesWorld text (answer formats, and questions answered from the "
        "scene's layout in context), then the Q-Former against the frozen image tower "
        "(contrastive, matching and grounded-generation losses on captions), then the Q-Former into the frozen LM on "
        "captions (stage 2), then on the instruction mix (VQA of every kind, captions, grounding with boxes).",
        model="shapes_blip2",
        task=VisionLanguage(),
        data=ShapesInstructions(SHAPES_DATA),
        stages=(
            Stage(BLIP2_TEXT_BUDGET, name="text", rules=FROZEN_BUT_LM, data=LAYOUT_TEXT),
            Stage(READ_BUDGET, name="read", rules=FROZEN_BUT_LM, data=READ_TEXT),
            Stage(QFORMER_BUDGET, name="qformer", rules=(FROZEN_ENCODER, FROZEN_LM), data=CAPTIONS,
                  task=QFormerPretraining(), init=SHAPES_TOWER),
            Stage(GENERATE_BUDGET, name="generate", rules=FROZEN_BUT_BRIDGE, data=CAPTIONS),
            Stage(BLIP2_INSTRUCT_BUDGET, name="instruct", rules=FROZEN_BUT_BRIDGE),
        ),
    )  # fmt: skip


@register_recipe
def honeybee_c_shapes() -> Recipe:
    llava = llava_shapes()
    return dataclasses.replace(
        llava,
        name="honeybee_c_shapes",
        description="Honeybee with the C-Abstractor on ShapesWorld (16 bridge tokens) reading the tower's layer 2: "
        "llava_shapes' stages, LM on ShapesWorld text, then the bridge on captions, then bridge + LM on the "
        "instruction mix.",
        model="shapes_honeybee_c",
        # The unweighted mix: the C-Abstractor learns grounding without the help, and llava_shapes' weight cost it
        # VQA (validation 0.856 against 0.890, one seed; docs/experiments.md, the twenty-third session).
        data=dataclasses.replace(llava.data, kind_weights=()),
    )


@register_recipe
def honeybee_d_shapes() -> Recipe:
    llava = llava_shapes()
    return dataclasses.replace(
        llava,
        name="honeybee_d_shapes",
        description="Honeybee with the D-Abstractor on ShapesWorld (16 bridge tokens) reading the tower's layer 2: "
        "llava_shapes' stages, LM on ShapesWorld text, then the bridge on captions, then bridge + LM on the "
        "instruction mix, referring expressions drawn four times as often as another kind.",
        model="shapes_honeybee_d",
        # Its own weight, chosen on its own seeds (the twenty-third session), whatever llava_shapes' becomes.
        data=dataclasses.replace(llava.data, kind_weights=GROUNDING_WEIGHTED),
    )

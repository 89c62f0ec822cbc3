"""The dual-encoder family on ShapesWorld: FILIP, LiT, EVA-CLIP and NaViT as recipes built from shared parts.

Each recipe is ``clip_shapes``'s (or ``siglip_shapes``'s) budget and data (``SHAPES_BUDGET`` / ``SHAPES_DATA``,
referenced, never copied) plus the one idea its paper adds:

- ``filip_shapes``: token-wise late interaction and the FILIP loss (Yao et al., 2021), preset ``shapes_filip``.
- ``lit_shapes``: the image tower pretrained by ``classify_shapes`` and locked; only the text side trains
  (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"). ``--lock none`` fine-tunes it
  instead, ``--lock text`` locks the (random) text tower.
- ``evaclip_shapes``: the same pretrained image tower, unlocked, with patch dropout 0.5, LAMB and layer-wise lr
  decay (Sun et al., 2023, "EVA-CLIP: Improved Training Techniques for CLIP at Scale").
- ``navit_shapes``: native aspect ratios packed into sequences (Dehghani et al., 2023, "Patch n' Pack"), built by
  ``vlkit.recipes.navit`` and trained with ``input_policy="pack"``.
"""

from __future__ import annotations

import dataclasses

from vlkit.recipes import navit
from vlkit.recipes.base import Recipe, register_recipe
from vlkit.recipes.contrastive import SHAPES_BUDGET, SHAPES_COLOURLESS_COPIES, SHAPES_DATA

# The image tower LiT and EVA-CLIP start from: ShapesWorld colour + shape classification, trained into OUT/pretrain.
PRETRAINED_TOWER = "recipe:classify_shapes"
# EVA-CLIP's layer-wise decay for a ViT-B-sized tower is 0.75-0.85; 0.8 over shapes_clip's 4 blocks leaves the
# patch embedding at 0.8**5 = 0.33 of the base rate, so the pretrained low-level filters move least.
EVA_LAYER_DECAY = 0.8
EVA_PATCH_DROPOUT = 0.5
# LAMB scales each tensor's Adam step by ||w|| / ||update||, so a from-scratch tensor (weights of std 0.02) moves
# about 50x less per step than under AdamW at the same lr; on 40 ShapesWorld steps LAMB at 5e-3 matched 1e-2 and
# beat 1e-3 (training loss 3.06 vs 3.04 vs 3.80; AdamW at 1e-3: 2.48), while 1.5e-2 and 3e-2 learned slower.
EVA_LAMB_LR = 5e-3
# FILIP's token-wise similarities make a step 1.7x a CLIP step (72 vs 124 samples/s on one thread under the same
# load), so it trains half the steps to stay within 10 minutes on the 2-core CPU; the softmax loss gets far in that:
# clip_shapes was at 96 % zero-shot after 1200 steps (H100 sweep, bench/results/shapes_sweep_h100.json).
FILIP_STEPS = SHAPES_BUDGET.steps // 2  # and half the warmup


@register_recipe
def filip_shapes() -> Recipe:
    return Recipe(
        name="filip_shapes",
        description="FILIP (token-wise late interaction, FILIP loss) trained from scratch on ShapesWorld.",
        model="shapes_filip",
        train=dataclasses.replace(
            SHAPES_BUDGET,
            steps=FILIP_STEPS,
            warmup_steps=SHAPES_BUDGET.warmup_steps * FILIP_STEPS // SHAPES_BUDGET.steps,
        ),
        shapes=SHAPES_DATA,
        colourless_copies=SHAPES_COLOURLESS_COPIES,
    )


@register_recipe
def lit_shapes() -> Recipe:
    return Recipe(
        name="lit_shapes",
        description="LiT: a locked image tower pretrained on ShapesWorld classification; the text tower learns to "
        "match it (softmax contrastive loss).",
        model="shapes_clip",
        train=SHAPES_BUDGET,
        shapes=SHAPES_DATA,
        colourless_copies=SHAPES_COLOURLESS_COPIES,
        lock="image",
        image_init=PRETRAINED_TOWER,
    )


@register_recipe
def evaclip_shapes() -> Recipe:
    return Recipe(
        name="evaclip_shapes",
        description="EVA-CLIP: a pretrained (unlocked) image tower, patch dropout 0.5, LAMB and layer-wise lr decay "
        "on ShapesWorld.",
        model="shapes_clip",
        train=dataclasses.replace(SHAPES_BUDGET, optimizer="lamb", lr=EVA_LAMB_LR),
        shapes=SHAPES_DATA,
        colourless_copies=SHAPES_COLOURLESS_COPIES,
        model_overrides={"vision.patch_dropout": EVA_PATCH_DROPOUT},
        image_init=PRETRAINED_TOWER,
        # The text tower starts from scratch here (EVA-CLIP's starts from CLIP's), so only the image tower decays.
        image_layer_decay=EVA_LAYER_DECAY,
    )


@register_recipe
def navit_shapes() -> Recipe:
    # The token slots of a batch of square 64-patch images, cut into sequences of 128 tokens, take 1.9x the
    # images at budgets of 16-64 patches. On the packing alone (100 random batches, first-fit-decreasing): 64-token
    # sequences leave 9% padding, 128-token ones 1.6% (~10% of the drawn images overflow and are dropped, logged),
    # 256-token ones 1.1% but their attention costs 2x as much as 128's (bench/navit_throughput.py).
    return dataclasses.replace(
        navit.navit_shapes(),
        input_policy="pack",
        pack_oversample=1.9,
        pack_sequence_slots=2,
        colourless_copies=SHAPES_COLOURLESS_COPIES,
    )

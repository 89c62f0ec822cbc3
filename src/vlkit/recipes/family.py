"""The dual-encoder family on ShapesWorld: FILIP, LiT, EVA-CLIP and NaViT as recipes built from shared parts.

Each recipe is ``clip_shapes``'s (or ``siglip_shapes``'s) budget and data (``SHAPES_BUDGET`` / ``SHAPES_DATA``,
referenced, never copied) plus the one idea its paper adds:

- ``filip_shapes``: token-wise late interaction and the FILIP loss (Yao et al., 2021), preset ``shapes_filip``.
- ``classify_shapes``: ShapesWorld colour + shape classification, the image tower LiT and EVA-CLIP start from.
- ``lit_shapes``: the image tower pretrained by ``classify_shapes`` and locked; only the text side trains
  (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"). As in the paper (big_vision's LiT
  configs: no image head by default, ``out_dim=(None, 768)``), the image embedding is the locked tower's own pooled
  representation, with no trainable projection on the image side; the text tower's head maps into it. ``--lock
  none`` fine-tunes the tower instead, ``--lock text`` locks the (random) text tower.
- ``evaclip_shapes``: the same pretrained image tower, unlocked, with patch dropout 0.5, LAMB and layer-wise lr
  decay (Sun et al., 2023, "EVA-CLIP: Improved Training Techniques for CLIP at Scale").
- ``navit_shapes``: native aspect ratios packed into sequences (Dehghani et al., 2023, "Patch n' Pack"): the
  contrastive task with ``inputs="pack"`` (``vlkit.tasks.navit``).
"""

from __future__ import annotations

import dataclasses

from vlkit.data.specs import ShapesObjects
from vlkit.recipes.base import InitFrom, LayerDecay, Recipe, Stage, lock_rules, register_recipe
from vlkit.recipes.contrastive import SHAPES_BUDGET, SHAPES_DATA, SHAPES_TRAIN
from vlkit.tasks.classification import Classification
from vlkit.tasks.contrastive import Contrastive
from vlkit.train import TrainConfig

# The image tower LiT and EVA-CLIP start from: ShapesWorld colour + shape classification, trained into
# OUT/pretrain/classify_shapes with this recipe's vision architecture.
PRETRAINED_TOWER = {"image_encoder": InitFrom("recipe:classify_shapes", share=("vision",))}
# EVA-CLIP's layer-wise decay for a ViT-B-sized tower is 0.75-0.85; 0.8 over shapes_clip's 4 blocks leaves the
# patch embedding at 0.8**5 = 0.33 of the base rate, so the pretrained low-level filters move least.
EVA_LAYER_DECAY = 0.8
EVA_PATCH_DROPOUT = 0.5
# LAMB scales each tensor's Adam step by ||w|| / ||update||, so a from-scratch tensor (weights of std 0.02) moves
# about 50x less per step than under AdamW at the same lr; on 40 ShapesWorld steps LAMB at 5e-3 matched 1e-2 and
# beat 1e-3 (training loss 3.06 vs 3.04 vs 3.80; AdamW at 1e-3: 2.48), while 1.5e-2 and 3e-2 learned slower.
EVA_LAMB_LR = 5e-3
# FILIP's token-wise similarities make a step 1.7x a CLIP step, so it trains half the steps to stay within 10
# minutes on the 2-core CPU (see the README's family table).
FILIP_STEPS = SHAPES_BUDGET.steps // 2  # and half the warmup
# ShapesWorld at native aspect ratios from 1:2 to 2:1 (about 64 x 64 pixels of area).
NAVIT_SHAPES_DATA = dataclasses.replace(SHAPES_DATA, aspect_ratios=(0.5, 2.0))


CLASSIFY_BUDGET = TrainConfig(
    steps=200, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=20, eval_every=100, schedule="constant"
)


@register_recipe
def classify_shapes() -> Recipe:
    # 200 steps x 128 fresh one-object scenes (rendered on the fly, never repeated): about 1.5 minutes on one CPU
    # thread in bf16. The data config is the contrastive recipes', so the tower sees the objects they will show it.
    # A constant rate after warmup: shape top-1 after 200 steps was 82% at 1e-3 constant and 69% at 1e-3 cosine.
    return Recipe(
        name="classify_shapes",
        description="ShapesWorld colour + shape classification (ViT image tower for LiT / EVA-style init).",
        model="shapes_classifier",
        task=Classification(),
        data=ShapesObjects(SHAPES_DATA, train_size=200 * 128, colourless_fraction=0.5),
        stages=(Stage(CLASSIFY_BUDGET),),
    )


@register_recipe
def filip_shapes() -> Recipe:
    train = dataclasses.replace(
        SHAPES_BUDGET, steps=FILIP_STEPS, warmup_steps=SHAPES_BUDGET.warmup_steps * FILIP_STEPS // SHAPES_BUDGET.steps
    )
    return Recipe(
        name="filip_shapes",
        description="FILIP (token-wise late interaction, FILIP loss) trained from scratch on ShapesWorld.",
        model="shapes_filip",
        task=Contrastive(),
        data=SHAPES_TRAIN,
        stages=(Stage(train),),
    )


@register_recipe
def lit_shapes() -> Recipe:
    return Recipe(
        name="lit_shapes",
        description="LiT: a locked image tower pretrained on ShapesWorld classification; the text tower learns to "
        "match it (softmax contrastive loss).",
        model="shapes_clip",
        task=Contrastive(),
        data=SHAPES_TRAIN,
        stages=(Stage(SHAPES_BUDGET, rules=lock_rules("image"), init=PRETRAINED_TOWER),),
        # No image head: a trainable projection would let the image side move, which LiT's lock rules out.
        model_overrides={"image_projection": "none"},
    )


@register_recipe
def evaclip_shapes() -> Recipe:
    # The text tower starts from scratch here (EVA-CLIP's starts from CLIP's), so only the image tower decays.
    stage = Stage(
        dataclasses.replace(SHAPES_BUDGET, optimizer="lamb", lr=EVA_LAMB_LR),
        rules=(LayerDecay("image_encoder", EVA_LAYER_DECAY),),
        init=PRETRAINED_TOWER,
    )
    return Recipe(
        name="evaclip_shapes",
        description="EVA-CLIP: a pretrained (unlocked) image tower, patch dropout 0.5, LAMB and layer-wise lr decay "
        "on ShapesWorld.",
        model="shapes_clip",
        task=Contrastive(),
        data=SHAPES_TRAIN,
        stages=(stage,),
        model_overrides={"vision.patch_dropout": EVA_PATCH_DROPOUT},
    )


@register_recipe
def navit_shapes() -> Recipe:
    # The token slots of a batch of square 64-patch images, cut into sequences of 128 tokens, take 1.9x the
    # images at budgets of 16-64 patches. On the packing alone (100 random batches, first-fit-decreasing): 64-token
    # sequences leave 9% padding, 128-token ones 1.6% (~10% of the drawn images overflow and are dropped, logged),
    # 256-token ones 1.1% but their attention costs 2x as much as 128's (bench/navit_throughput.py).
    return Recipe(
        name="navit_shapes",
        description="NaViT (patch n' pack at native aspect ratio, factorised x/y positions, softmax loss) on "
        "ShapesWorld.",
        model="navit_shapes",
        task=Contrastive(inputs="pack", pack_oversample=1.9, pack_sequence_slots=2),
        data=dataclasses.replace(SHAPES_TRAIN, config=NAVIT_SHAPES_DATA),
        stages=(Stage(SHAPES_BUDGET),),
    )

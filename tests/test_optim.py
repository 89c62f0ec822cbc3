"""LAMB against a per-parameter reference of the paper's equations (and pytorch-optimizer's LAMB where the two
variants coincide), the optimizer factory, and layer-wise learning-rate decay on a tiny ViT dual encoder."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from vlkit import create_model, get_config
from vlkit.train import load_checkpoint, save_checkpoint
from vlkit.train.optim import (
    Lamb,
    ParamGroupRule,
    build_optimizer,
    build_param_groups,
    dual_encoder_layer_decay_rules,
    layer_decay_rules,
)

SHAPES = [(6, 5), (7,), (4, 3, 2, 2), ()]


def reference_lamb(
    weights: list[torch.Tensor],
    gradients: list[list[torch.Tensor]],
    decays: list[float],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    bias_correction: bool = True,
    always_adapt: bool = False,
    trust_clip: bool = False,
) -> list[torch.Tensor]:
    """You et al. (2020), Algorithm 2 with phi = identity, one tensor at a time: ``gradients[t][k]`` is tensor k's
    gradient at step t + 1 and ``decays[k]`` its weight decay."""
    beta1, beta2 = betas
    weights = [weight.clone() for weight in weights]
    first = [torch.zeros_like(weight) for weight in weights]
    second = [torch.zeros_like(weight) for weight in weights]
    for t, step_gradients in enumerate(gradients, start=1):
        for k, (weight, gradient, decay) in enumerate(zip(weights, step_gradients, decays, strict=True)):
            first[k] = beta1 * first[k] + (1 - beta1) * gradient
            second[k] = beta2 * second[k] + (1 - beta2) * gradient * gradient
            m_hat = first[k] / (1 - beta1**t) if bias_correction else first[k]
            v_hat = second[k] / (1 - beta2**t) if bias_correction else second[k]
            update = m_hat / (v_hat.sqrt() + eps) + decay * weight
            trust = 1.0
            if decay != 0 or always_adapt:
                weight_norm = math.sqrt(float((weight * weight).sum()))
                update_norm = math.sqrt(float((update * update).sum()))
                if weight_norm > 0 and update_norm > 0:
                    trust = weight_norm / update_norm
                if trust_clip:
                    trust = min(trust, 1.0)
            weights[k] = weight - lr * trust * update
    return weights


def make_problem(seed: int, steps: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weights = [0.3 * torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
    weights[1].zero_()  # a zero-initialised tensor: ||w|| = 0, so its trust ratio falls back to 1
    gradients = [[torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES] for _ in range(steps)]
    for step_gradients in gradients[:2]:
        step_gradients[3] = torch.zeros_like(step_gradients[3])  # a zero update while the decay-free moments are 0
    return weights, gradients


def run_optimizer(optimizer_factory, weights, gradients, decays):
    parameters = [nn.Parameter(weight.clone()) for weight in weights]
    groups = [
        {"params": [parameter], "weight_decay": decay} for parameter, decay in zip(parameters, decays, strict=True)
    ]
    optimizer = optimizer_factory(groups)
    for step_gradients in gradients:
        for parameter, gradient in zip(parameters, step_gradients, strict=True):
            parameter.grad = gradient.clone()
        optimizer.step()
    return [parameter.detach() for parameter in parameters], optimizer


@pytest.mark.parametrize(
    ("options", "decays"),
    [
        ({}, [0.1, 0.1, 0.0, 0.0]),
        ({"bias_correction": False}, [0.05, 0.0, 0.05, 0.0]),
        ({"always_adapt": True}, [0.1, 0.0, 0.0, 0.1]),
        ({"trust_clip": True}, [0.1, 0.1, 0.1, 0.1]),
    ],
)
def test_lamb_matches_the_papers_equations(options: dict, decays: list[float]) -> None:
    weights, gradients = make_problem(seed=len(options) + int(10 * sum(decays)), steps=5)
    hyper = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-6}
    got, optimizer = run_optimizer(lambda groups: Lamb(groups, **hyper, **options), weights, gradients, decays)
    expected = reference_lamb(weights, gradients, decays, **hyper, **options)
    for value, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(value, reference)
    # The zero-initialised tensor moved (trust fell back to 1 rather than freezing it at 0) and every step counted.
    assert got[1].abs().sum() > 0
    assert all(int(state["step"]) == len(gradients) for state in optimizer.state.values())


def test_lamb_trust_ratio_rescales_the_step_to_the_weight_norm() -> None:
    """One decayed step moves the tensor by exactly lr * ||w||, whatever the gradient scale."""
    for scale in (1e-3, 1e3):
        weight = nn.Parameter(torch.full((10,), 2.0, dtype=torch.float64))
        weight.grad = scale * torch.linspace(-1, 1, 10, dtype=torch.float64)
        before = weight.detach().clone()
        Lamb([weight], lr=0.01, weight_decay=0.01).step()
        assert float((weight.detach() - before).norm()) == pytest.approx(0.01 * float(before.norm()), rel=1e-9)
    # With trust_clip the step never exceeds lr * ||update|| (a plain Adam step).
    weight = nn.Parameter(torch.full((10,), 50.0, dtype=torch.float64))
    weight.grad = torch.ones(10, dtype=torch.float64)
    Lamb([weight], lr=0.01, weight_decay=1e-4, trust_clip=True).step()
    assert float((50.0 - weight.detach()).abs().max()) < 0.0101


def test_lamb_matches_pytorch_optimizer_where_the_variants_coincide() -> None:
    """pytorch-optimizer's LAMB does not bias-correct and always adapts; with those choices the updates agree."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    weights, gradients = make_problem(seed=3, steps=6)
    decays = [0.1, 0.0, 0.02, 0.0]
    hyper = {"lr": 0.02, "betas": (0.9, 0.98), "eps": 1e-6}
    got, _ = run_optimizer(
        lambda groups: Lamb(groups, **hyper, bias_correction=False, always_adapt=True), weights, gradients, decays
    )
    theirs, _ = run_optimizer(
        # weight_decouple=False puts the decay inside the trust-ratio update (the paper's form, and ours);
        # adam_debias=True drops its 1 / (1 - beta1^t) step-size factor, i.e. no bias correction.
        lambda groups: pytorch_optimizer.Lamb(
            groups, **hyper, weight_decouple=False, adam_debias=True, foreach=True, max_grad_norm=0.0
        ),
        weights,
        gradients,
        decays,
    )
    for value, reference in zip(got, theirs, strict=True):
        # Theirs divides by ||u|| + eps rather than ||u||: a relative difference of about eps / ||u||.
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)
    assert not torch.equal(got[0], weights[0])


def test_lamb_state_survives_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()

    groups = build_param_groups(model, (), lr=0.01, weight_decay=0.1)
    reference_model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    reference_model.load_state_dict(model.state_dict())
    reference = build_optimizer(build_param_groups(reference_model, (), 0.01, 0.1), "lamb", 0.01, (0.9, 0.99), 1e-6,
                                0.1, "cpu")  # fmt: skip
    train(reference_model, reference, 5)

    optimizer = build_optimizer(groups, "lamb", 0.01, (0.9, 0.99), 1e-6, 0.1, "cpu")
    train(model, optimizer, 3)
    save_checkpoint(tmp_path, 3, model, optimizer, {})
    resumed_model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    resumed = build_optimizer(build_param_groups(resumed_model, (), 0.01, 0.1), "lamb", 0.01, (0.9, 0.99), 1e-6, 0.1,
                              "cpu")  # fmt: skip
    load_checkpoint(tmp_path / "checkpoints" / "step_00000003", resumed_model, resumed)
    train(resumed_model, resumed, 2)
    for key, value in reference_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)


def test_build_optimizer_adamw_and_lamb() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    groups = build_param_groups(model, (ParamGroupRule(r"1\..*", lr_scale=0.5),), lr=0.1, weight_decay=0.2)
    snapshot = [dict(group) for group in groups]

    adamw = build_optimizer(groups, "adamw", 0.1, (0.9, 0.98), 1e-6, 0.2, "cpu")
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.98) and adamw.defaults["eps"] == 1e-6
    by_name = {name: group for group in adamw.param_groups for name in group["param_names"]}
    assert by_name["1.weight"]["lr"] == pytest.approx(0.05) and by_name["0.weight"]["weight_decay"] == 0.2
    assert by_name["0.bias"]["weight_decay"] == 0.0
    # The trainer's construction: fused on CPU when this torch build has the kernel, else the single-tensor loop.
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(2))], fused=True)
        fused_available = True
    except RuntimeError:
        fused_available = False
    assert adamw.defaults["fused"] is (True if fused_available else None)
    assert groups == snapshot  # the caller's dicts were not filled with defaults

    lamb = build_optimizer(groups, "lamb", 0.1, (0.9, 0.98), 1e-6, 0.2, "cpu")
    assert isinstance(lamb, Lamb) and len(lamb.param_groups) == len(groups)
    assert {group["weight_decay"] for group in lamb.param_groups} == {0.2, 0.0}
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(groups, "sgd", 0.1, (0.9, 0.98), 1e-6, 0.2, "cpu")  # type: ignore[arg-type]


def expected_scale(name: str, image_depth: int, image_decay: float, text_depth: int, text_decay: float) -> float:
    """BEiT's numbering written out by hand: embeddings 0, block i -> i + 1, everything else depth + 1."""
    for prefix, depth, decay in (
        ("image_encoder.", image_depth, image_decay),
        ("text_encoder.", text_depth, text_decay),
    ):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        block = re.match(r"blocks\.(\d+)\.", rest)
        if block:
            layer = int(block.group(1)) + 1
        elif rest.split(".")[0] in ("patch_embed", "pos_embed", "class_token", "token_embed", "norm_pre"):
            layer = 0
        else:
            layer = depth + 1
        return decay ** (depth + 1 - layer)
    return 1.0


def test_layer_decay_scales_of_a_tiny_vit_dual_encoder() -> None:
    config = get_config("test_clip", {"vision.depth": 3})
    model = create_model("test_clip", **{"vision.depth": 3})
    rules = dual_encoder_layer_decay_rules(config, image_decay=0.5, text_decay=0.8)
    groups = build_param_groups(model, rules, lr=2.0, weight_decay=0.1)
    scales = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    assert set(scales) == {name for name, _ in model.named_parameters()}
    for name, scale in scales.items():
        assert scale == pytest.approx(expected_scale(name, 3, 0.5, 2, 0.8)), name
    lrs = {name: group["lr"] for group in groups for name in group["param_names"]}
    # Spot checks of the formula: block i at 0.5 ** (3 - i), embeddings at 0.5 ** 4, the head and projections at 1.
    assert lrs["image_encoder.blocks.0.attn.qkv.weight"] == pytest.approx(2.0 * 0.5**3)
    assert lrs["image_encoder.blocks.2.mlp.fc2.bias"] == pytest.approx(2.0 * 0.5)
    assert lrs["image_encoder.class_token"] == lrs["image_encoder.patch_embed.proj.weight"] == pytest.approx(2.0 / 16)
    assert lrs["text_encoder.token_embed.weight"] == pytest.approx(2.0 * 0.8**3)
    assert lrs["image_encoder.norm.weight"] == lrs["image_projection.weight"] == lrs["logit_scale"] == 2.0
    # Weight decay still follows the parameter kind, not the layer.
    decays = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert decays["image_encoder.blocks.1.attn.qkv.weight"] == 0.1 and decays["image_encoder.pos_embed.weight"] == 0.0


def test_layer_decay_composes_with_freeze_and_later_rules() -> None:
    model = create_model("test_siglip")
    config = model.config
    lock = ParamGroupRule(r"image_encoder\..*", freeze=True)
    head = ParamGroupRule(r"text_projection\..*", lr_scale=3.0)
    rules = (lock, *dual_encoder_layer_decay_rules(config, image_decay=0.7, text_decay=0.5), head)
    groups = build_param_groups(model, rules, lr=1.0, weight_decay=0.0)
    scales = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    # The lock wins over the image rules (shadowed by a freeze rule only: no error), the text tower is decayed,
    # a later rule still applies to what the decay rules leave alone, and the MAP head is frozen with its tower.
    assert not any(name.startswith("image_encoder.") for name in scales)
    assert not any(parameter.requires_grad for parameter in model.image_encoder.parameters())
    assert scales["text_encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert scales["text_encoder.pos_embed"] == pytest.approx(0.125)
    assert scales["text_projection.weight"] == 3.0 and scales["text_encoder.norm.weight"] == 1.0

    # A non-freeze rule in front of the decay rules would silently disable them: that is an error.
    with pytest.raises(ValueError, match="shadowed"):
        build_param_groups(model, (ParamGroupRule(r"text_encoder\..*"), *layer_decay_rules(2, 0.5, "text_encoder")),
                           1.0, 0.0)  # fmt: skip
    # Too deep a depth names blocks that do not exist: the typo check catches it.
    with pytest.raises(ValueError, match=r"blocks\\\\.2"):
        build_param_groups(model, layer_decay_rules(3, 0.5, "text_encoder"), 1.0, 0.0)
    with pytest.raises(ValueError, match="decay"):
        layer_decay_rules(2, 1.5)
    with pytest.raises(ValueError, match="transformer"):
        dual_encoder_layer_decay_rules(get_config("test_convnext_clip"), image_decay=0.9)


def test_the_d_abstractors_coordinates_and_query_positions_are_not_decayed() -> None:
    """Decoupled decay pulls a parameter towards zero: for the reference points, coordinates in [0, 1], that is the
    image's top-left corner."""
    from vlkit.bridges import DAbstractor

    config = get_config("shapes_honeybee_d").bridge
    bridge = nn.ModuleDict({"bridge": DAbstractor(config, vision_dim=32, lm_dim=48)})
    groups = build_param_groups(bridge, (), lr=1e-3, weight_decay=0.05)
    decay = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert decay["bridge.reference_points"] == decay["bridge.query_pos"] == 0.0
    assert decay["bridge.layers.0.deform_attn.offsets.weight"] == 0.05

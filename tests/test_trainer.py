"""Trainer behaviour on tiny CPU models: learning, parameter groups, schedules, accumulation, bf16, logging."""

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import vlkit.train.trainer
from vlkit.train import (
    ParamGroupRule,
    StepOutput,
    TrainConfig,
    Trainer,
    build_param_groups,
    count_parameters,
    lr_lambda,
)


class RegressionDataset(Dataset):
    """``y = x @ w + 0.5`` with a fixed random ``w``; samples are dicts, as vlkit collate functions expect."""

    def __init__(self, length: int = 64, in_features: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(length, in_features, generator=generator)
        weight = torch.randn(in_features, 1, generator=generator)
        self.targets = self.inputs @ weight + 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.inputs[index], "y": self.targets[index]}


def regression_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    prediction = model(batch["x"])
    loss = nn.functional.mse_loss(prediction.float(), batch["y"])
    return StepOutput(loss=loss, metrics={"prediction_mean": prediction.mean().item()})


class TowerModel(nn.Module):
    """Two named towers plus the scalar and embedding parameters that must never be weight-decayed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 1)
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(inputs + self.pos_embed.mean())) * self.logit_scale


def fp32_config(**overrides: object) -> TrainConfig:
    options = {"steps": 10, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "progress": False}
    return TrainConfig(**(options | overrides))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_decreases_and_logs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = fp32_config(steps=80, batch_size=16, lr=5e-2, weight_decay=0.0, warmup_steps=5, eval_every=40)
    evaluations = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        evaluations.append((model.training, torch.is_grad_enabled()))
        return {"mse": 1.0, "nested": {"a": 2.0}}

    trainer = Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path, evaluate)
    result = trainer.fit()

    records = read_log(result.log_path)
    train = [record for record in records if "loss" in record]
    assert [record["step"] for record in train] == list(range(1, 81))
    for key in ("loss", "lr", "grad_norm", "samples_per_second", "skipped", "prediction_mean"):
        assert key in train[0]
    first = sum(record["loss"] for record in train[:5]) / 5
    last = sum(record["loss"] for record in train[-5:]) / 5
    assert last < first / 20
    assert [record["step"] for record in records if "eval" in record] == [40, 80]
    assert evaluations == [(False, False), (False, False)]
    assert trainer.model.training
    assert result.steps == 80 and result.skipped == 0 and result.final_eval["nested"]["a"] == 2.0
    assert any((tmp_path / "tensorboard").iterdir())


def test_param_group_rules_freeze_scale_and_decay(tmp_path: Path) -> None:
    model = TowerModel()
    rules = (ParamGroupRule(r"encoder\..*", freeze=True), ParamGroupRule(r"head\..*", lr_scale=0.1, weight_decay=0.5))
    groups = build_param_groups(model, rules, lr=1.0, weight_decay=0.2)
    assert not any(parameter.requires_grad for parameter in model.encoder.parameters())
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert not any(name.startswith("encoder.") for name in by_name)
    assert by_name["head.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["head.weight"]["weight_decay"] == 0.5
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["logit_scale"]["weight_decay"] == 0.0 and by_name["logit_scale"]["lr"] == 1.0
    assert all(group["params"] for group in groups)
    assert count_parameters(model) == (8 + 1 + 12 + 1, 4 * 8 + 8 + 8 + 8 + 8 + 1 + 12 + 1)

    # A rule without freeze unfreezes what an earlier stage froze, and norms keep zero decay.
    groups = build_param_groups(model, (ParamGroupRule(r"encoder\.0\..*"),), lr=1.0, weight_decay=0.2)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["encoder.0.weight"]["weight_decay"] == 0.2
    assert "encoder.1.weight" not in by_name

    model = TowerModel()
    config = fp32_config(steps=3, param_groups=rules)
    trainer = Trainer(model, config, RegressionDataset(), None, regression_step, tmp_path)
    frozen = copy.deepcopy(model.encoder.state_dict())
    head = model.head.weight.detach().clone()
    trainer.fit()
    head_group = next(group for group in trainer.optimizer.param_groups if "head.weight" in group["param_names"])
    assert head_group["initial_lr"] == pytest.approx(config.lr * 0.1)
    assert all(torch.equal(frozen[key], value) for key, value in model.encoder.state_dict().items())
    assert not torch.equal(head, model.head.weight)


def test_rule_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="image_encodr"):
        build_param_groups(TowerModel(), (ParamGroupRule(r"image_encodr\..*", freeze=True),), 1.0, 0.1)
    with pytest.raises(ValueError, match="not a valid regex"):
        ParamGroupRule("encoder(")


def test_warmup_cosine_schedule_values(tmp_path: Path) -> None:
    factor = {step: lr_lambda(step, 110, warmup_steps=10, min_lr_ratio=0.1) for step in (0, 5, 10, 60, 110, 200)}
    assert factor[0] == 0.0 and factor[5] == pytest.approx(0.5) and factor[10] == pytest.approx(1.0)
    assert factor[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor[110] == pytest.approx(0.1) and factor[200] == pytest.approx(0.1)
    assert lr_lambda(35, 110, warmup_steps=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_lambda(3, 10, warmup_steps=4, schedule="constant") == pytest.approx(0.75)
    assert lr_lambda(9, 10, warmup_steps=4, schedule="constant") == 1.0

    config = fp32_config(steps=12, warmup_steps=4, min_lr_ratio=0.2)
    result = Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path).fit()
    logged = [record["lr"] for record in read_log(result.log_path)]
    expected = [config.lr * lr_lambda(step, 12, 4, "cosine", 0.2) for step in range(12)]
    assert logged == pytest.approx(expected)


def test_warmup_stable_decay_schedule_values(tmp_path: Path) -> None:
    # 100 steps: warmup over 10, 1 until the last 20 % (step 80), then linearly to min_lr_ratio at step 100.
    factor = {step: lr_lambda(step, 100, 10, "wsd", 0.1) for step in (0, 5, 10, 50, 80, 90, 99, 100, 150)}
    assert factor[0] == 0.0 and factor[5] == pytest.approx(0.5)
    assert factor[10] == factor[50] == factor[80] == 1.0
    assert factor[90] == pytest.approx(0.1 + 0.9 * 0.5) and factor[99] == pytest.approx(0.1 + 0.9 * 0.05)
    assert factor[100] == pytest.approx(0.1) and factor[150] == pytest.approx(0.1)
    config = fp32_config(steps=10, warmup_steps=2, schedule="wsd")
    result = Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path).fit()
    logged = [record["lr"] for record in read_log(result.log_path)]
    assert logged == pytest.approx([config.lr * lr_lambda(step, 10, 2, "wsd") for step in range(10)])
    with pytest.raises(ValueError, match="schedule must be one of"):
        fp32_config(schedule="linear")


def test_two_micro_batches_equal_one_full_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    results = []
    for grad_accum in (1, 2):
        copy_of_model = copy.deepcopy(model)
        config = fp32_config(steps=1, batch_size=8, grad_accum=grad_accum, grad_clip=None, weight_decay=0.1)
        Trainer(copy_of_model, config, RegressionDataset(), None, regression_step, tmp_path / str(grad_accum)).fit()
        results.append(copy_of_model)
    for full, accumulated in zip(results[0].parameters(), results[1].parameters(), strict=True):
        torch.testing.assert_close(full, accumulated, atol=1e-6, rtol=0)
    assert not torch.equal(next(model.parameters()), next(results[0].parameters()))


class TokenDataset(RegressionDataset):
    """Samples of 1 to 6 valid items (the rest masked), as an LM's samples hold different numbers of trained tokens."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        valid = torch.arange(6) < 1 + (index * 7) % 6
        return {
            "x": torch.randn(6, 4, generator=generator),
            "y": torch.randn(6, 1, generator=generator),
            "valid": valid,
        }


def token_mean_step(weighted: bool) -> Callable[[nn.Module, dict[str, torch.Tensor]], StepOutput]:
    def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        errors = (model(batch["x"]) - batch["y"]).pow(2).squeeze(-1)[batch["valid"]]
        return StepOutput(loss=errors.mean(), weight=float(batch["valid"].sum()) if weighted else None)

    return step


class AttentionModel(nn.Module):
    """Tokens (B, 6, 4) -> one self-attention layer -> (B, 6, 1)."""

    def __init__(self) -> None:
        super().__init__()
        from vlkit.layers.attention import Attention

        self.embed, self.attn, self.head = nn.Linear(4, 8), Attention(8, 2), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)))


def test_attention_products_run_for_the_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TrainConfig.attention_products: the run's bf16 training attention takes the products path (where the CPU
    allows it: allowed here by patching the check, so that the test means the same on every machine), the modules get
    their class's setting back when the run ends, and without the switch the kernel runs."""
    from vlkit.layers import attention

    calls = []
    products = attention._math_attention
    monkeypatch.setattr(attention, "_math_on_this_cpu", lambda *args: True)
    monkeypatch.setattr(attention, "_math_attention", lambda *args: calls.append(len(calls)) or products(*args))
    model = AttentionModel()
    for switch, expected in ((True, 3), (False, 0)):
        calls.clear()
        config = fp32_config(steps=3, precision="bf16", attention_products=switch)
        result = Trainer(model, config, TokenDataset(), None, token_mean_step(True), tmp_path / str(switch)).fit()
        assert len(calls) == expected
        assert "bf16_products" not in vars(model.attn) and not model.attn.bf16_products
        assert all(math.isfinite(record["loss"]) for record in read_log(result.log_path) if "loss" in record)


def test_accumulated_token_means_equal_the_full_batch_mean(tmp_path: Path) -> None:
    """A loss that is a mean over a varying number of items (an LM's trained tokens) gives its count as
    StepOutput.weight: two micro-batches then train exactly as one full batch; without it they do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    runs = {}
    for grad_accum, weighted in ((1, True), (2, True), (2, False)):
        copy_of_model = copy.deepcopy(model)
        config = fp32_config(steps=2, batch_size=8, grad_accum=grad_accum, grad_clip=None)
        result = Trainer(copy_of_model, config, TokenDataset(), None, token_mean_step(weighted),
                         tmp_path / f"{grad_accum}{weighted}").fit()  # fmt: skip
        losses = [record["loss"] for record in read_log(result.log_path) if "loss" in record]
        runs[grad_accum, weighted] = (torch.cat([p.flatten() for p in copy_of_model.parameters()]), losses)
    full, accumulated, unweighted = runs[1, True], runs[2, True], runs[2, False]
    torch.testing.assert_close(accumulated[0], full[0], atol=1e-6, rtol=0)
    assert accumulated[1] == pytest.approx(full[1], rel=1e-6)
    assert not torch.allclose(unweighted[0], full[0], atol=1e-4)


def test_bf16_autocast_path(tmp_path: Path) -> None:
    seen = []

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        prediction = model(batch["x"])
        seen.append((torch.is_autocast_enabled("cpu"), prediction.dtype))
        return StepOutput(loss=nn.functional.mse_loss(prediction.float(), batch["y"]))

    config = fp32_config(steps=4, precision="bf16", eval_every=2)
    evaluations = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        evaluations.append(model(torch.zeros(1, 4)).dtype)
        return {}

    model = nn.Linear(4, 1)
    result = Trainer(model, config, RegressionDataset(), None, step_fn, tmp_path, evaluate).fit()
    assert seen == [(True, torch.bfloat16)] * 4
    assert evaluations == [torch.bfloat16, torch.bfloat16]
    assert model.weight.dtype == torch.float32
    assert all(math.isfinite(record["loss"]) for record in read_log(result.log_path) if "loss" in record)


def test_skipped_samples_are_counted(tmp_path: Path) -> None:
    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, object]:
        kept = samples[1:]
        return {"x": torch.stack([s["x"] for s in kept]), "y": torch.stack([s["y"] for s in kept]), "skipped": 1}

    config = fp32_config(steps=5, batch_size=8, grad_accum=2)
    result = Trainer(nn.Linear(4, 1), config, RegressionDataset(), collate, regression_step, tmp_path).fit()
    assert result.skipped == 10
    assert [record["skipped"] for record in read_log(result.log_path)] == [2, 4, 6, 8, 10]


def test_data_order_covers_each_epoch_once(tmp_path: Path) -> None:
    seen: list[int] = []

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        seen.extend(batch["index"].tolist())
        return StepOutput(loss=model(batch["x"]).pow(2).mean())

    class Indexed(RegressionDataset):
        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"x": self.inputs[index], "index": torch.tensor(index)}

    config = fp32_config(steps=6, batch_size=4, grad_accum=2)
    Trainer(nn.Linear(4, 1), config, Indexed(length=9), None, step_fn, tmp_path).fit()
    # drop_last: 9 samples in micro-batches of 2 make 8 samples an epoch; 6 steps of 4 samples are 3 epochs.
    epochs = [seen[start : start + 8] for start in range(0, len(seen), 8)]
    assert len(seen) == 24 and all(len(set(epoch)) == 8 for epoch in epochs)
    assert epochs[0] != epochs[1]


def test_config_validation_and_existing_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grad_accum"):
        fp32_config(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="warmup_steps"):
        fp32_config(steps=5, warmup_steps=6)
    config = fp32_config(steps=2, save_every=1)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path).fit()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path).fit()
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        Trainer(nn.Linear(4, 1), config, RegressionDataset(length=4), None, regression_step, tmp_path / "small")


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_keeps_freed_memory_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    calls = []
    monkeypatch.setattr(vlkit.train.trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    config = fp32_config(steps=2, keep_freed_memory=keep)
    Trainer(nn.Linear(4, 1), config, RegressionDataset(), None, regression_step, tmp_path).fit()
    assert calls == ([1] if keep else [])

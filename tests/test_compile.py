"""``TrainConfig.compile``: which runs compile, that a compiled run trains as the eager one (to rounding) and leaves
the model eager afterwards, that evaluation never runs compiled, and that a failed compilation falls back to eager."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import vlkit
from vlkit.lm import DecoderLM, LMConfig
from vlkit.train import StepOutput, TrainConfig, Trainer
from vlkit.train import compile as train_compile
from vlkit.train.compile import AUTO_MIN_STEPS, compile_targets, resolve_compile

VOCAB = 64


def tiny_lm() -> DecoderLM:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=VOCAB, max_seq_len=32, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      bos_token_id=None, eos_token_ids=(1,), pad_token_id=0)  # fmt: skip
    return DecoderLM(config)


class Texts(torch.utils.data.Dataset):
    """Right-padded token rows of three lengths, so that batches differ in length (dynamic shapes)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        length = (8, 11, 14)[index % 3]
        ids = torch.randint(2, VOCAB, (length,), generator=generator)
        return {"ids": ids}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(sample["ids"]) for sample in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["ids"])] = sample["ids"]
        mask[row, : len(sample["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_logits=False)
    return StepOutput(out.loss)


def train(tmp_path: Path, name: str, compile: str, evaluate: bool = False) -> tuple[DecoderLM, list[float], Trainer]:
    model = tiny_lm()
    config = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, precision="fp32", compile=compile,  # type: ignore[arg-type]
                         eval_every=3 if evaluate else None, progress=False)  # fmt: skip

    def evaluation(module: nn.Module) -> dict[str, float]:
        # What evaluation and generation do: eval mode, no autograd, a KV cache.
        ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
        return {"generated": float(module.generate(ids, max_new_tokens=3).sum())}

    trainer = Trainer(model, config, Texts(), collate, lm_step, tmp_path / name,
                      evaluate=evaluation if evaluate else None)  # fmt: skip
    result = trainer.fit()
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in result.log_path.read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    return model, losses, trainer


def test_compile_targets_are_the_decoder_blocks() -> None:
    lm = tiny_lm()
    assert compile_targets(lm) == list(lm.blocks)
    vlm = vlkit.create_model("test_llava")
    assert compile_targets(vlm) == list(vlm.lm.blocks)
    assert compile_targets(vlkit.create_model("test_clip")) == []


def test_tower_blocks_are_targets_from_their_compile_width() -> None:
    from vlkit.layers.transformer import COMPILE_MIN_DIM, TransformerBlock

    wide, narrow = TransformerBlock(COMPILE_MIN_DIM, 8, 64), TransformerBlock(COMPILE_MIN_DIM - 8, 8, 64)
    assert compile_targets(nn.Sequential(narrow, wide)) == [wide]


@pytest.mark.skipif(not train_compile.compiler_present(), reason="inductor needs a C++ compiler on CPU")
def test_a_compiled_wide_tower_block_computes_the_eager_gradients() -> None:
    """The towers' block compiled as the trainer compiles it: with a padding mask and causal, the outputs and every
    parameter's gradient are the eager block's (to float rounding), and the undo makes it eager again."""
    from vlkit.layers.transformer import COMPILE_MIN_DIM, TransformerBlock

    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = TransformerBlock(COMPILE_MIN_DIM, 8, 64, act="quick_gelu")
    block = TransformerBlock(COMPILE_MIN_DIM, 8, 64, act="quick_gelu")
    block.load_state_dict(eager.state_dict())
    undo = train_compile.compile_for_training(block)
    x = torch.randn(2, 6, COMPILE_MIN_DIM)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    for kwargs in ({"mask": mask}, {"is_causal": True}):
        outputs = [module(x, **kwargs) for module in (block, eager)]
        for out in outputs:
            out.square().mean().backward()
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
        for (name, ours), theirs in zip(block.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-3, atol=1e-5, msg=name)
            ours.grad, theirs.grad = None, None
    assert "forward" in block.__dict__
    undo()
    assert "forward" not in block.__dict__
    torch._dynamo.reset()


def test_which_runs_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    lm, cpu = tiny_lm(), torch.device("cpu")
    monkeypatch.setattr(train_compile, "compiler_present", lambda: True)
    assert resolve_compile("on", lm, cpu, 1)
    assert resolve_compile("auto", lm, cpu, AUTO_MIN_STEPS)
    assert not resolve_compile("auto", lm, cpu, AUTO_MIN_STEPS - 1)  # too short to pay the compilation back
    assert not resolve_compile("auto", lm, torch.device("cuda"), AUTO_MIN_STEPS)  # not measured on GPUs
    assert not resolve_compile("off", lm, cpu, 10 * AUTO_MIN_STEPS)
    assert not resolve_compile("auto", lm, cpu, AUTO_MIN_STEPS, sharded=True)  # FSDP: not measured
    assert not resolve_compile("on", nn.Linear(2, 2), cpu, 1)  # nothing marked worth compiling
    monkeypatch.setattr(train_compile, "compiler_present", lambda: False)
    assert not resolve_compile("auto", lm, cpu, AUTO_MIN_STEPS)
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(steps=1, batch_size=1, lr=1.0, compile="always")  # type: ignore[arg-type]


@pytest.mark.skipif(not train_compile.compiler_present(), reason="inductor needs a C++ compiler on CPU")
def test_compiled_training_matches_eager_and_evaluation_stays_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_model, eager_losses, _ = train(tmp_path, "eager", "off")
    model, losses, trainer = train(tmp_path, "compiled", "on", evaluate=True)
    assert trainer.compiled
    # One graph for both blocks and all three batch lengths: shared by the instances, shapes dynamic; the
    # evaluation (eval mode, no grad, KV cache) ran eagerly, or it would have made graphs of its own.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for (name, ours), theirs in zip(model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4, msg=name)
    assert all("forward" not in block.__dict__ for block in model.blocks)  # eager again after fit


def test_a_failed_compilation_falls_back_to_eager(tmp_path: Path) -> None:
    from torch._inductor import config

    torch._dynamo.reset()
    _, eager_losses, _ = train(tmp_path, "eager", "off")
    # config.patch, not monkeypatch: setting the option back by setattr leaves inductor without it for later tests.
    with config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, losses, _ = train(tmp_path, "fallback", "on")
    messages = [str(warning.message) for warning in caught if "torch.compile failed" in str(warning.message)]
    assert len(messages) == 1, messages  # once, not per module or per step
    assert losses == eager_losses  # the eager forward exactly
    assert all("forward" not in block.__dict__ for block in model.blocks)
    torch._dynamo.reset()


def test_a_resumed_auto_run_keeps_its_compile_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled and eager steps differ in the last bits: a resumed run must not switch (the machine may now lack a
    compiler, or the threshold may have moved), as it keeps its precision."""
    from vlkit.train import trainer as trainer_module

    compiled_runs: list[int] = []

    def record(model: nn.Module) -> object:
        compiled_runs.append(len(compile_targets(model)))
        return lambda: None

    monkeypatch.setattr(trainer_module, "compile_for_training", record)
    monkeypatch.setattr(train_compile, "compiler_present", lambda: True)
    monkeypatch.setattr(train_compile, "AUTO_MIN_STEPS", 1)

    def run(steps: int, resume: bool) -> Trainer:
        config = TrainConfig(steps=steps, batch_size=4, lr=1e-3, precision="fp32", save_every=2, progress=False)
        trainer = Trainer(tiny_lm(), config, Texts(), collate, lm_step, tmp_path / "run")
        trainer.fit(resume=resume)
        return trainer

    assert run(2, resume=False).compiled and compiled_runs == [2]
    monkeypatch.setattr(train_compile, "compiler_present", lambda: False)  # "auto" would now say no
    assert run(4, resume=True).compiled and compiled_runs == [2, 2]
    with pytest.raises(FileExistsError):
        run(4, resume=False)

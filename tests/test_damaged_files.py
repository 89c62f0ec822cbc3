"""Damaged files are found, named and survived: each case damages a real file the way a crash, a full disk or a
careless rename does, and checks the one-line error (or, for a run's checkpoints, the warning and the resume from
the newest intact checkpoint, bit-identical to an uninterrupted run)."""

import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

import vlkit
from vlkit.cli import main as cli_main
from vlkit.convert.common import ConversionError, read_weights
from vlkit.files import DamagedFileError, check_safetensors, load_safetensors, read_json
from vlkit.train import StepOutput, TrainConfig, Trainer, build_param_groups, load_checkpoint, load_latest
from vlkit.train.checkpoint import verify_checkpoint


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return vlkit.create_model("test_clip").save_pretrained(tmp_path_factory.mktemp("model") / "clip")


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for entry in source.iterdir():
        (target / entry.name).write_bytes(entry.read_bytes())
    return target


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.delenv("VLKIT_DEBUG", raising=False)
    code = cli_main(argv)
    return code, capsys.readouterr().err


# --- model directories


def test_intact_model_directory_still_loads(model_dir: Path) -> None:
    # A directory written before this change has no manifest; the structural checks must accept it as it is.
    model = vlkit.from_pretrained(model_dir)
    expected = load_safetensors(model_dir / "model.safetensors")
    assert set(expected) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0], ids=["half", "last-bytes", "empty"])
def test_truncated_weights_name_the_file(model_dir: Path, tmp_path: Path, keep: float) -> None:
    directory = copy_dir(model_dir, tmp_path / "model")
    truncate(directory / "model.safetensors", keep)
    with pytest.raises(DamagedFileError) as caught:
        vlkit.from_pretrained(directory)
    assert caught.value.path == directory / "model.safetensors" and caught.value.reason.startswith("truncated: ")
    assert str(caught.value) == f"{directory / 'model.safetensors'}: {caught.value.reason}"


def test_truncated_weights_through_the_cli(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = copy_dir(model_dir, tmp_path / "model")
    truncate(directory / "model.safetensors")
    code, err = run_cli(["eval", "--model", str(directory)], capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vlkit: error: {directory / 'model.safetensors'}: truncated: ")


TRIPPED: list[str] = []


def _trip() -> str:
    TRIPPED.append("unpickled")
    return "tripwire"


class Tripwire:
    """Unpickling this object calls ``_trip``: proof that something unpickled the file."""

    def __reduce__(self) -> tuple:
        return _trip, ()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_renamed_torch_pickle_is_refused_unopened(
    model_dir: Path,
    tmp_path: Path,
    zip_format: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = copy_dir(model_dir, tmp_path / "model")
    weights = directory / "model.safetensors"
    # Cloned: safetensors maps the file into memory, and torch.save is about to overwrite it in place.
    state = {**{key: value.clone() for key, value in load_safetensors(weights).items()}, "tripwire": Tripwire()}
    torch.save(state, weights, _use_new_zipfile_serialization=zip_format)
    TRIPPED.clear()
    with pytest.raises(DamagedFileError, match="not safetensors; vlkit never unpickles") as caught:
        vlkit.from_pretrained(directory)
    assert caught.value.path == weights
    code, err = run_cli(["eval", "--model", str(directory)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and str(weights) in err
    assert TRIPPED == []
    # The tripwire works: loading the file the unsafe way does set it off (under a name torch.load takes a pickle).
    unsafe = tmp_path / "model.pt"
    unsafe.write_bytes(weights.read_bytes())
    torch.load(unsafe, weights_only=False)
    assert TRIPPED == ["unpickled"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"vlkit_format": 1, "kind": "dual_encoder", ', "not valid JSON"),
        ("\xff\xfe garbage", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"vlkit_format": 1, "kind": "no_such_kind"}', "unknown config kind"),
    ],
    ids=["cut", "binary", "array", "unknown-kind"],
)
def test_malformed_config_names_config_json(
    model_dir: Path,
    tmp_path: Path,
    text: str,
    reason: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = copy_dir(model_dir, tmp_path / "model")
    (directory / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=reason) as caught:
        vlkit.from_pretrained(directory)
    assert str(caught.value).startswith(f"{directory / 'config.json'}: ")
    code, err = run_cli(["eval", "--model", str(directory)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vlkit: error: {directory / 'config.json'}: ")


def test_a_damaged_tokenizer_names_the_file(tmp_path: Path) -> None:
    from vlkit.text import Tokenizer, train_tokenizer
    from vlkit.text.tokenizer import read_tokenizer_directory

    path = tmp_path / "tokenizer.json"
    train_tokenizer(["a red circle", "a blue square"] * 4, vocab_size=64, max_len=8).save(path)
    truncate(path)
    for read in (lambda: Tokenizer.from_file(path, max_len=8), lambda: read_tokenizer_directory(tmp_path, 8, None)):
        with pytest.raises(DamagedFileError) as caught:
            read()
        assert caught.value.path == path


def test_hugging_face_directory_damage_names_the_file(tmp_path: Path) -> None:
    exported = vlkit.export_hf(vlkit.create_model("test_siglip"), tmp_path / "hf")
    assert "model_type" in read_json(exported / "config.json")
    truncate(exported / "model.safetensors")
    with pytest.raises(DamagedFileError) as caught:
        vlkit.from_pretrained(exported)
    assert caught.value.path == exported / "model.safetensors"

    # A sharded checkpoint: the index and each shard are named when they are what is wrong.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(3)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2, 2)}, sharded / "model-00002-of-00002.safetensors")
    index = sharded / "model.safetensors.index.json"
    index.write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    weights = read_weights(sharded)
    assert torch.equal(weights["a"], torch.ones(3)) and torch.equal(weights["b"], torch.zeros(2, 2))

    truncate(sharded / "model-00002-of-00002.safetensors", 0.9)
    with pytest.raises(DamagedFileError) as caught:
        read_weights(sharded)
    assert caught.value.path == sharded / "model-00002-of-00002.safetensors"
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"model-00002-of-00002\.safetensors is missing") as missing:
        read_weights(sharded)
    assert str(sharded / "model-00002-of-00002.safetensors") in str(missing.value)
    index.write_text('{"weight_map": {"a": "model-00001-of')
    with pytest.raises(DamagedFileError, match="not valid JSON") as broken:
        read_weights(sharded)
    assert broken.value.path == index


def test_check_safetensors_sees_every_kind_of_damage(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, path)
    header = check_safetensors(path)
    assert header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "I64"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    damaged = {
        "trailing": (data + b"\0\0", "2 unexpected bytes after the last tensor"),
        "short": (data[:5], "too short"),
        "header-cut": (data[: header_end - 1], "header alone needs"),
        "data-cut": (data[:-1], f"truncated: {len(data) - 1} bytes, its safetensors header says {len(data)}"),
        "garbage": (b"\x10\0\0\0\0\0\0\0" + b"\xff" * 16, "header is not JSON"),
        "huge-header": (b"\xff" * 64, "implausible"),
    }
    for name, (content, reason) in damaged.items():
        path.write_bytes(content)
        with pytest.raises(DamagedFileError) as caught:
            load_safetensors(path)
        assert caught.value.path == path and reason in caught.value.reason, name
    # A header whose byte range does not fit the tensor's dtype and shape (a flipped digit in the header).
    bad = data[:header_end].replace(b"[2,3]", b"[2,4]")
    assert bad != data[:header_end]
    path.write_bytes(bad + data[header_end:])
    with pytest.raises(DamagedFileError, match="damaged header"):
        load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "absent.safetensors")


def test_read_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"step": 4')
    with pytest.raises(DamagedFileError, match=r"state\.json: not valid JSON") as caught:
        read_json(path)
    assert isinstance(caught.value, ValueError) and caught.value.path == path
    path.write_text('{"step": 4}')
    assert read_json(path) == {"step": 4}


# --- training checkpoints


class RegressionDataset(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(48, 4, generator=generator)
        self.targets = self.inputs @ torch.randn(4, 1, generator=generator) + 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.inputs[index], "y": self.targets[index]}


CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-2, save_every=2, precision="fp32", progress=False)


def train(out_dir: Path, crash_at_call: int | None = None, resume: bool = False) -> tuple[nn.Module, int]:
    """Train the tiny regression model; return it and the number of steps this call ran."""
    calls = 0

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        nonlocal calls
        calls += 1
        if calls == crash_at_call:
            raise RuntimeError("simulated crash")
        return StepOutput(loss=nn.functional.mse_loss(model(batch["x"]), batch["y"]))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    trainer = Trainer(model, CONFIG, RegressionDataset(), None, step_fn, out_dir)
    if crash_at_call is None:
        trainer.fit(resume=resume)
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(resume=resume)
    return model, calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    model, calls = train(tmp_path_factory.mktemp("reference"))
    assert calls == CONFIG.steps
    return {key: value.clone() for key, value in model.state_dict().items()}


def crashed_run(out_dir: Path) -> Path:
    """A run killed in step 5: checkpoints at steps 2 and 4 (keep_checkpoints=2), ``latest`` naming step 4."""
    train(out_dir, crash_at_call=5)
    root = out_dir / "checkpoints"
    assert sorted(path.name for path in root.glob("step_*")) == ["step_00000002", "step_00000004"]
    return root


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-model": ("model.safetensors", lambda path: truncate(path), "truncated"),
    "flipped-model-byte": ("model.safetensors", flip_last_byte, "SHA-256 mismatch"),
    "deleted-optimizer": ("optimizer.safetensors", lambda path: path.unlink(), "missing"),
    "truncated-trainer-state": ("trainer_state.json", lambda path: truncate(path), "truncated"),
    "broken-manifest": ("manifest.json", lambda path: truncate(path), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_skips_a_damaged_latest_checkpoint(
    tmp_path: Path, reference: dict[str, torch.Tensor], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    name, damage, reason = DAMAGE[case]
    root = crashed_run(tmp_path)
    damaged = root / "step_00000004"
    damage(damaged / name)
    with caplog.at_level(logging.WARNING, logger="vlkit.train.checkpoint"):
        model, calls = train(tmp_path, resume=True)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    expected = f"checkpoint {damaged} is damaged, skipping it: {damaged / name}: "
    assert any(line.startswith(expected) and reason in line.removeprefix(expected) for line in warnings), warnings
    assert any("continuing from" in line and "step_00000002" in line for line in warnings), warnings
    # Continued from step 2, not from step 4 nor from scratch, and ended where an uninterrupted run ends.
    assert calls == CONFIG.steps - 2
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key
    # The damaged checkpoint was rewritten by the resumed run when it reached step 4 again, then pruned.
    assert sorted(path.name for path in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    verify_checkpoint(root / "step_00000004")


def test_old_checkpoints_without_manifest_resume_and_are_still_checked(
    tmp_path: Path, reference: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    root = crashed_run(tmp_path / "intact")
    for manifest in root.glob("step_*/manifest.json"):
        manifest.unlink()
    model, calls = train(tmp_path / "intact", resume=True)
    assert calls == CONFIG.steps - 4
    assert all(torch.equal(model.state_dict()[key], value) for key, value in reference.items())

    root = crashed_run(tmp_path / "damaged")
    for manifest in root.glob("step_*/manifest.json"):
        manifest.unlink()
    truncate(root / "step_00000004" / "model.safetensors", 0.95)
    with caplog.at_level(logging.WARNING, logger="vlkit.train.checkpoint"):
        assert load_latest(tmp_path / "damaged") == root / "step_00000002"
    messages = [record.getMessage() for record in caplog.records]
    expected = f"checkpoint {root / 'step_00000004'} is damaged, skipping it: {root / 'step_00000004'}/model."
    assert any(message.startswith(expected + "safetensors: truncated: ") for message in messages), messages
    model, calls = train(tmp_path / "damaged", resume=True)
    assert calls == CONFIG.steps - 2
    assert all(torch.equal(model.state_dict()[key], value) for key, value in reference.items())


def test_a_run_with_no_intact_checkpoint_says_so_in_one_line(tmp_path: Path) -> None:
    root = crashed_run(tmp_path)
    truncate(root / "step_00000004" / "model.safetensors")
    (root / "step_00000002" / "rng.safetensors").unlink()
    with pytest.raises(DamagedFileError, match="no intact checkpoint to resume from") as caught:
        train(tmp_path, resume=True)
    message = str(caught.value)
    assert caught.value.path == root and "\n" not in message
    assert "step_00000004/model.safetensors" in message and "step_00000002/rng.safetensors: missing" in message
    # The log of the run that can no longer be resumed is left as it was, not restarted.
    assert (tmp_path / "log.jsonl").read_text().count('"loss"') == 4


def test_load_checkpoint_names_a_damaged_file(tmp_path: Path) -> None:
    root = crashed_run(tmp_path)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(build_param_groups(model, (), lr=CONFIG.lr, weight_decay=CONFIG.weight_decay))
    path = root / "step_00000004"
    assert load_checkpoint(path, model, optimizer)["step"] == 4
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        original = (path / name).read_bytes()
        truncate(path / name, 0.8)
        with pytest.raises(DamagedFileError) as caught:
            load_checkpoint(path, model, optimizer)
        assert caught.value.path == path / name and caught.value.reason.startswith("truncated: ")
        (path / name).write_bytes(pickle.dumps({"not": "safetensors"}))
        with pytest.raises(DamagedFileError, match="never unpickles") as caught:
            load_checkpoint(path, model, optimizer)
        assert caught.value.path == path / name
        (path / name).write_bytes(original)
    (path / "trainer_state.json").write_text('{"step": 4, "optim')
    with pytest.raises(DamagedFileError, match="not valid JSON") as caught:
        load_checkpoint(path, model, optimizer)
    assert caught.value.path == path / "trainer_state.json"

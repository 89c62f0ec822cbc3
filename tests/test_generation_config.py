"""A checkpoint's decoding defaults: ``generation_config.json`` read into ``model.generation_config``, applied by
``generate`` without arguments as transformers' ``generate(**inputs)`` applies it, a caller's options over single
fields, kept by vlkit's save / load and written back by ``export_hf``; a directory without one decodes greedily.

The checkpoint samples with ``top_k=1`` (deterministic: only the top token survives) and a repetition penalty that
changes the tokens, so token-identical output shows both were applied."""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import vlkit
from vlkit.convert import ConversionError, read_generation_config
from vlkit.lm import DecoderLM, GenerationConfig, generate
from vlkit.models.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

QWEN2 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0)  # fmt: skip
# What an instruct checkpoint ships (Qwen2-VL-Instruct: do_sample, top_k 1, a repetition penalty, end-of-turn ids).
DEFAULTS = {"do_sample": True, "top_k": 1, "repetition_penalty": 1.3, "eos_token_id": [2, 5], "pad_token_id": 0,
            "max_new_tokens": 12}  # fmt: skip
NEW = DEFAULTS["max_new_tokens"]


def _reference(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no weight at a special init; large enough for decisive argmaxes
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _checkpoint(path: Path, generation: dict[str, Any] | None) -> Path:
    """A transformers Qwen2 directory with ``generation`` as its generation_config.json (None: without one)."""
    _reference().save_pretrained(path)
    target = path / "generation_config.json"
    if generation is None:
        target.unlink()
    else:
        target.write_text(json.dumps(generation))
    return path


def _hf(path: Path) -> Any:
    return transformers.Qwen2ForCausalLM.from_pretrained(path).eval()


def _inputs() -> dict[str, torch.Tensor]:
    """Two left-padded prompts, each repeating a few tokens, which the penalty then steers away from."""
    ids = torch.tensor([[0, 0, 7, 9, 7, 9, 7, 9], [11, 13, 17, 11, 13, 17, 11, 13]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_the_checkpoint_defaults_decode_as_transformers_generate(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "hf", DEFAULTS)
    model = vlkit.from_pretrained(path)
    assert isinstance(model, DecoderLM)
    assert model.generation_config == GenerationConfig(
        max_new_tokens=NEW,
        do_sample=True,
        temperature=1.0,
        top_k=1,
        top_p=None,
        repetition_penalty=1.3,
        stop_token_ids=(2, 5),
        pad_token_id=0,
    )
    assert model.config.eos_token_ids == (2, 5)
    reference, inputs = _hf(path), _inputs()
    theirs = reference.generate(**inputs)  # no decoding arguments: generation_config.json's
    assert theirs.shape[1] == inputs["input_ids"].shape[1] + NEW
    assert torch.equal(model.generate(**inputs), theirs)
    assert torch.equal(generate(model, inputs["input_ids"], inputs["attention_mask"]), theirs)  # config=None
    # The penalty changed the tokens: plain greedy decoding (no penalty) answers otherwise, in both libraries.
    greedy = reference.generate(**inputs, do_sample=False, repetition_penalty=1.0)
    assert not torch.equal(greedy, theirs)
    assert torch.equal(generate(model, inputs["input_ids"], inputs["attention_mask"], config=GenerationConfig(NEW)),
                       greedy)  # fmt: skip


def test_the_callers_options_replace_single_fields(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "hf", DEFAULTS)
    model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
    for options in ({"max_new_tokens": 5}, {"do_sample": False}, {"repetition_penalty": 1.0},
                    {"max_new_tokens": 7, "top_p": 0.5, "temperature": 0.5}):  # fmt: skip
        assert torch.equal(model.generate(**inputs, **options), reference.generate(**inputs, **options)), options
    # max_new_tokens alone keeps the checkpoint's penalty: the start of the default answer, not greedy's.
    short = model.generate(**inputs, max_new_tokens=5)
    assert torch.equal(short, model.generate(**inputs)[:, : short.shape[1]])
    plain = model.generate(**inputs, repetition_penalty=1.0, do_sample=False)
    assert torch.equal(plain, reference.generate(**inputs, do_sample=False, repetition_penalty=1.0))
    assert not torch.equal(plain, model.generate(**inputs))
    assert model.generation_config.repetition_penalty == 1.3  # the options changed no stored default
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(**inputs, num_beams=2)


def test_defaults_survive_save_load_and_export(tmp_path: Path) -> None:
    model, inputs = vlkit.from_pretrained(_checkpoint(tmp_path / "hf", DEFAULTS)), _inputs()
    expected = model.generate(**inputs)
    model.save_pretrained(tmp_path / "own")
    own = vlkit.from_pretrained(tmp_path / "own")
    assert own.generation_config == model.generation_config
    assert torch.equal(own.generate(**inputs), expected)

    vlkit.export_hf(own, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert {key: written[key] for key in DEFAULTS} == DEFAULTS
    assert torch.equal(_hf(tmp_path / "out").generate(**inputs), expected)  # transformers decodes the same
    again = vlkit.from_pretrained(tmp_path / "out")
    assert again.generation_config == model.generation_config and again.config.eos_token_ids == (2, 5)

    # A default of vlkit's own that transformers spells otherwise: no top-k (None) is transformers' 0.
    own.generation_config = dataclasses.replace(own.generation_config, top_k=None, top_p=0.5, temperature=0.7)
    vlkit.export_hf(own, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (written["top_k"], written["top_p"], written["temperature"]) == (0, 0.5, 0.7)
    assert vlkit.from_pretrained(tmp_path / "out").generation_config == own.generation_config
    hf_config = _hf(tmp_path / "out").generation_config
    assert (hf_config.top_k, hf_config.top_p, hf_config.temperature) == (0, 0.5, 0.7)


def test_a_directory_without_generation_config_stays_greedy(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "hf", None)
    model, inputs = vlkit.from_pretrained(path), _inputs()
    assert model.generation_config is None
    ours = model.generate(**inputs, max_new_tokens=NEW)
    assert torch.equal(ours, _hf(path).generate(**inputs, max_new_tokens=NEW, do_sample=False))
    assert torch.equal(generate(model, inputs["input_ids"], inputs["attention_mask"])[:, : ours.shape[1]], ours)
    # Neither vlkit's save nor the export invents one; a stale file from an earlier write is removed.
    for target in (tmp_path / "own", tmp_path / "out"):
        target.mkdir()
        (target / "generation_config.json").write_text(json.dumps(DEFAULTS))
    model.save_pretrained(tmp_path / "own")
    vlkit.export_hf(model, tmp_path / "out")
    assert not (tmp_path / "own" / "generation_config.json").exists()
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert vlkit.from_pretrained(tmp_path / "own").generation_config is None


def test_missing_keys_take_transformers_defaults_and_unsupported_options_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        sampled = read_generation_config({"do_sample": True, "max_length": 4096, "transformers_version": "4.45"})
        assert read_generation_config({"num_beams": 1, "suppress_tokens": [], "top_k": 0}).top_k is None
    # No end-of-sequence id in the file: no stop id (transformers stops at none, whatever config.json says).
    assert sampled == GenerationConfig(do_sample=True, temperature=1.0, top_k=50, top_p=None, repetition_penalty=1.0,
                                       stop_token_ids=())  # fmt: skip
    with pytest.warns(UserWarning, match=r"num_beams=4, no_repeat_ngram_size=3") as caught:
        config = read_generation_config({"num_beams": 4, "no_repeat_ngram_size": 3, "temperature": 0.6,
                                         "max_length": 4096, "top_p": 0.9})  # fmt: skip
    assert len(caught) == 1 and "max_length" not in str(caught[0].message)
    assert config == GenerationConfig(temperature=0.6, top_k=50, top_p=0.9, stop_token_ids=())
    # Sampling-only options are checked and warned about only when sampling: greedy, transformers ignores them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy = read_generation_config({"do_sample": False, "temperature": 0.0, "top_p": 0.0, "min_p": 0.1})
    # top-p 0 keeps one token, as transformers' warper does; temperature 0.0 is kept (do_sample=True then raises)
    assert greedy == GenerationConfig(temperature=0.0, top_p=0.0, stop_token_ids=())
    with pytest.warns(UserWarning, match=r"min_p=0\.1"):
        read_generation_config({"do_sample": True, "min_p": 0.1})
    with pytest.raises(ConversionError, match=r"temperature=0\.0"):
        read_generation_config({"do_sample": True, "temperature": 0.0})
    # The file's end-of-sequence ids are the stop ids; without a pad id of its own, finished rows continue with the
    # first stop id (pad_token_id None), as transformers.
    assert read_generation_config({"eos_token_id": [7, 3]}) == GenerationConfig(stop_token_ids=(7, 3))
    assert read_generation_config({"eos_token_id": 7, "pad_token_id": 0}) == GenerationConfig(
        stop_token_ids=(7,), pad_token_id=0
    )


def test_finished_rows_pad_with_the_files_end_of_sequence_id(tmp_path: Path) -> None:
    # config.json pads with 0; generation_config.json has end-of-sequence ids and no pad id: transformers pads with
    # the first of them. The first row ends at its first token (made an end-of-sequence id), the second runs on.
    path = _checkpoint(tmp_path / "hf", {"eos_token_id": [2, 5], "max_new_tokens": 6})
    model, inputs = vlkit.from_pretrained(path), _inputs()
    greedy = model.generate(**inputs)
    first = int(greedy[0, 8])
    assert first not in greedy[1, 8:].tolist() and first != model.config.pad_token_id
    path = _checkpoint(tmp_path / "hf2", {"eos_token_id": [first, 2, 5], "max_new_tokens": 6})
    model, reference = vlkit.from_pretrained(path), _hf(path)
    ours, theirs = model.generate(**inputs), reference.generate(**inputs)
    assert torch.equal(ours, theirs) and ours.shape[1] == 8 + 6
    assert ours[0, 9:].eq(first).all() and model.config.pad_token_id == 0


LLAVA = dict(
    image_token_index=95,
    vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8),
    text_config={**QWEN2, "model_type": "qwen2", "vocab_size": 300},  # room for the byte-level chat tokenizer below
    vision_feature_layer=-2,
)  # fmt: skip


def test_a_vlm_applies_the_defaults_in_generate_and_chat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    reference = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**LLAVA)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape))
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(DEFAULTS))
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert isinstance(model, VisionLanguageModel) and model.generation_config is model.lm.generation_config
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[0, 7, 9] + [95] * 16 + [7, 9, 7, 9], [11] * 4 + [95] * 16 + [13, 11, 13]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": torch.randn(2, 3, 32, 32)}
    theirs = reference.generate(**inputs)
    assert torch.equal(model.generate(**inputs), theirs)
    assert not torch.equal(reference.generate(**inputs, do_sample=False, repetition_penalty=1.0), theirs)
    model.save_pretrained(tmp_path / "own")
    assert vlkit.from_pretrained(tmp_path / "own").generation_config == model.generation_config

    # vlkit chat starts from the same defaults, its own answer length over them.
    from PIL import Image

    from vlkit.serve.chat import ChatSession
    from vlkit.text import train_tokenizer

    model.tokenizer = train_tokenizer(["user: what is this? assistant: a red circle"] * 4, vocab_size=300,
                                      max_len=64, extra_special_tokens=("<image>", "<bos>", "<eos>"))  # fmt: skip
    model.config = dataclasses.replace(model.config, chat_template="shapes",
                                       image_token_id=model.tokenizer.backend.token_to_id("<image>"))  # fmt: skip
    used: list[GenerationConfig] = []
    module = importlib.import_module("vlkit.lm.generate")  # vlkit.lm.generate is also the function's name
    real = module.stream_generate
    monkeypatch.setattr(module, "stream_generate", lambda *a, **k: used.append(a[4]) or real(*a, **k))
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), "white").save(image)
    session = ChatSession(model, image, max_new_tokens=4)
    list(session.ask("what is this?"))
    # ... and stops at the template's end of turn as well as at the model's end-of-sequence ids.
    stops = tuple(dict.fromkeys([*model.config.lm.eos_token_ids, *sorted(session.eos_ids)]))
    assert used == [dataclasses.replace(model.generation_config, max_new_tokens=4, stop_token_ids=stops)]
    # A checkpoint's stop strings are matched in the chat's decoded text too.
    model.generation_config = dataclasses.replace(model.generation_config, stop_strings=("circle",))
    assert isinstance("".join(ChatSession(model, image, max_new_tokens=4).ask("what is this?")), str)


@pytest.mark.parametrize(
    ("logits", "top_p", "top_k", "temperature"),
    [([0.0, 0.0, 0.0, 0.0], 0.5, None, 1.0), ([2.0, 1.0, 1.0, 1.0, 0.0], 0.6, None, 1.0),
     ([0.5, 0.4, 0.1], 0.5, None, 1.0), ([3.0, 1.0, 1.0, 0.5, 0.5, 0.0], 0.0, None, 1.0),
     ([1.0, 2.0, 2.0, 0.5, 3.0], 0.8, 3, 0.7), ([1.0, 1.0, 1.0], 0.9, 0, 1.3)],
)  # fmt: skip
def test_warping_equals_transformers_warpers_ties_included(
    logits: list[float], top_p: float, top_k: int | None, temperature: float
) -> None:
    """Temperature, top-k and top-p as transformers' warpers compute them, also where tokens tie (common in bf16):
    which of equally likely tokens the nucleus keeps follows transformers' ascending sort."""
    from transformers.generation import logits_process as lp

    from vlkit.lm.generate import warp_logits

    scores = torch.tensor([logits]).log_softmax(-1) if logits == [0.5, 0.4, 0.1] else torch.tensor([logits])
    warpers = [lp.TemperatureLogitsWarper(temperature), *([lp.TopKLogitsWarper(top_k)] if top_k else []),
               lp.TopPLogitsWarper(top_p)]  # fmt: skip
    expected = scores.clone()
    for warper in warpers:
        expected = warper(None, expected)
    assert torch.equal(torch.isinf(warp_logits(scores, temperature, top_k, top_p)), torch.isinf(expected))
    torch.testing.assert_close(warp_logits(scores, temperature, top_k, top_p), expected)


def test_transformers_spellings_and_options(tmp_path: Path) -> None:
    """min_new_tokens, a padded prompt without its mask, and transformers' option values and names."""
    path = _checkpoint(tmp_path / "hf", None)
    model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
    early = reference.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[2, 9, 13, 17])
    assert (early[:, inputs["input_ids"].shape[1] :] == 0).any()  # some row stops early
    for options in ({"min_new_tokens": 8}, {"temperature": 0.0}, {"top_k": 0}):
        theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[2, 9, 13, 17],
                                    **options)  # fmt: skip
        ours = model.generate(**inputs, max_new_tokens=8, eos_token_id=[2, 9, 13, 17], **options)
        assert torch.equal(ours, theirs), options
        assert torch.equal(ours, early) != ("min_new_tokens" in options), options  # it held the stop tokens back
    # A stop id past the vocabulary (a tokenizer's added token) holds nothing back and breaks nothing.
    held = model.generate(**inputs, max_new_tokens=8, eos_token_id=[2, 9, 13, 17], min_new_tokens=8)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, eos_token_id=[2, 9, 13, 17, 500], min_new_tokens=8),
                       held)  # fmt: skip
    # Left-padded ids without their mask: the mask the pad id implies (pad 0 is no end-of-sequence id here).
    theirs = reference.generate(input_ids=inputs["input_ids"], max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(input_ids=inputs["input_ids"], max_new_tokens=6), theirs)
    assert torch.equal(theirs, reference.generate(**inputs, max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match="left-padded"):  # right-padded ids imply a mask vlkit cannot generate from
        model.generate(input_ids=torch.tensor([[7, 9, 7, 0, 0], [11, 13, 17, 11, 13]]), max_new_tokens=2)
    # No pad id of the model's own (vlkit's fallback pad is the first stop id): every token is real, as transformers.
    model.config = dataclasses.replace(model.config, pad_token_id=None)
    ones = {"max_new_tokens": 6, "stop_token_ids": ()}
    assert torch.equal(
        model.generate(input_ids=inputs["input_ids"], **ones),
        model.generate(**{**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}, **ones),
    )
    # Sampling without a generation_config.json: transformers' defaults (top-k 50, which a high temperature makes
    # matter), the same draws for one seed.
    torch.manual_seed(3)
    theirs = reference.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=8.0)
    torch.manual_seed(3)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=8.0), theirs)


def _first_greedy_token(tmp_path: Path) -> int:
    """Row 0's first greedy token (under no stop id), which is not among row 1's: as a stop id, it ends row 0 at once
    and leaves row 1 running."""
    model, inputs = vlkit.from_pretrained(_checkpoint(tmp_path / "probe", None)), _inputs()
    greedy = model.generate(**inputs, max_new_tokens=6, stop_token_ids=())
    first = int(greedy[0, 8])
    assert first not in greedy[1, 8:].tolist() and first not in (0, 2, 5)
    return first


def test_the_callers_stop_ids_pad_finished_rows_and_imply_no_mask(tmp_path: Path) -> None:
    # generation_config.json has end-of-sequence ids and no pad id. A caller's stop ids replace them, and the pad is
    # then the first of the caller's (transformers: the generation config's pad id, else the call's first eos id), in
    # the rows that finished and in the mask that ids without one imply: none, the pad being a stop id.
    first = _first_greedy_token(tmp_path)
    for name, generation in (("eos", {"eos_token_id": [2, 5], "max_new_tokens": 6}), ("none", {"max_new_tokens": 6})):
        path = _checkpoint(tmp_path / name, generation)
        model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
        theirs = reference.generate(**inputs, eos_token_id=[first])
        assert theirs[0, 8:].eq(first).all() and not theirs[1, 8:].eq(first).any()
        assert torch.equal(model.generate(**inputs, eos_token_id=[first]), theirs), name
        # Ids without their mask, holding the file's first end-of-sequence id (an earlier turn's end) mid-prompt.
        ids = torch.tensor([[7, 9, 2, 9, 7, 9, 2, 9], [11, 13, 2, 11, 13, 17, 11, 13]])
        theirs = reference.generate(input_ids=ids, eos_token_id=[60])
        assert torch.equal(theirs, reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                      eos_token_id=[60]))  # fmt: skip
        assert torch.equal(model.generate(input_ids=ids, eos_token_id=[60]), theirs), name
    # Without a generation_config.json a caller's stop ids leave config.json's pad id in place, in both libraries.
    path = _checkpoint(tmp_path / "nofile", None)
    model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
    theirs = reference.generate(**inputs, max_new_tokens=6, eos_token_id=[first])
    assert theirs[0, 9:].eq(0).all()
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[first]), theirs)
    # ... and so do vlkit's own defaults, which take the model's stop ids, as exported and read by transformers.
    model.generation_config = GenerationConfig(max_new_tokens=6)
    assert torch.equal(model.generate(**inputs, eos_token_id=[first]), theirs)
    vlkit.export_hf(model, tmp_path / "own")
    assert torch.equal(_hf(tmp_path / "own").generate(**inputs, eos_token_id=[first]), theirs)


def test_a_generation_config_without_eos_ids_stops_at_none(tmp_path: Path) -> None:
    # config.json ends sequences at row 0's first greedy token; generation_config.json names no end-of-sequence id, and
    # transformers decodes with that file alone: no row stops. The model's own ids stay config.json's.
    first = _first_greedy_token(tmp_path)
    for name, generation in (("plain", {"max_new_tokens": 6}), ("pad", {"max_new_tokens": 6, "pad_token_id": 0})):
        path = _checkpoint(tmp_path / name, generation)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "eos_token_id": first}))
        model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
        theirs = reference.generate(**inputs)
        assert theirs.shape[1] == 8 + 6 and theirs[0, 8] == first and not theirs[0, 9:].eq(first).all()
        assert torch.equal(model.generate(**inputs), theirs), name
        assert torch.equal(model.generate(**inputs, min_new_tokens=3), reference.generate(**inputs, min_new_tokens=3))
        assert model.config.eos_token_ids == (first,)
        # Written back without end-of-sequence ids, so that transformers stops at none either.
        vlkit.export_hf(model, tmp_path / f"{name}_out")
        assert "eos_token_id" not in json.loads((tmp_path / f"{name}_out" / "generation_config.json").read_text())
        assert torch.equal(_hf(tmp_path / f"{name}_out").generate(**inputs), theirs)
        assert torch.equal(vlkit.from_pretrained(tmp_path / f"{name}_out").generate(**inputs), theirs)


def test_a_greedy_files_zero_temperature_refuses_sampling(tmp_path: Path) -> None:
    # Greedy with temperature 0.0 (as some checkpoints ship): a caller's do_sample=True is refused, as transformers
    # refuses it, rather than sampling at temperature 1.
    path = _checkpoint(tmp_path / "hf", {"do_sample": False, "temperature": 0.0, "max_new_tokens": 4})
    model, reference, inputs = vlkit.from_pretrained(path), _hf(path), _inputs()
    assert torch.equal(model.generate(**inputs), reference.generate(**inputs))
    with pytest.raises(ValueError, match="temperature"):
        reference.generate(**inputs, do_sample=True)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(**inputs, do_sample=True)
    assert model.generation_config.temperature == 0.0
    torch.manual_seed(0)
    theirs = reference.generate(**inputs, do_sample=True, temperature=0.5)
    torch.manual_seed(0)
    assert torch.equal(model.generate(**inputs, do_sample=True, temperature=0.5), theirs)
    # Written back as the file had it, which transformers reads back.
    vlkit.export_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["temperature"] == 0.0
    exported = _hf(tmp_path / "out")
    assert exported.generation_config.temperature == 0.0
    assert torch.equal(exported.generate(**inputs), reference.generate(**inputs))
    with pytest.raises(ValueError, match="temperature"):
        exported.generate(**inputs, do_sample=True)
    assert vlkit.from_pretrained(tmp_path / "out").generation_config == model.generation_config

"""Language-model checkpoints: transformers' Llama / Qwen2 / OPT directories <-> vlkit ``DecoderLM``.

Each case builds the transformers model from a tiny random config (the cases vary every option the converters read),
saves it, loads it with ``vlkit.from_pretrained`` and checks logits (fp32, 1e-4) and greedy generation on a
left-padded batch token for token; then exports with ``vlkit.export_hf`` and loads that back with transformers.
Real-size presets are compared with the public architectures on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import vlkit
from vlkit.convert import ConversionError, llama, opt
from vlkit.lm import DecoderLM

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
LLAMAS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, eos_token_id=2, pad_token_id=0)  # fmt: skip
OPTS = dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, eos_token_id=2, pad_token_id=1, bos_token_id=2)  # fmt: skip
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("Llama", LLAMAS),
    "llama_gqa_biases_llama3_tied": ("Llama", {
        **LLAMAS, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 500000.0}}),
    "llama_mqa_head_dim_linear": ("Llama", {
        **LLAMAS, "num_key_value_heads": 1, "head_dim": 12, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # max_position_embeddings 8: the prompt and generation run past it, where dynamic NTK scaling changes the base
    "llama_dynamic": ("Llama", {**LLAMAS, "max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic",
                                                                                       "factor": 2.0}}),
    "qwen2_gqa_tied": ("Qwen2", {**LLAMAS, "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen2_mha_untied": ("Qwen2", {**LLAMAS, "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}),
    "opt_pre_norm_relu_tied": ("OPT", OPTS),
    "opt_post_norm_projected_gelu_untied": ("OPT", {
        **OPTS, "do_layer_norm_before": False, "word_embed_proj_dim": 16, "activation_function": "gelu",
        "tie_word_embeddings": False}),
    "opt_no_bias_no_final_norm": ("OPT", {**OPTS, "enable_bias": False, "_remove_final_layer_norm": True}),
}  # fmt: skip


def _reference(family: str, options: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**options)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no weight at a special init (unit norms, zero biases); large enough for decisive argmaxes
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _batch(vocab: int, pad: int, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_logits(model: Any, reference: Any, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference(**inputs).logits
    real = inputs["attention_mask"].bool()  # padded positions' outputs are meaningless in both libraries
    torch.testing.assert_close(ours[real], theirs[real], **TOLERANCE)


def _load_back(path: Path, family: str) -> Any:
    model, info = getattr(transformers, f"{family}ForCausalLM").from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_both_directions(case: str, tmp_path: Path) -> None:
    family, options = CASES[case]
    reference = _reference(family, options)
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert isinstance(model, DecoderLM)
    inputs = _batch(options["vocab_size"], options["pad_token_id"], [5, 10, 7])
    _check_logits(model, reference, inputs)

    ours = model.generate(**inputs, max_new_tokens=8)
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)

    vlkit.export_hf(model, tmp_path / "out")
    back = _load_back(tmp_path / "out", family)
    _check_logits(model, back, inputs)
    assert vlkit.from_pretrained(tmp_path / "out").config == model.config


def test_generation_stops_at_eos_like_transformers(tmp_path: Path) -> None:
    options = {**LLAMAS, "num_key_value_heads": 2}
    reference = _reference("Llama", options, seed=1)
    inputs = _batch(96, 0, [4, 6, 6], seed=1)
    free = reference.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)[:, 6:]
    eos = int(free[0, 2])  # row 0 ends after three tokens; the others whenever they produce it, if at all
    reference.config.eos_token_id = reference.generation_config.eos_token_id = eos
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert model.config.eos_token_ids == (eos,)
    ours = model.generate(**inputs, max_new_tokens=10)
    theirs = reference.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
    assert (ours[0, 9:] == 0).all() and ours[0, 8] == eos

    # An end-of-sequence id that only generation_config.json names (an instruct model's end of turn) stops both.
    reference.config.eos_token_id, reference.generation_config.eos_token_id = 2, [2, eos]
    reference.save_pretrained(tmp_path / "generation")
    assert json.loads((tmp_path / "generation" / "config.json").read_text())["eos_token_id"] == 2
    model = vlkit.from_pretrained(tmp_path / "generation")
    assert model.config.eos_token_ids == (2, eos)
    theirs = reference.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=10), theirs)


def test_sharded_export_loads_both_ways(tmp_path: Path) -> None:
    reference = _reference("Qwen2", {**LLAMAS, "num_key_value_heads": 2})
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    vlkit.export_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert all((tmp_path / "out" / shard).exists() for shard in shards)
    _check_logits(model, _load_back(tmp_path / "out", "Qwen2"), _batch(96, 0, [6, 4]))
    again = vlkit.from_pretrained(tmp_path / "out")  # vlkit reads shards too
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Exported again in one file, the earlier shards go with their index; in fewer shards, the surplus ones go.
    vlkit.export_hf(model, tmp_path / "out", max_shard_bytes=60_000)
    fewer = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert sorted(path.name for path in (tmp_path / "out").glob("*.safetensors")) == sorted(fewer)
    assert 1 < len(fewer) < len(shards)
    vlkit.export_hf(model, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


def test_stored_dtype_is_kept(tmp_path: Path) -> None:
    reference = _reference("Llama", {**LLAMAS, "num_key_value_heads": 2}).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    inputs = _batch(96, 0, [5, 3])
    assert model.generate(**inputs, max_new_tokens=3).shape == (2, 8)
    wide = vlkit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    # A fresh fp32 reference: .float() on the bf16 one would keep its RoPE frequencies rounded to bf16.
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    _check_logits(wide, fresh, inputs)
    # transformers' spellings: "auto" keeps the stored dtype, a name casts; anything else is refused by name.
    assert {p.dtype for p in vlkit.from_pretrained(tmp_path / "hf", dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vlkit.from_pretrained(tmp_path / "hf", dtype="float16").parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="'int8' is not a floating torch dtype"):
        vlkit.from_pretrained(tmp_path / "hf", dtype="int8")


def test_a_mixed_checkpoint_keeps_the_dtype_most_of_its_weights_have(tmp_path: Path) -> None:
    """OPT keeps many small vectors (biases, norms): stored in fp32 beside bf16 matrices, they outnumber the matrices
    but not their elements, and the model loads in bf16 (a 7B model upcast to fp32 would not fit in memory)."""
    from safetensors.torch import load_file, save_file

    reference = _reference("OPT", OPTS)
    reference.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    mixed = {key: value if value.dim() == 1 else value.bfloat16() for key, value in weights.items()}
    assert sum(value.dim() == 1 for value in mixed.values()) > len(mixed) / 2
    save_file(mixed, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert {p.dtype for p in vlkit.from_pretrained(tmp_path / "hf").parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_rms_norm_rounds_as_the_reference(family: str) -> None:
    """A bf16 checkpoint's norms give transformers' numbers bit for bit (normalised in fp32, rounded, then scaled)."""
    from vlkit.layers.norms import RMSNorm

    module = getattr(transformers.models, family)
    reference = getattr(module, f"modeling_{family}").__dict__[f"{family.title()}RMSNorm"](64, eps=1e-5)
    ours = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        ours.weight.copy_(reference.weight)
    x = (3 * torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(1))).bfloat16()
    assert torch.equal(ours.bfloat16()(x), reference.bfloat16()(x))


def test_legacy_rope_config_keys(tmp_path: Path) -> None:
    """Configs written before transformers 5 carry ``rope_theta`` + ``rope_scaling`` with "type"."""
    reference = _reference("Llama", {**LLAMAS, "rope_scaling": {"rope_type": "linear", "factor": 3.0}})
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters")
    config |= {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 3.0}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert (model.config.rope_scaling, model.config.rope_factor) == ("linear", 3.0)
    _check_logits(model, reference, _batch(96, 0, [7, 4]))


def test_rope_keys_read_with_transformers_precedence(tmp_path: Path) -> None:
    """A config.json with both ``rope_parameters`` and ``rope_scaling`` (a hand-edited one), and a llama3 RoPE with a
    top-level ``original_max_position_embeddings``: vlkit reads what transformers reads."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 500000.0}  # fmt: skip
    edits = {
        "both": {"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
        "top_level_original": {"rope_parameters": llama3, "original_max_position_embeddings": 16},
    }
    for name, edit in edits.items():
        _reference("Llama", LLAMAS).save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps(config | edit))
        reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        model = vlkit.from_pretrained(tmp_path / name)
        _check_logits(model, reference, _batch(96, 0, [40, 9]))
    assert (model.config.rope_scaling, model.config.rope_original_max_seq_len) == ("llama3", 16)


def test_tokenizer_is_loaded_and_stop_strings_use_it(tmp_path: Path) -> None:
    from vlkit.text import train_tokenizer

    texts = ["a red circle left of a blue square", "two green triangles above a small circle"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=96)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<eos>",
                                                pad_token="<pad>")  # fmt: skip
    reference = _reference("Llama", {**LLAMAS, "eos_token_id": None})
    reference.save_pretrained(tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    model = vlkit.from_pretrained(tmp_path / "hf")
    assert (
        model.tokenizer is not None and model.tokenizer.decode(tokenizer.encode("red circle")).strip() == "red circle"
    )
    inputs = _batch(96, 0, [6])
    free = model.generate(**inputs, max_new_tokens=8)[0, 6:].tolist()
    cut = next(k for k in range(1, 9) if len(model.tokenizer.decode(free[:k]).strip()) >= 2)
    stop = model.tokenizer.decode(free[:cut]).strip()[-2:]  # completed by token cut - 1 (or earlier)
    out = model.generate(**inputs, max_new_tokens=8, stop_strings=(stop,))[0, 6:].tolist()
    assert len(out) <= cut and out == free[: len(out)]
    assert stop in model.tokenizer.decode(out) and stop not in model.tokenizer.decode(out[:-1])


def test_unsupported_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="yarn"):
        llama.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")
    with pytest.raises(ConversionError, match="sliding"):
        llama.config_from_hf({"model_type": "qwen2", "use_sliding_window": True}, "x")
    with pytest.raises(ConversionError, match="SwiGLU"):
        llama.config_from_hf({"model_type": "llama", "hidden_act": "gelu"}, "x")
    with pytest.raises(ConversionError, match="elementwise"):
        opt.config_from_hf({"model_type": "opt", "layer_norm_elementwise_affine": False}, "x")
    reference = _reference("Llama", LLAMAS)
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="unpickles"):
        vlkit.from_pretrained(tmp_path / "hf")
    odd = vlkit.create_model("test_llama_lm", positions="learned")  # RMSNorm + SwiGLU + learned positions
    with pytest.raises(ConversionError, match="no Hugging Face format"):
        vlkit.export_hf(odd, tmp_path / "odd")


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    reference = _reference("Llama", {**LLAMAS, "num_key_value_heads": 2})
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ConversionError, match="k_proj"):
        vlkit.from_pretrained(tmp_path / "hf")


PUBLIC = {
    "vicuna_7b": ("Llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, pad_token_id=0), 6_738_415_616),
    "qwen2_0_5b": ("Qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                 rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643,
                                 eos_token_id=151643), 494_032_768),
    "opt_2_7b": ("OPT", dict(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                             num_attention_heads=32, max_position_embeddings=2048), 2_651_596_800),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_real_size_presets_match_the_public_architectures(name: str) -> None:
    family, options, count = PUBLIC[name]
    with torch.device("meta"):
        reference = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**options))
        model = vlkit.create_model(name)
    module = opt if family == "OPT" else llama
    hf_config = reference.config.to_dict()
    assert module.config_from_hf(hf_config, name) == model.config  # the converter reads the preset back exactly
    hf_shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    vlkit_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rules = module.rules(model.config)
    for rule in rules:  # every vlkit tensor is the concatenation of its foreign tensors
        foreign = [hf_shapes[key] for key in rule.hf]
        assert sum(s[0] for s in foreign) == vlkit_shapes[rule.vlkit[0]][0], rule
        assert all(s[1:] == vlkit_shapes[rule.vlkit[0]][1:] for s in foreign), rule
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    assert {key for r in rules for key in r.hf} == set(hf_shapes) - tied
    assert {key for r in rules for key in r.vlkit} == set(vlkit_shapes)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters()) == count


@pytest.mark.parametrize("family", ["Llama", "OPT"])
def test_a_stored_head_that_differs_from_the_embedding_is_kept_as_transformers_keeps_it(
    tmp_path: Path, family: str
) -> None:
    """A config that ties the head, over a file holding a different ``lm_head.weight``: transformers keeps the stored
    head (untied), and vlkit's logits match; a stored head equal to the embedding stays tied."""
    options = LLAMAS if family == "Llama" else OPTS
    _reference(family, {**options, "tie_word_embeddings": False}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    reference = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path).eval()
    model = vlkit.from_pretrained(tmp_path).eval()
    assert isinstance(model, DecoderLM) and not model.config.tie_embeddings
    _check_logits(model, reference, _batch(options["vocab_size"], options["pad_token_id"], [5, 3]))


def test_export_keeps_the_tokenizers_special_tokens_and_chat_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    _reference("Llama", {**LLAMAS, "bos_token_id": 1}).save_pretrained(tmp_path / "hf")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 96)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    source = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **tokens)
    source.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    source.save_pretrained(tmp_path / "hf")
    vlkit.export_hf(vlkit.from_pretrained(tmp_path / "hf"), tmp_path / "out")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (exported.bos_token, exported.unk_token, exported.eos_token) == ("<s>", "<unk>", "</s>")
    assert exported.chat_template == source.chat_template
    assert exported("w5 zz").input_ids == source("w5 zz").input_ids == [1, 5, 3]


LLAMA_TEXTS = ["Hello world", " Hello world", "  two leading spaces", "Hello</s>world", "Hello</s> world",
               "USER: a red circle ASSISTANT: yes</s>USER: and?", "line one\nline two", "émoji 🙂 3.14"]  # fmt: skip


def _llama2_tokenizer(directory: Path) -> int:
    """tokenizer.json as transformers 4 wrote Llama 2's, Vicuna's and TinyLlama's: a byte-fallback BPE whose normalizer
    prepends "▁" to every piece between special tokens and turns spaces into "▁", and ``<s> $A``. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    corpus = ["Hello world, a small corpus.", "USER: what is it? ASSISTANT: a red circle.", "line one line two"] * 4
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                            show_progress=False))  # fmt: skip
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(directory / "tokenizer.json"))
    return backend.get_vocab_size()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"legacy": True, "padding_side": "right"},
        {"add_prefix_space": False},
        {"tokenizer_class": "LlamaTokenizerFast"},
    ],
    ids=["defaults", "legacy", "no_prefix_space", "fast_name"],
)
def test_a_llama_tokenizer_reads_as_transformers_llama_tokenizer(settings: dict[str, Any], tmp_path: Path) -> None:
    """transformers 5 reads a Llama directory naming LlamaTokenizer with that class's own pipeline (Metaspace, a "▁"
    before the text's first word only, left padding), not the stored normalizer; vlkit encodes, pads and decodes as
    it does, and its export reads back the same."""
    (tmp_path / "hf").mkdir()
    size = _llama2_tokenizer(tmp_path / "hf")
    _reference("Llama", {**LLAMAS, "vocab_size": size, "bos_token_id": 1}).save_pretrained(tmp_path / "hf")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "</s>", "model_max_length": 24, **settings}  # fmt: skip
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == "LlamaTokenizer"
    ours = vlkit.from_pretrained(tmp_path / "hf").tokenizer
    for text in LLAMA_TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    expected = theirs(LLAMA_TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    batch = ours(LLAMA_TEXTS)
    assert ours.padding_side == theirs.padding_side == settings.get("padding_side", "left")
    assert torch.equal(batch.input_ids, expected["input_ids"]) and torch.equal(batch.attention_mask,
                                                                               expected["attention_mask"])  # fmt: skip
    exported = vlkit.export_hf(vlkit.from_pretrained(tmp_path / "hf"), tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(exported)
    assert [again(text)["input_ids"] for text in LLAMA_TEXTS] == [theirs(text)["input_ids"] for text in LLAMA_TEXTS]


def test_an_opt_directory_without_tokenizer_json_reads_its_vocab_and_merges(tmp_path: Path) -> None:
    """facebook/opt-* keep GPT-2's vocab.json and merges.txt and no tokenizer.json: vlkit builds the tokenizer
    transformers' GPT2Tokenizer builds from them (byte-level BPE, ``</s>`` prepended by ``add_bos_token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["Hello world, a small corpus.", "USER: what is it? ASSISTANT: a red circle.", "line one\nline two 42"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    directory = tmp_path / "opt"
    directory.mkdir()
    backend.model.save(str(directory))
    _reference("OPT", {**OPTS, "vocab_size": backend.get_vocab_size() + 2}).save_pretrained(directory)
    size = backend.get_vocab_size()
    # transformers 5's record of the added tokens, here not in id order, with a pad token vocab.json lacks
    added = {str(size + 1): {"content": "<newpad>", "special": True}, "2": {"content": "</s>", "special": True},
             str(size): {"content": "<extra>", "special": True}}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<newpad>",
        "add_prefix_space": False, "add_bos_token": True, "errors": "replace",
        "added_tokens_decoder": added}))  # fmt: skip
    texts = ["Hello world", " Hello world", "a</s>b", "line one\nline two", "émoji 🙂", "a<extra>b"]
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    ours = vlkit.from_pretrained(directory).tokenizer
    assert ours is not None and (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id)
    assert ours.backend.token_to_id("<extra>") == theirs.convert_tokens_to_ids("<extra>") == size
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids and ids[0] == theirs.bos_token_id, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    expected = theirs(texts, padding="max_length", max_length=ours.max_len, return_tensors="pt")
    assert torch.equal(ours(texts).input_ids, expected["input_ids"])
    exported = vlkit.export_hf(vlkit.from_pretrained(directory), tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(exported)
    assert [again(text)["input_ids"] for text in texts] == [theirs(text)["input_ids"] for text in texts]


def test_a_qwen2_directory_naming_no_pad_token_pads_with_qwen2_tokenizers_default(tmp_path: Path) -> None:
    """transformers 5 reads every qwen2 directory with Qwen2Tokenizer, whose pad token is ``<|endoftext|>`` when the
    configuration names none (vlkit used the end-of-sequence token, ``<|im_end|>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["a red circle and a blue square"] * 8, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    (tmp_path / "hf").mkdir()
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    _reference(
        "Qwen2", {**LLAMAS, "num_key_value_heads": 2, "vocab_size": backend.get_vocab_size(), "eos_token_id": 2}
    ).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                       "model_max_length": 32}))  # fmt: skip
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = vlkit.from_pretrained(tmp_path / "hf").tokenizer
    assert type(theirs).__name__ == "Qwen2Tokenizer" and theirs.pad_token == "<|endoftext|>"
    assert (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id) == (0, 2)
    texts = ["a red circle", "a blue square and a red circle"]
    expected = theirs(texts, padding="max_length", max_length=32, return_tensors="pt")
    assert torch.equal(ours(texts).input_ids, expected["input_ids"])

"""The decoder LM, its KV cache and generation: cached decoding equals recomputing everything, padding changes
nothing, each sampling option does what it says, cache slots can join and leave a running batch, and the loss ignores
-100 labels."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlkit
import vlkit.lm.model as lm_model
from vlkit.compiling import compiler_present
from vlkit.layers.linear import Linear, linear
from vlkit.lm import DecoderLM, GenerationConfig, KVCache, LMConfig, sample_logits, stream_generate
from vlkit.lm.generate import penalize_repetition

PRESETS = ["test_llama_lm", "test_qwen2_lm", "test_opt_lm"]


def _model(name: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    model = vlkit.create_model(name).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the argmax is decided by the input, not noise
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def _prompts(lengths: list[int], vocab: int, pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, max(lengths)) of random tokens (never 0-2, the special ids) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _right_padded(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_prompts``' rows with their padding on the right (pad id 0), as training batches are."""
    ids, mask = _prompts(lengths, vocab, 0, seed=seed)
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, length in enumerate(lengths):
        right_ids[row, :length], right_mask[row, :length] = ids[row, -length:], 1
    return right_ids, right_mask


def _greedy_without_cache(model: DecoderLM, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """The obvious reference: rerun the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, mask).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_backward(name: str) -> None:
    model = _model(name).train()
    ids, mask = _prompts([7, 5, 9], model.config.vocab_size, 0)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels)
    assert out.logits.shape == (3, 9, model.config.vocab_size)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: {param_name} got no gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_cached_generation_equals_uncached(name: str) -> None:
    model = _model(name)
    ids, mask = _prompts([6, 3, 8], model.config.vocab_size, 0)
    expected = _greedy_without_cache(model, ids, mask, steps=10)
    got = model.generate(ids, mask, max_new_tokens=10, stop_token_ids=())
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", PRESETS)
def test_left_padding_equals_each_row_alone(name: str) -> None:
    model = _model(name, seed=1)
    lengths = [4, 9, 6]
    ids, mask = _prompts(lengths, model.config.vocab_size, 0, seed=1)
    batched = model.generate(ids, mask, max_new_tokens=8, stop_token_ids=())
    with torch.no_grad():
        logits = model(ids, mask).logits
    for row, length in enumerate(lengths):
        alone = ids[row : row + 1, -length:]
        assert torch.equal(model.generate(alone, max_new_tokens=8, stop_token_ids=())[0, -8:], batched[row, -8:])
        with torch.no_grad():
            torch.testing.assert_close(model(alone).logits[0], logits[row, -length:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_right_padding_equals_each_row_alone(name: str) -> None:
    """Training batches are right-padded and run SDPA's causal kernel without a mask; the real tokens' logits and
    the loss must be each row's own, and a pad left of a real token (which the shortcut cannot take) too."""
    model = _model(name, seed=2)
    lengths = [4, 9, 6]
    right_ids, right_mask = _right_padded(lengths, model.config.vocab_size, seed=2)
    gap_mask = right_mask.clone()
    gap_mask[1, 2] = 0  # a pad inside the row: this row must not see position 2
    with torch.no_grad():
        logits = model(right_ids, right_mask).logits
        gapped = model(right_ids, gap_mask).logits
        for row, length in enumerate(lengths):
            alone = model(right_ids[row : row + 1, :length]).logits[0]
            torch.testing.assert_close(logits[row, :length], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(gapped[1, 3:9], logits[1, 3:9], atol=1e-4)
        torch.testing.assert_close(gapped[0, :4], logits[0, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple", [1, 8, 64])
@pytest.mark.parametrize("name", PRESETS)
def test_training_on_the_real_tokens_alone_equals_each_row_alone(
    name: str, multiple: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradients on, the blocks of a right-padded batch run on its real tokens only (``Unpadded``): the real
    tokens' logits, the loss and every gradient must be what the rows give alone, unpadded. The rows are rounded up
    to ``multiple`` with pads (and the head's to it with positions without a target): 1 takes none, 8 some, 64 all."""
    monkeypatch.setattr(lm_model, "ROW_MULTIPLE", multiple)
    real = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    rows = lm_model.Unpadded.of(real).index
    assert rows.numel() == {1: 6, 8: 8, 64: 12}[multiple] and int(real.flatten()[rows].sum()) == 6  # every real one
    model = _model(name, seed=3).train()
    lengths = [4, 9, 6]
    right_ids, right_mask = _right_padded(lengths, model.config.vocab_size, seed=3)
    labels = right_ids.masked_fill(right_mask == 0, -100)
    out = model(right_ids, right_mask, labels=labels)
    out.loss.backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    targets = sum(length - 1 for length in lengths)
    loss = torch.zeros(())
    for row, length in enumerate(lengths):
        alone = model(right_ids[row : row + 1, :length], labels=labels[row : row + 1, :length])
        torch.testing.assert_close(out.logits[row, :length], alone.logits[0], atol=1e-5, rtol=1e-5)
        loss = loss + alone.loss * (length - 1) / targets  # the batch's loss is the mean over all its targets
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    for name_, parameter in model.named_parameters():
        torch.testing.assert_close(batch_grads[name_], parameter.grad, atol=1e-5, rtol=1e-4, msg=name_)
    # Position ids broadcast over the batch (one row for all) give the same.
    positions = torch.arange(right_ids.shape[1])[None]
    torch.testing.assert_close(model(right_ids, right_mask, position_ids=positions, labels=labels).loss, out.loss)


def test_positions_past_max_seq_len() -> None:
    """RoPE has no length limit (the position tables grow); OPT's learned table does, and says so."""
    model = _model("test_llama_lm")
    ids, _ = _prompts([60], model.config.vocab_size, 0)
    out = model.generate(ids, max_new_tokens=10, stop_token_ids=())
    assert torch.equal(out, _greedy_without_cache(model, ids, torch.ones_like(ids), steps=10))
    with torch.no_grad():  # explicit position ids take the direct formula instead of the tables: same numbers
        direct = model(out, position_ids=torch.arange(out.shape[1])[None]).logits
        assert torch.equal(direct, model(out).logits)
    opt = _model("test_opt_lm")
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_len"):
        opt(torch.full((1, 65), 5))


def test_inputs_embeds_and_streaming() -> None:
    model = _model("test_llama_lm")
    ids, mask = _prompts([5, 7], model.config.vocab_size, 0)
    expected = model.generate(ids, mask, max_new_tokens=6, stop_token_ids=())
    streamed: list[torch.Tensor] = []
    new = model.generate(
        inputs_embeds=model.embed(ids),
        attention_mask=mask,
        max_new_tokens=6,
        stop_token_ids=(),
        streamer=streamed.append,
    )
    assert torch.equal(new, expected[:, -6:])  # only the new ids when the prompt came as embeddings
    assert torch.equal(torch.stack(streamed, dim=1), new)
    config = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    steps = list(stream_generate(model, ids, mask, config=config))
    assert len(steps) == 6 and torch.equal(torch.stack(steps, dim=1), new)


@pytest.mark.parametrize("name", PRESETS)
def test_bidirectional_blocks_in_the_cache_equal_recomputing(name: str) -> None:
    """Blocks (a VLM's image tokens) attend both ways within themselves: the cached prefill of a left-padded batch and
    the greedy tokens after it equal a full recomputation every step, and differ from causal attention."""
    model = _model(name, seed=3)
    ids, mask = _prompts([9, 6, 11], model.config.vocab_size, 0, seed=3)
    blocks = torch.full_like(ids, -1)
    blocks[0, 3:7], blocks[1, 6:9], blocks[2, 1:4], blocks[2, 5:9] = 0, 0, 0, 1  # real tokens; row 2 holds two blocks
    with torch.no_grad():
        full = model(ids, mask, attention_blocks=blocks).logits
        causal = model(ids, mask).logits
        cache = model.new_cache(3, 20)
        prefill = model.forward_head(model.forward_features(ids, mask, cache=cache.view([0, 1, 2]),
                                                            attention_blocks=blocks))  # fmt: skip
    real = mask.bool()
    torch.testing.assert_close(prefill[real], full[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[real], causal[real], atol=1e-3)
    got = model.generate(ids, mask, max_new_tokens=6, stop_token_ids=(), attention_blocks=blocks)
    current, current_mask, current_blocks = ids, mask, blocks
    with torch.no_grad():
        for _ in range(6):
            logits = model(current, current_mask, attention_blocks=current_blocks).logits[:, -1]
            current = torch.cat([current, logits.argmax(-1, keepdim=True)], dim=1)
            current_mask = torch.cat([current_mask, torch.ones_like(mask[:, :1])], dim=1)
            current_blocks = torch.cat([current_blocks, torch.full_like(blocks[:, :1], -1)], dim=1)
    assert torch.equal(got, current)
    assert not torch.equal(got, model.generate(ids, mask, max_new_tokens=6, stop_token_ids=()))


def test_generation_leaves_nothing_that_autograd_cannot_use() -> None:
    """Decoding runs in inference mode; what it hands back (streamed ids, the returned ids) and what it leaves on the
    model (rotary tables, packed weights) must still serve a training step, e.g. on the model's own samples."""
    model = _model("test_llama_lm")
    ids, mask = _prompts([5, 7], model.config.vocab_size, 0)
    streamed = list(stream_generate(model, ids, mask, config=GenerationConfig(max_new_tokens=4, stop_token_ids=())))
    sampled = model.generate(ids, mask, max_new_tokens=4, stop_token_ids=())
    assert not any(t.is_inference() for t in [*streamed, sampled])
    model.train()
    new = torch.stack(streamed, dim=1)
    out = model(inputs_embeds=model.embed(new), labels=new)  # an embedding lookup saves its ids for backward
    out.loss.backward()
    assert model.token_embed.weight.grad is not None and model.token_embed.weight.grad.abs().sum() > 0
    loss = model(sampled, torch.ones_like(sampled), labels=sampled).loss
    assert loss is not None
    loss.backward()


def test_top_k_one_equals_greedy_and_sampling_is_seeded() -> None:
    model = _model("test_qwen2_lm")
    ids, mask = _prompts([5, 8], model.config.vocab_size, 0)
    greedy = model.generate(ids, mask, max_new_tokens=8, stop_token_ids=())
    top1 = model.generate(ids, mask, max_new_tokens=8, stop_token_ids=(), do_sample=True, top_k=1, temperature=5.0)
    assert torch.equal(top1, greedy)

    def sampled(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(ids, mask, max_new_tokens=8, stop_token_ids=(), do_sample=True, generator=generator)

    assert torch.equal(sampled(0), sampled(0))
    assert not torch.equal(sampled(0), sampled(1))


def test_top_p_and_top_k_keep_exactly_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    generator = torch.Generator().manual_seed(0)
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> {0, 1}, drawn 5:3.
    draws = sample_logits(logits, top_p=0.7, generator=generator)
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03
    draws = sample_logits(logits, top_k=3, generator=generator)
    counts = torch.bincount(draws, minlength=4)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    # A low temperature sharpens towards the argmax.
    draws = sample_logits(logits, temperature=0.05, generator=generator)
    assert (draws == 0).float().mean() > 0.99


def test_repetition_penalty_as_defined() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(penalize_repetition(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))

    model = _model("test_llama_lm")
    ids, mask = _prompts([6, 4], model.config.vocab_size, 0)
    with torch.no_grad():
        last = model(ids, mask).logits[:, -1]
    seen = torch.zeros_like(last, dtype=torch.bool)
    for row in range(2):
        seen[row, ids[row][mask[row] == 1]] = True  # the prompt's real tokens; padding is not text
    expected = penalize_repetition(last, seen, 1.5).argmax(-1)
    first = model.generate(ids, mask, max_new_tokens=1, stop_token_ids=(), repetition_penalty=1.5)[:, -1]
    assert torch.equal(first, expected)
    # Strong enough, the penalty forbids repeating anything: 12 greedy tokens, all different from the prompt.
    out = model.generate(ids[:1, -6:], max_new_tokens=12, stop_token_ids=(), repetition_penalty=1e6)[0]
    assert len(set(out.tolist())) == len(out)


def test_stop_tokens_and_stop_strings() -> None:
    model = _model("test_llama_lm")
    ids, mask = _prompts([5, 7], model.config.vocab_size, 0)
    free = model.generate(ids, mask, max_new_tokens=10, stop_token_ids=())
    new = free[:, -10:]
    stop = int(new[0, 2])  # row 0 produces it at step 2; row 1 may or may not
    out = model.generate(ids, mask, max_new_tokens=10, stop_token_ids=(stop,), pad_token_id=0)
    first = {row: int((new[row] == stop).nonzero()[0]) if (new[row] == stop).any() else None for row in range(2)}
    for row in range(2):
        got = out[row, ids.shape[1] :]
        end = first[row]
        if end is None:
            assert torch.equal(got, new[row, : len(got)])
        else:
            assert torch.equal(got[: end + 1], new[row, : end + 1]) and (got[end + 1 :] == 0).all()
    if all(end is not None for end in first.values()):  # generation ends when every row has stopped
        assert out.shape[1] == ids.shape[1] + max(first.values()) + 1  # type: ignore[type-var]

    def decode(tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)

    text = decode(new[1].tolist())
    stop_string = text[3:5]  # completed by row 1's token 4 (or earlier if the letters repeat)
    out = model.generate(ids, mask, max_new_tokens=10, stop_token_ids=(), stop_strings=(stop_string,), decode=decode)
    generated = out[1, ids.shape[1] :].tolist()
    cut = next(i for i in range(10) if stop_string in decode(new[1, : i + 1].tolist()))
    assert generated[: cut + 1] == new[1, : cut + 1].tolist() and cut <= 4
    with pytest.raises(ValueError, match="decode"):
        model.generate(ids, mask, max_new_tokens=2, stop_strings=("x",))


def test_cache_slots_join_and_leave_a_running_batch() -> None:
    """Sequences in slots 0 and 2 (slot 1 freed in between) decode together with different lengths and give the
    same logits as each decoded alone."""
    model = _model("test_qwen2_lm")
    a, _ = _prompts([6], model.config.vocab_size, 0, seed=3)
    b, _ = _prompts([3], model.config.vocab_size, 0, seed=4)
    cache = model.new_cache(num_slots=3, max_len=32)
    assert cache.allocate(2) == [0, 1]
    cache.release([1])
    with pytest.raises(ValueError, match="not allocated"):
        cache.release([1])
    with pytest.raises(ValueError, match="slot 0 is not allocated"):  # named twice: nothing is freed
        cache.release([0, 0])
    with pytest.raises(ValueError, match="slot 1 is not allocated"):
        cache.release([0, 1])
    assert cache.allocate(2) == [1, 2]  # slot 0 is still held
    with torch.no_grad():  # a previous occupant leaves 12 positions in slot 2; its successor must never see them
        model(_prompts([12], model.config.vocab_size, 0, seed=5)[0], cache=cache.view([2]))
    cache.release([1, 2])
    assert cache.allocate(2) == [1, 2]
    cache.release([1])
    with pytest.raises(RuntimeError, match="free slots"):
        cache.allocate(2)

    def alone(ids: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
        own = model.new_cache(1, 32)
        view = own.view(own.allocate(1))
        with torch.no_grad():
            out = [model(ids, cache=view).logits[:, -1]]
            out += [model(torch.tensor([[t]]), cache=view).logits[:, -1] for t in steps]
        return out

    with torch.no_grad():
        model(a, cache=cache.view([0]))  # sequence a arrives first: prefill, then two steps alone
        model(torch.tensor([[5]]), cache=cache.view([0]))
        model(torch.tensor([[6]]), cache=cache.view([0]))
        b_prefill = model(b, cache=cache.view([2])).logits[:, -1]  # b joins
        joint = model(torch.tensor([[9], [7]]), cache=cache.view([2, 0])).logits[:, -1]  # one step, unequal lengths
    assert cache.lengths == [9, 0, 4]
    expected_a, expected_b = alone(a, [5, 6, 7])[-1], alone(b, [9])
    torch.testing.assert_close(b_prefill, expected_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[0], expected_b[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[1], expected_a[0], atol=1e-5, rtol=1e-5)
    cache.release([0, 2])
    assert cache.allocate(3) == [0, 1, 2] and cache.lengths == [0, 0, 0]


@pytest.mark.parametrize(("slots", "lengths", "sliced"), [([2, 0], [3, 0], False), ([1, 2], [2, 2], True)])
def test_cache_store_writes_every_layer_as_update_does(slots: list[int], lengths: list[int], sliced: bool) -> None:
    """``CacheStep.store`` (all layers at once, what a compiled decoding step returns) writes the same cache as
    ``update`` layer by layer: slots 2 and 0 at unequal lengths through index tensors, 1 and 2 through slices."""
    model = _model("test_llama_lm")
    config = model.config
    generator = torch.Generator().manual_seed(0)
    new = [torch.randn(config.depth, 2, config.num_kv_heads, 1, config.head_dim, generator=generator) for _ in "kv"]
    caches = []
    for write in ("update", "store"):
        cache = model.new_cache(num_slots=3, max_len=8)
        cache.allocate(3)
        for slot, length in zip(slots, lengths, strict=True):
            cache.lengths[slot] = length
        step = cache.view(slots).begin(1, None)
        assert step.sliced == sliced
        if write == "store":
            step.store(*new)
        else:
            for layer in range(config.depth):
                step.update(layer, new[0][layer], new[1][layer])
        caches.append(cache)
    for name in ("keys", "values", "key_bias"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name))
    assert caches[1].keys.abs().sum() > 0


def test_cache_errors_and_layout() -> None:
    model = _model("test_llama_lm")
    cache = model.new_cache(num_slots=2, max_len=8)
    config = model.config
    assert isinstance(cache, KVCache)
    assert cache.keys.shape == (config.depth, 2, config.num_kv_heads, 8, config.head_dim)
    view = cache.view(cache.allocate(1))
    with torch.no_grad(), pytest.raises(RuntimeError, match="overflow"):
        model(torch.arange(3, 12)[None], cache=view)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    model.compile_decoding = "on"  # the compiled step too names a view that does not match the batch
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), cache=view)
        with pytest.raises(ValueError, match="cache view has 2 slots for a batch of 1"):
            model.decode_step(torch.tensor([[7]]), cache.view([0, 1]))


def _labelled(model: DecoderLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ids and their labels, some positions ignored (-100)."""
    ids, _ = _prompts([8, 8], model.config.vocab_size, 0)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 3] = -100
    return ids, labels


def test_loss_ignores_minus_100() -> None:
    model = _model("test_opt_lm")
    ids, labels = _labelled(model)
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    only = torch.full_like(ids, -100)
    only[1, 6] = ids[1, 6]
    torch.testing.assert_close(model(ids, labels=only).loss, F.cross_entropy(out.logits[1, 5:6], ids[1, 6:7]))


def test_the_loss_alone_runs_the_head_at_the_targets_and_equals_the_full_pass() -> None:
    model = _model("test_opt_lm")
    ids, labels = _labelled(model)
    weights = torch.rand(ids.shape)
    full, alone = model(ids, labels=labels), model(ids, labels=labels, return_logits=False)
    assert alone.logits is None
    torch.testing.assert_close(alone.loss, full.loss)
    # Weighted: the weighted mean of the token losses, at the targets only.
    token_losses = F.cross_entropy(full.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    kept = weights[:, 1:] * (labels[:, 1:] != -100)
    expected = (token_losses * kept).sum() / kept.sum()
    torch.testing.assert_close(model(ids, labels=labels, loss_weights=weights).loss, expected)
    torch.testing.assert_close(model(ids, labels=labels, loss_weights=weights, return_logits=False).loss, expected)
    # The gradients agree too.
    model.zero_grad()
    full.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone.loss.backward()
    for before, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, before)
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, return_logits=False)


def test_config_validation_and_round_trip(tmp_path: Path) -> None:
    config = LMConfig(vocab_size=50, dim=32, depth=1, num_heads=4, mlp_dim=48)
    assert config.num_kv_heads == 4 and config.head_dim == 8
    with pytest.raises(ValueError, match="multiple"):
        LMConfig(dim=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="positions='rope'"):
        LMConfig(dim=32, num_heads=4, positions="learned", rope_scaling="linear")
    model = _model("test_qwen2_lm")
    model.save_pretrained(tmp_path / "m")
    loaded = vlkit.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    ids, _ = _prompts([5], model.config.vocab_size, 0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half = vlkit.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.generate(ids, max_new_tokens=3).shape == (1, 8)


def test_fast_linear_matches_f_linear() -> None:
    layer = torch.nn.Linear(40, 24)
    fast = Linear(40, 24)
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
        torch.testing.assert_close(linear(x[:, -1], layer.weight), F.linear(x[:, -1], layer.weight))
        packed = linear(x, layer.weight, layer.bias, pack=True)
        torch.testing.assert_close(packed, layer(x))
        layer.weight.mul_(-2)  # the packed copy follows changes of the weight
        torch.testing.assert_close(linear(x, layer.weight, layer.bias, pack=True), layer(x))
        assert not torch.allclose(packed, layer(x))
    out = fast(x)  # with autograd: the plain kernel, gradients flow
    out.sum().backward()
    assert fast.weight.grad is not None


def test_one_fp32_row_goes_to_f_linear_where_mkl_serves_it_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Intel CPUs (``MKL_ONE_ROW``) a single fp32 row skips oneDNN, packed or not: bit for bit ``F.linear``;
    several rows keep oneDNN's packed kernel, whichever the CPU."""
    from vlkit.layers import linear as fast_linear

    calls: list[str] = []
    plain = F.linear
    monkeypatch.setattr(fast_linear.F, "linear", lambda *args: calls.append("plain") or plain(*args))
    layer = torch.nn.Linear(40, 24)
    with torch.no_grad():
        for mkl in (True, False):
            monkeypatch.setattr(fast_linear, "MKL_ONE_ROW", mkl)
            for rows in ((1, 1, 40), (4, 1, 40)):
                calls.clear()
                x = torch.randn(rows)
                out = linear(x, layer.weight, layer.bias, pack=True)
                assert calls == (["plain"] if mkl and rows[0] == 1 else []), (mkl, rows)
                torch.testing.assert_close(out, plain(x, layer.weight, layer.bias))


def test_packed_weights_follow_an_optimizer_step_between_evaluations() -> None:
    # Generation in eval mode packs the weights; a (fused) optimizer step in train mode changes them in place; the
    # next evaluation must see the new weights, not the packed copies of the old ones.
    torch.manual_seed(0)
    model = vlkit.create_model("test_llama_lm")
    ids = torch.randint(3, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        model(ids)  # packs
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        packed = model(ids).logits
    model.set_weight_packing(False)
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(packed, plain)


def _scripted(model: DecoderLM, tokens: list[int]) -> DecoderLM:
    """``model`` whose head makes greedy decoding write ``tokens``, one per step (then repeat the last)."""
    steps = iter(range(10**6))

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], model.config.vocab_size), -10.0)
        logits[:, tokens[min(next(steps), len(tokens) - 1)]] = 10.0
        return logits

    model.forward_head = head  # type: ignore[method-assign]
    return model


def test_stop_strings_across_bytes_special_tokens_and_the_prompt() -> None:
    """Stop strings are matched as transformers' StopStringCriteria matches them: in the prompt's tail and the new
    tokens, with special tokens kept, however many byte tokens a character takes; one wholly inside the prompt
    does not stop."""
    from vlkit.text import train_tokenizer

    tokenizer = train_tokenizer(
        ["a red circle left of a blue square", "two green triangles above a small circle"] * 20,
        vocab_size=120,
        extra_special_tokens=("<|im_end|>",),
    )
    encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    config = LMConfig(vocab_size=tokenizer.vocab_size, max_seq_len=128, dim=32, depth=1, num_heads=2, mlp_dim=32)

    def run(prompt: str, written: str, stop: str) -> str:
        model = _scripted(DecoderLM(config).eval(), encode(written))
        model.tokenizer = tokenizer
        prompt_ids = torch.tensor([encode(prompt)])
        out = model.generate(prompt_ids, max_new_tokens=len(encode(written)), stop_strings=(stop,))
        return tokenizer.decode(out[0, prompt_ids.shape[1] :].tolist(), skip_special_tokens=False)

    # Each of these characters is several byte tokens: 5 characters, 15 bytes, more tokens than characters + 8.
    assert len(encode("停止生成吧")) > len("停止生成吧") + 8
    assert run("a red", " circle 停止生成吧 left of a blue square", "停止生成吧") == " circle 停止生成吧"
    assert run("a red", " circle<|im_end|> two green triangles", "<|im_end|>") == " circle<|im_end|>"
    assert run("two green", " triangles above a small circle", "green triangles") == " triangles"
    assert run("two green triangles", " above a small circle", "green triangles") == " above a small circle"


@pytest.mark.skipif(not compiler_present(), reason="inductor needs a C++ compiler on CPU")
@pytest.mark.parametrize(("name", "dtype", "lengths"), [("test_qwen2_lm", "float32", [9]),
                                                        ("test_opt_lm", "float32", [9]),
                                                        ("test_qwen2_lm", "bfloat16", [9]),
                                                        ("test_qwen2_lm", "float32", [9, 5, 7])])  # fmt: skip
def test_compiled_decoding_equals_eager(
    name: str, dtype: str, lengths: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile_decoding="on"``: each step of a decode after the prefill runs as one compiled function (every block,
    the attention over the cache, the head; a one-row product as a multiply-and-sum, several rows' products as the
    eager kernel) and gives the same greedy ids as eager decoding, and logits equal up to summation order in fp32
    (RoPE, QKV biases and pre-norm in Qwen2; learned positions, post-norm and every bias in OPT), every prompt left-
    padded (three rows: by different amounts). In bf16 the fused kernels round less often than the eager ops, so both
    are held against the fp32 model: no further off."""
    from vlkit.lm import model as lm_model

    monkeypatch.setitem(lm_model._DECODING, "failed", False)  # whatever an earlier test's compilation did
    model = _model(name).to(getattr(torch, dtype))
    ids, mask = _prompts(lengths, model.config.vocab_size, pad=0)
    pad = torch.zeros(len(lengths), 2, dtype=torch.long)  # left padding: the cache holds positions no query sees
    ids, mask = torch.cat([pad, ids], 1), torch.cat([pad, mask], 1)
    calls: list[tuple[int, int]] = []
    step = lm_model._decoding_step()

    def stepwise(model: DecoderLM, mode: str) -> torch.Tensor:
        """The fp32 logits of each one-token step after a prefill of the prompt, decoding ``eager``'s ids."""
        model.compile_decoding = mode
        view = model.new_cache(len(lengths), 32).view(range(len(lengths)))
        with torch.no_grad():
            model(eager[:, :11], mask, cache=view)
            return torch.stack([model.decode_step(eager[:, at : at + 1], view) for at in range(11, 21)]).float()

    model.compile_decoding = "off"
    eager = model.generate(ids, mask, max_new_tokens=10)
    reference = stepwise(model, "off")
    monkeypatch.setattr(
        lm_model, "_decoding_step", lambda: lambda *args: calls.append(args[3].shape[1:4:2]) or step(*args)
    )
    model.compile_decoding = "on"
    compiled = model.generate(ids, mask, max_new_tokens=10)
    # after the prefill (eager), 9 one-token steps of every row over the growing cache: (rows, stored positions)
    assert calls == [(len(lengths), stored) for stored in range(11, 20)]
    assert torch.equal(compiled, eager)
    logits = stepwise(model, "on")
    if dtype == "float32":
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    else:
        truth = stepwise(_model(name), "off")
        compiled_error, eager_error = (logits - truth).abs(), (reference - truth).abs()
        assert compiled_error.max() <= 1.25 * eager_error.max() and compiled_error.mean() <= 1.1 * eager_error.mean()
    assert not lm_model._DECODING["failed"]


def test_auto_compiles_decoding_after_enough_steps_of_a_large_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "auto" compiles only fp32 / bf16 steps on a CPU without gradients, of models with enough linear weights, where
    a compiler is present and MKL does not serve one row (Intel), and only once its eager steps have read
    ``AUTO_COMPILE_DECODING_BYTES_PER_LAYER`` of weights per layer (a bf16 step reads half as much; batched steps
    ``AUTO_COMPILE_BATCHED_FACTOR`` times as much); "off" never."""
    from vlkit.lm import model as lm_model

    model = _model("test_llama_lm")
    row, batch = torch.randn(1, 1, model.config.dim), torch.randn(2, 1, model.config.dim)
    step_bytes = model._linear_params * 4  # what one fp32 step reads
    monkeypatch.setattr(lm_model, "AUTO_COMPILE_DECODING_BYTES_PER_LAYER", 2 * step_bytes / model.config.depth)
    monkeypatch.setitem(lm_model._DECODING, "failed", False)
    monkeypatch.setattr(lm_model, "compiler_present", lambda: True)
    monkeypatch.setattr(lm_model, "MKL_ONE_ROW", False)
    with torch.no_grad():
        assert not model._compiles_decoding(row)  # too small for "auto"
        monkeypatch.setattr(lm_model, "COMPILE_DECODING_MIN_BYTES", 0)
        assert [model._compiles_decoding(row) for _ in range(4)] == [False, False, True, True]
        # batched steps are counted apart and wait AUTO_COMPILE_BATCHED_FACTOR times as long
        factor = lm_model.AUTO_COMPILE_BATCHED_FACTOR
        assert [model._compiles_decoding(batch) for _ in range(2 * factor + 1)] == [False] * 2 * factor + [True]
        assert model._compiles_decoding(row.bfloat16())
        assert not model._compiles_decoding(row.double())
        half = _model("test_llama_lm").bfloat16()
        assert [half._compiles_decoding(row.bfloat16()) for _ in range(5)] == [False] * 4 + [True]
        for blocker in ("MKL_ONE_ROW", "compiler_present"):
            with monkeypatch.context() as patch:
                patch.setattr(lm_model, blocker, True if blocker == "MKL_ONE_ROW" else lambda: False)
                assert not model._compiles_decoding(row)
        model.compile_decoding = "off"
        assert not model._compiles_decoding(row)
        model.compile_decoding = "on"
        assert lm_model.DecoderLM(model.config)._compiles_decoding(row) is False  # a new model starts at "auto"
        assert model._compiles_decoding(row)
    assert not model._compiles_decoding(row)  # with gradients: never


def test_compiled_decoding_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlkit.lm import model as lm_model

    def broken(function: object, **options: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(lm_model._DECODING, "failed", False)
    monkeypatch.setattr(lm_model, "_decoding_step", functools.cache(lm_model._decoding_step.__wrapped__))
    model = _model("test_llama_lm")
    ids, mask = _prompts([7], model.config.vocab_size, pad=0)
    model.compile_decoding = "off"
    eager = model.generate(ids, mask, max_new_tokens=6)
    model.compile_decoding = "on"
    with pytest.warns(UserWarning, match="compiling the decoding step failed .*no compiler here") as caught:
        assert torch.equal(model.generate(ids, mask, max_new_tokens=6), eager)
    assert len([w for w in caught if "decoding step" in str(w.message)]) == 1
    assert lm_model._DECODING["failed"]

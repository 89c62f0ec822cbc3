"""Decode speed: vlkit's ``DecoderLM.generate`` against transformers' ``generate`` on the same weights.

A Qwen2-style decoder of about 56 M parameters (dim 512, 8 layers, 8 query / 2 key-value heads, SwiGLU 1408, vocab
32000, untied head) is built by transformers with random weights, saved, and loaded by ``vlkit.from_pretrained``. The
prompt is what a VLM feeds its language model: 64 image positions (random embeddings) followed by a few text tokens,
given to both libraries as ``inputs_embeds`` (transformers' decoder-only ``generate`` accepts them) with an attention
mask; at batch 8 the text lengths differ, so rows are left-padded. Both decode greedily for the same number of new
tokens with no end-of-sequence token; the outputs must be identical.

vlkit is measured twice: as it decodes once ``DecoderLM.compile_decoding`` has compiled its steps (a long generation
or a server; "on" here, the compilation done before timing and its seconds reported) and eagerly ("off":
``vlkit_eager_tok_s``, what a short one-off answer gets). At batch 1 ``linear_only_compiled_tok_s``: the products back
to back in one compiled function (the multiply-and-sum reductions of the compiled steps; at 8 rows the compiled step
calls the eager kernels).

Decode speed excludes the prefill: rate = new tokens / (time(N new tokens) - time(1 new token)), best of
``--repeats`` (the two libraries alternate, so drifts of the machine's load hit both). At batch 1 decoding streams
every weight once per token, so the script also measures the memory bandwidth (sums over a 512 MB tensor: the median
of five rounds, each the best of three) and reports the bound = bandwidth / bytes of weights read per token (every
layer weight and the LM head, fp32; the embedding lookup reads one row). The bandwidth of the 2-core development
machines drifts within minutes (33-55 GB/s in one session), so one round is also measured before each repeat of the
decoding: ``bound_during_tok_s`` and ``fraction_of_bound_during`` use their median. ``linear_only_tok_s``: the rate if a
step were only its matrix products, run back to back through vlkit's kernels (what the GEMV kernels alone allow),
beside ``linear_only_f_linear_tok_s``, the same through ``F.linear`` (which kernel is faster differs by CPU).

    python bench/generate.py --threads 2 --out bench/results/generate.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import vlkit
from train_step import cpu_description

IMAGE_TOKENS = 64
CONFIG = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=1000000.0,
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)  # fmt: skip


def read_bandwidth(tensors: list[torch.Tensor], rounds: int = 5, repeats: int = 3) -> list[float]:
    """Bytes/s of summing ``tensors``: the best of ``repeats`` in each of ``rounds`` rounds (this machine's memory
    bandwidth drifts between rounds by up to 2x, so the rounds are reported, not only their best)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    rates = []
    for _ in range(rounds):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for tensor in tensors:
                tensor.sum()
            best = min(best, time.perf_counter() - start)
        rates.append(nbytes / best)
    return rates


def linear_only_rate(model: Any, batch: int, repeats: int = 7, plain: bool = False, compiled: bool = False) -> float:
    """Tokens/s if a decode step were nothing but its matrix products: every linear layer and the head run back to back
    through the same kernels as ``generate`` (the ceiling the kernels allow, without attention, norms or dispatch);
    ``plain``: through ``F.linear`` instead (MKL on CPU), the kernel transformers' decoding takes; ``compiled``: all
    of them in one compiled function (one row: the multiply-and-sum of vlkit's compiled decoding)."""
    from vlkit.layers.linear import linear

    weights = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w, _ in weights}

    def products() -> list[torch.Tensor]:
        if plain:
            return [torch.nn.functional.linear(inputs[w.shape[1]], w, b) for w, b in weights]
        return [linear(inputs[w.shape[1]], w, b, pack=model.pack_weights) for w, b in weights]

    run = torch.compile(products, dynamic=False) if compiled else products
    best = float("inf")
    with torch.no_grad():
        run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return batch / best


def _prompt(embed: torch.nn.Embedding, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds (B, 64 + text, D) and attention_mask: image embeddings, then 4..8 text tokens, left-padded."""
    generator = torch.Generator().manual_seed(seed)
    dim = embed.embedding_dim
    lengths = [8] if batch == 1 else [4 + row % 5 for row in range(batch)]
    width = IMAGE_TOKENS + max(lengths)
    embeds = torch.zeros(batch, width, dim)
    mask = torch.zeros(batch, width, dtype=torch.long)
    with torch.no_grad():
        for row, length in enumerate(lengths):
            image = torch.randn(IMAGE_TOKENS, dim, generator=generator) * 0.02
            text = embed(torch.randint(3, embed.num_embeddings, (length,), generator=generator))
            embeds[row, width - IMAGE_TOKENS - length :] = torch.cat([image, text])
            mask[row, width - IMAGE_TOKENS - length :] = 1
    return embeds, mask


def decode_rates(
    runs: dict[str, Any], batch: int, new_tokens: int, repeats: int, between: Any = None
) -> dict[str, Any]:
    """Per library: tokens/s of the decode steps alone (prefill subtracted) and the ids of its long run. The libraries
    alternate within each repeat, so a change in the machine's load or bandwidth hits both alike; best of repeats.
    ``between()`` runs before each repeat (the bandwidth measured beside the decoding)."""
    short = dict.fromkeys(runs, float("inf"))
    long = dict.fromkeys(runs, float("inf"))
    ids: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        if between is not None:
            between()
        for name, run in runs.items():
            start = time.perf_counter()
            run(1)
            short[name] = min(short[name], time.perf_counter() - start)
            start = time.perf_counter()
            ids[name] = run(new_tokens)
            long[name] = min(long[name], time.perf_counter() - start)
    return {name: (batch * (new_tokens - 1) / (long[name] - short[name]), ids[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    transformers.logging.set_verbosity_error()
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = vlkit.from_pretrained(directory).eval()
    params = sum(p.numel() for p in model.parameters())
    # Read per token: every parameter except the embedding table (one row of it).
    read_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "token_embed.weight")
    # Read bandwidth: a 512 MB tensor (the bound's definition), and the decoder's own weights (what decoding reads).
    big = [torch.ones(128 * 2**20)]
    rates = read_bandwidth(big)
    weight_rates = read_bandwidth([p for n, p in model.named_parameters() if n != "token_embed.weight"])
    bandwidth = statistics.median(rates)

    machine = cpu_description()
    results: dict[str, Any] = {
        "cpu": machine["cpu_model"],
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "amx": machine["amx"],
        "cpu_flags": machine["cpu_flags"],  # two "AMD EPYC" machines here differ: AVX-512 with bf16, or AVX2 only
        "model": {**CONFIG, "parameters": params, "bytes_read_per_token": read_bytes, "dtype": "float32"},
        "prompt": f"{IMAGE_TOKENS} image positions + 4-8 text tokens, as inputs_embeds in both libraries",
        "new_tokens": args.new_tokens,
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bandwidth_rounds_gb_s": [round(r / 1e9, 1) for r in rates],
        "weights_read_gb_s": [round(r / 1e9, 1) for r in weight_rates],
    }
    identical = True
    for batch in (1, 8):
        embeds, mask = _prompt(reference.model.embed_tokens, batch, seed=batch)

        def run_vlkit(
            n: int, embeds: torch.Tensor = embeds, mask: torch.Tensor = mask, compiled: bool = True
        ) -> torch.Tensor:
            model.compile_decoding = "on" if compiled else "off"
            return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n)

        def run_reference(n: int, embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> torch.Tensor:
            with torch.inference_mode():
                return reference.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, do_sample=False)

        runs = {"vlkit": run_vlkit, "reference": run_reference}
        row: dict[str, Any] = {}
        start = time.perf_counter()
        run_vlkit(3)  # compiles the decoding step for this batch (inductor's on-disk cache makes later runs faster)
        row["compile_seconds"] = round(time.perf_counter() - start, 1)
        runs["eager"] = functools.partial(run_vlkit, compiled=False)
        during: list[float] = []  # the bandwidth before each repeat: this machine's drifts within minutes
        rates = decode_rates(runs, batch, args.new_tokens, args.repeats,
                             between=lambda during=during: during.extend(read_bandwidth(big, rounds=1)))  # fmt: skip
        (ours, _), (theirs, their_ids) = rates["vlkit"], rates["reference"]
        identical = identical and all(
            torch.equal(ids, their_ids[:, -ids.shape[1] :])
            for _, ids in (rates[name] for name in runs if name != "reference")
        )
        bound = bandwidth / read_bytes
        row["bandwidth_during_gb_s"] = [round(r / 1e9, 1) for r in during]
        bound_during = statistics.median(during) / read_bytes
        row["bound_during_tok_s"] = round(bound_during, 1)
        row["fraction_of_bound_during"] = round(ours / batch / bound_during, 3)
        row["vlkit_eager_tok_s"] = round(rates["eager"][0], 1)
        if batch == 1:
            row["linear_only_compiled_tok_s"] = round(linear_only_rate(model, batch, compiled=True), 1)
        results[f"batch{batch}"] = {
            "vlkit_tok_s": round(ours, 1),
            "reference_tok_s": round(theirs, 1),
            "bound_tok_s": round(bound, 1),
            "linear_only_tok_s": round(linear_only_rate(model, batch), 1),
            "linear_only_f_linear_tok_s": round(linear_only_rate(model, batch, plain=True), 1),
            **row,
            "speedup": round(ours / theirs, 2),
            "fraction_of_bound": round(ours / batch / bound, 3),
        }
        print(f"batch {batch}: {results[f'batch{batch}']}", flush=True)
    results["greedy_identical"] = identical
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""NaViT packing vs pad-to-square: training throughput at the same number of images.

The same `navit_shapes` model, loss and optimizer train on the same ShapesWorld images at native aspect ratios
(1:2 to 2:1), fed two ways:

- pack: each image resized to a token budget drawn from [16, 64] patches at its own aspect ratio, packed
  first-fit-decreasing into 128-token sequences with a block-diagonal attention mask (what `navit_shapes` trains);
- pad_square: each image letterboxed into a 64 x 64 square (64 patches), one image per sequence.

Both process the same images; the script times full training steps (forward, backward, AdamW, bf16 autocast, as
the trainer runs them, data preparation excluded) and reports images/s, tokens/s and the padding of each. The two
policies alternate, and the median over rounds is reported.

    python bench/navit_throughput.py --out bench/results/navit_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlkit import create_model
from vlkit.data import shapes
from vlkit.losses import SigLipLoss
from vlkit.recipes.family import NAVIT_SHAPES_DATA
from vlkit.tasks.navit import MAX_PATCHES, MIN_PATCHES, input_policy


def _samples(count: int, text_len: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(count):
        ids = torch.randint(3, vocab, (text_len,), generator=generator)
        ids[-1] = 2  # end of text: the causal text tower pools there
        samples.append({"image": shapes.generate(NAVIT_SHAPES_DATA, "train", index).image, "input_ids": ids,
                        "attention_mask": torch.ones(text_len, dtype=torch.long)})  # fmt: skip
    return samples


def _batches(policy: str, samples: list[dict], images_per_batch: int, sequence_slots: int) -> list[dict]:
    """Collated batches of one policy over the same images (``images_per_batch`` drawn per batch)."""
    pack = policy == "pack"
    setup = input_policy(
        policy,
        num_sequences=128,
        min_patches=MIN_PATCHES if pack else None,
        seq_len=sequence_slots * MAX_PATCHES if pack else None,
    )
    items = [{"pixels": setup.transform(s["image"]), "input_ids": s["input_ids"],
              "attention_mask": s["attention_mask"]} for s in samples]  # fmt: skip
    dataset = setup.wrap_dataset(items)
    return [
        setup.collate_fn([dataset[index] for index in range(start, min(start + images_per_batch, len(items)))])
        for start in range(0, len(items), images_per_batch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=729)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sequence-slots", type=int, default=2, help="packed sequence length in 64-token squares")
    parser.add_argument("--out", default="bench/results/navit_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model("navit_shapes")
    loss_fn = SigLipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = _samples(args.images, text_len=16, vocab=model.config.text.vocab_size)
    # pack: 243 images per batch into 64 x 128 token slots (navit_shapes' 1.9x); pad_square: 128 images per batch.
    policies = {
        "pack": _batches("pack", samples, 243, args.sequence_slots),
        "pad_square": _batches("pad_square", samples, 128, 1),
    }
    steps = {name: input_policy(name, 128, min_patches=MIN_PATCHES).step_fn(loss_fn) for name in policies}

    def run(name: str) -> tuple[float, int, int, int]:
        images = tokens = slots = 0
        start = time.perf_counter()
        for batch in policies[name]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = steps[name](model, batch)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if name == "pack":
                segments = batch["segment_ids"]
                images += len(batch["kept"])
                tokens += int((segments >= 0).sum())
                slots += segments.numel()
            else:
                images += batch["pixels"].shape[0]
                tokens += batch["pixels"].shape[0] * MAX_PATCHES
                slots += batch["pixels"].shape[0] * MAX_PATCHES
        return time.perf_counter() - start, images, tokens, slots

    run("pack")  # warm-up (allocator, oneDNN kernels for both shapes)
    run("pad_square")
    timings: dict[str, list[float]] = {name: [] for name in policies}
    counts: dict[str, tuple[int, int, int]] = {}
    for _ in range(args.rounds):
        for name in policies:
            seconds, images, tokens, slots = run(name)
            timings[name].append(seconds)
            counts[name] = (images, tokens, slots)
    results = {}
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        images, tokens, slots = counts[name]
        results[name] = {
            "images": images, "seconds": median, "images_per_second": images / median,
            "tokens_per_image": tokens / images, "padding_fraction": 1 - tokens / slots,
        }  # fmt: skip
    # pad_square's token padding is 0, but its letterbox pixels are padding too: report the image-area share.
    results["pack_over_pad_square_images_per_second"] = (
        results["pack"]["images_per_second"] / results["pad_square"]["images_per_second"]
    )
    results["settings"] = {"images": args.images, "rounds": args.rounds, "threads": args.threads, "precision": "bf16",
                           "sequence_slots": args.sequence_slots}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name in policies:
        row = results[name]
        print(f"{name:11s} {row['images']:5d} images  {row['images_per_second']:7.1f} images/s  "
              f"{row['tokens_per_image']:5.1f} tokens/image  padding {row['padding_fraction']:.3f}")  # fmt: skip
    print(f"pack / pad_square images/s: {results['pack_over_pad_square_images_per_second']:.2f}")


if __name__ == "__main__":
    main()

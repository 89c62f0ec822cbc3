"""Dataset readers, image transform, WebDataset streaming and the resumable sampler."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlkit.data.images import BadSampleError
from vlkit.data.readers import (
    ImageTextDataset,
    ImageTextRecord,
    ReadResult,
    ResumableSampler,
    WebDatasetSource,
    collate_image_text,
    read_csv,
    read_manifest,
    read_records,
)
from vlkit.data.shards import make_webdataset, webdataset_caption_sample
from vlkit.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform


def number_tokenize(text: str) -> list[int]:
    """Whitespace tokenizer: a number word is its own id, any other word is id 1."""
    return [int(word) if word.isdigit() else 1 for word in text.split()]


def save_image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# Manifest, CSV, dispatch ----------------------------------------------------------------------------------------


def test_manifest_resolves_relative_and_absolute_paths(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "b.png"
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.parent.mkdir()
    lines = [
        {"image": "images/a.png", "caption": " a red square ", "source": "synthetic"},
        {"image": str(elsewhere), "captions": ["first caption", "second caption"]},
        {"image": "../data/./images/c.png", "caption": "normalised path"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = read_manifest(manifest)
    assert isinstance(result, ReadResult) and result.skipped == []
    first, second, third = result.records
    assert first.image == str(manifest.parent / "images" / "a.png")
    assert first.captions == ["a red square"]
    assert first.meta == {"source": "synthetic"}
    assert first.item == f"{manifest}:1"
    assert second.image == str(elsewhere)
    assert second.captions == ["first caption", "second caption"]
    assert third.image == str(manifest.parent / "images" / "c.png")


def test_csv_and_tsv_read_open_clip_format(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    table.write_text('filepath,caption,width\nimages/a.png,"a cat, sitting",640\n/abs/b.png,a dog,480\n')
    records = read_csv(table).records
    assert [record.image for record in records] == [str(tmp_path / "images" / "a.png"), "/abs/b.png"]
    assert [record.captions for record in records] == [["a cat, sitting"], ["a dog"]]
    assert records[0].meta == {"width": "640"} and records[1].item == f"{table}:3"

    tab_table = tmp_path / "train.tsv"
    tab_table.write_text("path\ttext\nx.png\ta bird\n")
    with pytest.raises(BadSampleError, match="header has no column"):
        read_records(tab_table)  # read as TSV, but the default column names do not match this file's
    tab_records = read_csv(tab_table, image_key="path", caption_key="text", sep="\t").records
    assert tab_records[0].captions == ["a bird"]

    # An unclosed quote is an error naming the row, not a caption that swallows the rest of the file.
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('filepath,caption\na.png,a red square\nb.png,"a blue circle\nc.png,a green star\n')
    with pytest.raises(BadSampleError, match=f"{unclosed}:3: malformed CSV row"):
        read_csv(unclosed)


def test_read_records_dispatches_on_kind(tmp_path: Path) -> None:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "x"}\n')
    assert isinstance(read_records(manifest), ReadResult)
    shard_folder = tmp_path / "shards"
    shard_folder.mkdir()
    for index in range(3):
        with wds.TarWriter(str(shard_folder / f"shard-{index:03d}.tar")) as writer:
            writer.write({"__key__": "k", "txt": b"x"})
    from_folder = read_records(shard_folder)
    from_pattern = read_records(f"{shard_folder}/shard-{{000..002}}.tar")
    assert isinstance(from_folder, WebDatasetSource)
    assert from_folder == from_pattern
    assert [Path(url).name for url in from_folder.urls] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    with pytest.raises(FileNotFoundError, match=r"shard-003\.tar"):
        read_records(f"{shard_folder}/shard-{{000..003}}.tar")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        read_records(tmp_path / "train.parquet")


# Transform ------------------------------------------------------------------------------------------------------


def test_transform_resizes_shorter_side_and_centre_crops() -> None:
    # A wide image: left third red, middle green, right third blue; the centre crop keeps only green.
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0] = pixels[:, 30:60, 1] = pixels[:, 60:, 2] = 255
    output = ImageTransform(10)(Image.fromarray(pixels))
    assert output.shape == (3, 10, 10) and output.dtype == torch.float32
    unnormalised = output * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(
        unnormalised[:, 2:8, 2:8].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=0.02, rtol=0
    )
    assert torch.equal(output, ImageTransform(10)(Image.fromarray(pixels)))


def test_a_thin_strip_is_not_upscaled_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20000 x 1 strip: CLIP's order (resize the short side, then crop) would make a 1 G-pixel image; only the
    kept region is resampled, to the same colours."""
    strip = np.zeros((1, 20000, 3), dtype=np.uint8)
    strip[:, 9990:10010, 1] = 255  # green in the middle, where the crop is
    transform = ImageTransform(224)
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda image, size, *a, **k: sizes.append(size) or resize(image, size, *a, **k)
    )
    output = transform(Image.fromarray(strip))
    assert max(width * height for width, height in sizes) <= 16 * 224 * 224
    unnormalised = output * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert output.shape == (3, 224, 224)
    torch.testing.assert_close(unnormalised.mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=0.02, rtol=0)
    # At 16:1 and below the whole image is resized first, as CLIP's preprocessing does.
    wide = np.random.default_rng(0).integers(0, 256, (14, 224, 3), dtype=np.uint8)
    resized = Image.fromarray(wide).resize((3584, 224), Image.Resampling.BICUBIC).crop((1680, 0, 1904, 224))
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(transform(Image.fromarray(wide)), (expected - mean) / std)


def test_transform_modes_and_rectangular_size() -> None:
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    assert ImageTransform((12, 18))(image).shape == (3, 12, 18)
    assert ImageTransform((12, 18), resize_mode="squash")(image).shape == (3, 12, 18)
    padded = ImageTransform(16, resize_mode="pad")(image)
    assert padded.shape == (3, 16, 16)
    # The pad band (top rows) is the mean colour, which normalises to about zero; the image rows do not.
    assert padded[:, 0].abs().max() < 0.01
    assert padded[:, 8].min() > 1.0
    with pytest.raises(ValueError, match="resize_mode"):
        ImageTransform(16, resize_mode="stretch")  # type: ignore[arg-type]


# Map-style dataset ----------------------------------------------------------------------------------------------


def test_dataset_batches_pad_tokens_and_masks(tmp_path: Path) -> None:
    records = []
    for index in range(5):
        save_image(tmp_path / f"{index}.png", colour=(index * 40, 0, 0))
        captions = [f"caption {index}"] + [f"alternative {index} {100 + index}"] * (index % 2)
        records.append(ImageTextRecord(str(tmp_path / f"{index}.png"), captions, f"m:{index + 1}"))
    dataset = ImageTextDataset(records, ImageTransform(8), number_tokenize, max_text_len=6, caption_choice="first")
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_image_text)
    batches = list(loader)
    assert [batch["pixels"].shape for batch in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    first = batches[0]
    assert first["input_ids"].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert first["index"].tolist() == [0, 1] and first["skipped"] == 0
    # A tokenizer that pads on the left (SigLIP 2's in transformers) trains on what its processor feeds at inference.
    left = ImageTextDataset(records, ImageTransform(8), number_tokenize, max_text_len=6, caption_choice="first",
                            pad_id=9, pad_left=True)  # fmt: skip
    assert left[1]["input_ids"].tolist() == [9, 9, 9, 9, 1, 1]
    assert left[1]["attention_mask"].tolist() == [0, 0, 0, 0, 1, 1]


def test_random_caption_choice_depends_only_on_seed_epoch_and_index(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    captions = [f"caption {number}" for number in range(2, 10)]
    records = [ImageTextRecord(str(tmp_path / "a.png"), captions, f"m:{index}") for index in range(40)]

    def chosen(seed: int, epoch: int) -> list[int]:
        dataset = ImageTextDataset(records, ImageTransform(4), number_tokenize, max_text_len=4, seed=seed)
        dataset.set_epoch(epoch)
        return [int(dataset[index]["input_ids"][1]) for index in range(len(dataset))]

    assert chosen(0, 0) == chosen(0, 0)
    assert chosen(0, 0) != chosen(0, 1)
    assert chosen(0, 1) != chosen(1, 0)
    assert len(set(chosen(0, 0))) > 3


def test_dataset_keeps_resized_pixels_within_its_budget(tmp_path: Path) -> None:
    records = []
    for index in range(4):
        save_image(tmp_path / f"{index}.png", colour=(index * 60, 30, 200 - index * 40), size=(12, 10))
        records.append(ImageTextRecord(str(tmp_path / f"{index}.png"), [f"caption {index}"], f"m:{index + 1}"))
    transform = ImageTransform(8)
    expected = [transform(Image.open(record.image)) for record in records]
    kept = ImageTextDataset(records, transform, number_tokenize, max_text_len=4)  # 4 x 8 x 8 x 3 bytes: kept
    fresh = ImageTextDataset(records, transform, number_tokenize, max_text_len=4, cache_bytes=0)
    tight = ImageTextDataset(records, transform, number_tokenize, max_text_len=4, cache_bytes=4 * 8 * 8 * 3 - 1)
    for index in range(4):
        for dataset in (kept, fresh, tight):
            item = dataset[index]["pixels"]
            assert torch.equal(item, expected[index])
            item.add_(1.0)  # an item is the caller's own: changing it changes no later read
    for record in records:
        Path(record.image).unlink()
    # The kept pixels are read without the file; a dataset that keeps nothing (or is over its budget) reads it.
    assert all(torch.equal(kept[index]["pixels"], expected[index]) for index in range(4))
    for dataset in (fresh, tight):
        with pytest.raises(BadSampleError, match="image file not found"):
            dataset[0]
    # A pickled copy (a spawned DataLoader worker) starts without the cache.
    copy = pickle.loads(pickle.dumps(kept))
    with pytest.raises(BadSampleError, match="image file not found"):
        copy[0]


def test_transform_halves_make_the_transform() -> None:
    rng = np.random.default_rng(0)
    for size, mode in ((8, "shortest_crop"), ((6, 10), "squash"), (8, "pad"), (12, "shortest_crop")):
        transform = ImageTransform(size, resize_mode=mode)
        image = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
        pixels = transform.resize(image)
        assert pixels.dtype == np.uint8 and pixels.shape == (*transform.size, 3)
        assert torch.equal(transform.normalise(pixels), transform(image))
    # An image already at the size is taken as it is.
    square = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.array_equal(ImageTransform(8).resize(square), np.asarray(square))


# WebDataset -----------------------------------------------------------------------------------------------------


def write_shards(folder: Path, num_shards: int, per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as writer:
            for offset in range(per_shard):
                number = shard * per_shard + offset
                encoded = io.BytesIO()
                Image.new("RGB", (10, 7), (number, 0, 0)).save(encoded, format="PNG")
                sample = {"__key__": f"sample{number:04d}", "png": encoded.getvalue()}
                if number % 2:
                    sample["json"] = json.dumps({"caption": f"caption {number}"}).encode()
                else:
                    sample["txt"] = f"caption {number}".encode()
                writer.write(sample)
    return f"{folder}/shard-{{000..{num_shards - 1:03d}}}.tar"


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_webdataset_with_two_workers_reads_every_sample_once(tmp_path: Path, shuffle_buffer: int) -> None:
    urls = write_shards(tmp_path / "shards", num_shards=4, per_shard=5)
    dataset = make_webdataset(urls, ImageTransform(8), number_tokenize, max_text_len=4, shuffle_buffer=shuffle_buffer)

    def read_epoch(epoch: int) -> list[int]:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_image_text)
        numbers = []
        for batch in loader:
            assert batch["pixels"].shape[1:] == (3, 8, 8) and batch["skipped"] == 0
            numbers += batch["input_ids"][:, 1].tolist()
        return numbers

    first_pass = read_epoch(0)
    assert sorted(first_pass) == list(range(20))
    assert read_epoch(0) == first_pass
    if shuffle_buffer:
        assert read_epoch(1) != first_pass


# Sampler --------------------------------------------------------------------------------------------------------


def test_sampler_order_is_a_deterministic_permutation_per_epoch() -> None:
    sampler = ResumableSampler(range(50), seed=3)
    epoch_zero = list(sampler)
    assert sorted(epoch_zero) == list(range(50)) and epoch_zero != list(range(50))
    assert list(ResumableSampler(range(50), seed=3)) == epoch_zero
    sampler.set_epoch(1)
    assert list(sampler) != epoch_zero
    assert list(ResumableSampler(range(50), seed=4)) != epoch_zero
    assert list(ResumableSampler(range(50), shuffle=False)) == list(range(50))


def test_sampler_resume_continues_the_uninterrupted_order() -> None:
    dataset = list(range(37))
    batch_size = 4

    def loader_for(sampler: ResumableSampler) -> DataLoader:
        # Workers prefetch, so the sampler has yielded more than the trainer consumed when it stops.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=2, prefetch_factor=2)

    reference = ResumableSampler(dataset, seed=7)
    reference.set_epoch(2)
    uninterrupted = [index for batch in loader_for(reference) for index in batch.tolist()]

    interrupted = ResumableSampler(dataset, seed=7)
    interrupted.set_epoch(2)
    consumed = []
    for step, batch in enumerate(loader_for(interrupted)):
        consumed += batch.tolist()
        interrupted.advance(batch_size)
        if step == 2:
            break
    saved = interrupted.state_dict()
    assert saved["epoch"] == 2 and saved["position"] == 3 * batch_size

    resumed = ResumableSampler(dataset, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    resumed.set_epoch(2)  # the training loop's usual call at the top of the epoch keeps the position
    rest = [index for batch in loader_for(resumed) for index in batch.tolist()]
    assert consumed + rest == uninterrupted

    # The trainer can equally compute the position itself from the batches it consumed.
    computed = ResumableSampler(dataset, seed=7)
    computed.load_state_dict({"epoch": 2, "position": 3 * batch_size})
    assert list(computed) == uninterrupted[3 * batch_size :]

    resumed.set_epoch(3)
    assert resumed.position == 0 and len(list(resumed)) == len(dataset)


def test_sampler_refuses_a_state_from_a_different_setup() -> None:
    state = ResumableSampler(range(10), seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(range(10), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_replicas"):
        ResumableSampler(range(10), seed=1, num_replicas=2).load_state_dict(state)


@pytest.mark.parametrize(("num_samples", "num_replicas"), [(10, 3), (12, 4), (2, 3)])
def test_sampler_rank_split_covers_every_index(num_samples: int, num_replicas: int) -> None:
    per_rank = [
        list(ResumableSampler(range(num_samples), seed=5, num_replicas=num_replicas, rank=rank))
        for rank in range(num_replicas)
    ]
    expected_length = -(-num_samples // num_replicas)
    assert all(len(indices) == expected_length for indices in per_rank)
    combined = [index for indices in per_rank for index in indices]
    assert set(combined) == set(range(num_samples))
    # Wrapping pads with repeats of the permutation's first indices only.
    assert len(combined) - num_samples == expected_length * num_replicas - num_samples
    single = list(ResumableSampler(range(num_samples), seed=5))
    padded = (single * num_replicas)[: expected_length * num_replicas]
    assert per_rank[1] == padded[1::num_replicas]


def test_webdataset_captions_for_the_tokenizer_read_as_training_reads(tmp_path: Path) -> None:
    """Through webdataset's reader: a pipe: URL works, a truncated shard gives what precedes the damage, and a
    caption's byte-order mark is no part of it."""
    pattern = write_shards(tmp_path / "shards", num_shards=1, per_shard=6)
    expected = [f"caption {number}" for number in range(6)]
    assert webdataset_caption_sample(pattern) == expected
    assert webdataset_caption_sample(f"pipe:cat {tmp_path}/shards/shard-000.tar") == expected
    assert webdataset_caption_sample(pattern, limit=4) == expected[:4]
    data = (tmp_path / "shards" / "shard-000.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ReadError"):
        partial = webdataset_caption_sample(str(tmp_path / "truncated.tar"))
    assert 0 < len(partial) < len(expected) and partial == expected[: len(partial)]
    with wds.TarWriter(str(tmp_path / "bom.tar")) as writer:
        encoded = io.BytesIO()
        Image.new("RGB", (4, 4)).save(encoded, format="PNG")
        writer.write({"__key__": "a", "png": encoded.getvalue(), "txt": "\ufeffa red square".encode()})
    assert webdataset_caption_sample(str(tmp_path / "bom.tar")) == ["a red square"]

"""Bad and odd input: every case gives an RGB image or a ``BadSampleError`` naming the item, and skips count."""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlkit.data.images import BadSampleError, decode_image_bytes, load_image, to_rgb
from vlkit.data.readers import (
    ImageTextDataset,
    ImageTextRecord,
    collate_image_text,
    read_csv,
    read_manifest,
)
from vlkit.data.shards import make_webdataset
from vlkit.data.transforms import ImageTransform


def whitespace_tokenize(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def save_noise_image(path: Path, image_format: str, size: int = 64) -> None:
    # Noise does not compress, so cutting the file in half really removes pixel data.
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=image_format)


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no pixel data: tiny on disk, and decoding
    it would fail (or need gigabytes), so a refusal that names the pixel count proves the check came first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixel_data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel_data) + chunk(b"IEND", b""))


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return tuple(int(value) for value in np.asarray(image)[y, x])


# Broken files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_image_is_refused(tmp_path: Path, image_format: str) -> None:
    path = tmp_path / f"cut.{image_format.lower()}"
    save_noise_image(path, image_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError) as caught:
        load_image(path)
    assert caught.value.item == str(path)
    assert "truncated" in caught.value.reason


def test_truncated_bytes_are_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(buffer, format="PNG")
    with pytest.raises(BadSampleError, match=r"^shard-000\.tar:key7: .*truncated"):
        decode_image_bytes(buffer.getvalue()[:-30], item="shard-000.tar:key7")


def test_zero_byte_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadSampleError) as caught:
        load_image(path)
    assert str(caught.value) == f"{path}: image file is empty (0 bytes)"


def test_text_file_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(BadSampleError, match="not a recognised image format") as caught:
        load_image(path)
    assert caught.value.item == str(path)


def test_missing_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(BadSampleError, match="not found") as caught:
        load_image(path)
    assert caught.value.item == str(path)


def test_gigantic_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    write_png_header_only(path, 100_000, 100_000)
    assert path.stat().st_size < 1000
    with pytest.raises(BadSampleError, match="decompression bomb") as caught:
        load_image(path)
    assert caught.value.item == str(path)


def test_image_over_the_default_limit_is_refused_by_vlkit_check(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    write_png_header_only(path, 10_000, 10_000)
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice its limit; vlkit's own check must refuse.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(BadSampleError, match="10000x10000 = 100000000 pixels; the limit is 89478485"):
            load_image(path)


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "claims_20x20.png"
    write_png_header_only(path, 20, 20)
    with pytest.raises(BadSampleError, match="20x20 = 400 pixels; the limit is 399"):
        load_image(path, max_pixels=399)
    real = tmp_path / "real_20x20.png"
    save_noise_image(real, "PNG", size=20)
    assert load_image(real, max_pixels=400).size == (20, 20)


def test_bad_sample_error_is_one_line_and_pickles() -> None:
    error = BadSampleError("train.jsonl:17", "caption is empty")
    assert str(error) == "train.jsonl:17: caption is empty"
    restored = pickle.loads(pickle.dumps(error))
    assert (restored.item, restored.reason, str(restored)) == (error.item, error.reason, str(error))
    assert isinstance(error, ValueError)


# Odd but valid images -------------------------------------------------------------------------------------------


def test_one_by_one_image_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    image = load_image(path)
    assert image.size == (1, 1) and rgb_at(image, 0, 0) == (10, 20, 30)
    assert ImageTransform(8)(image).shape == (3, 8, 8)


def test_mode_l_becomes_grey_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (2, 2), 100).save(path)
    assert rgb_at(load_image(path), 1, 1) == (100, 100, 100)


def test_mode_1_becomes_black_and_white(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    image.save(path)
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (0, 0, 0) and rgb_at(loaded, 1, 0) == (255, 255, 255)


def test_mode_p_with_transparency_composites_on_white(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (255, 255, 255)
    assert rgb_at(loaded, 1, 0) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_colour_key_composites_on_white(tmp_path: Path, mode: str) -> None:
    """A greyscale or RGB PNG whose tRNS chunk marks one colour transparent (black here) is white there, as a
    transparent palette index is; other pixels keep their colour."""
    path = tmp_path / f"{mode}.png"
    black, grey = (0, (0, 0, 0)), (128, (128, 128, 128))
    image = Image.new(mode, (2, 1), black[0] if mode == "L" else black[1])
    image.putpixel((1, 0), grey[0] if mode == "L" else grey[1])
    image.save(path, transparency=black[0] if mode == "L" else black[1])
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (255, 255, 255) and rgb_at(loaded, 1, 0) == (128, 128, 128)


def test_mode_p_without_transparency_uses_palette(tmp_path: Path) -> None:
    path = tmp_path / "palette.gif"
    image = Image.new("P", (1, 1), 0)
    image.putpalette([0, 200, 0] + [0, 0, 0] * 255)
    image.save(path)
    assert rgb_at(load_image(path), 0, 0) == (0, 200, 0)


def test_mode_rgba_composites_on_white_not_black(tmp_path: Path) -> None:
    path = tmp_path / "logo.png"
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (255, 0, 0, 128))
    image.save(path)
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (255, 255, 255)
    assert rgb_at(loaded, 1, 0) == (255, 0, 0)
    red, green, blue = rgb_at(loaded, 2, 0)
    assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1


def test_mode_la_composites_on_white(tmp_path: Path) -> None:
    path = tmp_path / "grey_alpha.png"
    image = Image.new("LA", (2, 1), (50, 255))
    image.putpixel((1, 0), (50, 0))
    image.save(path)
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (50, 50, 50) and rgb_at(loaded, 1, 0) == (255, 255, 255)


def test_mode_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.tiff"
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    image.save(path)
    loaded = load_image(path)
    assert rgb_at(loaded, 0, 0) == (255, 255, 255)
    assert rgb_at(loaded, 1, 0) == (0, 255, 255)


def test_mode_i16_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 65535, 32768, 257]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = load_image(path)
    assert [rgb_at(loaded, x, 0)[0] for x in range(4)] == [0, 255, 128, 1]


def test_mode_i_is_read_as_sixteen_bit() -> None:
    image = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert image.mode == "I"
    assert [rgb_at(to_rgb(image), x, 0)[0] for x in range(4)] == [0, 255, 255, 0]


def test_mode_f_unit_range_is_scaled() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    assert [rgb_at(to_rgb(image), x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    # The stored left (red) half ends up on top once rotated clockwise.
    top, bottom = rgb_at(loaded, 10, 5), rgb_at(loaded, 10, 35)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# Broken manifest and CSV lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"image": "a.png", "caption": "unterminated', "malformed JSON"),
        ('["a.png", "a caption"]', "expected a JSON object, got array"),
        ('{"caption": "a cat"}', "missing 'image' key"),
        ('{"image": 7, "caption": "a cat"}', "'image' must be a non-empty string"),
        ('{"image": "a.png", "caption": ""}', "'caption' is empty"),
        ('{"image": "a.png", "caption": "   "}', "'caption' is empty"),
        ('{"image": "a.png"}', "missing 'caption'"),
        ('{"image": "a.png", "caption": 3}', "'caption' must be a string, got number"),
        ('{"image": "a.png", "captions": ["a cat", 3]}', r"'captions'\[1\] must be a string, got number"),
        ('{"image": "a.png", "captions": []}', "'captions' is an empty list"),
        ('{"image": "a.png", "captions": "a cat"}', "'captions' must be a list of strings"),
        ('{"image": "a.png", "caption": "a", "captions": [""]}', r"'captions'\[0\] is empty"),
    ],
)
def test_malformed_manifest_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"image": "good.png", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(BadSampleError, match=reason) as caught:
        read_manifest(manifest)
    assert caught.value.item == f"{manifest}:3"
    assert str(caught.value).startswith(f"{manifest}:3: ")


def test_manifest_skip_bad_counts_skipped_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "train.jsonl"
    lines = [
        '{"image": "a.png", "caption": "good one"}',
        "{not json",
        '{"caption": "no image"}',
        '{"image": "b.png", "caption": ""}',
        '{"image": "c.png", "captions": ["ok", null]}',
        "",
        '{"image": "d.png", "captions": ["good", "two"]}',
    ]
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "\xff.png", "caption": "x"}\n')
    result = read_manifest(manifest, skip_bad=True)
    assert [Path(record.image).name for record in result.records] == ["a.png", "d.png"]
    assert [error.item for error in result.skipped] == [f"{manifest}:{number}" for number in (2, 3, 4, 5, 8)]
    assert "not valid UTF-8" in result.skipped[-1].reason


def test_csv_bad_rows_name_lines_and_skip_counts(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    table.write_text('filepath,caption\na.png,a cat\nb.png,\nc.png,"a dog",extra\n\nd.png,"two\nlines"\ne.png,ok\n')
    with pytest.raises(BadSampleError, match="empty 'caption'") as caught:
        read_csv(table)
    assert caught.value.item == f"{table}:3"
    result = read_csv(table, skip_bad=True)
    assert [Path(record.image).name for record in result.records] == ["a.png", "d.png", "e.png"]
    assert [error.item for error in result.skipped] == [f"{table}:3", f"{table}:4"]
    assert "row has 3 fields; the header has 2" in result.skipped[1].reason
    assert result.records[2].item == f"{table}:8"


def test_csv_without_the_caption_column_is_a_file_error(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    table.write_text("filepath,title\na.png,a cat\n")
    with pytest.raises(BadSampleError, match=r"header has no column \['caption'\]"):
        read_csv(table, skip_bad=True)


# Bad text and images inside datasets ----------------------------------------------------------------------------


def make_record(tmp_path: Path, caption: str, name: str = "ok.png", item: str = "train.jsonl:5") -> ImageTextRecord:
    path = tmp_path / name
    if not path.exists():
        Image.new("RGB", (12, 10), (1, 2, 3)).save(path)
    return ImageTextRecord(image=str(path), captions=[caption], item=item)


def make_dataset(records: list[ImageTextRecord], **options: object) -> ImageTextDataset:
    return ImageTextDataset(records, ImageTransform(8), whitespace_tokenize, max_text_len=4, **options)


def test_over_long_caption_in_tokens_names_the_item(tmp_path: Path) -> None:
    dataset = make_dataset([make_record(tmp_path, "one two three four five six")])
    with pytest.raises(BadSampleError) as caught:
        dataset[0]
    assert str(caught.value) == "train.jsonl:5: caption has 6 tokens; the text tower takes at most 4"


def test_over_long_caption_in_characters_names_the_item(tmp_path: Path) -> None:
    dataset = make_dataset([make_record(tmp_path, "x" * 50)], max_caption_chars=40)
    with pytest.raises(BadSampleError, match=r"^train\.jsonl:5: caption has 50 characters; the limit is 40"):
        dataset[0]


def test_empty_caption_in_dataset_names_the_item(tmp_path: Path) -> None:
    with pytest.raises(BadSampleError, match=r"^train\.jsonl:5: caption is empty"):
        make_dataset([make_record(tmp_path, "  ")])[0]


def test_bad_image_in_dataset_names_record_and_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    record = ImageTextRecord(image=str(broken), captions=["a cat"], item="train.jsonl:9")
    with pytest.raises(BadSampleError) as caught:
        make_dataset([record])[0]
    assert caught.value.item == "train.jsonl:9"
    assert str(broken) in caught.value.reason and "not a recognised image format" in caught.value.reason


def test_dataset_skip_bad_returns_none_and_collate_counts(tmp_path: Path) -> None:
    records = [
        make_record(tmp_path, "a cat", item="m:1"),
        make_record(tmp_path, "far too many words here", item="m:2"),
        ImageTextRecord(image=str(tmp_path / "missing.png"), captions=["a dog"], item="m:3"),
        make_record(tmp_path, "a bird", item="m:4"),
    ]
    dataset = make_dataset(records, skip_bad=True)
    samples = [dataset[index] for index in range(len(dataset))]
    assert [sample is None for sample in samples] == [False, True, True, False]
    batch = collate_image_text(samples)
    assert batch["skipped"] == 2
    assert batch["pixels"].shape == (2, 3, 8, 8)
    assert batch["index"].tolist() == [0, 3]


def test_collate_of_only_bad_samples_has_zero_rows() -> None:
    batch = collate_image_text([None, None, None])
    assert batch["skipped"] == 3
    assert batch["pixels"].shape[0] == 0 and batch["input_ids"].shape[0] == 0
    assert batch["input_ids"].dtype == torch.long


def test_webdataset_bad_samples_name_shard_and_key(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000.tar"
    good = io.BytesIO()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(good, format="PNG")
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "good", "png": good.getvalue(), "txt": b"a cat"})
        writer.write({"__key__": "corrupt", "png": good.getvalue()[:40], "txt": b"a dog"})
        writer.write({"__key__": "nocaption", "png": good.getvalue()})
        writer.write({"__key__": "badjson", "png": good.getvalue(), "json": json.dumps({"caption": ""}).encode()})
    options = {"transform": ImageTransform(8), "tokenize": whitespace_tokenize, "max_text_len": 4}
    with pytest.raises(BadSampleError) as caught:
        list(make_webdataset(str(shard), **options))
    assert caught.value.item == f"{shard}:corrupt"
    samples = list(make_webdataset(str(shard), skip_bad=True, **options))
    assert [sample is None for sample in samples] == [False, True, True, True]
    assert collate_image_text(samples)["skipped"] == 3

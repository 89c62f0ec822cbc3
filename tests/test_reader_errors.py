"""Readers' bad-input rule at the edges: DataLoader workers, odd paths, unopenable files, broken CSV quoting and
damaged WebDataset shards all end in one line naming the bad item, never a traceback or silently lost rows."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlkit.cli import main as cli_main
from vlkit.data.images import BadSampleError
from vlkit.data.readers import (
    ReadResult,
    WebDatasetSource,
    collate_image_text,
    read_csv,
    read_manifest,
    read_records,
)
from vlkit.data.shards import make_webdataset
from vlkit.data.transforms import ImageTransform


def whitespace_tokenize(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar written member by member, so a sample can hold the same member twice (TarWriter refuses that)."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


WDS_OPTIONS = {"transform": ImageTransform(8), "tokenize": whitespace_tokenize, "max_text_len": 4}


# A: errors raised inside DataLoader workers ----------------------------------------------------------------------


class OneBadImage(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        raise BadSampleError("x.png", "cannot decode")


def test_a_bad_sample_in_a_dataloader_worker_stays_one_line() -> None:
    with pytest.raises(BadSampleError) as caught:
        list(DataLoader(OneBadImage(), num_workers=1))
    assert str(caught.value) == "x.png: cannot decode"
    assert (caught.value.item, caught.value.reason) == ("x.png", "cannot decode")


def test_bad_sample_error_from_a_worker_message_keeps_colons_and_pickles() -> None:
    message = (
        "Caught BadSampleError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "w.py", line 1, in <module>\n    raise BadSampleError(item, reason)\n'
        "vlkit.data.images.BadSampleError: /d/train.jsonl:2: image /d/b.png: not a recognised image format\n"
    )
    error = BadSampleError(message)
    assert str(error) == "/d/train.jsonl:2: image /d/b.png: not a recognised image format"
    assert error.item == "/d/train.jsonl:2"
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error) and restored.item == error.item
    assert str(BadSampleError("m.jsonl:3", "caption is empty")) == "m.jsonl:3: caption is empty"
    assert str(BadSampleError("no structure here")) == "no structure here"


# B: paths with braces ------------------------------------------------------------------------------------------


def test_an_existing_file_with_braces_in_its_path_is_read_as_its_kind(tmp_path: Path) -> None:
    folder = tmp_path / "exp{1}"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    (folder / "train.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    (folder / "train.csv").write_text("filepath,caption\na.png,a dog\n")
    for name, caption in (("train.jsonl", "a cat"), ("train.csv", "a dog")):
        result = read_records(folder / name)
        assert isinstance(result, ReadResult)
        assert [record.captions for record in result.records] == [[caption]]
        assert result.records[0].image == str(folder / "a.png")
    with pytest.raises(FileNotFoundError, match=r"no such file; a brace pattern stands for WebDataset \.tar shards"):
        read_records(tmp_path / "exp{2}" / "train.jsonl")


def test_a_brace_pattern_that_is_no_file_is_still_a_shard_pattern(tmp_path: Path) -> None:
    for number in range(2):
        write_tar(tmp_path / f"shard-{number:03d}.tar", [("k.png", png_bytes()), ("k.txt", b"a cat")])
    result = read_records(str(tmp_path / "shard-{000..001}.tar"))
    assert result == WebDatasetSource(urls=[str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")])


# C: an unclosed quote in a CSV ----------------------------------------------------------------------------------


def test_an_unclosed_quote_that_swallows_the_rest_of_a_csv_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    good_rows = "".join(f"c.png,good {number}\n" for number in range(50))
    table.write_text('filepath,caption\na.png,fine\nb.png,"unclosed\n' + good_rows)
    for skip_bad in (False, True):
        with pytest.raises(BadSampleError) as caught:
            read_csv(table, skip_bad=skip_bad)
        assert caught.value.item == f"{table}:3"
        assert "never closed" in caught.value.reason and "lines 4-53" in caught.value.reason
        assert "\n" not in str(caught.value)


def test_ordinary_malformed_csv_rows_stay_skippable(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    # Line 3: text after a closing quote; line 5: an unclosed quote on the last line loses nothing after it.
    table.write_text('filepath,caption\na.png,one\nb.png,"two"x\nc.png,three\nd.png,"four\n')
    result = read_csv(table, skip_bad=True)
    assert [record.captions for record in result.records] == [["one"], ["three"]]
    assert [error.item for error in result.skipped] == [f"{table}:3", f"{table}:5"]


# D: data files the OS refuses to open ---------------------------------------------------------------------------


def test_a_manifest_or_csv_that_cannot_be_opened_is_one_line_naming_it(tmp_path: Path) -> None:
    for name in ("loop.jsonl", "loop.csv"):
        loop = tmp_path / name
        os.symlink(name, loop)  # points at itself: ELOOP
        with pytest.raises(BadSampleError) as caught:
            read_records(loop, skip_bad=True)
        assert caught.value.item == str(loop) and "cannot open" in caught.value.reason
        assert "\n" not in str(caught.value)
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    for reader in (read_csv, read_manifest):
        with pytest.raises(BadSampleError, match="cannot open") as caught:
            reader(folder)
        assert caught.value.item == str(folder)


def test_an_unopenable_manifest_through_the_cli_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLKIT_DEBUG", raising=False)
    loop = tmp_path / "loop.jsonl"
    os.symlink("loop.jsonl", loop)
    argv = ["train", "--recipe", "clip_shapes", "--out", str(tmp_path / "run"), "--train-data", str(loop)]
    code = cli_main([*argv, "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"vlkit: error: {loop}: cannot open")


# E: errors inside WebDataset shards -----------------------------------------------------------------------------


def test_a_duplicate_member_names_the_shard_and_key_and_a_skip_is_counted(tmp_path: Path) -> None:
    png = png_bytes()
    for number in range(3):
        duplicate = [("a.png", png)] if number == 1 else []
        members = [("a.png", png), ("a.txt", b"x"), *duplicate, ("b.png", png), ("b.txt", b"y")]
        write_tar(tmp_path / f"shard-{number:03d}.tar", members)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    with pytest.raises(BadSampleError) as caught:
        list(make_webdataset(pattern, **WDS_OPTIONS))
    assert caught.value.item == f"{tmp_path / 'shard-001.tar'}:a"
    assert "duplicate" in caught.value.reason
    samples = list(make_webdataset(pattern, skip_bad=True, **WDS_OPTIONS))
    assert collate_image_text(samples)["skipped"] == 1


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    png = png_bytes()
    for number in range(3):
        members = [("a.png", png), ("a.txt", b"x"), ("b.png", png), ("b.txt", b"y")]
        write_tar(tmp_path / f"shard-{number:03d}.tar", members)
    middle = tmp_path / "shard-001.tar"
    middle.write_bytes(middle.read_bytes()[:700])
    pattern = str(tmp_path / "shard-{000..002}.tar")
    with pytest.raises(BadSampleError) as caught:
        list(make_webdataset(pattern, **WDS_OPTIONS))
    assert caught.value.item.startswith(str(middle))
    assert "\n" not in str(caught.value)


def test_a_shard_that_fails_part_way_keeps_its_partial_sample_apart_from_the_next_shards(tmp_path: Path) -> None:
    """The partial sample a truncated shard ends with is its own (a bad sample, skipped and counted), never joined to
    the next shard's sample of the same key: every decoded caption is from its own shard."""
    png = png_bytes()
    for number in range(3):
        members = [
            ("a.png", png),
            ("a.txt", f"s{number} a".encode()),
            ("b.png", png),
            ("b.txt", f"s{number} b".encode()),
        ]
        write_tar(tmp_path / f"shard-{number:03d}.tar", members)
    middle = tmp_path / "shard-001.tar"
    middle.write_bytes(middle.read_bytes()[:700])  # inside its a.png
    dataset = make_webdataset(str(tmp_path / "shard-{000..002}.tar"), skip_bad=True, **WDS_OPTIONS)
    captions = []
    decode = dataset._decode

    def spy(sample: dict, item: str) -> dict:
        captions.append((item.rsplit("/", 1)[-1], sample.get("txt")))
        return decode(sample, item)

    dataset._decode = spy  # type: ignore[method-assign]
    out = list(dataset)
    decoded = [(item, caption) for item, caption in captions if caption is not None]
    assert all(caption.decode().split()[0] == "s" + item.split("-")[1][2] for item, caption in decoded), decoded
    assert ("shard-002.tar:a", b"s2 a") in decoded and sum(sample is not None for sample in out) == 4

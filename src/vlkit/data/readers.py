"""Image-text dataset readers: manifests, CSV and WebDataset shards -> batches of pixels and token ids.

Sources:
  vlkit JSONL manifest   one object per line: {"image": "rel/or/abs.jpg", "caption": "..."} or "captions": [...]
  CSV / TSV              open_clip's format: a header row, an image-path column and a caption column
  WebDataset shards      ``.tar`` files (a directory of them, one file, or a brace pattern ``shards-{000..009}.tar``)
                         whose samples hold an image (.jpg/.png/.jpeg/.webp) and a caption (.txt, or .json with
                         "caption"/"captions"), streamed by ``vlkit.data.shards``

Every sample becomes ``{"pixels": (3, H, W) float, "input_ids": (T,) long, "attention_mask": (T,) long}``
(plus ``"index"`` for map-style datasets), and ``collate_image_text`` stacks them into (B, 3, H, W) and
(B, T). Bad input (a broken manifest line, a corrupt image, an empty or over-long caption) raises a
``BadSampleError`` naming the item ("train.jsonl:17", "shard-003.tar:000042"); with ``skip_bad=True`` it is
logged and counted instead (readers return ``ReadResult.skipped``; datasets yield ``None``, which the collate
function drops and counts in ``batch["skipped"]``).

``ResumableSampler`` gives a shuffled order that is a pure function of (seed, epoch) and can resume mid-epoch,
so an interrupted run continues with exactly the samples it had not yet seen. The trainer uses it with
``num_replicas=1`` as the *global* order and gives each rank a contiguous slice of every global micro-batch
(``vlkit.train.distributed.GlobalBatchSampler``), so the samples of a step do not depend on the world size.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadSampleError, load_image
from vlkit.data.transforms import ImageTransform
from vlkit.seeding import mix_seed
from vlkit.text.tokenizer import pad_rows

logger = logging.getLogger(__name__)

CaptionChoice = Literal["first", "random"]
Tokenize = Callable[[str], list[int]]
Transform = Callable[[Image.Image], torch.Tensor]

# ImageTextDataset keeps the resized pixels of a training set of up to this size in memory: ShapesWorld's 15000
# training images at 64 pixels take 184 MB, and 1 GiB holds about 7000 images at 224.
IMAGE_CACHE_BYTES = 1 << 30

# Domain tags keep the random streams of different consumers independent even when they share a seed (the shard
# order and the sample shuffle are vlkit.data.shards').
_CAPTION_STREAM = 1
_SAMPLER_STREAM = 2
_SHARD_STREAM = 3
_SAMPLE_SHUFFLE_STREAM = 4


@dataclass
class ImageTextRecord:
    """One image with its captions. ``image`` is an absolute path (or an in-tar key); ``item`` names the source."""

    image: str
    captions: list[str]
    item: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadResult:
    """What a manifest or CSV reader returns: the good records and the errors of the lines it skipped."""

    records: list[ImageTextRecord]
    skipped: list[BadSampleError]


@dataclass(frozen=True)
class WebDatasetSource:
    """``read_records``' answer for shard inputs: the expanded shard URLs, for ``shards.make_webdataset``."""

    urls: list[str]


def read_records(path: str | os.PathLike[str], skip_bad: bool = False) -> ReadResult | WebDatasetSource:
    """Read ``path`` by its kind: ``.jsonl`` manifest, ``.csv``/``.tsv`` table, or WebDataset shards.

    A directory, a ``.tar`` file or a brace pattern gives a ``WebDatasetSource`` (shards are streamed, not
    listed here); the other kinds are read in full. A path with braces is a brace pattern only when no file or
    directory of that name exists (``runs/exp{1}/train.jsonl`` is a manifest).
    """
    text = str(path)
    folder = Path(path)
    if "{" in text and "}" in text and not os.path.lexists(text):
        if folder.suffix.lower() in (".jsonl", ".csv", ".tsv"):
            raise FileNotFoundError(
                f"{text}: no such file; a brace pattern stands for WebDataset .tar shards, not {folder.suffix} files"
            )
        return WebDatasetSource(urls=expand_shard_urls(text))
    if folder.is_dir():
        shards = sorted(str(shard) for shard in folder.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{text}: directory holds no .tar shards")
        return WebDatasetSource(urls=shards)
    suffix = folder.suffix.lower()
    if suffix == ".jsonl":
        return read_manifest(path, skip_bad=skip_bad)
    if suffix == ".csv":
        return read_csv(path, skip_bad=skip_bad)
    if suffix == ".tsv":
        return read_csv(path, sep="\t", skip_bad=skip_bad)
    if suffix == ".tar":
        return WebDatasetSource(urls=expand_shard_urls(text))
    raise ValueError(f"{text}: unknown dataset kind; expected .jsonl, .csv, .tsv, .tar, a brace pattern or a directory")


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``shards-{000..009}.tar``) and check that local shards exist."""
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(url) for url in urls]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    for url in expanded:
        # Remote (http://, s3://) and piped ("pipe:curl ...") shards can only be checked by opening them.
        is_local = "://" not in url and not url.startswith("pipe:")
        if is_local and not Path(url).is_file():
            raise FileNotFoundError(f"shard not found: {url}")
    return expanded


def read_manifest(path: str | os.PathLike[str], skip_bad: bool = False) -> ReadResult:
    """Read a vlkit JSONL manifest; relative image paths are resolved against the manifest's folder.

    Image files are not opened here (that would read every image of a large dataset up front); a missing or
    corrupt image is reported when the dataset loads it.
    """
    folder = Path(path).absolute().parent
    records: list[ImageTextRecord] = []
    skipped: list[BadSampleError] = []
    # Binary lines, decoded one at a time, so a stray non-UTF-8 byte is one bad line rather than a dead file.
    with _open_data_file(path, "rb") as stream:
        for line_number, raw_line in enumerate(stream, start=1):
            item = f"{path}:{line_number}"
            try:
                record = _parse_manifest_line(raw_line, item, folder, first_line=line_number == 1)
            except BadSampleError as error:
                _raise_or_collect(error, skip_bad, skipped)
                continue
            if record is not None:
                records.append(record)
    _log_skipped(path, skipped)
    return ReadResult(records=records, skipped=skipped)


def read_csv(
    path: str | os.PathLike[str],
    image_key: str = "filepath",
    caption_key: str = "caption",
    sep: str = ",",
    skip_bad: bool = False,
) -> ReadResult:
    """Read an open_clip-style CSV/TSV (header row required); other columns go to ``meta``.

    Relative image paths are resolved against the CSV's folder, as for manifests (open_clip resolves them
    against the working directory; absolute paths behave the same in both). Items are named by the line
    a row starts on.
    """
    folder = Path(path).absolute().parent
    header_item = f"{path}:1"
    # surrogateescape keeps undecodable bytes as markers, so a bad row is found and named, not the whole file.
    with _open_data_file(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as stream:
        reader = csv.reader(stream, delimiter=sep, strict=True)  # strict: an unclosed quote is an error, not a
        # caption swallowing the rest of the file
        try:
            header = next(reader)
        except StopIteration:
            raise BadSampleError(header_item, "CSV file is empty; expected a header row") from None
        except csv.Error as error:
            raise BadSampleError(header_item, f"cannot parse the header row ({error})") from None
        missing = [key for key in (image_key, caption_key) if key not in header]
        if missing:
            raise BadSampleError(header_item, f"header has no column {missing}; its columns are {header}")
        records: list[ImageTextRecord] = []
        skipped: list[BadSampleError] = []
        last_line = reader.line_num
        while True:
            item = f"{path}:{last_line + 1}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                if str(error).startswith("unexpected end of data") and reader.line_num > last_line + 1:
                    # A quote opened in this row and never closed: every line after it was read into this row,
                    # so skipping it would silently drop the rest of the file.
                    first, last = last_line + 2, reader.line_num
                    rest = f"line {last}" if first == last else f"lines {first}-{last}"
                    raise BadSampleError(
                        item,
                        f"malformed CSV row (a quote opened in it is never closed, so the rest of the file, {rest}, "
                        'was read into this row; close the quote, or double it ("") inside a quoted field)',
                    ) from None
                last_line = reader.line_num
                _raise_or_collect(BadSampleError(item, f"malformed CSV row ({error})"), skip_bad, skipped)
                continue
            last_line = reader.line_num
            if not row:
                continue
            try:
                records.append(_parse_csv_row(row, header, image_key, caption_key, item, folder))
            except BadSampleError as error:
                _raise_or_collect(error, skip_bad, skipped)
    _log_skipped(path, skipped)
    return ReadResult(records=records, skipped=skipped)


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``ImageTextRecord``s; item ``i`` -> dict of pixels, token ids, mask and ``index``.

    With ``caption_choice="random"`` the caption of item ``i`` is a pure function of (seed, epoch, i): call
    ``set_epoch`` before each epoch's DataLoader iterator is created (workers copy the dataset at that moment,
    so with ``persistent_workers=True`` the epoch does not reach them). With ``skip_bad=True`` a bad item
    returns ``None``, which ``collate_image_text`` drops and counts.

    ``cache_bytes``: with an ``ImageTransform``, whose resizing is deterministic, keep every image's resized
    pixels after its first decode when all of them fit in that many bytes (records x height x width x 3), so
    that later epochs decode nothing (a 64-pixel PNG's decode and resize cost ~0.2 ms); 0 turns it off. The
    items are the same either way. A forked DataLoader worker fills its own copy, which lasts as long as the
    worker; a spawned one starts without.
    """

    def __init__(
        self,
        records: Sequence[ImageTextRecord],
        transform: Transform,
        tokenize: Tokenize,
        max_text_len: int,
        caption_choice: CaptionChoice = "random",
        seed: int = 0,
        skip_bad: bool = False,
        max_caption_chars: int = 1000,
        pad_id: int = 0,
        pad_left: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        cache_bytes: int = IMAGE_CACHE_BYTES,
    ) -> None:
        _check_options(max_text_len, caption_choice, seed, max_caption_chars)
        self.records = list(records)
        self.transform = transform
        self.tokenize = tokenize
        self.max_text_len = max_text_len
        self.caption_choice = caption_choice
        self.seed = seed
        self.skip_bad = skip_bad
        self.max_caption_chars = max_caption_chars
        self.pad_id = pad_id
        self.pad_left = pad_left
        self.max_image_pixels = max_image_pixels
        self.epoch = 0
        # The cache: per record, its resized pixels once read (the arrays the transform made, not copies of them).
        self._pixels: list[np.ndarray | None] | None = None
        if isinstance(transform, ImageTransform):
            height, width = transform.size
            if len(self.records) * height * width * 3 <= cache_bytes:
                self._pixels = [None] * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random caption choice ``__getitem__`` makes."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        try:
            return self._load(index, record)
        except BadSampleError as error:
            if not self.skip_bad:
                raise
            logger.warning("skipping bad sample: %s", error)
            return None

    def _load(self, index: int, record: ImageTextRecord) -> dict[str, Any]:
        if not record.captions:
            raise BadSampleError(record.item, "record has no captions")
        caption = _choose_caption(record.captions, self.caption_choice, self.seed, self.epoch, index)
        # Text first: it is cheap, and a sample with unusable text should not cost an image decode.
        input_ids, attention_mask = _encode_caption(
            caption, record.item, self.tokenize, self.max_text_len, self.max_caption_chars, self.pad_id, self.pad_left
        )
        return {
            "pixels": self._image(index, record),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": index,
        }

    def __getstate__(self) -> dict[str, Any]:
        # A worker started by pickling (spawn) reads its images anew rather than receiving the cache.
        return {**self.__dict__, "_pixels": None}

    def _image(self, index: int, record: ImageTextRecord) -> torch.Tensor:
        cached = None if self._pixels is None else self._pixels[index]
        if cached is not None:
            return self.transform.normalise(cached)
        try:
            image = load_image(record.image, max_pixels=self.max_image_pixels)
        except BadSampleError as error:
            # Name the record (manifest line) and the image file both.
            raise BadSampleError(record.item, f"image {error.item}: {error.reason}") from None
        if self._pixels is None:
            return self.transform(image)
        pixels = self._pixels[index] = self.transform.resize(image)
        return self.transform.normalise(pixels)


def collate_image_text(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Drop ``None`` (skipped) samples, stack the rest, and count the dropped ones in ``"skipped"``.

    Tensors are stacked ((B, 3, H, W), (B, T)), ints become a long tensor, anything else a list. If every
    sample was bad the batch has zero rows (shapes (0, 3, 0, 0), (0, 0), (0,)); a trainer should skip it.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {
            "pixels": torch.empty(0, 3, 0, 0),
            "input_ids": torch.empty(0, 0, dtype=torch.long),
            "attention_mask": torch.empty(0, 0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
            "skipped": skipped,
        }
    collated: dict[str, Any] = {}
    for key in kept[0]:
        values = [sample[key] for sample in kept]
        if isinstance(values[0], torch.Tensor):
            collated[key] = torch.stack(values)
        elif isinstance(values[0], int):
            collated[key] = torch.tensor(values, dtype=torch.long)
        else:
            collated[key] = values
    collated["skipped"] = skipped
    return collated


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices that are a pure function of (seed, epoch), resumable mid-epoch, splittable across ranks.

    Ranks: every rank builds the same permutation; rank ``r`` of ``num_replicas`` takes positions
    ``r, r + num_replicas, ...``. When the dataset size is not a multiple of ``num_replicas`` the permutation is
    padded by wrapping around to its start, so every rank gets ``ceil(N / num_replicas)`` indices and
    distributed steps stay in lockstep (a few samples are seen twice per epoch).

    Resuming: ``position`` counts indices of this rank's epoch order that the trainer has *consumed*. It is not
    the number the sampler has yielded: a DataLoader prefetches batches, so the sampler runs ahead of training.
    The trainer therefore reports consumption, either with ``advance(batch_size)`` after each optimizer step
    (then ``state_dict()`` is ready to save) or by computing ``position = batches_consumed * batch_size`` itself
    and calling ``load_state_dict({"epoch": epoch, "position": position})``. A new iterator starts at
    ``position``. ``set_epoch`` to a different epoch resets ``position`` to 0; to the same epoch it keeps it,
    so the usual "load checkpoint, then ``set_epoch(epoch)`` at the top of the loop" resumes correctly.
    """

    def __init__(
        self, data_source: Sized, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Indices per rank per epoch (a resumed epoch yields ``len(self) - position`` of them)."""
        return math.ceil(self.num_samples / self.num_replicas)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.num_samples == 0:
            return []
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(_SAMPLER_STREAM, self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = len(self) * self.num_replicas
        if total > self.num_samples:
            order = order.repeat(math.ceil(total / self.num_samples))[:total]
        return order[self.rank : total : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        if self.position >= len(self) > 0:
            logger.warning(
                "ResumableSampler: epoch %d was already fully consumed; call set_epoch(next_epoch) before iterating",
                self.epoch,
            )
        # Sliced now, not lazily, so the start is the position at the moment the iterator is created.
        return iter(self.indices()[self.position :])

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def advance(self, num_samples: int) -> None:
        """Record that the trainer consumed ``num_samples`` more indices (per rank) of the current epoch."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        # A short last batch makes batches x batch_size overshoot the epoch; the epoch is simply complete.
        self.position = min(self.position + num_samples, len(self))

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``epoch`` and ``position`` (required); other keys, if present, must match this sampler."""
        for key in ("seed", "num_samples", "num_replicas", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: saved {key}={state[key]} but this sampler has {key}={getattr(self, key)}, "
                    "so the data order would differ"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch and position must be >= 0, got epoch={epoch}, position={position}")
        self.epoch = epoch
        self.position = min(position, len(self))


def _check_options(max_text_len: int, caption_choice: str, seed: int, max_caption_chars: int) -> None:
    if max_text_len < 1:
        raise ValueError(f"max_text_len must be >= 1, got {max_text_len}")
    if caption_choice not in ("first", "random"):
        raise ValueError(f"caption_choice must be 'first' or 'random', got {caption_choice!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if max_caption_chars < 1:
        raise ValueError(f"max_caption_chars must be >= 1, got {max_caption_chars}")


def _choose_caption(captions: Sequence[str], choice: CaptionChoice, seed: int, epoch: int, index: int) -> str:
    if choice == "first" or len(captions) == 1:
        return captions[0]
    return captions[mix_seed(_CAPTION_STREAM, seed, epoch, index) % len(captions)]


def _encode_caption(
    caption: str, item: str, tokenize: Tokenize, max_text_len: int, max_caption_chars: int, pad_id: int,
    pad_left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Validate and tokenize one caption -> (input_ids (T,), attention_mask (T,)), padded to ``max_text_len`` on the
    right, or on the left (``pad_left``: a tokenizer that pads there, as SigLIP 2's does in transformers)."""
    if not caption.strip():
        raise BadSampleError(item, "caption is empty")
    # Checked before tokenizing: a multi-megabyte "caption" (a scraped page) would be slow to tokenize.
    if len(caption) > max_caption_chars:
        raise BadSampleError(
            item, f"caption has {len(caption)} characters; the limit is {max_caption_chars} (max_caption_chars)"
        )
    token_ids = list(tokenize(caption))
    if not token_ids:
        raise BadSampleError(item, "caption tokenizes to zero tokens")
    if len(token_ids) > max_text_len:
        raise BadSampleError(item, f"caption has {len(token_ids)} tokens; the text tower takes at most {max_text_len}")
    input_ids, attention_mask = pad_rows([token_ids], pad_id, pad_left, max_text_len)
    return input_ids[0], attention_mask[0]


def _parse_manifest_line(raw_line: bytes, item: str, folder: Path, first_line: bool) -> ImageTextRecord | None:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSampleError(item, f"line is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if first_line:
        text = text.removeprefix("\ufeff")
    text = text.strip()
    if not text:
        return None
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadSampleError(item, f"malformed JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise BadSampleError(item, f"malformed JSON ({type(error).__name__}: {error})") from None
    if not isinstance(entry, dict):
        raise BadSampleError(item, f"expected a JSON object, got {_json_type(entry)}")
    if "image" not in entry:
        raise BadSampleError(item, "missing 'image' key")
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise BadSampleError(item, f"'image' must be a non-empty string, got {_json_type(image)} {image!r}")
    captions = _captions_from_entry(entry, item)
    meta = {key: value for key, value in entry.items() if key not in ("image", "caption", "captions")}
    return ImageTextRecord(image=_resolve_image_path(image, folder), captions=captions, item=item, meta=meta)


def _parse_csv_row(
    row: list[str], header: list[str], image_key: str, caption_key: str, item: str, folder: Path
) -> ImageTextRecord:
    if len(row) != len(header):
        raise BadSampleError(item, f"row has {len(row)} fields; the header has {len(header)}")
    fields = dict(zip(header, row, strict=True))
    try:
        "".join(row).encode("utf-8")
    except UnicodeEncodeError:
        raise BadSampleError(item, "row is not valid UTF-8") from None
    image = fields[image_key].strip()
    if not image:
        raise BadSampleError(item, f"empty {image_key!r} field")
    caption = fields[caption_key].strip()
    if not caption:
        raise BadSampleError(item, f"empty {caption_key!r} field (caption)")
    meta = {key: value for key, value in fields.items() if key not in (image_key, caption_key)}
    return ImageTextRecord(image=_resolve_image_path(image, folder), captions=[caption], item=item, meta=meta)


def _captions_from_entry(entry: dict[str, Any], item: str) -> list[str]:
    """Captions from a manifest line or a WebDataset .json: ``"caption": str`` and/or ``"captions": [str, ...]``.

    With both, ``caption`` is the canonical one (ShapesWorld writes its full description there) and comes first.
    """
    if "caption" not in entry and "captions" not in entry:
        raise BadSampleError(item, "missing 'caption' (or 'captions') key")
    captions: list[str] = []
    if "caption" in entry:
        caption = entry["caption"]
        if not isinstance(caption, str):
            raise BadSampleError(item, f"'caption' must be a string, got {_json_type(caption)}")
        if not caption.strip():
            raise BadSampleError(item, "'caption' is empty")
        captions.append(caption.strip())
    if "captions" in entry:
        listed = entry["captions"]
        if not isinstance(listed, list):
            raise BadSampleError(item, f"'captions' must be a list of strings, got {_json_type(listed)}")
        if not listed:
            raise BadSampleError(item, "'captions' is an empty list")
        for position, caption in enumerate(listed):
            if not isinstance(caption, str):
                raise BadSampleError(item, f"'captions'[{position}] must be a string, got {_json_type(caption)}")
            if not caption.strip():
                raise BadSampleError(item, f"'captions'[{position}] is empty")
            if caption.strip() not in captions:
                captions.append(caption.strip())
    return captions


def _resolve_image_path(image: str, folder: Path) -> str:
    path = Path(image)
    return os.path.normpath(path if path.is_absolute() else folder / path)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _open_data_file(path: str | os.PathLike[str], mode: str, **options: Any) -> IO[Any]:
    """``open`` for a manifest or table, where a file the OS refuses (missing, a directory, no permission, a symlink
    loop) is a ``BadSampleError`` naming it."""
    try:
        return open(path, mode, **options)
    except OSError as error:
        raise BadSampleError(str(path), f"cannot open the file ({error.strerror or error})") from None


def _raise_or_collect(error: BadSampleError, skip_bad: bool, skipped: list[BadSampleError]) -> None:
    if not skip_bad:
        raise error
    skipped.append(error)


def _log_skipped(path: str | os.PathLike[str], skipped: list[BadSampleError]) -> None:
    if skipped:
        logger.warning("%s: skipped %d bad line(s); first: %s", path, len(skipped), skipped[0])

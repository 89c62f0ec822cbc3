"""WebDataset shards -> image-text samples, streamed: ``ImageTextWebDataset`` (``make_webdataset``) and the captions a
tokenizer is fitted on (``webdataset_caption_sample``). ``vlkit.data.readers.read_records`` hands shard inputs here as
a ``WebDatasetSource``; the samples, the collate function and the bad-input rule are the readers' (its docstring).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import webdataset as wds

from vlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadSampleError, decode_image_bytes
from vlkit.data.readers import (
    _SAMPLE_SHUFFLE_STREAM,
    _SHARD_STREAM,
    CaptionChoice,
    Tokenize,
    Transform,
    _captions_from_entry,
    _check_options,
    _choose_caption,
    _encode_caption,
    _json_type,
    expand_shard_urls,
)
from vlkit.seeding import mix_seed

logger = logging.getLogger(__name__)

WEBDATASET_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")


class ImageTextWebDataset(torch.utils.data.IterableDataset):
    """Streams image-text samples from WebDataset shards; build it with ``make_webdataset``.

    Shards are shuffled with (seed, epoch) before being split across ranks (rank r takes shards r, r + W, ...) and
    DataLoader workers (``wds.split_by_worker``), so every process sees the same shard order and together they
    read each shard once per epoch; samples are then shuffled in a buffer of ``shuffle_buffer`` seeded by
    (seed, epoch, rank, worker). Give at least as many shards as ranks x workers, or some workers idle.
    The rank and world size are read in the main process (at construction and ``set_epoch``), because a worker
    started with "spawn" or "forkserver" has no process group to ask.
    Errors inside a shard name it (and the sample's key where known). With ``skip_bad`` a bad sample yields
    ``None``; so does a sample with a broken member (one held twice), and a shard that fails part-way (a truncated
    tar) has the rest of it skipped, logged and counted as one ``None`` (the partial sample it stopped in, cut off
    from the next shard's, is a bad sample of its own).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Transform,
        tokenize: Tokenize,
        max_text_len: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        skip_bad: bool = False,
        caption_choice: CaptionChoice = "random",
        max_caption_chars: int = 1000,
        pad_id: int = 0,
        pad_left: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        _check_options(max_text_len, caption_choice, seed, max_caption_chars)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_shard_urls(urls)
        self.transform = transform
        self.tokenize = tokenize
        self.max_text_len = max_text_len
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skip_bad = skip_bad
        self.caption_choice = caption_choice
        self.max_caption_chars = max_caption_chars
        self.pad_id = pad_id
        self.pad_left = pad_left
        self.max_image_pixels = max_image_pixels
        self.epoch = 0
        self.rank, self.world_size, _, _ = wds.utils.pytorch_worker_info()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for shard order, sample shuffle and caption choice (before creating the iterator)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.rank, self.world_size, _, _ = wds.utils.pytorch_worker_info()

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        _, _, worker, _ = wds.utils.pytorch_worker_info()
        rank = self.rank
        shuffling = self.shuffle_buffer > 0
        reading = _ShardReading(self.skip_bad)  # per iterator: two iterators over one dataset read different shards
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            self._shuffle_shards if shuffling else None,
            self._split_by_rank,
            wds.split_by_worker,
            reading.samples,
            wds.shuffle(
                self.shuffle_buffer,
                initial=self.shuffle_buffer,
                seed=mix_seed(_SAMPLE_SHUFFLE_STREAM, self.seed, self.epoch, rank, worker),
            )
            if shuffling
            else None,
            functools.partial(self._decode_samples, reading=reading),
        )
        return iter(pipeline)

    def _split_by_rank(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from itertools.islice(shards, self.rank, None, self.world_size)

    def _shuffle_shards(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shard_list = list(shards)
        generator = torch.Generator().manual_seed(mix_seed(_SHARD_STREAM, self.seed, self.epoch))
        for position in torch.randperm(len(shard_list), generator=generator).tolist():
            yield shard_list[position]

    def _decode_samples(
        self, samples: Iterator[dict[str, Any]], reading: _ShardReading
    ) -> Iterator[dict[str, Any] | None]:
        for sample in samples:
            yield from reading.take_skips()
            item = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            if item in reading.bad_samples:
                yield None  # a sample with a broken member (already logged, and counted by this None)
                continue
            try:
                yield self._decode(sample, item)
            except BadSampleError as error:
                if not self.skip_bad:
                    raise
                logger.warning("skipping bad sample: %s", error)
                yield None
        yield from reading.take_skips()

    def _decode(self, sample: dict[str, Any], item: str) -> dict[str, Any]:
        members = sorted(key for key in sample if not key.startswith("__"))
        image_key = next((key for key in WEBDATASET_IMAGE_KEYS if key in sample), None)
        if image_key is None:
            raise BadSampleError(item, f"no image member (looked for .jpg, .png, .jpeg, .webp); it has {members}")
        captions = _webdataset_captions(sample, item, members)
        key_number = zlib.crc32(str(sample.get("__key__", "")).encode("utf-8"))
        caption = _choose_caption(captions, self.caption_choice, self.seed, self.epoch, key_number)
        input_ids, attention_mask = _encode_caption(
            caption, item, self.tokenize, self.max_text_len, self.max_caption_chars, self.pad_id, self.pad_left
        )
        image = decode_image_bytes(sample[image_key], item, max_pixels=self.max_image_pixels)
        return {"pixels": self.transform(image), "input_ids": input_ids, "attention_mask": attention_mask}


class _ShardReading:
    """webdataset's ``tarfile_to_samples`` for one iterator, remembering which shard (and member) it is reading, so
    that an error webdataset reports there (a truncated tar, a sample holding a member twice) names them.

    The stages are generators pulled one item at a time, so the URL last taken from the shard list is the shard
    being read, and the member last passed to the grouping step is the one it fails on. With ``skip_bad`` the error
    is logged and counted: a sample with a broken member is dropped (``bad_samples``), and an error that ends a
    shard early (its lost samples unknown) counts one skip per shard.
    """

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.url: str | None = None
        self.member: str | None = None
        self.bad_samples: set[str] = set()
        self._reported: set[str] = set()
        self._pending_skips = 0

    def samples(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        tar = wds.tariterators
        streams = tar.url_opener(self._track_shards(shards), handler=self.handle)
        files = tar.tar_file_expander(streams, handler=self.handle)
        return tar.group_by_keys(self._track_members(files), handler=self.handle)

    def take_skips(self) -> Iterator[None]:
        """A ``None`` (a counted skip) for each shard-level error since the last call."""
        while self._pending_skips:
            self._pending_skips -= 1
            yield None

    def _track_shards(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            self.url, self.member = shard["url"], None
            yield shard

    def _track_members(self, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        url = None
        for file in files:
            if file and url is not None and file.get("__url__") != url:
                # A new shard: webdataset's end-of-shard marker ({}) does not come after a shard that failed
                # part-way, and without it the grouping step would join that shard's last sample to the next
                # shard's sample of the same key.
                yield {}
            url = file.get("__url__") if file else None
            self.member = file.get("fname")
            yield file
            self.member = None  # reading the next member: an error now is the tar's, not this member's

    def handle(self, error: Exception) -> bool:
        if isinstance(error, BadSampleError):
            raise error
        # Where no shard was tracked, tar_file_expander's error arguments end with the URL.
        shard = self.url or next((arg for arg in reversed(error.args[1:]) if isinstance(arg, str)), "webdataset shard")
        key = wds.tariterators.base_plus_ext(self.member)[0] if self.member else None
        item = f"{shard}:{key}" if key else shard
        detail = error.args[0] if error.args else error
        bad = BadSampleError(item, f"unreadable shard data ({type(error).__name__}: {detail})")
        if not self.skip_bad:
            raise bad from error
        if key:
            logger.warning("skipping a sample with a broken member: %s", bad)
            self.bad_samples.add(item)
        elif shard not in self._reported:
            logger.warning("skipping the rest of a shard: %s", bad)
            self._reported.add(shard)
            self._pending_skips += 1
        return True


def make_webdataset(
    urls: str | Sequence[str],
    transform: Transform,
    tokenize: Tokenize,
    max_text_len: int,
    shuffle_buffer: int = 0,
    seed: int = 0,
    skip_bad: bool = False,
    caption_choice: CaptionChoice = "random",
    max_caption_chars: int = 1000,
    pad_id: int = 0,
    pad_left: bool = False,
) -> ImageTextWebDataset:
    """An ``IterableDataset`` over WebDataset shards (brace pattern or list of URLs); see ``ImageTextWebDataset``."""
    return ImageTextWebDataset(
        urls,
        transform,
        tokenize,
        max_text_len,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        skip_bad=skip_bad,
        caption_choice=caption_choice,
        max_caption_chars=max_caption_chars,
        pad_id=pad_id,
        pad_left=pad_left,
    )


def webdataset_caption_sample(urls: str | Sequence[str], limit: int = 20_000) -> list[str]:
    """Up to ``limit`` captions of the shards' samples (to fit a tokenizer), read by webdataset as training reads
    them (local files, ``pipe:`` and remote URLs alike). An unreadable shard or sample is passed over here: training
    reports it (or skips it, with ``skip_bad``) when it reaches it."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_shard_urls(urls)), wds.tarfile_to_samples(handler=wds.warn_and_continue)
    )
    captions: list[str] = []
    for sample in pipeline:
        item = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            captions += _webdataset_captions(sample, item, sorted(key for key in sample if not key.startswith("__")))
        except BadSampleError:
            continue
        if len(captions) >= limit:
            break
    return captions[:limit]


def _webdataset_captions(sample: dict[str, Any], item: str, members: list[str]) -> list[str]:
    if "txt" in sample:
        try:
            return [sample["txt"].decode("utf-8-sig").strip()]  # a byte-order mark is no part of the caption
        except UnicodeDecodeError:
            raise BadSampleError(item, "caption (.txt) is not valid UTF-8") from None
    if "json" in sample:
        try:
            entry = json.loads(sample["json"])
        except (ValueError, RecursionError) as error:
            raise BadSampleError(item, f"malformed .json ({type(error).__name__}: {error})") from None
        if not isinstance(entry, dict):
            raise BadSampleError(item, f".json must hold an object, got {_json_type(entry)}")
        return _captions_from_entry(entry, item)
    raise BadSampleError(item, f"no caption member (looked for .txt, .json); it has {members}")

"""Tokenizers through the ``tokenizers`` library and its ``tokenizer.json`` format.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` with the conventions a text tower needs (pad id, end-of-text id,
fixed-length batches). ``train_tokenizer`` fits a small byte-level BPE on a corpus (ShapesWorld captions, or a
user's own captions) and names its special tokens ``<pad>`` (id 0), ``<bos>`` (1) and ``<eos>`` (2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token


class Tokenizer:
    """Text -> ids with padding to ``max_len``; ``truncate`` keeps the end-of-text token when cutting."""

    def __init__(self, backend: _HFTokenizer, pad_token_id: int, eos_token_id: int, max_len: int) -> None:
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_len = max_len

    @classmethod
    def from_file(cls, path: str | Path, max_len: int, pad_token: str = "<pad>", eos_token: str = "<eos>") -> Tokenizer:
        backend = _HFTokenizer.from_file(str(path))
        pad_id, eos_id = backend.token_to_id(pad_token), backend.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise ValueError(f"{path}: tokenizer has no {pad_token!r} or {eos_token!r} token")
        return cls(backend, pad_id, eos_id, max_len)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def __call__(self, texts: str | Sequence[str], max_len: int | None = None, truncate: bool = True) -> TokenBatch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = max_len or self.max_len
        ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, encoding in enumerate(self.backend.encode_batch(texts)):
            tokens = encoding.ids
            if len(tokens) > length:
                if not truncate:
                    raise ValueError(f"text {texts[row][:60]!r} has {len(tokens)} tokens; at most {length} fit")
                tokens = tokens[: length - 1] + [self.eos_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return TokenBatch(ids, mask)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, max_len: int = 32) -> Tokenizer:
    """Fit a lower-cased BPE tokenizer that wraps every text as ``<bos> ... <eos>``."""
    backend = _HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos, eos = backend.token_to_id("<bos>"), backend.token_to_id("<eos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return Tokenizer(backend, backend.token_to_id("<pad>"), eos, max_len)

"""Tokenizers through the ``tokenizers`` library and its ``tokenizer.json`` format.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` with the conventions a text tower needs (pad id, end-of-text id,
fixed-length batches). ``train_tokenizer`` fits a small byte-level BPE on a corpus (ShapesWorld captions, or a
user's own captions) and names its special tokens ``<pad>`` (id 0), ``<bos>`` (1) and ``<eos>`` (2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from vlkit.files import DamagedFileError, read_json
from vlkit.text.jinja import ChatTemplates, read_chat_templates, refuse_unimplemented, render_chats

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Conventions of foreign checkpoints whose tokenizer files do not name their special tokens: (eos, pad, length).
TEXT_DEFAULTS = {
    "clip": ("<|endoftext|>", "<|endoftext|>", 77),
    "siglip": ("</s>", "</s>", 64),
    "siglip2": ("<eos>", "<pad>", 64),
    "qwen2": ("<|endoftext|>", "<|endoftext|>", None),  # Qwen2Tokenizer's defaults, which transformers 5 always uses
}
# Dual-encoder families whose text tower is causal and pooled at the end-of-text token, which is also their pad: they
# read right-padded text only (left padding would have real tokens attend to pads and the pooling read a pad).
_CAUSAL_TEXT = frozenset({"clip"})
# Families whose transformers tokenizer is GPT2Tokenizer, which can be built from vocab.json and merges.txt alone
# (CLIP's vocab.json and merges.txt are another BPE, with its own word ends and cleaning).
_GPT2_FILES = frozenset({"opt", "blip-2"})
PaddingSide = Literal["left", "right"]
_HUGE = 10**9  # transformers writes model_max_length=1e30 for "no limit"
# Texts whose ids a Tokenizer remembers (as CLIP's reference tokenizer caches its BPE per word): a training set's
# captions, questions and chat segments repeat, and encoding one costs ~40 us where the lookup costs ~0.2 us.
_MEMO_SIZE = 1 << 16
Padding = Literal["max_length", "longest"]


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token


class Tokenizer:
    """Text -> ids padded to ``max_len`` on ``padding_side``; a text too long is cut as transformers cuts it: its own
    tokens, from the ``truncation_side`` end, to what fits beside the special tokens the tokenizer adds, which are then
    added (an end-of-text token the tokenizer adds stays last)."""

    def __init__(
        self, backend: _HFTokenizer, pad_token_id: int, eos_token_id: int, max_len: int,
        padding_side: PaddingSide = "right",
    ) -> None:  # fmt: skip
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_len = max_len
        self.padding_side: PaddingSide = padding_side
        self.truncation_side: PaddingSide = "right"  # which end a text too long loses
        # A Hugging Face directory's tokenizer_config.json / special_tokens_map.json entries (bos and unk tokens,
        # sides, ...; the chat template is kept apart, below): vlkit reads eos and pad of them, export_hf writes them
        # all back.
        self.hf_settings: dict[str, Any] = {}
        # A checkpoint's Jinja chat template(s) (``vlkit.text.jinja``), for ``apply_chat_template``; None without one.
        self.chat_template: ChatTemplates | None = None
        # A directory's named special tokens for a chat template (``special_tokens_map``); None: vlkit's own.
        self.named_tokens: dict[str, str] | None = None
        # The end-of-word suffix ``decode`` turns into spaces, as transformers' CLIPTokenizer does ("</w>"); else None.
        self.word_end: str | None = None
        # text -> ids, with and without the special tokens the backend adds (``encode``, ``encode_plain``), for the
        # vocabulary size it was made at (tokens added to the backend start it anew).
        self._memo: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._memo_vocab = -1

    @classmethod
    def from_file(cls, path: str | Path, max_len: int, pad_token: str = "<pad>", eos_token: str = "<eos>") -> Tokenizer:
        backend = _read_tokenizer_file(Path(path))
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
        """The ids of ``text`` with the special tokens the tokenizer adds (``<bos> ... <eos>``)."""
        return self._encode(text, True)

    def encode_plain(self, text: str) -> list[int]:
        """The ids of ``text`` alone, without added special tokens (a chat template's segment)."""
        return self._encode(text, False)

    def _encode(self, text: str, special: bool) -> list[int]:
        vocab = self.backend.get_vocab_size()
        if vocab != self._memo_vocab or len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
            self._memo_vocab = vocab
        key = (text, special)
        ids = self._memo.get(key)
        if ids is None:
            ids = self._memo[key] = tuple(self.backend.encode(text, add_special_tokens=special).ids)
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(self.word_end, " ").strip() if self.word_end else text

    def __call__(self, texts: str | Sequence[str], max_len: int | None = None, truncate: bool = True) -> TokenBatch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = max_len or self.max_len
        rows = []
        for text, encoding in zip(texts, self.backend.encode_batch(texts), strict=True):
            tokens = encoding.ids
            if len(tokens) > length:
                if not truncate:
                    raise ValueError(f"text {text[:60]!r} has {len(tokens)} tokens; at most {length} fit")
                tokens = self._truncated(text, length)
            rows.append(tokens)
        return TokenBatch(*pad_rows(rows, self.pad_token_id, self.padding_side == "left", length))

    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (``bos_token``, ``eos_token``, a model's ``image_token``, ...), as transformers
        hands them to a chat template: a directory's (``named_tokens``), else this tokenizer's end and pad tokens."""
        if self.named_tokens is not None:
            return dict(self.named_tokens)
        return {"eos_token": self.backend.id_to_token(self.eos_token_id),
                "pad_token": self.backend.id_to_token(self.pad_token_id)}  # fmt: skip

    def hf_entries(self, vocabulary_only: bool = False) -> dict[str, Any]:
        """The ``tokenizer_config.json`` entries that read this tokenizer back as it is (``save_pretrained``,
        ``export_hf``): the named tokens a chat template sees (``vocabulary_only``: those the vocabulary holds, where
        the reading class would add the others as new tokens), the end and pad tokens, both sides, and the tokenizer
        class where the stored pipeline is not the whole story (CLIP's, whose decode turns word ends into spaces)."""
        backend = self.backend
        named = {name: token for name, token in self.special_tokens_map().items()
                 if not vocabulary_only or backend.token_to_id(token) is not None}  # fmt: skip
        return {
            **named,
            "eos_token": backend.id_to_token(self.eos_token_id),
            "pad_token": backend.id_to_token(self.pad_token_id),
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            **({"tokenizer_class": "CLIPTokenizer"} if self.word_end == "</w>" else {}),
        }

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Literal["pt"] | None = None,
        return_dict: bool = True,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **variables: Any,
    ) -> Any:
        """transformers' ``apply_chat_template``: ``conversation`` (``{"role", "content"}`` messages, or a batch of
        such lists) rendered with the stored template (``chat_template``: a stored one's name, or another template)
        and the special tokens (``variables`` over them). -> the text(s) (``tokenize=False``); else the ids of each
        text whole, without added special tokens (the template writes them), cut to ``max_length`` (else the
        model's) from ``truncation_side`` with ``truncation``, and padded on ``padding_side`` with ``padding``
        (``True`` / ``"longest"``, or ``"max_length"``): a dict of ``input_ids`` and ``attention_mask`` lists
        (``return_dict``), or the ids alone; ``return_tensors="pt"`` gives (B, T) tensors, padded to the longest at
        least (where transformers refuses rows of unequal length)."""
        refuse_unimplemented(variables, ("return_assistant_tokens_mask", "sanitize_control_tokens", "tokenizer_kwargs"))
        texts, batched = render_chats(
            self.chat_template, conversation, chat_template, add_generation_prompt, continue_final_message, tools,
            documents, **{**self.special_tokens_map(), **variables},
        )  # fmt: skip
        if not tokenize:
            return texts if batched else texts[0]
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        rows = [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]
        if truncation:
            keep = max_length or self.max_len
            rows = [row[:keep] if self.truncation_side == "right" else row[max(len(row) - keep, 0) :] for row in rows]
        left, longest = self.padding_side == "left", max(len(row) for row in rows)
        target = longest if padding in (True, "longest") else 0
        if padding == "max_length":
            target = max_length or self.max_len
        ids: Any = rows
        mask: Any = [[1] * len(row) for row in rows]
        if return_tensors == "pt":
            ids, mask = pad_rows(rows, self.pad_token_id, left, max(longest, target))
        elif target:  # each row to the target, as transformers pads lists (a longer row stays as it is)
            padded = [pad_rows([row], self.pad_token_id, left, max(len(row), target)) for row in rows]
            ids, mask = [row[0].tolist() for row, _ in padded], [row[0].tolist() for _, row in padded]
        if not batched and return_tensors is None:
            ids, mask = ids[0], mask[0]
        return {"input_ids": ids, "attention_mask": mask} if return_dict else ids

    def _truncated(self, text: str, length: int) -> list[int]:
        """``text``'s ids in ``length`` tokens: its own cut to what the added special tokens leave, then those."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        encoding.truncate(
            max(length - self.backend.num_special_tokens_to_add(False), 0), direction=self.truncation_side
        )
        return list(self.backend.post_process(encoding).ids)[:length]


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> ``input_ids`` and ``attention_mask`` (B, ``length``, else the longest row's) long, padded on
    the left or on the right."""
    width = max((len(row) for row in rows), default=0) if length is None else length
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for number, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[number, span] = torch.tensor(row, dtype=torch.long)
        mask[number, span] = 1
    return ids, mask


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    max_len: int = 32,
    extra_special_tokens: Sequence[str] = (),
    split_digits: bool = False,
) -> Tokenizer:
    """Fit a lower-cased BPE tokenizer that wraps every text as ``<bos> ... <eos>``.

    ``extra_special_tokens`` (e.g. ``<image>``, ``<ref>``) are single tokens that are never split or lower-cased.
    ``split_digits`` makes every digit its own token, so numbers (box coordinates) are spelled digit by digit.
    """
    backend = _HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([byte_level, pre_tokenizers.Digits(individual_digits=True)])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(t for t in extra_special_tokens if t not in SPECIAL_TOKENS)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos, eos = backend.token_to_id("<bos>"), backend.token_to_id("<eos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return Tokenizer(backend, backend.token_to_id("<pad>"), eos, max_len)


def load_tokenizer(path: str | Path, max_len: int | None = None, model_type: str | None = None) -> Tokenizer | None:
    """vlkit ``Tokenizer`` for a directory's ``tokenizer.json`` (``None`` without one).

    End-of-text and padding tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json``, else from
    the conventions of ``model_type``. The length is the smallest of ``max_len`` (the text tower's), the
    tokenizer's ``model_max_length`` and the truncation / fixed-padding lengths stored in ``tokenizer.json``.
    """
    loaded = read_tokenizer_directory(Path(path), max_len, model_type)
    return loaded[0] if loaded is not None else None


def _read_tokenizer_file(file: Path) -> _HFTokenizer:
    """A ``tokenizers`` tokenizer from ``file``; a damaged file is a ``DamagedFileError`` naming it (``tokenizers``
    raises a bare ``Exception`` that names no file)."""
    try:
        return _HFTokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a plain Exception for every parse failure
        if not file.is_file():
            raise
        raise DamagedFileError(file, f"not a readable tokenizers file ({error})") from None


def read_tokenizer_directory(
    directory: Path, max_len: int | None, model_type: str | None
) -> tuple[Tokenizer, Padding] | None:
    file = directory / "tokenizer.json"
    byte_level = (
        model_type in _GPT2_FILES
        and not file.exists()
        and (directory / "vocab.json").is_file()
        and (directory / "merges.txt").is_file()
    )
    if not file.exists() and not byte_level:
        return None
    settings: dict[str, Any] = {}
    unset: set[str] = set()  # tokens the configuration sets to null: none, whatever the tokenizer class's default
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).exists():
            stored = read_json(directory / name)
            settings.update({k: v for k, v in stored.items() if v is not None})
            unset = (unset - stored.keys()) | {k for k, v in stored.items() if v is None}
    backend = _gpt2_tokenizer(directory, settings) if byte_level else _read_tokenizer_file(file)
    settings.pop("chat_template", None)  # kept apart (``Tokenizer.chat_template``) and written as its own file
    default_eos, default_pad, _ = TEXT_DEFAULTS.get(str(model_type), (None, None, None))
    padding_settings, truncation = backend.padding, backend.truncation
    eos = _token_text(settings.get("eos_token")) or default_eos
    known_pad = default_pad if default_pad is not None and backend.token_to_id(default_pad) is not None else None
    pad = _token_text(settings.get("pad_token")) or (padding_settings or {}).get("pad_token") or known_pad or eos
    if eos is None:
        raise ValueError(f"{directory}: no eos_token in tokenizer_config.json and no convention for {model_type!r}")
    ids = {role: backend.token_to_id(token) for role, token in (("eos", eos), ("pad", pad))}
    unknown = [f"{role} token {token!r}" for (role, token) in (("eos", eos), ("pad", pad)) if ids[role] is None]
    if unknown:
        raise ValueError(f"{file if file.exists() else directory}: vocabulary has no {' or '.join(unknown)}")
    kind_of = None if byte_level else _tokenizer_class(model_type, settings, file, backend)
    # transformers' order: tokenizer_config.json's side, then tokenizer.json's, then its tokenizer class's default.
    sides: dict[str, str] = {}
    for kind, stored, default in (
        ("padding_side", padding_settings, kind_of.padding_side if kind_of is not None else "right"),
        ("truncation_side", truncation, "right"),
    ):
        sides[kind] = str(settings.get(kind) or (stored or {}).get("direction") or default).lower()
        if sides[kind] not in ("left", "right"):
            raise ValueError(f"{directory}: {kind} {sides[kind]!r} is neither 'left' nor 'right'")
    if sides["padding_side"] == "left" and model_type in _CAUSAL_TEXT:
        raise ValueError(f"{directory}: pads on the left; {model_type}'s causal text tower reads right-padded text "
                         "(its end-of-text pooling would read a pad)")  # fmt: skip
    if kind_of is not None and kind_of.rebuild is not None:
        kind_of.rebuild(backend, settings)
    defaults = {key: token for key, token in (kind_of.tokens if kind_of else ()) if key not in unset}
    named = _named_tokens(settings, defaults, eos)
    # transformers makes every named token the stored tokenizer does not hold whole a special one (open_clip's pad
    # "!"): split out of any text, skipped in decoding. (One missing from the vocabulary it would add; vlkit does not.)
    held = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [
        token for token in dict.fromkeys(named.values()) if token not in held and backend.token_to_id(token) is not None
    ]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    lengths = [max_len, settings.get("model_max_length"), (truncation or {}).get("max_length")]
    lengths.append((padding_settings or {}).get("length"))
    usable = [int(n) for n in lengths if isinstance(n, int | float) and 0 < n < _HUGE]
    if not usable:
        raise ValueError(f"{directory}: cannot tell the maximum text length (no model_max_length or max_len)")
    padding: Padding = "longest" if padding_settings and padding_settings.get("length") is None else "max_length"
    # vlkit's Tokenizer pads and truncates itself (``Tokenizer._truncated``); the backend must not do it too.
    backend.no_padding()
    backend.no_truncation()
    tokenizer = Tokenizer(backend, int(ids["pad"]), int(ids["eos"]), min(usable), _side(sides["padding_side"]))
    tokenizer.truncation_side = _side(sides["truncation_side"])
    tokenizer.hf_settings = settings
    tokenizer.chat_template = read_chat_templates(directory)
    tokenizer.named_tokens = named
    tokenizer.word_end = kind_of.word_end if kind_of is not None else None
    return tokenizer, padding


def _gpt2_tokenizer(directory: Path, settings: dict[str, Any]) -> _HFTokenizer:
    """transformers' GPT2Tokenizer over a directory without tokenizer.json (OPT's, facebook/opt-*): the byte-level
    BPE of vocab.json and merges.txt, the special tokens the configuration names kept whole, and the begin / end
    tokens added where ``add_bos_token`` / ``add_eos_token`` say (OPT prepends ``</s>``)."""
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="")
    except Exception as error:  # tokenizers raises a plain Exception that names no file
        raise DamagedFileError(vocab, f"vocab.json / merges.txt not readable as a byte-level BPE ({error})") from None
    backend = _HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space", False)))
    backend.decoder = decoders.ByteLevel()
    # transformers 5 writes each added token with its id and flags: added first, in the order of their ids.
    declared = sorted((int(number), token) for number, token in (settings.get("added_tokens_decoder") or {}).items())
    for number, token in declared:
        content = _token_text(token) or ""
        flags = token if isinstance(token, dict) else {}
        options = {key: bool(flags.get(key, False)) for key in ("single_word", "lstrip", "rstrip", "normalized")}
        added = AddedToken(content, special=bool(flags.get("special", True)), **options)
        if added.special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
        if backend.token_to_id(content) != number:
            raise ValueError(f"{directory}: added token {content!r} is id {number} in tokenizer_config.json but "
                             f"{backend.token_to_id(content)} here")  # fmt: skip
    named = [_token_text(settings.get(key)) for key in ("unk_token", "bos_token", "eos_token", "pad_token")]
    named += [_token_text(token) for token in settings.get("additional_special_tokens") or ()]
    backend.add_special_tokens([token for token in dict.fromkeys(named) if token])
    bos = _token_text(settings.get("bos_token")) if settings.get("add_bos_token") else None
    eos = _token_text(settings.get("eos_token")) if settings.get("add_eos_token") else None
    if bos or eos:
        single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
        ends = dict.fromkeys(token for token in (bos, eos) if token)
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(token, backend.token_to_id(token)) for token in ends]
        )
    return backend


def _side(value: str) -> PaddingSide:
    return "left" if value == "left" else "right"


@dataclass(frozen=True)
class _TokenizerClass:
    """What the transformers 5 tokenizer class that reads a directory brings to its stored tokenizer.json: its own
    pipeline (``rebuild``: normalizer, pre-tokenizer and decoder replaced, the vocabulary, merges and post-processor
    kept; None: the stored one), its default padding side, the special tokens it names itself, and the end-of-word
    suffix its ``decode`` turns into spaces."""

    name: str
    rebuild: Callable[[_HFTokenizer, dict[str, Any]], None] | None = None
    padding_side: PaddingSide = "right"
    tokens: tuple[tuple[str, str], ...] = ()
    word_end: str | None = None


def _tokenizer_class(
    model_type: str | None, settings: dict[str, Any], file: Path, backend: _HFTokenizer
) -> _TokenizerClass | None:
    """The tokenizer class transformers 5 reads this directory with, where it is not the stored tokenizer.json as it
    is (None):

    - ``Siglip2Tokenizer``, for every siglip2 directory whatever tokenizer_config.json names: it lower-cases (SigLIP 2
      trained on lower-cased text; Gemma's tokenizer.json does not) and pads on the left.
    - ``LlamaTokenizer``, for a Llama directory whose tokenizer_config.json names it (Llama 2, Vicuna, TinyLlama),
      unless its tokenizer.json is byte-level (Llama 3, read as stored); it pads on the left.
    - ``CLIPTokenizer``, for a directory that names it (or a CLIP one that names no class) over CLIP's end-of-word
      BPE: CLIP's cleaning and split, and decoding with its "</w>" word ends as spaces.
    - ``Qwen2Tokenizer``, for every qwen2 directory: the stored pipeline, its own special tokens.
    """
    named = str(settings.get("tokenizer_class") or "").removesuffix("Fast")
    if model_type == "siglip2":
        return _SIGLIP2
    if model_type == "llama" and named == "LlamaTokenizer" and '"ByteLevel"' not in file.read_text(encoding="utf-8"):
        return _LLAMA
    word_end = getattr(backend.model, "end_of_word_suffix", None)
    if (named == "CLIPTokenizer" or (model_type == "clip" and not named)) and word_end == "</w>":
        return _CLIP
    return _QWEN2 if model_type == "qwen2" else None


def _as_siglip2_tokenizer(backend: _HFTokenizer, settings: dict[str, Any]) -> None:
    """transformers 5's Siglip2Tokenizer pipeline: lower-case, spaces as "▁", byte fallback when decoding."""
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _as_llama_tokenizer(backend: _HFTokenizer, settings: dict[str, Any]) -> None:
    """transformers 5's LlamaTokenizer pipeline over a stored tokenizer.json: no normalizer, and a Metaspace
    pre-tokenizer that puts "▁" before a text's first word only ("first"; "always" with ``legacy``, "never" without
    ``add_prefix_space``), where the Llama 2 layout prepends one to every piece between special tokens."""
    prefix = settings.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if settings.get("legacy") else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)


# OpenAI CLIP's split: its special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _as_clip_tokenizer(backend: _HFTokenizer, settings: dict[str, Any]) -> None:
    """transformers 5's CLIPTokenizer pipeline: NFC, whitespace runs as one space, lower-case; CLIP's split, then
    byte-level pieces (no prefix space); byte-level decoding (the "</w>" word ends become spaces in ``decode``)."""
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()


_LLAMA = _TokenizerClass("LlamaTokenizer", _as_llama_tokenizer, "left",
                         (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>")))  # fmt: skip
_SIGLIP2 = _TokenizerClass("Siglip2Tokenizer", _as_siglip2_tokenizer, "left",
                           (("unk_token", "<unk>"), ("bos_token", "<bos>"), ("eos_token", "<eos>"),
                            ("pad_token", "<pad>"), ("mask_token", "<mask>")))  # fmt: skip
_CLIP = _TokenizerClass("CLIPTokenizer", _as_clip_tokenizer, "right",
                        (("unk_token", "<|endoftext|>"), ("bos_token", "<|startoftext|>"),
                         ("eos_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")), word_end="</w>")  # fmt: skip
_QWEN2 = _TokenizerClass("Qwen2Tokenizer", None, "right",
                         (("unk_token", "<|endoftext|>"), ("eos_token", "<|endoftext|>"),
                          ("pad_token", "<|endoftext|>")))  # fmt: skip


def _named_tokens(settings: dict[str, Any], defaults: dict[str, str], eos: str) -> dict[str, str]:
    """transformers' ``special_tokens_map``: the class's defaults, then every ``*_token`` the configuration names
    (a model's ``image_token`` too) and the named ``extra_special_tokens``; the end-of-sequence token always."""
    named = dict(defaults)
    extra = settings.get("extra_special_tokens")
    for key, value in [*settings.items(), *(extra.items() if isinstance(extra, dict) else ())]:
        if key.endswith("_token") and isinstance(value, str | dict) and _token_text(value):
            named[key] = str(_token_text(value))
    return {**named, "eos_token": eos}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

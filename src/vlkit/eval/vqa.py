"""VQA exact-match accuracy, overall and per question kind, after answer normalisation.

    vqa_accuracy(predictions [str], references [str | [str]], kinds [str] | None) -> VQAResult

Normalisation (in the spirit of the VQAv2 evaluation, Antol et al., 2015; Goyal et al., 2017): lower case,
punctuation removed, the articles a / an / the dropped, number words written as digits ("Three." -> "3"). A
reference may list several acceptable answers; a prediction is right when it equals any of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
NUMBER_WORDS: dict[str, str] = {word: str(number) for number, word in enumerate(_NUMBERS)}
_ARTICLES = frozenset({"a", "an", "the"})
# Punctuation, except a sign or decimal point that belongs to a number ("-1" is not "1", "2.5" is not "2 5"). Letters
# of every script are words ("café", "红色"), not punctuation.
_PUNCTUATION = re.compile(r"(?![-+.]\d)[^\w\s]|(?<=\d)\.(?!\d)|_")


@dataclass
class VQAResult:
    accuracy: float
    per_kind: dict[str, float]  # kind -> accuracy
    counts: dict[str, int]  # kind -> number of questions
    correct: list[bool]  # per question, in input order
    count: int

    def as_dict(self, prefix: str = "vqa_") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.accuracy}
        out.update({f"{prefix}accuracy_{kind}": value for kind, value in self.per_kind.items()})
        return out


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or articles, digits for number words: 'The Three red circles.' -> '3 red circles'.
    An answer that is nothing but an article keeps it (the letter "A" stays "a", never the empty answer)."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    kept = [word for word in words if word not in _ARTICLES] or words
    return " ".join(NUMBER_WORDS.get(word, word) for word in kept)


def vqa_accuracy(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], kinds: Sequence[str] | None = None
) -> VQAResult:
    """Exact match after ``normalise_answer``; per-kind accuracies when ``kinds`` names each question's kind."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if kinds is not None and len(kinds) != len(references):
        raise ValueError(f"{len(kinds)} kinds but {len(references)} references")
    if not references:
        raise ValueError("no questions to score")
    correct = []
    for prediction, reference in zip(predictions, references, strict=True):
        accepted = [reference] if isinstance(reference, str) else list(reference)
        predicted = normalise_answer(prediction) if isinstance(prediction, str) else None
        # An empty prediction is never right, whatever a reference normalises to.
        correct.append(bool(predicted) and predicted in {normalise_answer(answer) for answer in accepted})
    per_kind: dict[str, float] = {}
    counts: dict[str, int] = {}
    if kinds is not None:
        for kind in dict.fromkeys(kinds):
            hits = [hit for hit, own in zip(correct, kinds, strict=True) if own == kind]
            per_kind[kind], counts[kind] = sum(hits) / len(hits), len(hits)
    return VQAResult(sum(correct) / len(correct), per_kind, counts, correct, len(correct))

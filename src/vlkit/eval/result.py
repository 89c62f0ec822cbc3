"""``EvalResult``: what every evaluation returns — scalar metrics to log, and artifacts for the report.

Artifacts are whatever the report draws from (confusion matrices, retrieval similarities, sample answers, boxes);
keeping them on the result rather than on the evaluator means a periodic evaluation leaves no state behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalResult"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)

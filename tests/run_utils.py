"""Helpers for tests that interrupt a finished recipe run and resume it."""

from __future__ import annotations

import shutil
from pathlib import Path

# A dual encoder small enough to train a few hundred steps in seconds (recipe overrides for the shapes presets).
TINY_DUAL_ENCODER = {
    "model.vision.image_size": 32, "model.vision.dim": 32, "model.vision.depth": 1, "model.vision.num_heads": 2,
    "model.vision.mlp_dim": 64, "model.text.dim": 32, "model.text.depth": 1, "model.text.num_heads": 2,
    "model.text.mlp_dim": 64, "model.embed_dim": 16,
}  # fmt: skip


def interrupt_after(out: Path, stage_folder: Path, step: int) -> None:
    """Make the finished run in ``out`` look interrupted after ``step`` of the stage in ``stage_folder``: the run's
    final outputs, the stage's metrics and its later checkpoints never written."""
    for name in ("metrics.json", "model"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (stage_folder / "metrics.json").unlink()
    kept = f"step_{step:08d}"
    for checkpoint in (stage_folder / "checkpoints").glob("step_*"):
        if checkpoint.name != kept:
            shutil.rmtree(checkpoint)
    (stage_folder / "checkpoints" / "latest").write_text(kept + "\n")

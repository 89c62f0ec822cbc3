"""Where a stage's parts start: ``Stage.init`` maps a part (a submodule name: ``image_encoder``, ``lm``, ``bridge``)
to an ``InitFrom`` source, a model directory or another recipe's run.

A part is copied only into a part of the same architecture: both modules' configs must match except for
training-time choices (``TRAINING_ONLY``: EVA-CLIP fine-tunes with patch dropout a tower pretrained without), so a
mean-pooled tower never silently starts a MAP-pooled one with a random head.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vlkit.recipes.base import InitFrom, get_recipe
from vlkit.tasks.base import RunContext
from vlkit.train import distributed

logger = logging.getLogger(__name__)

__all__ = ["TRAINING_ONLY", "init_parts", "source_part"]

# Config fields a part's source need not share with the part it initialises.
TRAINING_ONLY = ("drop_path", "patch_dropout")
# The names one role goes by in different model kinds; a source without the target's name is searched for these.
_ALIASES = (("image_encoder", "encoder"),)


def init_parts(model: nn.Module, init: Mapping[str, InitFrom], run: RunContext | None = None) -> None:
    """Copy each named part's weights from its source (``run`` is needed for ``recipe:`` sources only)."""
    from vlkit.hub import from_pretrained

    for part, spec in init.items():
        target = model.get_submodule(part)
        source_model = from_pretrained(resolve_source(spec, run))
        source = _part_of(source_model, spec.source, part, spec.part)
        where = f"{spec.source} ({spec.part or part})"
        _check_architecture(target, source, where, part)
        _check_vocabulary(model, source_model, target, where, part)
        target.load_state_dict(source.state_dict())
        logger.info("%s starts from %s", part, spec.source)


def source_part(path: Path | str, target: str, part: str | None = None) -> nn.Module:
    """The module ``part`` (default: ``target`` or its alias) of the model at ``path`` (vlkit or Hugging Face)."""
    from vlkit.hub import from_pretrained

    return _part_of(from_pretrained(path), path, target, part)


def _part_of(model: nn.Module, path: Path | str, target: str, part: str | None) -> nn.Module:
    names = [part] if part else next((list(group) for group in _ALIASES if target in group), [target])
    for name in names:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(f"{path}: a {type(model).__name__} has no {' or '.join(names)} to start {target} from")


def resolve_source(spec: InitFrom, run: RunContext | None) -> Path:
    """A directory; ``"recipe:NAME"`` is trained into ``OUT/pretrain/NAME`` first unless a finished run is there."""
    if not spec.source.startswith("recipe:"):
        return Path(spec.source)
    if run is None:
        raise ValueError(f"{spec.source}: a recipe source is trained inside a run; pass the run")
    name = spec.source.removeprefix("recipe:")
    out_dir = run.out_dir / "pretrain" / name
    if not (out_dir / "metrics.json").exists():
        if distributed.get_world_size() > 1:
            # Pretraining is single-process: every rank stops here rather than wait on rank 0 training alone.
            raise ValueError(f"recipe {run.recipe.name}: train its {name} run first: `vlkit train --recipe {name} "
                             f"--out {out_dir}`")  # fmt: skip
        shared = {
            key: value
            for key, value in run.recipe.model_overrides.items()
            if key.partition(".")[0] in spec.share and key.rpartition(".")[2] not in TRAINING_ONLY
        }
        recipe = get_recipe(name).with_overrides({**{f"model.{k}": v for k, v in shared.items()}, **spec.overrides})
        logger.info("recipe %s: training %s into %s", run.recipe.name, name, out_dir)
        from vlkit.recipes.run import run_recipe

        run_recipe(recipe, out_dir, resume=True, progress=run.progress, report=run.report, device=run.device)
    return out_dir / "model"


def _check_vocabulary(model: nn.Module, source_model: nn.Module, target: nn.Module, where: str, part: str) -> None:
    """A part that embeds token ids (a language model, a text tower) reads them with its source's tokenizer: both
    models' tokenizers must give every token the same id, or the copied embeddings would mean other tokens."""
    if not any(isinstance(module, nn.Embedding) for module in target.modules()):
        return  # an image part reads no token ids
    mine, theirs = _vocabulary(model), _vocabulary(source_model)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"{where}: its tokenizer differs from the model's, so its {part} cannot read the model's "
                         "token ids; start from a run fitted on the same data settings")  # fmt: skip


def _vocabulary(model: nn.Module) -> dict[str, int] | None:
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend", tokenizer)  # vlkit's Tokenizer wraps a tokenizers.Tokenizer
    return backend.get_vocab() if hasattr(backend, "get_vocab") else None


def _check_architecture(target: nn.Module, source: nn.Module, where: str, part: str) -> None:
    wanted, found = getattr(target, "config", None), getattr(source, "config", None)
    if wanted is None or found is None:
        return
    if type(wanted) is not type(found):
        raise ValueError(f"{where}: a {type(found).__name__} cannot start {part}, a {type(wanted).__name__}")

    def architecture(config: Any) -> Any:
        return dataclasses.replace(config, **{name: 0.0 for name in TRAINING_ONLY if hasattr(config, name)})

    if architecture(found) != architecture(wanted):
        compared = [item.name for item in dataclasses.fields(wanted) if item.name not in TRAINING_ONLY]
        changed = sorted(name for name in compared if getattr(wanted, name, None) != getattr(found, name, None))
        raise ValueError(f"{where}: its {part} differs from the model's in {changed}")

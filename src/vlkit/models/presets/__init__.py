"""Named presets of the image and dual-encoder models, one module per family, each beside the helpers its presets
share: ``clip`` (OpenAI CLIP, and FILIP's token-wise variant of its tiny model), ``siglip`` (SigLIP, SigLIP 2
NaFlex, NaViT's tiny model), ``classifiers`` (ImageNet ViT / ConvNeXt), ``shapes`` (the ShapesWorld models the
recipes train). Each family has its exact public architectures and its tiny ``test_*`` models.

Importing this package registers them all (``vlkit.registry`` does, on first use); the language models' presets are
in ``vlkit.lm.presets``. Real-size presets mirror the published configs of their checkpoints (parameter names aside,
shapes and counts match: see tests/test_models.py).
"""

from vlkit.models.presets import classifiers, clip, shapes, siglip

__all__ = ["classifiers", "clip", "shapes", "siglip"]

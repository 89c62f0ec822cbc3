"""vlkit: the modern vision-language lineage built from one small set of composable parts.

Public API: ``create_model``, ``list_models``, ``from_pretrained``, ``export_hf``, ``load_processor``; every model has
``save_pretrained``.
"""

from vlkit.convert import export_hf
from vlkit.data.processors import load_processor
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel  # registers the VLM config, model class and presets
from vlkit.registry import create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "VisionLanguageModel",
    "__version__",
    "create_model",
    "export_hf",
    "from_pretrained",
    "get_config",
    "list_models",
    "load_processor",
]

"""Named training recipes: model + data + task + stages, small and declarative.

``get_recipe(name)`` returns a frozen ``Recipe``; ``run_recipe`` (in ``vlkit.recipes.run``) trains it.
"""

from vlkit.recipes.base import InitFrom, LayerDecay, Recipe, Stage, get_recipe, list_recipes, register_recipe

__all__ = ["InitFrom", "LayerDecay", "Recipe", "Stage", "get_recipe", "list_recipes", "register_recipe"]

"""Named training recipes: data + model + training schedule, small and declarative.

``get_recipe(name)`` returns a frozen ``Recipe``; ``run_recipe`` (in ``vlkit.recipes.run``) trains it.
"""

from vlkit.recipes.base import Recipe, get_recipe, list_recipes, register_recipe

__all__ = ["Recipe", "get_recipe", "list_recipes", "register_recipe"]

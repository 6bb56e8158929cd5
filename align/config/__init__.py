"""Recipe loading: typed schemas, overrides, and the checks that run before any process starts."""

from align.config.checks import check_model_source, load_grpo_recipe, load_sft_recipe
from align.config.loader import RecipeError, load_recipe
from align.config.schema import SFTRecipe

__all__ = ["RecipeError", "SFTRecipe", "check_model_source", "load_grpo_recipe", "load_recipe", "load_sft_recipe"]

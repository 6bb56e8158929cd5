"""Typed recipes: YAML + `key=value` overrides -> nested dataclasses, validated before any process starts.

Every error is one line that names the recipe file and the dotted key, so a user fixes it without
reading a traceback. The schema itself lives in `align/config/schema.py`; this module only knows how
to turn plain YAML data into dataclass instances of any schema.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Names users bring from TRL / transformers, pointed at ours in the did-you-mean hint.
PEER_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "micro_batch_size",
              "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs",
              "max_seq_length": "max_length", "lr_scheduler_type": "schedule", "warmup_ratio": "warmup_steps",
              # the sampling-ahead bound: our former boolean, prime-rl's and AReaL's names
              "overlap_rollout": "max_staleness", "max_off_policy_steps": "max_staleness",
              "max_head_offpolicyness": "max_staleness"}


class RecipeError(ValueError):
    """A recipe problem, reported as one line naming the file and the key."""


def describe(field: dataclasses.Field) -> str:
    """The one-line description every schema field carries in its metadata."""
    return field.metadata.get("help", "")


def load_recipe(schema: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe, apply `a.b.c=value` overrides, and build the typed schema.

    Relative paths inside the recipe stay relative to the current directory (the README runs
    everything from the repository root), as in TRL/torchtune.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override, source=str(path))
    return build(schema, raw, source=str(path))


def apply_override(raw: dict, override: str, source: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (so `1e-4`, `true`, `[1,2]`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"{source}: override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build(schema: type[T], data: Any, source: str, prefix: str = "") -> T:
    """Build dataclass `schema` from a mapping, checking unknown keys, missing keys and types."""
    where = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            close = [PEER_NAMES[key]] if PEER_NAMES.get(key) in fields else difflib.get_close_matches(
                str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise RecipeError(f"{source}: unknown key {prefix}{key}{hint}")
    values = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            values[name] = convert(hints[name], data[name], source, key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {key} ({describe(field)})")
    try:
        return schema(**values)
    except (ValueError, TypeError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"{source}: {where}: {err}") from None


def convert(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check and convert one value against its type hint (dataclass, Literal, list, Optional, scalars)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, source, key)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[-1])
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{source}: {key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key}: expected a list, got {type(value).__name__}")
        return [convert(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, prefix=f"{key}.")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RecipeError(f"{source}: {key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"{source}: {key}: expected a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise RecipeError(f"{source}: {key}: expected a string, got {value!r}")
        return str(value)
    if hint is Any:
        return value
    raise RecipeError(f"{source}: {key}: unsupported schema type {hint!r}")


def to_dict(recipe: Any) -> dict:
    """The recipe as plain data (for saving next to a run, so it can be reproduced)."""
    return dataclasses.asdict(recipe)


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A schema field with its one-line description; lists/dicts/dataclasses get a default factory."""
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)

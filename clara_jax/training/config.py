"""Loading, overriding and validating run configs (`configs/*.py:ARG` + `--config.a.b=value`).

Overrides are typed by the field they replace, unknown keys are refused with the closest
known names, and `validate` (training/run_spec.py) reports every problem at once, before anything
heavy starts.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil

import ml_collections

from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.presets import set_path
from clara_jax.training.run_spec import ConfigError, RunSpec


def _is_file_spec(target: str) -> bool:
    """'configs/stage1_scp.py' names a file; 'stage1_scp' a module of the installed package."""
    return target.endswith(".py") or os.sep in target or "/" in target


def _config_module(target: str):
    """A config file ('configs/stage1_scp.py', any path) or a module of the installed `configs`
    package ('stage1_scp'). Config files import `configs.common`, which the install provides."""
    if _is_file_spec(target):
        if not os.path.isfile(target):
            raise ConfigError(
                f"config file {target!r} does not exist (expected e.g. configs/stage1_scp.py:tiny "
                "or, from the installed configs package, stage1_scp:tiny)"
            )
        module_spec = importlib.util.spec_from_file_location(f"_clara_config_{abs(hash(target))}", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    known = sorted(
        m.name
        for m in pkgutil.iter_modules(importlib.import_module("configs").__path__)
        if m.name != "common"
    )
    if target not in known:
        raise ConfigError(f"config {target!r} is neither a file nor one of the installed configs {known}")
    return importlib.import_module(f"configs.{target}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/stage1_scp.py:tiny,runlocal' or 'stage1_scp:tiny,runlocal' -> get_config('tiny,runlocal')."""
    target, _, arg = spec.partition(":")
    module = _config_module(target)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{target}: no get_config(arg) function")
    try:
        return module.get_config(arg or None)
    except ValueError as err:
        raise ConfigError(f"{target}: {err}") from None


def stage_config_spec(spec: str, stage: str) -> str:
    """The same ARG in `stage`'s config, beside the given one ('configs/stage1_scp.py:x' ->
    'configs/stage3_e2e.py:x'; 'stage1_scp:x' -> 'stage3_e2e:x')."""
    target, sep, arg = spec.partition(":")
    module = get_stage(stage).config_module
    if _is_file_spec(target):
        return os.path.join(os.path.dirname(target), module + ".py") + sep + arg
    return module + sep + arg


def _parse_value(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true/false, got {text!r}")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"--config.{key}: expected {kind.__name__}, got {text!r}") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `a.b=value`) strings in order."""
    flat = {k: v for k, v in _flatten(config)}
    for item in overrides:
        text = item[len("--config.") :] if item.startswith("--config.") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.key=value")
        key, value = text.split("=", 1)
        if key not in flat:
            close = difflib.get_close_matches(key, flat, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config.{key}: no such config field{hint}")
        parsed = _parse_value(value, flat[key], key)
        set_path(config, key, parsed)
        flat[key] = parsed
    return config


def _flatten(config, prefix=""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def validate(c: ml_collections.ConfigDict) -> RunSpec:
    """The config's typed settings; a ConfigError lists every problem, with field and expectation."""
    return RunSpec.from_config(c)


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    config = apply_overrides(load_config_file(spec), list(overrides))
    validate(config)
    return config

"""Loading, overriding and validating run configs (`configs/*.py:ARG` + `--config.a.b=value`).

Overrides are typed by the field they replace, unknown keys are refused with the closest
known names, and `validate` reports every problem at once, before anything heavy starts.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil

import ml_collections

from clara_jax.model.decoder import REMAT_POLICIES, DTypePolicy
from clara_jax.model.presets import PRESETS
from clara_jax.model.stage_registry import STAGE_NAMES, get_stage
from clara_jax.model.topk import MASK_MODES
from clara_jax.parallel.mesh import MeshConfig
from clara_jax.parallel.rules import parse_rules


class ConfigError(ValueError):
    pass


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
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = parsed
        flat[key] = parsed
    return config


def _flatten(config, prefix=""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def validate(c: ml_collections.ConfigDict) -> None:
    """Every problem of a config, with the field and what is expected, in one error."""
    problems = []

    def need(ok: bool, field: str, expected: str):
        if not ok:
            problems.append(f"{field} = {c[field]!r}: expected {expected}")

    need(c.stage in STAGE_NAMES, "stage", f"one of {STAGE_NAMES}")
    need(c.model.preset in PRESETS, "model.preset", f"one of {sorted(PRESETS)}")
    need(
        bool(c.model.path) or c.model.preset == "tiny",
        "model.path",
        "a local transformers directory (only the 'tiny' preset has a built-in random init)",
    )
    try:
        DTypePolicy.parse(c.model.dtype)
    except (TypeError, ValueError):
        need(False, "model.dtype", "'float32', 'bfloat16' or 'p=float32,c=bfloat16'")
    need(c.model.remat in REMAT_POLICIES, "model.remat", f"one of {sorted(REMAT_POLICIES)}")
    need(c.lora.rank > 0, "lora.rank", "> 0")
    need(c.lora.alpha > 0, "lora.alpha", "> 0")
    need(0 <= c.lora.dropout < 1, "lora.dropout", "in [0, 1)")
    k = c.clara
    need(
        1 <= k.compression_rate <= min(256, k.doc_max_length),
        "clara.compression_rate",
        "in [1, min(256, doc_max_length)]",
    )
    need(k.doc_max_length >= 1, "clara.doc_max_length", ">= 1")
    need(k.mse_weight >= 0, "clara.mse_weight", ">= 0")
    need(k.docs_per_example >= 1, "clara.docs_per_example", ">= 1")
    need(k.top_k >= 1, "clara.top_k", ">= 1")
    need(k.temperature > 0, "clara.temperature", "> 0")
    need(k.topk_mask_mode in MASK_MODES, "clara.topk_mask_mode", f"one of {MASK_MODES}")
    need(k.query_max_length >= 1, "clara.query_max_length", ">= 1")
    need(k.generator_max_length >= 16, "clara.generator_max_length", ">= 16")
    need(c.data.policy in ("error", "skip"), "data.policy", "'error' or 'skip'")
    need(c.data.bucket >= 1, "data.bucket", ">= 1")
    need(c.data.num_epochs >= 1, "data.num_epochs", ">= 1")
    need(c.data.eval_every >= 0, "data.eval_every", ">= 0 (0: no periodic dev evaluation)")
    need(c.data.eval_questions >= 1, "data.eval_questions", ">= 1")
    if c.stage in STAGE_NAMES and get_stage(c.stage).retrieval:
        need(c.data.candidates >= k.top_k, "data.candidates", f">= clara.top_k = {k.top_k}")
        need(
            not c.data.eval_every or bool(c.data.eval),
            "data.eval",
            "a file with pos_index when data.eval_every > 0 (the dev questions to rank)",
        )
        need(k.mse_weight == 0, "clara.mse_weight", "0 in stage 3 (the compressor is frozen)")
    need(c.batch.micro_size >= 1, "batch.micro_size", ">= 1")
    need(
        c.batch.global_size >= c.batch.micro_size and c.batch.global_size % c.batch.micro_size == 0,
        "batch.global_size",
        f"a multiple of batch.micro_size = {c.batch.micro_size}",
    )
    need(c.optim.lr > 0, "optim.lr", "> 0")
    need(c.optim.schedule in ("cosine", "constant"), "optim.schedule", "'cosine' or 'constant'")
    need(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio", "in [0, 1)")
    need(0 <= c.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]")
    need(c.optim.clip_norm > 0, "optim.clip_norm", "> 0")
    need(c.total_steps >= 0, "total_steps", ">= 0 (0: derived from the data)")
    try:
        MeshConfig.from_spec(c.mesh)
    except ValueError as err:
        problems.append(f"mesh = {c.mesh!r}: {err}")
    try:
        parse_rules(c.sharding_rules)
    except ValueError as err:
        problems.append(f"sharding_rules = {c.sharding_rules!r}: {err}")
    need(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", ">= 1")
    need(c.checkpoint.keep >= 1, "checkpoint.keep", ">= 1")
    need(c.log_every >= 1, "log_every", ">= 1")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    config = apply_overrides(load_config_file(spec), list(overrides))
    validate(config)
    return config

"""From a run config to a ready model: base weights, tokenizer, CLaRa tokens, adapters.

Stages chain through `init_from` (the previous stage's workdir):
  stage 2 <- stage 1: the compressor and the <MEM*> rows; a fresh generator (as the paper does)
  stage 3 <- stage 2: compressor, generator and <MEM*> rows; the query reasoner starts as a copy
                      of the compressor (docs/official_code.md §1.3)
The shape-defining settings (preset, compression rate, doc length, LoRA) are taken from the
previous stage's saved config and must agree with this run's (docs/official_code.md §8.1 item 4).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections
from flax import nnx

from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import ClaraTokenizer, load_tokenizer
from clara_jax.formats import checkpoint_meta
from clara_jax.interop.gguf import resolve_model_path
from clara_jax.interop.hf import load_decoder
from clara_jax.model import factory
from clara_jax.model.clara import COMPRESSOR, QUERY_REASONER, ClaraConfig
from clara_jax.model.decoder import Decoder
from clara_jax.model.presets import preset
from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.rules import parse_rules
from clara_jax.parallel.sharded_init import change_sharded, create_sharded
from clara_jax.training.checkpoint import Checkpointer, abstract_like
from clara_jax.training.optimizer import make_optimizer
from clara_jax.training.run_spec import clara_settings, lora_config, optimizer_config
from clara_jax.training.stages import stage_spec
from clara_jax.training.step import TrainState
from clara_jax.training.trainable import split_trainable

log = logging.getLogger(__name__)

# Settings that fix parameter shapes or the base weights: they must match across chained stages.
CHAINED_KEYS = (
    "model.preset",
    "model.path",
    "clara.doc_max_length",
    "clara.compression_rate",
    "lora.rank",
    "lora.target_modules",
    "seed",
)


@dataclasses.dataclass
class BuiltModel:
    tokenizer: ClaraTokenizer
    model: Decoder
    clara: ClaraConfig


def tokenizer_dir(config) -> str:
    if config.model.tokenizer:
        return config.model.tokenizer
    if config.model.path:
        return resolve_model_path(config.model.path)
    if config.model.preset == "tiny":
        return str(TINY_TOKENIZER_DIR)
    raise ValueError(
        f"model.preset={config.model.preset!r} needs --config.model.path (a local transformers "
        "directory with its weights and tokenizer); only 'tiny' has a built-in random init"
    )


# The Variables build_model adds or rewrites on top of the base: CLaRa's vocabulary rows and adapters.
CLARA_ADDITIONS = nnx.Any(
    *(nnx.PathContains(name) for name in ("embed", "lm_head", "embed_rows", "adapters"))
)


def build_model(config: ml_collections.ConfigDict, mesh=None) -> BuiltModel:
    """Base decoder + CLaRa vocabulary + the three adapters (fresh), per the config.

    With a `mesh`, every parameter is read or initialised straight into the shards
    `config.sharding_rules` give it, so a base too large for one device never exists whole on
    one device (or in host memory).
    """
    clara = clara_settings(config)
    tok = load_tokenizer(tokenizer_dir(config), n_mem=clara.n_mem)
    rules = parse_rules(config.sharding_rules)
    if config.model.path:
        model = load_decoder(
            resolve_model_path(config.model.path),
            dtype=config.model.dtype,
            remat=config.model.remat,
            mesh=mesh,
            rules=rules,
        )
    else:
        arch = preset(config.model.preset).replace(
            vocab_size=tok.base_vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
        )
        model = create_sharded(
            lambda: Decoder(
                arch, rngs=nnx.Rngs(config.seed), dtype=config.model.dtype, remat=config.model.remat
            ),
            mesh,
            rules,
        )
    model = change_sharded(
        model,
        lambda m: add_clara_parts(m, config, tok.vocab_size, tok.mem_token_ids, tok.base_vocab_size),
        CLARA_ADDITIONS,
        mesh,
        rules,
    )
    return BuiltModel(tok, model, clara.model_config(tok.mem_token_ids))


def add_clara_parts(model: Decoder, config, vocab_size: int, mem_token_ids, first_new: int) -> None:
    """model/factory.py's recipe with the run's LoRA settings and seed: the one of `build_model`
    and of `clara-jax compile`'s abstract model."""
    factory.add_clara_parts(
        model,
        vocab_size=vocab_size,
        mem_token_ids=mem_token_ids,
        first_new=first_new,
        lora=lora_config(config),
        seed=config.seed,
    )


def same_model_path(a: str, b: str) -> bool:
    """One base checkpoint named two ways ("runs/base" vs "/abs/runs/base", "smollm2" vs its cache)."""
    if a == b:
        return True
    if not a or not b:
        return False
    return os.path.realpath(resolve_model_path(a)) == os.path.realpath(resolve_model_path(b))


def check_chain(config, previous: dict, source: str) -> None:
    """The previous stage must have produced parameters this run can use."""
    prev = ml_collections.ConfigDict(previous)
    problems = []
    for key in CHAINED_KEYS:
        mine, theirs = config[key], prev[key]  # ConfigDict reads dotted keys
        same = same_model_path(mine, theirs) if key == "model.path" else mine == theirs
        if not same:
            problems.append(f"{key}: this run has {mine!r}, {source} was trained with {theirs!r}")
    expected_prev = get_stage(config.stage).starts_from
    if expected_prev and prev.stage != expected_prev:
        problems.append(f"stage: {config.stage} starts from {expected_prev}, but {source} is {prev.stage}")
    if problems:
        raise ValueError(f"cannot initialise from {source}:\n  " + "\n  ".join(problems))


def init_from_previous_stage(built: BuiltModel, config, workdir: str) -> dict:
    """Copy the inherited adapters and <MEM*> rows from the previous stage's newest checkpoint."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        previous = checkpoint_meta.saved_config(ckpt.restore_meta(), ckpt_dir)
        check_chain(config, previous, ckpt_dir)
        prev = stage_spec(previous["stage"])
        _, prev_params, _ = split_trainable(built.model, prev.adapters, prev.state_has_rows)
        # the previous run saved a whole TrainState: restore into that layout, keep its params
        tx = make_optimizer(optimizer_config(previous))
        abstract = abstract_like(TrainState.create(prev_params, tx, jax.random.key_data(jax.random.key(0))))
        restored = ckpt.restore_latest(abstract)
        if restored is None:
            raise FileNotFoundError(f"{ckpt_dir}: no readable checkpoint to initialise from")
        step, state, _, _ = restored
    finally:
        ckpt.close()

    stage = get_stage(config.stage)
    inherit = stage.inherits
    params = state.params
    for role in inherit:
        nnx.update(built.model.adapters[role], params["adapters"][role])
    if "embed_rows" in params:
        built.model.embed_rows.set_value(params["embed_rows"][...])
    if stage.query_from_compressor:
        nnx.update(built.model.adapters[QUERY_REASONER], nnx.state(built.model.adapters[COMPRESSOR]))
    log.info(
        "initialised %s from %s step %d: %s%s",
        config.stage,
        ckpt_dir,
        step,
        ", ".join(inherit),
        " (+ query_reasoner <- compressor)" if stage.query_from_compressor else "",
    )
    return {"source": ckpt_dir, "step": step, "inherited": list(inherit)}

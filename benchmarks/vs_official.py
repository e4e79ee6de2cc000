"""clara_jax beside the official CLaRa PyTorch code, on exactly the same work (issue #14).

    python benchmarks/vs_official.py                      # every section, ~10-20 min on 2 quiet cores
    python benchmarks/vs_official.py --sections stage1 --reps 5 --out /tmp/vs.json
    python benchmarks/vs_official.py --quiet-wait 600     # a shared machine: wait longer for idle cores

The official side is `run_official.py` of shared/bench/official (see its README.md): the official
apple/ml-clara code, float32, torch with 2 threads, on the tiny fixed Llama base in
/tmp/clara-bench-base. When its venv (/tmp/clara-official-venv) or the base is missing, this script
runs that folder's `setup.sh` (with CLARA_OFFICIAL_MIRROR, default /work/.mirror/apple+ml-clara/repo).

Our side runs the same work through the public API only (so it survives refactors):
`clara_jax.training.config.load_config` + `--config.*` overrides, `training.build.build_model`
(the base read as a transformers directory), the data pipeline's `BatchIterator` over the same
records, `training.stages.stage_program(...).start()` for the train steps, `ClaraInference` for
compression and generation, and `load_decoder` + `inference.generation.generate` for the plain base.

Same work, from bench_config.json: float32; LoRA r16 α32 dropout 0.1 on every projection;
compression 16 of 128-token documents (n_mem 8, encoder rows of 139 = 128 + 3 + 8); AdamW
β 0.9/0.95, eps 1e-8, clip 1.0, constant lr (no scheduler, as the official harness).
  stage1      one SCP step, records 0-3 with all their QA pairs as target: encoder [4,139],
              generator [4,714] at its natural width (no bucketing), 1,661 target tokens, CE + 0.1 MSE.
  stage3_*    one stage-3 step, questions of lines 10/11 with 19 distractors each (positives at
              slots 3 and 12), top-5, CE only, lr 5e-6, generator at its natural width, candidates
              [40,139]. `stage3_recompress`: candidates re-compressed in the step, queries in our
              own layout (bucketed to their length: [2,40]); `stage3_recompress_q1035`: the same with
              queries padded to the official 1035; `stage3_cached`: candidate vectors compressed once
              before the step (our default, `data.cache_candidates`).
  compress    `compress_documents` of the 64 documents of lines 200-263, one batch of 64.
  generation  one question (line 20) with the documents of lines 20, 300-303: exactly 32 greedy new
              tokens from the 5 compressed documents (EOS ignored, as the official min_new_tokens),
              compress + generate, the first token alone, and the plain base (no adapter) on the
              653-token text prompt (each document cut to 128 tokens), 32 tokens and first token.

Method: each section runs in a fresh process (its peak RSS, `ru_maxrss` from wait4, is its own),
official and ours interleaved section by section. Before every timed block the process waits up to
--quiet-wait s for a 1-s window in which other processes use < 5 % of the CPU (`/proc/stat`, as
run_official.py), and measures the other processes' share during the timed repetitions; a section
where it exceeds 5 % is re-run in a fresh process (--retries) and flagged "contended" if it stays so.
Times are medians of --reps (5) after 1 warm-up (ours: after the ahead-of-time compile). For our
stage-1 step the compiled program's memory analysis (arguments, outputs, temporaries) is reported
next to its peak RSS. Absolute times move by about ±20 % between runs on a shared VM: only ratios
measured side by side in one run mean anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OFFICIAL_DIR = Path(os.environ.get("CLARA_OFFICIAL_BENCH", "/work/shared/bench/official"))
OFFICIAL_VENV = Path(os.environ.get("CLARA_OFFICIAL_VENV", "/tmp/clara-official-venv"))
DEFAULT_MIRROR = "/work/.mirror/apple+ml-clara/repo"

OFFICIAL_SECTIONS = ("stage1", "stage3", "compress", "generation")
# ours, grouped under the official section they are compared with (one fresh process each)
OUR_SECTIONS = {
    "stage1": ("stage1",),
    "stage3": ("stage3_recompress", "stage3_recompress_q1035", "stage3_cached"),
    "compress": ("compress",),
    "generation": ("generation",),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- CPU contention
class CpuMeter:
    """Share of the machine's CPU time used by OTHER processes between start() and stop()
    (the method of run_official.py: /proc/stat minus this process's own ticks)."""

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    @staticmethod
    def _self() -> int:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def start(self) -> None:
        self.t0, self.i0 = self._machine()
        self.s0 = self._self()

    def stop(self) -> float:
        t1, i1 = self._machine()
        s1 = self._self()
        busy_other = (t1 - self.t0) - (i1 - self.i0) - (s1 - self.s0)
        self.other_ticks = max(0, busy_other)
        return max(0.0, busy_other / max(t1 - self.t0, 1))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.05) -> dict:
    """Wait (up to max_wait_s) for a 1-s window in which other processes use < threshold of the CPU."""
    meter, t0 = CpuMeter(), time.perf_counter()
    while True:
        meter.start()
        time.sleep(1.0)
        share = meter.stop()
        waited = time.perf_counter() - t0
        if share < threshold or waited >= max_wait_s:
            return dict(waited_s=round(waited, 1), other_cpu_share_before=round(share, 3))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def any_contended(tree) -> bool:
    if isinstance(tree, dict):
        return bool(tree.get("contended")) or any(any_contended(v) for v in tree.values())
    return False


# ----------------------------------------------------------------------------- shared settings
def read_bench_config() -> dict:
    return json.loads((OFFICIAL_DIR / "bench_config.json").read_text())


def data_path() -> Path:
    return (OFFICIAL_DIR / "../../data/clara_pretrain_sample.jsonl").resolve()


def read_lines(lines) -> dict[int, dict]:
    wanted = set(lines)
    out = {}
    with data_path().open() as f:
        for i, line in enumerate(f):
            if i in wanted:
                out[i] = json.loads(line)
    if wanted - set(out):
        sys.exit(f"{data_path()}: lines {sorted(wanted - set(out))} not found")
    return out


def check_base(cfg: dict) -> list[str]:
    """Files of the base that differ from bench_config.json's sha256 (empty: byte-identical)."""
    bad = []
    for name, digest in cfg["files_sha256"].items():
        path = Path(cfg["base_model_dir"], name)
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(str(path))
    return bad


# ============================================================================= our side (child)
class Section:
    """Timing helpers of one child process: quiet wait, medians, contention, peak RSS."""

    def __init__(self, quiet_wait: float, warmup: int, reps: int):
        self.quiet_wait, self.warmup, self.reps = quiet_wait, warmup, reps

    def timed(self, name: str, fn) -> dict:
        """fn() must block until its result is ready; returns a dict of numbers (may be empty)."""
        import jax

        quiet = wait_for_quiet(self.quiet_wait) if self.quiet_wait > 0 else {}
        resettable = reset_peak_rss()
        for _ in range(self.warmup):
            jax.block_until_ready(fn())
        meter = CpuMeter()
        meter.start()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        other = meter.stop()
        out = dict(
            median_s=statistics.median(times),
            min_s=min(times),
            max_s=max(times),
            times_s=[round(t, 6) for t in times],
            other_processes_cpu_share=round(other, 3),
            contended=bool(other > 0.05 and meter.other_ticks >= 3),
            **quiet,
            peak_rss_mb=round(vm_hwm_mb(), 1),
            peak_rss_scope="warm-up + timed reps (VmHWM reset after compile)"
            if resettable
            else "process so far",
        )
        log(
            f"ours {name}: median {out['median_s'] * 1e3:.1f} ms (min {out['min_s'] * 1e3:.1f}, "
            f"max {out['max_s'] * 1e3:.1f}); other processes {other:.0%} of the CPU"
            + ("  <-- CONTENDED" if out["contended"] else "")
        )
        return out


def base_overrides(cfg: dict, stage: str) -> list[str]:
    """The run-config overrides that make a clara_jax run the benchmark's model and optimizer."""
    c = cfg["clara"]
    lora = c["lora"]
    adam = cfg["bench"]["adam"]
    s = cfg["bench"]["stage1" if stage == "stage1" else "stage3"]
    out = [
        f"model.path={cfg['base_model_dir']}",
        "model.dtype=float32",
        f"lora.rank={lora['r']}",
        f"lora.alpha={float(lora['alpha'])}",
        f"lora.dropout={lora['dropout']}",
        "lora.target_modules=all-linear",
        f"clara.doc_max_length={c['doc_max_length']}",
        f"clara.compression_rate={c['compr_rate']}",
        f"clara.generator_max_length={s['dec_max_len']}",
        f"batch.global_size={s['batch_size']}",
        f"batch.micro_size={s['batch_size']}",
        f"optim.lr={s['lr']}",
        "optim.schedule=constant",
        "optim.warmup_ratio=0.0",
        f"optim.b1={adam['betas'][0]}",
        f"optim.b2={adam['betas'][1]}",
        f"optim.weight_decay={adam['weight_decay']}",
        f"optim.clip_norm={adam['grad_clip_norm']}",
        f"seed={cfg['seed']}",
        "mesh=data=1,fsdp=1,tensor=1",
    ]
    if stage == "stage1":
        out.append("clara.mse_weight=0.1")
    else:
        out += [
            "clara.mse_weight=0.0",
            f"clara.top_k={s['top_k']}",
            f"data.candidates={s['n_candidates']}",
            f"clara.query_max_length={s['dec_max_len']}",  # the official training limit (1024)
        ]
    return out


def fit_width(batch: dict, keys: tuple[str, ...], mask_key: str, width: int, pad: dict) -> dict:
    """Left-trim all-padding columns of `keys` (leaves [micro, rows, L]) and left-pad to `width`.

    The layouts are left-padded and masked, so this changes only how much padding a row carries:
    the same tokens at the same RoPE positions (positions follow the mask)."""
    import numpy as np

    mask = np.asarray(batch[mask_key])
    used = mask.reshape(-1, mask.shape[-1]).any(axis=0)
    first = int(np.argmax(used)) if used.any() else mask.shape[-1]
    natural = mask.shape[-1] - first
    if width < natural:
        raise ValueError(f"{keys}: {natural} columns hold tokens, more than the requested width {width}")
    out = dict(batch)
    for k in keys:
        a = np.asarray(batch[k])[..., first:]
        out[k] = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(width - natural, 0)], constant_values=pad.get(k, 0))
    return out


def natural_width(batch: dict, mask_key: str) -> int:
    import numpy as np

    mask = np.asarray(batch[mask_key])
    used = mask.reshape(-1, mask.shape[-1]).any(axis=0)
    return int(mask.shape[-1] - np.argmax(used)) if used.any() else 0


def mesh_1() -> object:
    import jax

    from clara_jax.parallel.mesh import MeshConfig, make_mesh

    return make_mesh(MeshConfig.from_spec("data=1,fsdp=1,tensor=1"), devices=jax.devices()[:1])


def run_train_step(sec: Section, name: str, config, built, batch: dict, mesh) -> dict:
    """stage_program(...).start(), compile ahead of time (memory analysis), then time the step."""
    import jax
    import numpy as np

    from clara_jax.parallel.rules import parse_rules
    from clara_jax.training.run_spec import optimizer_config, stage_spec_of
    from clara_jax.training.stages import stage_program

    batch = {k: np.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        trainer = stage_program(
            built.model,
            stage_spec_of(config),
            built.clara,
            optimizer_config(config, 1000),
            mesh,
            batch,
            seed=config.seed,
            gumbel=config.clara.gumbel,
            straight_through=config.clara.straight_through,
            candidate_dropout=config.clara.candidate_dropout,
            rules=parse_rules(config.sharding_rules),
        ).start()
        device_batch = jax.device_put(batch, trainer.shardings.batch)
        compiled = trainer.step.lower(trainer.state, trainer.frozen, device_batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    box = {"state": trainer.state}
    losses = []

    def step():
        box["state"], metrics = compiled(box["state"], trainer.frozen, device_batch)  # state donated
        losses.append(metrics["loss"])
        return box["state"], metrics

    r = sec.timed(name, step)
    r["compile_s"] = round(compile_s, 2)
    r["loss_per_call_incl_warmup"] = [round(float(x), 5) for x in losses]
    r["batch_shapes"] = {k: list(v.shape[1:]) for k, v in batch.items()}  # per micro-step
    if "target_mask" in batch:
        r["label_tokens"] = int(batch["target_mask"].sum())
    if mem is not None:
        r["memory_analysis_mb"] = {
            "arguments": round(mem.argument_size_in_bytes / 2**20, 1),
            "outputs": round(mem.output_size_in_bytes / 2**20, 1),
            "aliased": round(mem.alias_size_in_bytes / 2**20, 1),
            "temporaries": round(mem.temp_size_in_bytes / 2**20, 1),
            "generated_code": round(mem.generated_code_size_in_bytes / 2**20, 1),
        }
    n_params = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
    r["trainable_params"] = n_params(trainer.state.params)
    return r


def first_batch(config, built, records, size: int, cache=None) -> dict:
    """The data pipeline's first batch of `size` records under `config` (one micro-batch)."""
    from clara_jax.data.pipeline import BatchIterator
    from clara_jax.training.run_spec import layout_config

    iterator = BatchIterator(
        records,
        built.tokenizer,
        config.stage,
        layout_config(config),
        global_size=size,
        micro_size=size,
        seed=config.seed,
        candidate_memory=cache.lookup if cache else None,
    )
    return next(iterator)


def stage1_inputs(cfg: dict):
    """(config, built model, batch) of the stage-1 step (also what a profiler script needs)."""
    from clara_jax.data.records import parse_record
    from clara_jax.training.build import build_model
    from clara_jax.training.config import load_config

    s1 = cfg["bench"]["stage1"]
    raw = read_lines(s1["data_lines"])
    records = [parse_record(raw[i], "stage1") for i in s1["data_lines"]]
    # the generator at its natural width, as the official collate pads to the longest row: a first
    # pass finds it, then data.bucket = that width (encoder rows stay at doc_max_length + 3 + n_mem)
    probe = load_config("stage1_scp:tiny", base_overrides(cfg, "stage1") + ["data.bucket=4096"])
    t0 = time.perf_counter()
    built = build_model(probe)
    build_s = time.perf_counter() - t0
    first = first_batch(probe, built, records, 4)
    width = natural_width(first, "gen_mask")
    config = load_config("stage1_scp:tiny", base_overrides(cfg, "stage1") + [f"data.bucket={width}"])
    batch = first_batch(config, built, records, s1["batch_size"])
    return config, built, batch, build_s


def stage1_section(sec: Section, cfg: dict) -> dict:
    config, built, batch, build_s = stage1_inputs(cfg)
    r = run_train_step(sec, "stage-1 step", config, built, batch, mesh_1())
    r["build_s"] = round(build_s, 2)
    return {"stage1_train_step": r}


def stage3_records(cfg: dict):
    """The official harness's two questions, each with 19 distractors around its positive."""
    from clara_jax.data.records import parse_record

    s3 = cfg["bench"]["stage3"]
    q_lines, n_cand = s3["question_lines"], s3["n_candidates"]
    d_lines = list(range(100, 100 + (n_cand - 1) * len(q_lines)))
    raw = read_lines(q_lines + d_lines)
    records = []
    for b, (ql, pos) in enumerate(zip(q_lines, s3["positive_slot"])):
        distract = [raw[i]["docs"][0] for i in d_lines[b * (n_cand - 1) : (b + 1) * (n_cand - 1)]]
        docs = distract[:pos] + [raw[ql]["docs"][0]] + distract[pos:]
        qi = s3["question_index"]
        obj = {
            "question": raw[ql]["question"][qi],
            "answer": raw[ql]["answers"][qi],
            "docs": docs,
            "pos_index": [pos],
        }
        records.append(parse_record(obj, "stage3"))
    return records


def stage3_section(sec: Section, cfg: dict, variant: str) -> dict:
    from clara_jax.training.build import build_model
    from clara_jax.training.candidate_cache import CandidateCache
    from clara_jax.training.config import load_config

    s3 = cfg["bench"]["stage3"]
    c = cfg["clara"]
    cached = variant == "stage3_cached"
    overrides = base_overrides(cfg, "stage3") + [f"data.cache_candidates={str(cached).lower()}"]
    config = load_config("stage3_e2e:tiny", overrides)
    records = stage3_records(cfg)
    t0 = time.perf_counter()
    built = build_model(config)
    build_s = time.perf_counter() - t0
    mesh = mesh_1()
    cache = None
    if cached:
        cache = CandidateCache.for_config(config, built, records, mesh)
    batch = first_batch(config, built, records, s3["batch_size"], cache)
    pad = built.tokenizer.pad_id
    n_mem = c["n_mem_tokens"]
    # generator at its natural width (the official collate pads to the longest row); candidates at
    # doc_max_length + 3 + n_mem as the official encoder layout
    gen_keys = ("gen_ids", "gen_mask", "targets", "target_mask")
    batch = fit_width(batch, gen_keys, "gen_mask", natural_width(batch, "gen_mask"), {"gen_ids": pad})
    if not cached:
        batch = fit_width(
            batch, ("enc_ids", "enc_mask"), "enc_mask", c["doc_max_length"] + 3 + n_mem, {"enc_ids": pad}
        )
    if variant == "stage3_recompress_q1035":
        batch = fit_width(
            batch, ("query_ids", "query_mask"), "query_mask", s3["query_pad_len_official"], {"query_ids": pad}
        )
    name = {
        "stage3_recompress": "stage-3 step, candidates re-compressed, own query layout",
        "stage3_recompress_q1035": "stage-3 step, candidates re-compressed, 1035-token queries",
        "stage3_cached": "stage-3 step, cached candidates, own query layout",
    }[variant]
    r = run_train_step(sec, name, config, built, batch, mesh)
    r["build_s"] = round(build_s, 2)
    if cache is not None:
        r["candidate_cache_s"] = round(cache.seconds, 3)
    return {variant: r}


def clara_inference(cfg: dict, batch_size: int):
    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.training.build import build_model
    from clara_jax.training.config import load_config

    config = load_config("stage1_scp:tiny", base_overrides(cfg, "stage1"))
    built = build_model(config)
    return ClaraInference(built.tokenizer, built.model, built.clara, batch_size=batch_size), built


def compress_section(sec: Section, cfg: dict) -> dict:
    c = cfg["bench"]["compress"]
    lo, hi = (int(x) for x in c["data_lines"].split("-"))
    raw = read_lines(range(lo, hi + 1))
    docs = [raw[i]["docs"][0] for i in range(lo, hi + 1)]
    clara, _ = clara_inference(cfg, batch_size=len(docs))  # one batch of 64, as the official call
    shapes = {}

    def run():
        memory, _ = clara.compress_documents(docs)
        shapes["out"] = list(memory.shape)
        return memory

    r = sec.timed(f"compress_documents({len(docs)} docs)", run)
    r.update(docs_per_s=len(docs) / r["median_s"], output_shape=shapes["out"])
    return {"compress_documents": r}


def generation_section(sec: Section, cfg: dict) -> dict:
    import jax.numpy as jnp

    from clara_jax.data.prompts import STANDARD_SYSTEM
    from clara_jax.data.tokenizer import load_tokenizer, render_chat
    from clara_jax.inference.generation import SamplingConfig, generate
    from clara_jax.interop.hf import load_decoder

    gen = cfg["bench"]["generation"]
    dml = cfg["clara"]["doc_max_length"]
    raw = read_lines(gen["doc_lines"] + [gen["question_line"]])
    q = raw[gen["question_line"]]["question"][gen["question_index"]]
    docs = [raw[i]["docs"][0] for i in gen["doc_lines"]]
    max_new = gen["max_new_tokens"]
    clara, built = clara_inference(cfg, batch_size=1)
    tok = built.tokenizer
    comp, _ = clara.compress_documents(docs)
    # exactly max_new tokens whatever the random weights emit (the official sets min_new_tokens)
    exact = lambda n: SamplingConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=tok.pad_id)
    out: dict = {}

    def compressed(n):
        def run():
            out["compressed"] = clara.generate_from_compressed_documents_and_questions(
                [q], comp, max_new_tokens=n, sampling=exact(n)
            )

        return run

    def end_to_end():
        out["e2e"] = clara.generate_from_text([q], [docs], max_new_tokens=max_new, sampling=exact(max_new))

    r_c = sec.timed("generate from 5 compressed docs", compressed(max_new))
    r_e = sec.timed("generate_from_text (compress 5 docs + generate)", end_to_end)
    r_c1 = sec.timed("first token, 5 compressed docs", compressed(1))

    # the plain base (no adapter, no CLaRa tokens) on the standard prompt with the documents as text
    base_dir = cfg["base_model_dir"]
    base = load_decoder(base_dir, dtype="float32")
    btok = load_tokenizer(base_dir, n_mem=0)
    cut = [btok.hf.decode(btok.hf(d, add_special_tokens=False)["input_ids"][:dml]) for d in docs]
    user = "Background:\n" + "\n".join(cut) + f"\n\nQuestion:{q}"
    messages = [{"role": "system", "content": STANDARD_SYSTEM}, {"role": "user", "content": user}]
    text = render_chat(btok, messages, add_generation_prompt=True)
    ids = jnp.asarray([btok.hf(text, add_special_tokens=False)["input_ids"]], jnp.int32)

    def text_generate(n):
        sampling = SamplingConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=btok.pad_id)
        return lambda: generate(base, ids, jnp.ones(ids.shape, bool), sampling=sampling)

    r_t = sec.timed("text RAG, plain base model", text_generate(max_new))
    r_t1 = sec.timed("first token, text RAG plain base model", text_generate(1))
    prompt_tokens = int(ids.shape[1])
    for r in (r_t, r_t1):
        r["prompt_tokens"] = prompt_tokens
    for r in (r_c, r_e, r_c1):
        r["prompt"] = "standard prompt, 5 memory blocks, bucketed by ClaraInference (bucket 32)"
    return {
        "generation": dict(
            question=q,
            max_new_tokens=max_new,
            compressed=r_c,
            end_to_end_generate_from_text=r_e,
            first_token_compressed=r_c1,
            text_rag_base_model=r_t,
            first_token_text_rag_base_model=r_t1,
            text=out["compressed"][0][:200],
        )
    }


def child_main(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = read_bench_config()
    t0 = time.perf_counter()
    import logging

    import jax

    import clara_jax  # noqa: F401

    # "N of 64 texts cut to 128 tokens" on every call: expected (the official cuts them too)
    logging.getLogger("clara_jax.inference").setLevel(logging.ERROR)

    rss_after_import = vm_hwm_mb()
    sec = Section(args.quiet_wait, args.warmup, args.reps)
    name = args.child
    if name == "stage1":
        results = stage1_section(sec, cfg)
    elif name.startswith("stage3"):
        results = stage3_section(sec, cfg, name)
    elif name == "compress":
        results = compress_section(sec, cfg)
    elif name == "generation":
        results = generation_section(sec, cfg)
    else:
        sys.exit(f"unknown section {name}")
    out = dict(
        section=name,
        results=results,
        any_section_contended=any_contended(results),
        rss_mb_after_importing_jax=round(rss_after_import, 1),
        jax=jax.__version__,
        total_run_s=round(time.perf_counter() - t0, 2),
    )
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


# ============================================================================= orchestration
def ensure_official(args) -> None:
    cfg = read_bench_config()
    python = Path(args.official_python)
    if (
        python.exists()
        and Path(cfg["base_model_dir"], "model.safetensors").exists()
        and list(Path("/tmp/ml-clara-src").glob(".extracted-*-patched-*"))
    ):
        return
    mirror = os.environ.get("CLARA_OFFICIAL_MIRROR", DEFAULT_MIRROR)
    log(f"setting up the official side: CLARA_OFFICIAL_MIRROR={mirror} bash {OFFICIAL_DIR / 'setup.sh'}")
    subprocess.run(
        ["bash", str(OFFICIAL_DIR / "setup.sh")],
        check=True,
        env=dict(os.environ, CLARA_OFFICIAL_MIRROR=mirror),
    )


def run_child(cmd: list[str], out_file: Path, env=None) -> tuple[dict, float, float]:
    """Run one section process; (its JSON, its peak RSS in MB from wait4's ru_maxrss, wall s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"section failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(out_file.read_text()), usage.ru_maxrss / 1024.0, wall


def run_side(side: str, section: str, args, tmp: Path) -> dict:
    """One section of one side in fresh processes, re-run while other processes were busy."""
    attempts = []
    for attempt in range(args.retries + 1):
        out_file = tmp / f"{side}-{section}-{attempt}.json"
        common = [
            "--quiet-wait",
            str(args.quiet_wait),
            "--reps",
            str(args.reps),
            "--warmup",
            str(args.warmup),
        ]
        if side == "official":
            cmd = [
                args.official_python,
                str(OFFICIAL_DIR / "run_official.py"),
                "--only",
                section,
                "--out",
                str(out_file),
                "--ckpt",
                str(tmp / "official-ckpt"),
            ] + common
            env = dict(os.environ)
        else:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                section,
                "--out",
                str(out_file),
            ] + common
            env = dict(os.environ, JAX_PLATFORMS="cpu")
        log(f"{side} {section} (attempt {attempt + 1}): {' '.join(cmd[:4])} ...")
        child, rss, wall = run_child(cmd, out_file, env)
        attempts.append(
            dict(wall_s=round(wall, 1), peak_rss_mb=round(rss, 1), contended=child["any_section_contended"])
        )
        if not child["any_section_contended"]:
            break
        log(
            f"{side} {section}: other processes were busy during the timing; "
            + ("retrying in a fresh process" if attempt < args.retries else "keeping it, flagged")
        )
    return dict(
        results=child["results"],
        process_peak_rss_mb=round(rss, 1),
        attempts=attempts,
        contended=child["any_section_contended"],
        child=child,
    )


# rows of the table: (label, official section + key path, our section + key path)
ROWS = (
    (
        "stage-1 step (enc [4,139], gen [4,714])",
        ("stage1", "stage1_train_step"),
        ("stage1", "stage1_train_step"),
    ),
    (
        "stage-3 step, re-compressed; own query layout (off. [2,1035], ours [2,40])",
        ("stage3", "stage3_train_step"),
        ("stage3_recompress", "stage3_recompress"),
    ),
    (
        "stage-3 step, re-compressed; 1035-token queries both",
        ("stage3", "stage3_train_step"),
        ("stage3_recompress_q1035", "stage3_recompress_q1035"),
    ),
    (
        "stage-3 step, cached candidates (ours) vs official's",
        ("stage3", "stage3_train_step"),
        ("stage3_cached", "stage3_cached"),
    ),
    ("compress 64 docs", ("compress", "compress_documents"), ("compress", "compress_documents")),
    (
        "32 tokens from 5 compressed docs",
        ("generation", "generation.compressed"),
        ("generation", "generation.compressed"),
    ),
    (
        "generate_from_text (compress 5 + 32 tokens)",
        ("generation", "generation.end_to_end_generate_from_text"),
        ("generation", "generation.end_to_end_generate_from_text"),
    ),
    (
        "first token, 5 compressed docs",
        ("generation", "generation.first_token_compressed"),
        ("generation", "generation.first_token_compressed"),
    ),
    (
        "32 tokens, 653-token text prompt, plain base",
        ("generation", "generation.text_rag_base_model"),
        ("generation", "generation.text_rag_base_model"),
    ),
    (
        "first token, 653-token text prompt, plain base",
        ("generation", "generation.first_token_text_rag_base_model"),
        ("generation", "generation.first_token_text_rag_base_model"),
    ),
)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def build_table(official: dict, ours: dict) -> tuple[str, list[dict]]:
    rows, out = [], []
    for label, (osec, okey), (usec, ukey) in ROWS:
        o = _get(official.get(osec, {}).get("results", {}), okey)
        u = _get(ours.get(usec, {}).get("results", {}), ukey)
        if o is None or u is None:
            continue
        o_rss = official[osec]["process_peak_rss_mb"]
        u_rss = ours[usec]["process_peak_rss_mb"]
        flags = []
        if o.get("contended"):
            flags.append("official contended")
        if u.get("contended"):
            flags.append("ours contended")
        row = dict(
            work=label,
            official_s=o["median_s"],
            clara_jax_s=u["median_s"],
            ratio=u["median_s"] / o["median_s"],
            official_min_s=o["min_s"],
            clara_jax_min_s=u["min_s"],
            official_rss_mb=o_rss,
            clara_jax_rss_mb=u_rss,
            rss_ratio=u_rss / o_rss,
            official_other_cpu=o.get("other_processes_cpu_share"),
            clara_jax_other_cpu=u.get("other_processes_cpu_share"),
            flags=flags,
        )
        out.append(row)
        rows.append(
            [
                label,
                _fmt_s(row["official_s"]),
                _fmt_s(row["clara_jax_s"]),
                f"{row['ratio']:.2f}x",
                f"{o_rss / 1024:.2f} GB",
                f"{u_rss / 1024:.2f} GB",
                f"{row['rss_ratio']:.2f}x",
                f"{o.get('other_processes_cpu_share', 0):.0%}/{u.get('other_processes_cpu_share', 0):.0%}",
                ", ".join(flags) or "-",
            ]
        )
    headers = [
        "work",
        "official",
        "clara_jax",
        "ratio",
        "official RSS",
        "clara_jax RSS",
        "RSS ratio",
        "others' CPU (off/ours)",
        "contention",
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    text = "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
    return text, out


def orchestrate(args) -> None:
    t_start = time.perf_counter()
    cfg = read_bench_config()
    sections = [s for s in OFFICIAL_SECTIONS if s in args.sections.split(",")]
    if not args.skip_official:
        ensure_official(args)
    bad = check_base(cfg)
    if bad:
        sys.exit(f"the base differs from bench_config.json's sha256: {bad}; rebuild it with make_base.py")
    official, ours = {}, {}
    with tempfile.TemporaryDirectory(prefix="clara-vs-official-") as tmp:
        tmp = Path(tmp)
        for i, section in enumerate(sections):
            # alternate who goes first, so neither side always runs right after the other's section
            order = ("official", "ours") if i % 2 == 0 else ("ours", "official")
            for side in order:
                if side == "official" and not args.skip_official:
                    official[section] = run_side("official", section, args, tmp)
                elif side == "ours":
                    for ours_section in OUR_SECTIONS[section]:
                        ours[ours_section] = run_side("ours", ours_section, args, tmp)
    if args.official_json:  # sections taken from an earlier official run (e.g. --skip-official)
        earlier = json.loads(Path(args.official_json).read_text())
        for section in sections:
            official.setdefault(section, earlier["official"][section])
    table, rows = build_table(official, ours)
    print("\n" + table)
    s1 = _get(ours.get("stage1", {}).get("results", {}), "stage1_train_step")
    if s1 and "memory_analysis_mb" in s1:
        m = s1["memory_analysis_mb"]
        print(
            f"\nclara_jax stage-1 step, compiled program (XLA memory analysis): arguments {m['arguments']} MB, "
            f"outputs {m['outputs']} MB (aliased {m['aliased']} MB), temporaries {m['temporaries']} MB, "
            f"code {m['generated_code']} MB; process peak RSS {ours['stage1']['process_peak_rss_mb']:.0f} MB "
            f"(during warm-up + timed steps: {s1['peak_rss_mb']:.0f} MB; after importing jax: "
            f"{ours['stage1']['child']['rss_mb_after_importing_jax']:.0f} MB); compile {s1['compile_s']} s"
        )
    flagged = [r["work"] for r in rows if r["flags"]]
    print(
        "\ncontention: "
        + (
            "none (other processes < 5 % of the CPU during every timed block)"
            if not flagged
            else "; ".join(f"{r['work']}: {', '.join(r['flags'])}" for r in rows if r["flags"])
        )
    )
    print(
        f"ratio = clara_jax / official (median of {args.reps} after {args.warmup} warm-up); RSS = peak RSS of "
        "the section's process (official stage-3 / generation rows share one process each)"
    )
    import platform

    out = dict(
        date_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        what="official apple/ml-clara (run_official.py) vs clara_jax on the same work, CPU float32",
        clara_jax_commit=subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        clara_jax_dirty=bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
            ).stdout.strip()
        ),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
        reps=args.reps,
        warmup=args.warmup,
        quiet_wait_s=args.quiet_wait,
        retries=args.retries,
        table=rows,
        official=official,
        clara_jax=ours,
        any_contended=any(r["flags"] for r in rows),
        total_run_s=round(time.perf_counter() - t_start, 1),
    )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.out}")
    log(f"total {out['total_run_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sections",
        default=",".join(OFFICIAL_SECTIONS),
        help="comma-separated subset of: " + ",".join(OFFICIAL_SECTIONS),
    )
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per block (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions before them")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each timed block, wait up to this many seconds for an idle CPU",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-run a section in a fresh process up to this many times while it is contended",
    )
    ap.add_argument("--official-python", default=str(OFFICIAL_VENV / "bin/python"))
    ap.add_argument("--skip-official", action="store_true", help="time our side only")
    ap.add_argument("--official-json", help="take missing official sections from an earlier --out file")
    ap.add_argument("--out", help="write every figure to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps < 3:
        ap.error("--reps must be >= 3")
    if args.child:
        if not args.out:
            ap.error("--child needs --out")
        child_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()

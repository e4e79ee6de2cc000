"""`clara-jax`: the command-line entry point.

Each sub-command lives in a small function here and imports its heavy machinery lazily, so
`clara-jax --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """A tiny decoder with CLaRa's tokens and adapters: forward, then greedy generation."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer, render_chat
    from clara_jax.inference.generation import SamplingConfig, generate
    from clara_jax.model.config import tiny_config
    from clara_jax.model.decoder import Decoder
    from clara_jax.model.lora import LoRAConfig
    from clara_jax.model.vocab import extend_vocabulary

    start = time.perf_counter()
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=args.n_mem)
    cfg = tiny_config(vocab_size=tok.base_vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Decoder(cfg, rngs=nnx.Rngs(args.seed))
    extend_vocabulary(
        model, tok.vocab_size, key=jax.random.key(args.seed), trainable_token_ids=tok.mem_token_ids
    )
    for i, role in enumerate(("compressor", "query_reasoner", "generator")):
        model.add_adapter(role, LoRAConfig(rank=8, alpha=16), rngs=nnx.Rngs(args.seed + i + 1))
    print(
        f"model: {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size} "
        f"(+{tok.n_mem + 3} CLaRa tokens), {cfg.param_count() / 1e6:.2f}M base parameters, "
        f"adapters {sorted(model.adapters)}"
    )

    prompt = render_chat(
        tok,
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": args.prompt},
        ],
        add_generation_prompt=True,
    )
    batch = tok.hf([prompt], add_special_tokens=False, return_tensors="np", padding=True)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    logits = model(ids, mask, adapter="generator")
    print(f"prompt: {prompt!r}\n  {ids.shape[1]} tokens -> logits {tuple(logits.shape)} {logits.dtype}")

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id
    )
    tokens = generate(model, ids, mask, sampling=sampling, adapter="generator")
    text = tok.hf.decode([t for t in tokens[0].tolist() if t != tok.pad_id])
    print(
        f"greedy continuation ({args.max_new_tokens} tokens max, random weights, so not meaningful text):\n  {text!r}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}")
    return 0


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train one stage; resumes from the newest checkpoint in the workdir."""
    import logging

    from clara_jax.data.records import RecordError
    from clara_jax.training.config import ConfigError, load_config
    from clara_jax.training.loop import TrainingDiverged, run_training

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load_config(args.config, overrides)
        summary = run_training(config, args.workdir, progress=not args.no_progress)
    except (ConfigError, RecordError, FileNotFoundError) as err:
        print(f"clara-jax train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"clara-jax train: {err}", file=sys.stderr)
        return 3
    status = "preempted, checkpoint saved" if summary.preempted else "done"
    print(
        f"{summary.stage}: steps {summary.first_step} -> {summary.last_step} ({status}); workdir {summary.workdir}"
    )
    if summary.final_metrics:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(summary.final_metrics.items())))
    for path in summary.plots:
        print(f"  plot: {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from clara_jax.training.metrics import plot_history

    paths = plot_history(args.workdir)
    if not paths:
        print(f"clara-jax plot: no metrics.jsonl with data in {args.workdir}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clara-jax",
        description="CLaRa (continuous latent reasoning for retrieval-augmented generation) in JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the embedded default: a tiny CLaRa-ready decoder on the CPU",
        description="Builds a tiny random decoder with the bundled tokenizer, adds CLaRa's memory tokens and "
        "its three adapters, and runs a forward pass and greedy KV-cache generation.",
    )
    demo.add_argument(
        "--prompt",
        default="Background: the river Tamar runs past Launceston. Question: where?",
        help="user message rendered with the chat template",
    )
    demo.add_argument("--n-mem", type=int, default=8, help="number of <MEM*> tokens to add (default 8)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")
    demo.add_argument("--seed", type=int, default=0, help="PRNG seed for the random weights")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train",
        help="train one CLaRa stage from a config file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one stage (stage1 SCP, stage2 instruction tuning, stage3 end-to-end).\n\n"
        "  clara-jax train --config configs/stage1_scp.py:tiny,runlocal --workdir runs/s1 \\\n"
        "      --config.data.train data/stage1_train.jsonl --config.optim.lr 3e-4\n\n"
        "Any config field can be overridden with --config.FIELD=VALUE (or --config.FIELD VALUE).\n"
        "The run resumes from the newest readable checkpoint in WORKDIR; SIGTERM/SIGINT save and exit 0.\n"
        "Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/checkpoints/ and PNG plots.",
    )
    train.add_argument(
        "--config", required=True, help="configs/FILE.py:ARG, e.g. configs/stage1_scp.py:tiny,runlocal"
    )
    train.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and plots")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")
    train.set_defaults(func=_train, takes_overrides=True)

    plot = sub.add_parser("plot", help="(re)draw the PNG plots of a workdir's metrics.jsonl")
    plot.add_argument("--workdir", required=True)
    plot.set_defaults(func=_plot)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--config.a.b=v` / `--config.a.b v` out of argv (argparse cannot declare them)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--config."):
            if "=" not in item and i + 1 < len(argv):
                item = f"{item}={argv[i + 1]}"
                i += 1
            overrides.append(item)
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def main(argv=None) -> int:
    parser = build_parser()
    rest, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "takes_overrides", False):
        return args.func(args, overrides)
    if overrides:
        parser.error(f"{args.command} takes no --config.* overrides")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

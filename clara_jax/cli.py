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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

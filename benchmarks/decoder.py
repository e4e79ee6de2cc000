"""Decoder throughput against this machine's own dense-matmul FLOP/s, measured in the same run.

    python benchmarks/decoder.py                 # 4 layers, width 256, seq 512, batch 8
    python benchmarks/decoder.py --layers 2 --seq 128 --batch 2   # quicker

Prints tokens/s for the forward and for forward+backward (gradients of a LoRA adapter over a
frozen base, the way CLaRa trains), the analytic FLOPs of each (clara_jax.model.flops; XLA's
cost analysis counts a scanned layer only once) and the ratio of achieved FLOP/s to the
measured matmul FLOP/s. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.flops import forward_flops, lora_train_flops
from clara_jax.model.lora import LoRAConfig


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_s(n: int, dtype, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / best_time(mm, a, b, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    heads = max(args.width // 64, 1)
    cfg = tiny_config(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=args.width // heads,
        max_position_embeddings=max(args.seq, 1024),
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=args.dtype)
    model.add_adapter("generator", LoRAConfig(rank=16, alpha=32), rngs=nnx.Rngs(1))
    graphdef, adapter, base = nnx.split(model, nnx.LoRAParam, ...)
    ids = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, cfg.vocab_size)
    tokens = args.batch * args.seq

    @jax.jit
    def forward(adapter, base, ids):
        return nnx.merge(graphdef, adapter, base)(ids, adapter="generator")

    @jax.jit
    def forward_backward(adapter, base, ids):
        def loss(adapter):
            logits = nnx.merge(graphdef, adapter, base)(ids, adapter="generator")
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

        return jax.grad(loss)(adapter)

    peak = matmul_flops_per_s(1024, jnp.dtype(args.dtype), args.repeats)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}")
    print(
        f"config: layers={args.layers} width={args.width} heads={heads} seq={args.seq} batch={args.batch} "
        f"vocab={args.vocab} dtype={args.dtype}  base params={cfg.param_count() / 1e6:.1f}M"
    )
    print(f"dense matmul 1024^3 ({args.dtype}): {peak / 1e9:.1f} GFLOP/s")
    counts = {
        "forward": forward_flops(cfg, args.batch, args.seq, lora_rank=16),
        "forward+backward": lora_train_flops(cfg, args.batch, args.seq, lora_rank=16),
    }
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        flops = counts[name]
        seconds = best_time(fn, adapter, base, ids, repeats=args.repeats)
        achieved = flops / seconds
        print(
            f"{name:>17}: {seconds * 1e3:8.1f} ms  {tokens / seconds:10.0f} tokens/s  "
            f"{flops / 1e9:7.1f} GFLOP  {achieved / 1e9:6.1f} GFLOP/s  = {achieved / peak:.2f} x matmul peak"
        )


if __name__ == "__main__":
    main()

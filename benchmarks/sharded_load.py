"""Peak host memory and wall time of loading a 1B-shaped base onto an fsdp=8 mesh, two ways.

    python benchmarks/sharded_load.py                     # TinyLlama-1.1B shape, bf16: 2.2 GB on disk
    python benchmarks/sharded_load.py --layers 4          # quicker

Writes a random Llama checkpoint in bfloat16 (numpy + safetensors, several files and an
index, as transformers shards them) and loads it in a fresh process per method, so each peak
is its own:
  whole-then-reshard  every tensor read whole onto one device, the model then resharded
                      (`load_decoder` without a mesh, then `shard_state`)
  sharded             `load_decoder(mesh=...)`: each device's shard read from disk by itself
On 8 simulated CPU devices every shard lives in this process's memory, so even a perfect load
peaks at about one model; what the sharded load removes is the extra whole copies. Peak RSS
(VmHWM) also counts file pages mapped while reading. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import os

# Must happen before jax is imported: the fsdp=8 mesh needs 8 host devices.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

METHODS = ("whole-then-reshard", "sharded")
LAYERS_PER_FILE = 4


def write_checkpoint(directory: str, args) -> int:
    """A random bfloat16 Llama checkpoint in transformers' sharded layout; returns its bytes."""
    from safetensors.numpy import save_file

    from clara_jax.interop.hf import hf_config_dict
    from clara_jax.model.config import DecoderConfig

    cfg = DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    )
    rng = np.random.default_rng(0)

    def random(*shape):
        return (rng.random(shape, np.float32) * 0.04 - 0.02).astype(ml_dtypes.bfloat16)

    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    groups = [
        range(i, min(i + LAYERS_PER_FILE, cfg.num_layers)) for i in range(0, cfg.num_layers, LAYERS_PER_FILE)
    ]
    files = len(groups) + 1
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for n, layers in enumerate([None, *groups], start=1):
        if layers is None:
            tensors = {
                "model.embed_tokens.weight": random(cfg.vocab_size, d),
                "lm_head.weight": random(cfg.vocab_size, d),
                "model.norm.weight": random(d) + 1,
            }
        else:
            tensors = {}
            for i in layers:
                p = f"model.layers.{i}."
                tensors.update(
                    {
                        p + "input_layernorm.weight": random(d) + 1,
                        p + "post_attention_layernorm.weight": random(d) + 1,
                        p + "self_attn.q_proj.weight": random(q, d),
                        p + "self_attn.k_proj.weight": random(kv, d),
                        p + "self_attn.v_proj.weight": random(kv, d),
                        p + "self_attn.o_proj.weight": random(d, q),
                        p + "mlp.gate_proj.weight": random(f, d),
                        p + "mlp.up_proj.weight": random(f, d),
                        p + "mlp.down_proj.weight": random(d, f),
                    }
                )
        name = f"model-{n:05d}-of-{files:05d}.safetensors"
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(hf_config_dict(cfg), fh)
    return sum(os.path.getsize(os.path.join(directory, n)) for n in set(weight_map.values()))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def load_once(directory: str, method: str, dtype: str) -> dict:
    """Load the checkpoint onto an fsdp=8 mesh by `method`; runs in its own process."""
    import jax
    from flax import nnx

    from clara_jax.interop import hf
    from clara_jax.parallel.mesh import MeshConfig, make_mesh
    from clara_jax.parallel.rules import shard_state, state_shardings

    mesh = make_mesh(MeshConfig.from_spec("data=1,fsdp=8,tensor=1"))
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    if method == "sharded":
        model = hf.load_decoder(directory, dtype, mesh=mesh)
        state = nnx.state(model)
    else:
        model = hf.load_decoder(directory, dtype)
        state = nnx.state(model)
        state = shard_state(state, state_shardings(state, mesh))
        del model  # drop the single-device copy, as a training run does once the state is placed
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - start
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    sharded = all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state) if x.size)
    return {
        "method": method,
        "seconds": round(seconds, 2),
        "rss_before_load_mb": round(before),
        "peak_rss_mb": round(_status_mb("VmHWM")),
        "rss_after_load_mb": round(_status_mb("VmRSS")),
        "model_mb": round(model_bytes / 2**20),
        "on_all_8_devices": sharded,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/tmp/clara_sharded_load_bench", help="scratch checkpoint (deleted)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", help="parameter dtype to load into")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.dir, args.child, args.dtype)))
        return

    start = time.perf_counter()
    size = write_checkpoint(args.dir, args)
    print(f"wrote {size / 2**30:.2f} GiB to {args.dir} in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, "--dir", args.dir, "--dtype", args.dtype],
                check=True,
                capture_output=True,
                text=True,
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

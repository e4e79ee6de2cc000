"""Tiny transformers (PyTorch) models with every weight perturbed, written as local checkpoints.

Random HF inits have zero biases and unit norm weights, which hide mapping bugs (a swapped
norm or a dropped bias changes nothing); noise on every tensor makes each one count.
"""

from __future__ import annotations

import numpy as np

torch = None


def _torch():
    global torch
    if torch is None:
        import torch as _t

        torch = _t
    return torch


VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers classes, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500.0)),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500.0,
        ),
    ),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e4)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_theta=1e4)),
    "tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Phi-4-mini's shape in miniature: fused qkv/gate_up, half of each 16-dim head rotated,
    # LongRoPE (attention factor from 256/64), a sliding window, tied embeddings.
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 2.1, 3.7],
                "long_factor": [1.1, 2.9, 7.5, 19.0],
            },
            original_max_position_embeddings=64,
            sliding_window=11,
            tie_word_embeddings=True,
            pad_token_id=None,
        ),
    ),
}
# Families whose HF projections are fused (PEFT targets qkv_proj/gate_up_proj, not q_proj/...).
FUSED_FAMILIES = ("phi3",)


def build_family(name: str, seed: int = 0):
    """A perturbed tiny HF model (eval mode, float32)."""
    t = _torch()
    import transformers

    cfg_cls, model_cls, overrides = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **overrides})
    t.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    perturb_(model, seed)
    return model


def perturb_(module, seed: int, scale: float = 0.05, only: str = ""):
    """Add noise to every parameter whose name contains `only`."""
    t = _torch()
    gen = t.Generator().manual_seed(seed + 1)
    with t.no_grad():
        for name, p in module.named_parameters():
            if only in name:
                p.add_(t.randn(p.shape, generator=gen) * scale)


def save_family(name: str, directory, seed: int = 0):
    model = build_family(name, seed)
    model.save_pretrained(str(directory))
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits with transformers' generate-style positions (cumsum of the mask)."""
    t = _torch()
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with t.no_grad():
        out = model(input_ids=t.tensor(ids), attention_mask=t.tensor(mask), position_ids=t.tensor(positions))
    return out.logits.float().numpy()


def torch_greedy(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, eos: int, pad: int) -> np.ndarray:
    t = _torch()
    with t.no_grad():
        out = model.generate(
            input_ids=t.tensor(ids),
            attention_mask=t.tensor(mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    new = out[:, ids.shape[1] :].numpy()
    if new.shape[1] < new_tokens:  # generate stops early once every row hit EOS
        new = np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=pad)
    return new


def left_padded_batch(seed: int = 0, lengths=(13, 9, 4), vocab: int = VOCAB):
    """Token ids [B, S] with left padding (pad id 0) and the matching mask."""
    rng = np.random.RandomState(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.randint(3, vocab, n)
        mask[row, width - n :] = 1
    return ids, mask

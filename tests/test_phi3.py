"""Phi-3 / Phi-4-mini specifics beyond the shared parity suite: LongRoPE's long-factor switch,
LoRA on the projections HF does not fuse, config mapping, and the fused-target PEFT refusal."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from clara_jax.inference.generation import SamplingConfig, generate  # noqa: E402
from clara_jax.interop.hf import load_decoder, save_decoder  # noqa: E402
from clara_jax.interop.peft import load_peft_adapter  # noqa: E402
from clara_jax.model.config import DecoderConfig  # noqa: E402
from clara_jax.model.presets import PRESETS  # noqa: E402
from clara_jax.training.config import load_config  # noqa: E402
from tests import hf_reference as ref  # noqa: E402

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3")
    return path, ref.save_family("phi3", path)


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_loaded_config_matches_transformers(phi3):
    path, torch_model = phi3
    cfg = load_decoder(path).config
    rotary = torch_model.model.rotary_emb
    assert cfg.rotary_dim == 8 and cfg.sliding_windows == (11, 11)
    assert cfg.rope_scaling[0] == "longrope" and cfg.rope_scaling[3] == 64
    assert cfg.rope_scaling[4] == pytest.approx(rotary.attention_scaling)


@pytest.mark.slow
def test_long_factors_beyond_original_window(phi3):
    """Positions past original_max_position_embeddings (64) switch every position of the call
    to the long factors, as transformers does per forward."""
    path, torch_model = phi3
    model = load_decoder(path)
    ids, mask = ref.left_padded_batch(seed=5, lengths=(90, 70, 20))
    expected = ref.torch_logits(torch_model, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff(got, expected, mask) <= 1e-4
    # The short-factor path really differs here, so the test sees the switch.
    short = ref.torch_logits(torch_model, ids[2:, -20:], mask[2:, -20:])
    assert _max_diff(got[2:, -20:], short, mask[2:, -20:]) > 1e-3


@pytest.mark.slow
def test_lora_on_unfused_projections_matches_peft(phi3, tmp_path):
    path, _ = phi3
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj", "down_proj"])
    peft_model = peft.get_peft_model(ref.build_family("phi3"), lora_cfg).eval()
    ref.perturb_(peft_model, seed=7, scale=0.1, only="lora_")
    peft_model.save_pretrained(str(tmp_path))

    model = load_decoder(path)
    load_peft_adapter(model, "generator", tmp_path)
    ids, mask = ref.left_padded_batch(seed=3)
    expected = ref.torch_logits(peft_model, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter="generator"))
    base = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff(base, expected, mask) > 1e-2
    assert _max_diff(got, expected, mask) <= 1e-4

    expected_tokens = ref.torch_greedy(peft_model, ids, mask, NEW_TOKENS, eos=2, pad=0)
    got_tokens = generate(
        model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        adapter="generator",
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(2,), pad_token_id=0),
    )
    np.testing.assert_array_equal(np.asarray(got_tokens), expected_tokens)


def test_peft_on_fused_projections_is_refused(phi3, tmp_path):
    path, _ = phi3
    lora_cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"])
    peft.get_peft_model(ref.build_family("phi3"), lora_cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="qkv_proj"):
        load_peft_adapter(load_decoder(path), "a", tmp_path)


def test_saved_checkpoint_is_fused(phi3, tmp_path):
    path, _ = phi3
    save_decoder(load_decoder(path), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["original_max_position_embeddings"] == 64
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys
    assert not any("q_proj" in k or "gate_proj" in k for k in keys)


def _phi4_mini_hf_config():
    """Phi-4-mini-instruct's config.json layout (transformers 4.x spelling), factors shortened."""
    return {
        "model_type": "phi3",
        "vocab_size": 200064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
        "rms_norm_eps": 1e-5,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "bos_token_id": 199999,
        "eos_token_id": 199999,
        "pad_token_id": 199999,
    }


def test_phi4_mini_config_maps_onto_the_preset():
    cfg = DecoderConfig.from_hf_dict(_phi4_mini_hf_config())
    assert cfg.head_dim == 128 and cfg.rotary_dim == 96
    assert cfg.rope_scaling[4] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert cfg.replace(rope_scaling=("default",)) == PRESETS["phi4_mini"]
    assert cfg.param_count() == PRESETS["phi4_mini"].param_count()


def test_phi4_mini_stage_configs_validate():
    config = load_config("configs/stage1_scp.py:phi4_mini", ["--config.model.path=/x"])
    assert config.model.preset == "phi4_mini"


def test_partial_rotary_is_refused_where_transformers_lacks_it():
    hf = dict(
        ref.COMMON, model_type="llama", rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}
    )
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        DecoderConfig.from_hf_dict(hf)


def test_longrope_factor_length_is_checked():
    hf = _phi4_mini_hf_config()
    hf["rope_scaling"]["short_factor"] = [1.0] * 64
    with pytest.raises(ValueError, match="short_factor"):
        DecoderConfig.from_hf_dict(hf)

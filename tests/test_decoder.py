"""Decoder behaviour that needs no reference implementation: cache, adapters, vocab, dtypes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.interop.hf import load_decoder, save_decoder
from clara_jax.model.config import DecoderConfig, tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.lora import LoRAConfig
from clara_jax.model.vocab import extend_vocabulary
from clara_jax.training.trainable import split_trainable
from tests.hf_reference import left_padded_batch


def _model(seed=0, **cfg):
    return Decoder(tiny_config(**cfg), rngs=nnx.Rngs(seed))


def _perturb_adapter(model, name, seed):
    key = jax.random.key(seed)
    for f in model.adapters[name].factors.values():
        key, sub = jax.random.split(key)
        f["b"].set_value(0.1 * jax.random.normal(sub, f["b"].shape))


def _batch(seed=0):
    ids, mask = left_padded_batch(seed=seed, lengths=(11, 7, 3), vocab=512)
    return jnp.asarray(ids), jnp.asarray(mask)


def _valid(x, mask):
    return np.asarray(x)[np.asarray(mask).astype(bool)]


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 5])
def test_cached_greedy_equals_full_recomputation(window):
    model = _model(sliding_windows=(window, window))
    ids, mask = _batch()
    tokens = np.asarray(generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=12)))
    seq, m = np.asarray(ids), np.asarray(mask)
    forward = jax.jit(lambda model, ids, mask: model(ids, mask)[:, -1].argmax(-1))
    for step in range(12):  # no cache: re-run the whole sequence and take the last argmax
        nxt = np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(m)))
        np.testing.assert_array_equal(tokens[:, step], nxt)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((3, 1), m.dtype)], 1)


@pytest.mark.slow
def test_generation_stops_at_eos_and_pads():
    model = _model()
    ids, mask = _batch()
    free = np.asarray(generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=8)))
    eos = int(free[0, 2])  # make row 0's third token the stop token
    out = np.asarray(
        generate(
            model, ids, mask, sampling=SamplingConfig(max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=-1)
        )
    )
    stop = int(np.argmax(out[0] == eos))
    assert stop <= 2 and (out[0, stop + 1 :] == -1).all()
    np.testing.assert_array_equal(out[0, : stop + 1], free[0, : stop + 1])


@pytest.mark.slow
def test_sampling_is_reproducible_and_top_p_tiny_is_greedy():
    model = _model()
    ids, mask = _batch()
    greedy = generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=6))
    nucleus = generate(
        model,
        ids,
        mask,
        rng=jax.random.key(3),
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6),
    )
    np.testing.assert_array_equal(greedy, nucleus)
    s = SamplingConfig(max_new_tokens=6, temperature=5.0)
    a = generate(model, ids, mask, rng=jax.random.key(1), sampling=s)
    b = generate(model, ids, mask, rng=jax.random.key(1), sampling=s)
    c = generate(model, ids, mask, rng=jax.random.key(2), sampling=s)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, sampling=s)


def test_inputs_embeds_equal_input_ids():
    model = _model()
    ids, mask = _batch()
    by_ids = model(ids, mask)
    by_embeds = model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask)
    np.testing.assert_allclose(_valid(by_ids, mask), _valid(by_embeds, mask), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed_tokens(ids))


def test_left_padding_does_not_change_a_row():
    model = _model()
    ids, mask = _batch()
    alone = model(ids[1:2, -7:])  # row 1 without its 4 pads
    np.testing.assert_allclose(np.asarray(model(ids, mask))[1, -7:], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.slow
def test_adapters_identity_distinct_and_switchable():
    model = _model()
    for name, seed in (("compressor", 1), ("generator", 2), ("fresh", 3)):
        model.add_adapter(name, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(seed))
    _perturb_adapter(model, "compressor", 10)
    _perturb_adapter(model, "generator", 11)
    ids, mask = _batch()
    base = model(ids, mask)
    comp, gen, fresh = (model(ids, mask, adapter=n) for n in ("compressor", "generator", "fresh"))
    np.testing.assert_allclose(_valid(fresh, mask), _valid(base, mask), atol=1e-6)  # B = 0: identity
    assert np.abs(_valid(comp, mask) - _valid(gen, mask)).max() > 1e-2
    assert np.abs(_valid(comp, mask) - _valid(base, mask)).max() > 1e-2
    with pytest.raises(KeyError, match="no adapter named"):
        model(ids, adapter="reranker")

    traces = []

    @jax.jit
    def run(model, adapter, ids, mask):
        traces.append(1)
        return model(ids, mask, adapter=adapter)

    np.testing.assert_allclose(run(model, model.adapters["compressor"], ids, mask), comp, atol=1e-5)
    np.testing.assert_allclose(run(model, model.adapters["generator"], ids, mask), gen, atol=1e-5)
    assert len(traces) == 1  # one compilation served both adapters

    @jax.jit
    def both(model, ids, mask):  # several roles inside one jitted function
        return model(ids, mask, adapter="compressor"), model(ids, mask, adapter="generator")

    c2, g2 = both(model, ids, mask)
    np.testing.assert_allclose(c2, comp, atol=1e-5)
    np.testing.assert_allclose(g2, gen, atol=1e-5)


@pytest.mark.slow
def test_lora_targets_regex_and_dropout():
    model = _model()
    only_layer1_q = LoRAConfig(rank=2, target_modules=r"model\.layers\.1\.self_attn\.q_proj")
    model.add_adapter("q1", only_layer1_q, rngs=nnx.Rngs(1))
    spec = model.adapters["q1"].spec()
    assert dict(spec.layer_masks) == {"q_proj": (False, True)}
    with pytest.raises(ValueError, match="matches no projection"):
        model.add_adapter("none", LoRAConfig(target_modules=r"nothing"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        model.add_adapter("bad", LoRAConfig(target_modules=["qkv"]), rngs=nnx.Rngs(1))

    model.add_adapter("drop", LoRAConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(2))
    _perturb_adapter(model, "drop", 3)
    ids, mask = _batch()
    det = model(ids, mask, adapter="drop")
    a = model(ids, mask, adapter="drop", dropout_rng=jax.random.key(0))
    b = model(ids, mask, adapter="drop", dropout_rng=jax.random.key(0))
    c = model(ids, mask, adapter="drop", dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
    assert np.abs(np.asarray(a) - np.asarray(det)).max() > 1e-4


def test_trainable_filter_selects_exactly_adapters_and_rows():
    model = _model()
    model.add_adapter("compressor", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    model.add_adapter("generator", LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(2))
    model.add_adapter("query_reasoner", LoRAConfig(rank=4), rngs=nnx.Rngs(3))
    extend_vocabulary(model, 520, key=jax.random.key(0), trainable_token_ids=range(512, 516))
    _, trainable, frozen = split_trainable(model, ["generator", "query_reasoner"])
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    expected = {f"adapters/generator/factors/{t}/{ab}" for t in ("q_proj", "v_proj") for ab in "ab"}
    expected |= {
        f"adapters/query_reasoner/factors/{t}/{ab}"
        for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for ab in "ab"
    }
    expected.add("embed_rows")
    assert paths == expected
    frozen_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    assert "embed" in frozen_paths and not any(p.startswith("adapters/generator") for p in frozen_paths)
    _, compressor_only, _ = split_trainable(model, ["compressor"], embed_rows=False)
    paths = [p for p, _ in nnx.to_flat_state(compressor_only)]
    assert len(paths) == 14 and all(p[:2] == ("adapters", "compressor") for p in paths)


@pytest.mark.slow
def test_only_trainable_leaves_get_gradients_and_updates():
    model = _model()
    model.add_adapter("generator", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    model.add_adapter("compressor", LoRAConfig(rank=4), rngs=nnx.Rngs(2))
    extend_vocabulary(model, 516, key=jax.random.key(0), trainable_token_ids=(512, 513))
    graphdef, trainable, frozen = split_trainable(model, ["generator"])
    ids = jnp.asarray([[5, 512, 7, 513, 9, 514]])

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        return m(ids, adapter="generator")[0, -1, 3]

    grads = jax.grad(loss)(trainable)
    g_rows = np.asarray(grads["embed_rows"][...])
    assert np.abs(g_rows).sum(1).min() > 0  # both trainable rows are used by the input and get gradient
    g_b = np.asarray(grads["adapters"]["generator"]["factors"]["q_proj"]["b"][...])
    assert np.abs(g_b).max() > 0  # B gets gradient even at zero init (A is random)
    tx = optax.adam(1e-2)
    new = optax.apply_updates(trainable, tx.update(grads, tx.init(trainable), trainable)[0])
    updated = nnx.merge(graphdef, new, frozen)
    assert not np.allclose(updated.merged_embedding()[512], model.merged_embedding()[512])
    np.testing.assert_array_equal(
        updated.merged_embedding()[514], model.merged_embedding()[514]
    )  # not trainable
    np.testing.assert_array_equal(updated.embed[...], model.embed[...])


def test_vocabulary_extension_mean_init_and_old_tokens_unchanged():
    model = _model()
    ids, mask = _batch()
    before = model(ids, mask)
    old_mean = np.asarray(model.embed[...]).mean(0)
    extend_vocabulary(model, 523, key=jax.random.key(0), trainable_token_ids=range(512, 520))
    assert (
        model.config.vocab_size == 523 and model.embed.shape == (523, 64) and model.lm_head.shape == (523, 64)
    )
    new_rows = np.asarray(model.merged_embedding())[512:]
    np.testing.assert_allclose(new_rows, np.broadcast_to(old_mean, new_rows.shape), atol=1e-3)
    assert len({tuple(r) for r in new_rows}) == 11  # seeded noise keeps rows distinct
    after = model(ids, mask)
    np.testing.assert_allclose(_valid(after, mask)[:, :512], _valid(before, mask), atol=1e-5)
    with pytest.raises(ValueError, match="never drops rows"):
        extend_vocabulary(model, 500, key=jax.random.key(0))


def test_clara_tokens_can_reuse_unused_padding_rows():
    """Qwen-style bases have embedding rows past the tokenizer: the new tokens take them."""
    model = _model()
    before = np.asarray(model.embed[...])
    extend_vocabulary(model, 505, key=jax.random.key(0), trainable_token_ids=(500, 501), first_new=498)
    after = np.asarray(model.merged_embedding())
    assert after.shape == (512, 64) and model.config.vocab_size == 512
    np.testing.assert_array_equal(after[:498], before[:498])  # the base's rows are untouched
    np.testing.assert_allclose(after[498:], np.broadcast_to(before[:498].mean(0), (14, 64)), atol=1e-3)


def test_tied_embedding_rows_train_as_outputs_too():
    model = _model(tie_word_embeddings=True)
    extend_vocabulary(model, 516, key=jax.random.key(0), trainable_token_ids=(513,))
    model.embed_rows[...] = model.embed_rows[...] + 1.0
    hidden = model.hidden_states(jnp.asarray([[1, 2, 3]]))
    logits = model.logits(hidden)
    expected = np.asarray(hidden @ model.merged_embedding().T)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


@pytest.mark.slow
def test_remat_and_bfloat16_policy(tmp_path):
    ids, mask = _batch()
    model = _model()
    model.add_adapter("g", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    _perturb_adapter(model, "g", 1)
    remat = _model()
    remat.remat = "full"
    remat.add_adapter("g", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    _perturb_adapter(remat, "g", 1)

    def loss_of(m):
        def loss(adapter):
            return jnp.sum(m(ids, mask, adapter=adapter) * mask[..., None]) * 1e-3

        return jax.grad(loss)(m.adapters["g"])

    g1 = jax.tree.leaves(nnx.state(loss_of(model)))
    g2 = jax.tree.leaves(nnx.state(loss_of(remat)))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    save_decoder(_model(), tmp_path)
    bf16 = load_decoder(tmp_path, dtype="bfloat16")
    assert bf16.embed.dtype == jnp.bfloat16 and bf16.layers["q_proj"].dtype == jnp.bfloat16
    out = bf16(ids, mask)
    assert out.dtype == jnp.float32  # logits always float32
    ref = _model()(ids, mask)
    err = np.abs(_valid(out, mask) - _valid(ref, mask)).max()
    assert 0 < err < 0.05, err  # bf16 rounding, nothing worse


@pytest.mark.slow
def test_scan_keeps_program_size_independent_of_depth():
    def eqn_count(layers):
        model = _model(num_layers=layers)
        graphdef, state = nnx.split(model)
        fn = lambda s, x: nnx.merge(graphdef, s)(x)
        return len(jax.make_jaxpr(fn)(state, jnp.ones((1, 4), jnp.int32)).jaxpr.eqns)

    assert eqn_count(2) == eqn_count(12)


def test_save_load_roundtrip(tmp_path):
    model = _model(seed=5)
    extend_vocabulary(model, 520, key=jax.random.key(1), trainable_token_ids=(515,))
    model.embed_rows[...] = model.embed_rows[...] + 0.5
    save_decoder(model, tmp_path)
    loaded = load_decoder(tmp_path)
    ids, mask = _batch()
    np.testing.assert_allclose(loaded(ids, mask), model(ids, mask), atol=1e-6)
    assert loaded.config.vocab_size == 520


def test_load_errors_name_what_is_wrong(tmp_path):
    save_decoder(_model(), tmp_path / "ok")
    import safetensors.numpy as stn

    tensors = stn.load_file(str(tmp_path / "ok" / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "missing").mkdir()
    stn.save_file(tensors, str(tmp_path / "missing" / "model.safetensors"))
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_decoder(tmp_path / "missing")

    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_decoder(tmp_path / "gpt")

    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ValueError, match=r"config.json: line 2"):
        load_decoder(tmp_path / "badjson")

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_decoder(tmp_path / "bin")

    (tmp_path / "extra").mkdir()
    tensors = stn.load_file(str(tmp_path / "ok" / "model.safetensors"))
    tensors["model.layers.0.mlp.mystery.weight"] = np.zeros(3, np.float32)
    stn.save_file(tensors, str(tmp_path / "extra" / "model.safetensors"))
    (tmp_path / "extra" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mystery"):
        load_decoder(tmp_path / "extra")
    load_decoder(tmp_path / "extra", strict=False)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="not a multiple"):
        DecoderConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
        )

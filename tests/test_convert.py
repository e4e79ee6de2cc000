"""`clara-jax convert`: our adapters as PEFT adapters, and official CLaRa checkpoints in.

Both directions are checked against PyTorch (transformers + peft) numerically, not just by
shapes: adapters, the extended embedding / lm_head rows and the trained <MEM*> rows are all
perturbed, so any dropped or transposed tensor changes the outputs.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from clara_jax.cli.convert import add_parser as add_convert_parser  # noqa: E402
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR  # noqa: E402
from clara_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clara_jax.interop import official  # noqa: E402
from clara_jax.interop.model_dir import load_clara_model, save_clara_model  # noqa: E402
from clara_jax.interop.official import convert_official  # noqa: E402
from clara_jax.interop.peft import load_peft_adapter, save_peft_adapter  # noqa: E402
from clara_jax.model.clara import (  # noqa: E402  # noqa: E402
    COMPRESSOR,
    GENERATOR,
    QUERY_REASONER,
    ROLES,
    ClaraConfig,
    compress,
    generator_logits,
    splice,
)
from clara_jax.model.config import tiny_config  # noqa: E402
from clara_jax.model.decoder import Decoder  # noqa: E402
from clara_jax.model.factory import add_clara_parts  # noqa: E402
from clara_jax.model.lora import LoRAConfig  # noqa: E402
from tests import hf_reference as ref  # noqa: E402

N_MEM, DOC_MAX, COMPR = 4, 16, 4
TOL = 1e-4
OFFICIAL_NAMES = ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")


def _cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="clara-jax")
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _torch_hidden_and_logits(hf, ids=None, mask=None, embeds=None):
    """Post-final-norm last hidden states and logits, with generate-style (cumsum) positions."""
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    if embeds is None:
        kw["input_ids"] = torch.tensor(ids)
    else:
        kw["inputs_embeds"] = torch.tensor(np.asarray(embeds, np.float32))
    with torch.no_grad():
        out = hf(**kw, output_hidden_states=True)
    return out.hidden_states[-1].float().numpy(), out.logits.float().numpy()


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask, bool)].max())


def _token_batch(tok, seed=0, lengths=(11, 7, 4)):
    """Left-padded rows mixing base tokens with <ENC>/<SEP>/<AE> (extended rows must count)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), tok.pad_id, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    extra = [tok.enc_id, tok.sep_id, tok.ae_id, *tok.mem_token_ids]
    for r, n in enumerate(lengths):
        row = rng.integers(3, tok.base_vocab_size, n)
        row[rng.integers(0, n, 2)] = rng.choice(extra, 2)
        ids[r, width - n :] = row
        mask[r, width - n :] = 1
    return ids, mask


def _encoder_batch(tok, seed=0, lengths=(9, 5)):
    """[pad…] <ENC> <s> text </s> <MEM0..n-1>, left padded (the compressor's layout)."""
    rng = np.random.default_rng(seed)
    rows = [[tok.enc_id, tok.bos_id, *rng.integers(3, tok.base_vocab_size, n), tok.eos_id] for n in lengths]
    width = max(map(len, rows)) + N_MEM
    ids = np.full((len(rows), width), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        full = row + list(tok.mem_token_ids)
        ids[r, width - len(full) :] = full
        mask[r, width - len(full) :] = 1
    return ids, mask


def _generator_batch(tok, seed=0):
    """<s> p… <MEM0..n-1><SEP> q…, one document per row, left padded."""
    rng = np.random.default_rng(seed)
    rows = [
        [tok.bos_id, *rng.integers(3, tok.base_vocab_size, n), *tok.mem_token_ids, tok.sep_id, 5, 6, 7]
        for n in (4, 2)
    ]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------- (a) PEFT out
@pytest.fixture(scope="module")
def clara_dir(tmp_path_factory):
    """A saved clara-jax model: perturbed adapters and trained (perturbed) <MEM*> rows."""
    out = tmp_path_factory.mktemp("clara_model")
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    add_clara_parts(model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=lora, seed=0)
    model.embed_rows.set_value(
        model.embed_rows[...] + 0.3 * jax.random.normal(jax.random.key(9), (N_MEM, 64))
    )
    for i, role in enumerate(ROLES):
        for f in model.adapters[role].factors.values():
            f["b"].set_value(0.1 * jax.random.normal(jax.random.key(10 + i), f["b"].shape))
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=DOC_MAX, compression_rate=COMPR)
    save_clara_model(model, tok, clara, str(out))
    return out


@pytest.mark.slow
def test_peft_round_trip_matches_pytorch(clara_dir, tmp_path):
    out = tmp_path / "peft"
    assert _cli(["convert", "--to-peft", str(clara_dir), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(["base", *ROLES])
    tok, model, _ = load_clara_model(str(clara_dir))
    cfg = json.load(open(out / GENERATOR / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert cfg["base_model_name_or_path"] == str(out / "base")

    ids, mask = _token_batch(tok, seed=1)
    for role in (GENERATOR, COMPRESSOR):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base")).eval()
        hf = peft.PeftModel.from_pretrained(base, str(out / role)).eval()
        _, expected = _torch_hidden_and_logits(hf, ids, mask)
        got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter=role))
        plain = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
        assert _max_diff(plain, expected, mask) > 1e-2, "the adapter must change the output"
        assert _max_diff(got, expected, mask) <= TOL, role

    # and back: our own reader gives the same factors
    again = load_clara_model(str(clara_dir))[1]
    del again.adapters[GENERATOR]
    load_peft_adapter(again, GENERATOR, out / GENERATOR)
    np.testing.assert_allclose(
        np.asarray(again(jnp.asarray(ids), jnp.asarray(mask), adapter=GENERATOR)),
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter=GENERATOR)),
        atol=1e-6,
    )


def test_peft_keys_are_peft_spelling(clara_dir, tmp_path):
    from safetensors.numpy import load_file

    _, model, _ = load_clara_model(str(clara_dir))
    model.add_adapter(
        "partial", LoRAConfig(rank=2, alpha=4, target_modules=r".*\.1\.self_attn\.q_proj"), rngs=nnx.Rngs(0)
    )
    save_peft_adapter(model, "partial", tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (2, 64),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (64, 2),
    }
    assert json.load(open(tmp_path / "adapter_config.json"))["target_modules"] == r".*\.1\.self_attn\.q_proj"


# ----------------------------------------------------------------------------- (b) official in
def _official_checkpoint(root):
    """A tiny checkpoint in the released layout (tokenizer saved beside the adapters), assembled here
    with transformers + PEFT; checkpoints written by the official code itself are tested in
    test_convert_official_code.py.

    Base: a perturbed Mistral-like model (vocab 384 = the tiny tokenizer) saved to BASE. The CLaRa
    model: resized by n_mem+3 rows, three adapters added with transformers' PEFT integration
    (`add_adapter(peft_config, name)`, as the official `_setup_lora_adapters`), then saved as
    `get_adapter_state_dict(name)` per adapter and the decoder's named `embed_tokens`/`lm_head`.
    """
    base_dir, ckpt = root / "base", root / "official"
    cfg_cls, model_cls, overrides = ref.FAMILIES["mistral_sliding"]
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)
    cfg = getattr(transformers, cfg_cls)(**{**ref.COMMON, **overrides, "vocab_size": tok.base_vocab_size})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    ref.perturb_(hf, seed=0)
    hf.save_pretrained(str(base_dir))

    hf.resize_token_embeddings(tok.vocab_size)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the trained <MEM*> rows and the (never trained, random) other new rows
        for w in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight):
            w[tok.base_vocab_size :] += 0.3 * torch.randn(w[tok.base_vocab_size :].shape, generator=gen)
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1
    )
    for name in OFFICIAL_NAMES:
        hf.add_adapter(lora, adapter_name=name)
    ref.perturb_(hf, seed=3, scale=0.1, only="lora_")
    hf.eval()

    ckpt.mkdir()
    adapters = {
        name: {k: v.clone() for k, v in hf.get_adapter_state_dict(name).items()} for name in OFFICIAL_NAMES
    }
    # also cover the PeftModel key spelling and raw names with the adapter infix
    adapters["query_reasoner_adapter"] = {
        "base_model.model." + k.replace(".weight", ".query_reasoner_adapter.weight"): v
        for k, v in adapters["query_reasoner_adapter"].items()
    }
    torch.save(adapters, ckpt / "adapters.pth")
    first_last = {
        k: v.detach().clone()
        for k, v in hf.named_parameters()
        if "lm_head.weight" in k or "embed_tokens.weight" in k
    }
    assert sorted(first_last) == ["lm_head.weight", "model.embed_tokens.weight"]
    torch.save(first_last, ckpt / "decoder_first_last_layers.pth")
    json.dump(
        dict(
            model_type="CLaRa",
            decoder_model_name=str(base_dir),
            doc_max_length=DOC_MAX,
            compr_rate=COMPR,
            lora=True,
            lora_r=4,
            different_mem_tokens=True,
            sep=True,
            optimize_mem_tokens=True,
            training_stage="stage2",
            generation_top_k=2,
        ),
        open(ckpt / "config.json", "w"),
    )
    tok.hf.save_pretrained(str(ckpt))
    return hf, base_dir, ckpt


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    return _official_checkpoint(tmp_path_factory.mktemp("official_layout"))


@pytest.mark.slow
def test_official_checkpoint_matches_pytorch(official_ckpt, tmp_path):
    hf, base_dir, ckpt = official_ckpt
    out = tmp_path / "converted"
    argv = ["convert", "--from-official", str(ckpt), "--base", str(base_dir), "--out", str(out)]
    assert _cli(argv + ["--compr-rate", str(COMPR), "--doc-max-length", str(DOC_MAX)]) == 0
    meta = json.load(open(out / "clara.json"))
    assert meta["base"] == str(base_dir)  # base rows agree: referenced, not copied
    assert not (out / "base").exists()
    tok, model, clara = load_clara_model(str(out))
    assert (clara.n_mem, clara.compression_rate, clara.doc_max_length, clara.top_k) == (
        N_MEM,
        COMPR,
        DOC_MAX,
        2,
    )
    assert sorted(model.adapters) == sorted(ROLES)
    assert model.trainable_token_ids == tok.mem_token_ids
    assert model.adapters[GENERATOR].lora_config == LoRAConfig(rank=4, alpha=8, dropout=0.1)

    enc_ids, enc_mask = _encoder_batch(tok, seed=2)
    memory = None
    for role, name in ((COMPRESSOR, "encoder_adapter"), (QUERY_REASONER, "query_reasoner_adapter")):
        hf.set_adapter(name)
        hidden, _ = _torch_hidden_and_logits(hf, enc_ids, enc_mask)
        ours = np.asarray(
            compress(model, jnp.asarray(enc_ids), jnp.asarray(enc_mask), N_MEM, adapter=role)[0]
        )
        np.testing.assert_allclose(ours, hidden[:, -N_MEM:], atol=TOL, err_msg=role)
        if role == COMPRESSOR:
            memory = ours

    hf.set_adapter("decoder_adapter")
    gen_ids, gen_mask = _generator_batch(tok, seed=3)
    memory = jnp.asarray(memory)[:, None]  # one document per row
    embeds = np.asarray(splice(model, jnp.asarray(gen_ids), memory, tok.mem_token_ids))
    _, expected = _torch_hidden_and_logits(hf, mask=gen_mask, embeds=embeds)
    got = np.asarray(
        generator_logits(model, jnp.asarray(gen_ids), jnp.asarray(gen_mask), memory, tok.mem_token_ids)
    )
    assert _max_diff(got, expected, gen_mask) <= TOL
    ids, mask = _token_batch(tok, seed=4)  # plain tokens, incl. the extended <ENC>/<SEP>/<AE> rows
    _, expected = _torch_hidden_and_logits(hf, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter=GENERATOR))
    assert _max_diff(got, expected, mask) <= TOL
    plain = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff(plain, expected, mask) > 1e-2, "the generator adapter must matter"


@pytest.mark.slow
def test_official_copy_base_writes_a_full_base(official_ckpt, tmp_path):
    hf, base_dir, ckpt = official_ckpt
    out = convert_official(ckpt, base_dir, tmp_path / "copied", copy_base=True)
    assert json.load(open(os.path.join(out, "clara.json")))["base"] == "base"
    tok, model, _ = load_clara_model(out)
    hf.set_adapter("decoder_adapter")
    ids, mask = _token_batch(tok, seed=5)
    _, expected = _torch_hidden_and_logits(hf, ids, mask)
    assert _max_diff(model(jnp.asarray(ids), jnp.asarray(mask), adapter=GENERATOR), expected, mask) <= TOL


def test_official_config_is_binding(official_ckpt, tmp_path):
    _, base_dir, ckpt = official_ckpt
    with pytest.raises(ValueError, match="compr_rate=4, but 8 was asserted"):
        convert_official(ckpt, base_dir, tmp_path / "x", compression_rate=8)
    argv = ["convert", "--from-official", str(ckpt), "--base", str(base_dir), "--out", str(tmp_path / "y")]
    assert _cli(argv + ["--doc-max-length", "32"]) == 2
    assert not (tmp_path / "y" / "clara.json").exists()


# ----------------------------------------------------------------------------- (c) no code from pickles
def test_pickled_code_is_refused(official_ckpt, tmp_path, monkeypatch, capsys):
    _, base_dir, ckpt = official_ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(ckpt):
        if f != "adapters.pth":
            os.symlink(ckpt / f, bad / f)
    torch.save({"encoder_adapter": {"x": os.getcwd}}, bad / "adapters.pth")  # a callable in the pickle
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    argv = ["convert", "--from-official", str(bad), "--base", str(base_dir), "--out", str(tmp_path / "out")]
    assert _cli(argv) == 2
    assert "refused" in capsys.readouterr().err
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    with pytest.raises(ValueError, match="weights_only"):
        official.load_torch_weights(str(bad / "adapters.pth"))


def test_convert_help_lists_both_directions(capsys):
    with pytest.raises(SystemExit):
        _cli(["convert", "--help"])
    text = capsys.readouterr().out
    assert "--to-peft" in text and "--from-official" in text and "weights_only=True" in text


def test_official_base_rows_that_differ_are_copied(official_ckpt, tmp_path):
    """A base whose rows differ from the checkpoint's (e.g. another revision) is not referenced."""
    hf, base_dir, ckpt = official_ckpt
    other = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    ref.perturb_(other, seed=11, scale=0.01, only="embed_tokens")
    other.save_pretrained(str(tmp_path / "other_base"))
    out = convert_official(ckpt, tmp_path / "other_base", tmp_path / "out")
    assert json.load(open(os.path.join(out, "clara.json")))["base"] == "base"
    tok, model, _ = load_clara_model(out)
    np.testing.assert_array_equal(
        np.asarray(model.merged_embedding()), hf.get_input_embeddings().weight.detach().numpy()
    )

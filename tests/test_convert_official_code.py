"""`convert --from-official` on checkpoints written by the official CLaRa code itself (issue #19).

tests/fixtures/official_clara/ was made by the official apple/ml-clara code (857c3cf) with its own
`save_pretrained`: stage1/ as its trainer writes it (no tokenizer; PEFT's embedding copies inside
each adapter), stage3/ with a query reasoner. `expected.*` hold the official model's outputs on
fixed inputs; `make_fixture.py` regenerates all of it in the official environment. The always-on
test converts the fixture and compares to those stored outputs; the slow test rebuilds the
checkpoints with the official code on the benchmark base and does the same.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clara_jax.cli.convert import add_parser as add_convert_parser  # noqa: E402
from clara_jax.data.layouts import encoder_batch  # noqa: E402
from clara_jax.data.prompts import standard_prompt  # noqa: E402
from clara_jax.inference.clara_model import ClaraInference  # noqa: E402
from clara_jax.inference.generation import SamplingConfig, generate  # noqa: E402
from clara_jax.interop.model_dir import load_clara_model  # noqa: E402
from clara_jax.interop.official import convert_official  # noqa: E402
from clara_jax.model.clara import GENERATOR, generator_logits, splice  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official_clara"
OFFICIAL_PYTHON = Path(os.environ.get("CLARA_OFFICIAL_VENV", "/tmp/clara-official-venv")) / "bin" / "python"
OFFICIAL_SRC = Path(os.environ.get("CLARA_OFFICIAL_SRC", "/tmp/ml-clara-src"))
BENCH_BASE = Path("/tmp/clara-bench-base")
TOL = 1e-4


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _within_tol(measured: dict, name: str, ours, official) -> None:
    measured[name] = _max_abs(ours, official)
    assert measured[name] <= TOL, f"{name}: max |diff| {measured[name]:.3g} > {TOL}"


def check_against_official(fixture: Path, base: Path, out_root: Path) -> dict:
    """Convert fixture/stage1 and fixture/stage3 and compare with the official outputs stored
    beside them. Returns the measured max |diff| per output (each asserted ≤ TOL)."""
    expected = json.loads((fixture / "expected.json").read_text())
    arrays = np.load(fixture / "expected.npz")
    inputs = expected["inputs"]
    docs, question, k = inputs["documents"], inputs["question"], inputs["generator_docs"]
    measured = {}
    for stage in ("stage1", "stage3"):
        official = expected[stage]
        notes = []
        out = convert_official(fixture / stage, base, out_root / stage, report=notes.append)
        # the official trainer saves no tokenizer: it must be rebuilt from the base, and said so
        assert any(n.startswith(f"tokenizer: {base}") and "rebuilt" in n for n in notes), notes
        tok, model, clara = load_clara_model(out)
        assert (clara.doc_max_length, clara.compression_rate) == (
            inputs["doc_max_length"],
            inputs["compr_rate"],
        )
        roles = {"encoder_adapter": "compressor", "decoder_adapter": "generator"}
        roles["query_reasoner_adapter"] = "query_reasoner"
        assert sorted(model.adapters) == sorted(roles[a] for a in official["adapters"])

        # the rebuilt tokenizer gives the official ids, for the compressor and the generator
        enc = encoder_batch(tok, docs, clara.doc_max_length, length=clara.doc_max_length + 3)
        np.testing.assert_array_equal(enc.ids, official["encoder_input_ids"])
        np.testing.assert_array_equal(enc.mask, np.asarray(official["encoder_attention_mask"], bool))
        prompt = standard_prompt(tok, question, k).prompt
        assert prompt == official["generator_prompt"]
        ids = tok.hf(prompt, add_special_tokens=False)["input_ids"]
        assert ids == official["generator_input_ids"]

        clara_api = ClaraInference(tok, model, clara, data_parallel=False, batch_size=4)
        compressed, _ = clara_api.compress_documents(docs)
        _within_tol(measured, f"{stage}/compressed", compressed, arrays[f"{stage}/compressed"])

        ids = jnp.asarray([ids])
        mask = jnp.ones_like(ids, dtype=bool)
        memory = jnp.asarray(compressed[:k][None])
        logits = generator_logits(model, ids, mask, memory, tok.mem_token_ids)[0]
        _within_tol(measured, f"{stage}/generator_logits", logits, arrays[f"{stage}/generator_logits"])
        plain = model(ids, mask)[0]  # the adapter must matter, or the comparison proves little
        assert _max_abs(plain, arrays[f"{stage}/generator_logits"]) > 1e-2

        sampling = SamplingConfig(
            max_new_tokens=inputs["max_new_tokens"], eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id
        )
        embeds = splice(model, ids, memory, tok.mem_token_ids)
        tokens = np.asarray(
            generate(model, inputs_embeds=embeds, attention_mask=mask, sampling=sampling, adapter=GENERATOR)
        )
        want = official["greedy_token_ids"]
        assert tokens[0][: len(want)].tolist() == want
        answer = clara_api.generate_from_compressed_documents_and_questions(
            [question], compressed[:k], max_new_tokens=inputs["max_new_tokens"]
        )
        assert answer == [official["greedy_answer"].strip()]

        if "query_reasoner_adapter" in official["adapters"]:
            queries = clara_api.encode_queries(inputs["queries"])
            _within_tol(measured, f"{stage}/query_vectors", queries, arrays[f"{stage}/query_vectors"])
            answers, topk = clara_api.generate_from_questions(
                [question], inputs["max_new_tokens"], documents=[docs], k=k
            )
            assert topk.tolist() == official["reranked_topk"]
            assert answers == [official["reranked_answer"].strip()]
    return measured


def test_fixture_was_made_by_the_official_code():
    """The fixture's checkpoints are the trainer's layouts, including what issue #19 tripped on."""
    made = json.loads((FIXTURE / "expected.json").read_text())["made_with"]
    assert made["official_commit"] == "857c3cf"
    assert not (FIXTURE / "stage1" / "tokenizer.json").exists()
    adapters = torch.load(FIXTURE / "stage1" / "adapters.pth", weights_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(adapters["encoder_adapter"])


@pytest.mark.slow
def test_official_fixture_converts_and_matches_official_outputs(tmp_path):
    measured = check_against_official(FIXTURE, FIXTURE / "base", tmp_path)
    print(json.dumps(measured, indent=1))


@pytest.mark.slow
@pytest.mark.skipif(
    not (OFFICIAL_PYTHON.exists() and (OFFICIAL_SRC / "openrlhf/models/modeling_clara.py").exists()),
    reason=f"needs the official CLaRa environment ({OFFICIAL_PYTHON}, {OFFICIAL_SRC}): "
    "CLARA_OFFICIAL_MIRROR=<bare clone of apple/ml-clara> bash shared/bench/official/setup.sh",
)
def test_checkpoints_built_now_by_the_official_code(tmp_path):
    """Stage-1 and stage-3 checkpoints built by the official code on the benchmark base (the tiny
    fixture base when that is absent), converted and compared on the same inputs."""
    cmd = [str(OFFICIAL_PYTHON), str(FIXTURE / "make_fixture.py"), "--src", str(OFFICIAL_SRC)]
    cmd += ["--out", str(tmp_path / "official")]
    if (BENCH_BASE / "config.json").exists():
        cmd += ["--base", str(BENCH_BASE), "--doc-max-length", "128", "--compr-rate", "16"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    base = BENCH_BASE if "--base" in cmd else tmp_path / "official" / "base"
    measured = check_against_official(tmp_path / "official", base, tmp_path / "converted")
    print(json.dumps(measured, indent=1))


# ----------------------------------------------------------------------------- decisions, by name
def _copy_stage(tmp_path: Path, stage: str = "stage1") -> Path:
    dst = tmp_path / stage
    shutil.copytree(FIXTURE / stage, dst)
    return dst


def _edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sep": False}, "sep=false; only sep=true is supported"),
        ({"sep": None}, "sep=false \\(absent, so the official default applies\\)"),
        ({"kbtc_training": True}, "kbtc_training=true"),
        ({"quantization": "int4"}, 'quantization="int4"'),
        ({"different_mem_tokens": False}, "different_mem_tokens=false"),
        ({"lora": False}, "lora=false"),
    ],
)
def test_config_fields_that_change_the_computation_are_refused_by_name(tmp_path, changes, message):
    ckpt = _copy_stage(tmp_path)
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=message):
        convert_official(ckpt, FIXTURE / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_decoder_model_name_when_base_has_none(tmp_path):
    """--base with weights only: the tokenizer comes from config.json's decoder_model_name."""
    base = tmp_path / "weights_only"
    base.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(FIXTURE / "base" / name, base / name)
    ckpt = _copy_stage(tmp_path)
    _edit_config(ckpt, decoder_model_name=str(FIXTURE / "base"))
    notes = []
    out = convert_official(ckpt, base, tmp_path / "out", report=notes.append)
    assert any(f"tokenizer: {FIXTURE / 'base'}" in n and "decoder_model_name" in n for n in notes), notes
    tok = load_clara_model(out)[0]
    expected = json.loads((FIXTURE / "expected.json").read_text())["stage1"]
    assert (
        tok.hf(expected["generator_prompt"], add_special_tokens=False)["input_ids"]
        == (expected["generator_input_ids"])
    )

    _edit_config(ckpt, decoder_model_name="/nonexistent/Mistral-7B-Instruct-v0.2")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        convert_official(ckpt, base, tmp_path / "out2")


def test_embedding_copies_that_differ_follow_the_official_loader(tmp_path):
    """The official loader applies adapters.pth after decoder_first_last_layers.pth, each
    adapter's embedding copy overwriting the model's: the last copy in the file wins."""
    ckpt = _copy_stage(tmp_path)
    adapters = torch.load(ckpt / "adapters.pth", weights_only=True)
    last = list(adapters)[-1]
    edited = adapters[last]["model.embed_tokens.weight"].clone()
    edited[-3:] += 0.5  # e.g. rows of <AE>, <ENC>, <SEP>
    adapters[last]["model.embed_tokens.weight"] = edited
    torch.save(adapters, ckpt / "adapters.pth")
    notes = []
    out = convert_official(ckpt, FIXTURE / "base", tmp_path / "out", report=notes.append)
    note = next(n for n in notes if n.startswith("embeddings:"))
    assert "differ" in note and f"{last}'s embed_tokens.weight (max |diff| 0.5)" in note
    assert f"embed_tokens.weight from {ckpt / 'adapters.pth'}['{last}']" in note
    model = load_clara_model(out)[1]
    np.testing.assert_array_equal(np.asarray(model.merged_embedding()), edited.numpy())


def test_cli_says_which_tokenizer_and_embeddings_were_used(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="clara-jax")
    add_convert_parser(parser.add_subparsers(dest="command"))
    argv = ["convert", "--from-official", str(FIXTURE / "stage1"), "--base", str(FIXTURE / "base")]
    args = parser.parse_args(argv + ["--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"tokenizer: {FIXTURE / 'base'}: the base tokenizer from --base plus the CLaRa tokens" in printed
    assert "embeddings: decoder_adapter, encoder_adapter in adapters.pth carry PEFT's copies" in printed
    assert "they equal decoder_first_last_layers.pth" in printed


if __name__ == "__main__":  # python tests/test_convert_official_code.py: the parity numbers
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(check_against_official(FIXTURE, FIXTURE / "base", Path(tmp)), indent=1))

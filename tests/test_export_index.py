"""Corpus export (sharded, resumable, atomic) and the streaming cosine index over it."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from clara_jax.cli import export as export_cli
from clara_jax.cli import search as search_cli
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.formats.corpus import read_corpus
from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.export import export_corpus, model_fingerprint, read_shard
from clara_jax.inference.index import EmbeddingIndex, search_questions
from clara_jax.interop.model_dir import load_clara_model, save_clara_model
from clara_jax.model.clara import ROLES, ClaraConfig
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS, SHARD, BATCH = 60, 16, 8
NAMES = ["Mava", "Tavo", "Sumi", "Lona", "Teme", "Fato", "Rin", "Oska"]
CITIES = ["Vienna", "Madrid", "Lima", "Oslo", "Quito", "Kyoto", "Accra"]
THINGS = ["a goat", "a dog", "orange", "tea", "chess", "a red bike"]


def _save_model(out, seed):
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(seed))
    add_clara_parts(
        model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=LoRAConfig(rank=4), seed=seed
    )
    for i, role in enumerate(ROLES):
        for f in model.adapters[role].factors.values():  # non-zero B: every adapter matters
            f["b"].set_value(0.05 * jax.random.normal(jax.random.key(seed * 7 + i), f["b"].shape))
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8)
    save_clara_model(model, tok, clara, str(out))
    return str(out)


def _corpus_records():
    rows = []
    for i in range(N_DOCS):
        name, city, thing = NAMES[i % 8], CITIES[(i * 3) % 7], THINGS[(i * 5) % 6]
        text = f"{name} {i} lives in {city} and keeps {thing}. Born in {1900 + 7 * i}."
        row = {"id": f"doc-{i:03d}", "text": text}
        if i % 10 == 3:
            row["title"] = f"{name} of {city}"
        rows.append(row)
    return rows


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _texts(rows):
    return [f"{r['title']}\n{r['text']}" if "title" in r else r["text"] for r in rows]


def _load_export(out):
    """(ids, float32 embeddings) of a complete export, in corpus order."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["complete"]
    ids, embs = [], []
    for s in manifest["shards"]:
        emb, shard_ids = read_shard(os.path.join(out, s["file"]))
        ids += shard_ids
        embs.append(np.asarray(emb, np.float32))
    return ids, np.concatenate(embs), manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = _save_model(root / "model", seed=0)
    other_model = _save_model(root / "model2", seed=1)
    rows = _corpus_records()
    corpus = _write_jsonl(root / "corpus.jsonl", rows)
    tok, model, clara = load_clara_model(model_dir)
    inference = ClaraInference(tok, model, clara, batch_size=BATCH)
    direct, _ = inference.compress_documents(_texts(rows))
    ref = str(root / "ref")
    manifest = export_corpus(model_dir, corpus, ref, shard_size=SHARD, batch_size=BATCH, progress=False)
    return dict(
        root=root,
        model=model_dir,
        other_model=other_model,
        corpus=corpus,
        rows=rows,
        inference=inference,
        direct=direct,
        ref=ref,
        manifest=manifest,
    )


@pytest.mark.slow
def test_export_has_every_id_once_and_equals_direct_compression(setup):
    ids, emb, manifest = _load_export(setup["ref"])
    assert ids == [r["id"] for r in setup["rows"]]
    assert manifest == setup["manifest"]
    assert manifest["num_shards"] == 4 and [s["count"] for s in manifest["shards"]] == [16, 16, 16, 12]
    assert manifest["model_fingerprint"] == model_fingerprint(setup["model"])
    assert (manifest["n_mem"], manifest["compression_rate"], manifest["hidden_size"]) == (4, 8, emb.shape[2])
    np.testing.assert_allclose(emb, setup["direct"], atol=1e-6, rtol=0)
    # Plain safetensors files: the reference reader agrees.
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(
        load_file(os.path.join(setup["ref"], "shard-00000.safetensors"))["embeddings"], emb[:16]
    )


@pytest.mark.parametrize("dtype,rtol", [("bfloat16", 2.0**-8), ("float16", 2.0**-10)])
def test_low_precision_exports_round_trip(setup, tmp_path, dtype, rtol):
    out = str(tmp_path / dtype)
    export_corpus(
        setup["model"], setup["corpus"], out, dtype=dtype, shard_size=SHARD, batch_size=BATCH, progress=False
    )
    ids, emb, manifest = _load_export(out)
    stored, _ = read_shard(os.path.join(out, "shard-00000.safetensors"))
    assert stored.dtype.name == dtype and manifest["dtype"] == dtype
    assert ids == [r["id"] for r in setup["rows"]]
    direct = setup["direct"]
    assert np.all(np.abs(emb - direct) <= rtol * np.abs(direct) + 1e-6)


_CRASHY_EXPORT = textwrap.dedent(
    """
    import sys, time
    from clara_jax.inference import clara_model
    from clara_jax.inference.export import export_corpus

    compress = clara_model.ClaraInference.compress_documents

    def slow(self, texts):  # leave time to be killed between shards
        out = compress(self, texts)
        time.sleep(1.5)
        return out

    clara_model.ClaraInference.compress_documents = slow
    export_corpus(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=16, batch_size=8, progress=False)
    """
)


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_uninterrupted_export(setup, tmp_path):
    out = str(tmp_path / "crashed")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHY_EXPORT, setup["model"], setup["corpus"], out],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = os.path.join(out, "shard-00000.safetensors")
    deadline = time.monotonic() + 60
    while not os.path.exists(first):
        if proc.poll() is not None:
            pytest.fail(f"export subprocess exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no shard appeared within 60 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    with open(os.path.join(out, "manifest.json")) as f:
        assert not json.load(f)["complete"]  # really interrupted
    assert not os.path.exists(os.path.join(out, "shard-00003.safetensors"))

    manifest = export_corpus(
        setup["model"], setup["corpus"], out, shard_size=SHARD, batch_size=BATCH, progress=False
    )
    assert manifest["complete"]
    ids, emb, _ = _load_export(out)
    ref_ids, ref_emb, ref_manifest = _load_export(setup["ref"])
    assert ids == ref_ids and len(set(ids)) == N_DOCS
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6, rtol=0)
    assert [s["count"] for s in manifest["shards"]] == [s["count"] for s in ref_manifest["shards"]]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left behind


def test_corrupt_shard_is_detected_and_redone(setup, tmp_path):
    out = str(tmp_path / "corrupt")
    shutil.copytree(setup["ref"], out)
    path = os.path.join(out, "shard-00001.safetensors")
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    index = EmbeddingIndex.open(out)
    with pytest.raises(ValueError, match="shard-00001.safetensors: checksum mismatch"):
        index.search(setup["direct"][:1].reshape(1, -1), k=3)
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.startswith("shard-")}
    export_corpus(setup["model"], setup["corpus"], out, shard_size=SHARD, batch_size=BATCH, progress=False)
    after = {n: os.path.getmtime(os.path.join(out, n)) for n in before}
    assert [n for n in before if after[n] != before[n]] == ["shard-00001.safetensors"]  # only it was redone
    ids, emb, _ = _load_export(out)
    ref_ids, ref_emb, _ = _load_export(setup["ref"])
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6, rtol=0)
    EmbeddingIndex.open(out).verify()


def test_resume_removes_the_temp_files_a_killed_run_left(setup, tmp_path):
    out = str(tmp_path / "stale")
    shutil.copytree(setup["ref"], out)
    os.remove(os.path.join(out, "progress", "shard-00002.json"))  # shard 2 was being redone when killed
    stale = [
        os.path.join(out, ".shard-00002.safetensors.tmp.99999"),
        os.path.join(out, ".shard-00000.safetensors.tmp.99998"),
        os.path.join(out, "progress", ".shard-00002.json.tmp.99999"),
    ]
    for path in stale:
        with open(path, "wb") as f:
            f.write(b"half a shard")
    manifest = export_corpus(
        setup["model"], setup["corpus"], out, shard_size=SHARD, batch_size=BATCH, progress=False
    )
    assert manifest["complete"]
    assert not [p for p in stale if os.path.exists(p)]
    ids, emb, _ = _load_export(out)
    ref_ids, ref_emb, _ = _load_export(setup["ref"])
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6, rtol=0)


def test_resume_refuses_another_dtype_model_or_corpus(setup, tmp_path):
    out = str(tmp_path / "mixed")
    shutil.copytree(setup["ref"], out)
    kw = dict(shard_size=SHARD, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="dtype='float32', this run has dtype='bfloat16'"):
        export_corpus(setup["model"], setup["corpus"], out, dtype="bfloat16", **kw)
    with pytest.raises(ValueError, match="exported with a different model"):
        export_corpus(setup["other_model"], setup["corpus"], out, **kw)
    other_corpus = _write_jsonl(tmp_path / "other.jsonl", setup["rows"][:-1])
    with pytest.raises(ValueError, match="exported with a different corpus"):
        export_corpus(setup["model"], other_corpus, out, **kw)
    with pytest.raises(ValueError, match="shard_size=16, this run has shard_size=8"):
        export_corpus(setup["model"], setup["corpus"], out, shard_size=8, batch_size=BATCH, progress=False)


def test_corpus_errors_name_the_line(setup, tmp_path):
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    with pytest.raises(ValueError, match=r"dup.jsonl:3: duplicate id 'a' \(first at .*dup.jsonl:1\)"):
        export_corpus(setup["model"], _write_jsonl(tmp_path / "dup.jsonl", rows), str(tmp_path / "o1"))
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "  "}]
    with pytest.raises(ValueError, match=r"empty.jsonl:2: document 'b' has an empty"):
        export_corpus(setup["model"], _write_jsonl(tmp_path / "empty.jsonl", rows), str(tmp_path / "o2"))
    rows = [{"id": "", "text": "x"}]
    with pytest.raises(ValueError, match=r"noid.jsonl:1: field 'id' must be a non-empty string"):
        export_corpus(setup["model"], _write_jsonl(tmp_path / "noid.jsonl", rows), str(tmp_path / "o3"))


def test_two_processes_split_the_shards(setup, tmp_path):
    out = str(tmp_path / "mp")
    kw = dict(shard_size=SHARD, batch_size=BATCH, progress=False, process_count=2)
    partial = export_corpus(setup["model"], setup["corpus"], out, process_index=1, **kw)
    assert not partial["complete"]
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == [
        "shard-00001.safetensors",
        "shard-00003.safetensors",
    ]
    assert export_corpus(setup["model"], setup["corpus"], out, process_index=0, **kw)["complete"]
    ids, emb, _ = _load_export(out)
    ref_ids, ref_emb, _ = _load_export(setup["ref"])
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6, rtol=0)


# --- search ------------------------------------------------------------------------------------------


def _brute_force(queries, docs, k):
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    d = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_each_document_finds_itself_first(setup):
    index = EmbeddingIndex.open(setup["ref"])
    flat = setup["direct"].reshape(N_DOCS, -1)
    ids, scores = index.search(flat, k=1)
    assert [row[0] for row in ids] == [r["id"] for r in setup["rows"]]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_streaming_search_equals_brute_force(setup, k):
    index = EmbeddingIndex.open(setup["ref"])
    rng = np.random.default_rng(k)
    flat = setup["direct"].reshape(N_DOCS, -1)
    queries = np.concatenate(
        [rng.normal(size=(7, flat.shape[1])), flat[::9] + 0.3 * rng.normal(size=(7, flat.shape[1]))]
    )
    ids, scores = index.search(queries.astype(np.float32), k=k, query_batch=4)  # several query batches
    order, expected = _brute_force(queries.astype(np.float32), flat, k)
    all_ids = [r["id"] for r in setup["rows"]]
    assert ids == [[all_ids[j] for j in row] for row in order]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores.dtype == np.float32 and scores.shape == (14, k)


def test_faiss_backend_equals_jax(setup):
    pytest.importorskip("faiss")
    index = EmbeddingIndex.open(setup["ref"])
    queries = np.random.default_rng(0).normal(size=(9, index.dim)).astype(np.float32)
    jax_ids, jax_scores = index.search(queries, k=6)
    faiss_ids, faiss_scores = index.search(queries, k=6, backend="faiss")
    assert faiss_ids == jax_ids
    np.testing.assert_allclose(faiss_scores, jax_scores, atol=1e-5)


def test_mismatched_query_model_is_named(setup):
    index = EmbeddingIndex.open(setup["ref"])
    with pytest.raises(ValueError, match="query dim 8 != index dim n_mem·hidden_size"):
        index.search(np.zeros((2, 8), np.float32), k=1)
    with pytest.raises(ValueError, match=r"k=61 must be in \[1, 60\]"):
        index.search(np.zeros((2, index.dim), np.float32), k=61)
    inf = setup["inference"]
    hidden = inf.model.config.hidden_size
    other = ClaraConfig(mem_token_ids=tuple(range(500, 508)), doc_max_length=32, compression_rate=4)
    with pytest.raises(
        ValueError, match="disagree on compression_rate: the index at .* has 8, the query model has 4"
    ):
        index.check_model(other, hidden)
    with pytest.raises(ValueError, match="disagree on hidden_size"):
        index.check_model(inf.clara, hidden * 2)
    with pytest.raises(ValueError, match="disagree on model_fingerprint"):
        search_questions(
            inf, ["Where?"], 3, index=index, model_fingerprint=model_fingerprint(setup["other_model"])
        )


def test_search_questions_and_cli(setup, capsys):
    questions = ["Where does Mava 0 live?", "Who keeps a goat?"]
    ids, scores = search_questions(
        setup["inference"],
        questions,
        3,
        index=setup["ref"],
        model_fingerprint=model_fingerprint(setup["model"]),
    )
    expected = EmbeddingIndex.open(setup["ref"]).search(setup["inference"].encode_queries(questions), 3)
    assert ids == expected[0] and len(ids) == 2 and all(len(r) == 3 for r in ids)
    np.testing.assert_allclose(scores, expected[1], atol=1e-6)

    parser = argparse.ArgumentParser(prog="clara-jax")
    sub = parser.add_subparsers(dest="command")
    export_cli.add_parser(sub)
    search_cli.add_parser(sub)
    args = parser.parse_args(
        [
            "search",
            "--model",
            setup["model"],
            "--index",
            setup["ref"],
            "--question",
            *questions,
            "-k",
            "3",
            "--json",
        ]
    )
    assert args.func(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["ids"] for row in lines] == ids
    np.testing.assert_allclose([row["scores"] for row in lines], scores, atol=1e-5)

    # for people: each hit with a snippet of its text, read from the corpus the manifest names
    base = [
        "search",
        "--model",
        setup["model"],
        "--index",
        setup["ref"],
        "--question",
        questions[0],
        "-k",
        "2",
    ]
    assert parser.parse_args(base).func(parser.parse_args(base)) == 0
    out = capsys.readouterr().out.splitlines()
    doc_ids, doc_texts, _ = read_corpus(setup["corpus"])
    texts = dict(zip(doc_ids, doc_texts))
    hits = [line.split()[-1] for line in out if line.strip()[:2] in ("1.", "2.")]
    assert hits == ids[0][:2]
    for doc_id in hits:
        assert f"       {' '.join(texts[doc_id].split())[:100]}" in "\n".join(out)
    args = parser.parse_args(base + ["--no-text"])
    assert args.func(args) == 0 and len(capsys.readouterr().out.splitlines()) == 3  # Q + 2 hits

    args = parser.parse_args(
        ["export", "--model", setup["other_model"], "--corpus", setup["corpus"], "--out", setup["ref"]]
    )
    assert args.func(args) == 2  # bad input: the index belongs to another model
    assert "exported with a different model" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_from_index_answers_from_stored_vectors(setup):
    """Stage-3 inference over an index: search, fetch the stored vectors, answer from them."""
    from clara_jax.inference.clara_model import load_inference
    from clara_jax.inference.index import generate_from_index

    inference = load_inference(setup["model"], batch_size=4)
    index = EmbeddingIndex.open(setup["ref"])
    answers, ids, scores = generate_from_index(inference, ["Where?", "Who?"], index, k=2, max_new_tokens=4)
    assert len(answers) == 2 and all(len(r) == 2 for r in ids) and scores.shape == (2, 2)
    stored = index.embeddings(ids)
    texts = dict(zip([r["id"] for r in _corpus_records()], _texts(_corpus_records()), strict=True))
    direct = inference.compress_documents([texts[d] for row in ids for d in row])[0].reshape(stored.shape)
    np.testing.assert_allclose(stored, direct, atol=1e-5)
    with pytest.raises(KeyError, match="not in the index"):
        index.embeddings([["no-such-id"]])

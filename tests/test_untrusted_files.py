"""Files a user may download (safetensors, index manifests, model directories) cannot read outside
their directory or crash the reader: every hostile input gets a ValueError naming file and field."""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.file_io import sha256_file
from clara_jax.formats.safetensors_io import SafetensorsFile, open_checkpoint, weights_digest
from clara_jax.inference.export import encode_shard, model_fingerprint, read_shard, shard_name
from clara_jax.inference.index import EmbeddingIndex
from clara_jax.interop.model_dir import load_clara_model, save_clara_model
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig

# --- safetensors headers -----------------------------------------------------------------------------


def _raw_file(path, header: dict | bytes, data: bytes = b"", size: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if size is None else size) + raw + data)
    return str(path)


def _tensor(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"x": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def test_a_valid_file_reads_like_the_library(tmp_path):
    path = str(tmp_path / "ok.safetensors")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({"a": a, "i": np.arange(5, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}, path)
    f = SafetensorsFile(path)
    with safe_open(path, "numpy") as ref:
        for key in ref.keys():
            np.testing.assert_array_equal(f.get(key), ref.get_tensor(key))
    shard = tmp_path / "bf16.safetensors"
    shard.write_bytes(encode_shard(np.ones((2, 3, 4), np.float32) / 3, ["p", "q"], 0, "bfloat16"))
    emb, ids = read_shard(shard)
    assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (2, 3, 4) and ids == ["p", "q"]


@pytest.mark.parametrize(
    "size, expect",
    [
        (2**40, "header size 1099511627776"),
        (2**63, "header size 9223372036854775808"),
        (10**6, "larger than"),
    ],
)
def test_a_huge_header_size_is_refused_before_reading(tmp_path, size, expect):
    path = _raw_file(tmp_path / "big.safetensors", _tensor(), b"\0" * 16, size=size)
    with pytest.raises(ValueError, match=expect) as err:
        SafetensorsFile(path)
    assert path in str(err.value)


@pytest.mark.parametrize(
    "entry, expect",
    [
        (_tensor(offsets=(-8, 8)), r"data_offsets \[-8, 8\] outside"),
        (_tensor(offsets=(-100, -84)), r"outside the data section"),
        (_tensor(offsets=(8, 0)), r"outside the data section"),
        (_tensor(offsets=(0, 24)), r"expected 0 <= begin <= end <= 16"),
        (_tensor(shape=(3, 2)), r"16 data bytes, but shape \[3, 2\] of F32 needs 24"),
        (_tensor(shape=(2, 2), offsets=(0, 8)), r"8 data bytes, but shape \[2, 2\] of F32 needs 16"),
        (_tensor(shape=(2, -2)), r"'shape' must be a list of non-negative integers"),
        (_tensor(offsets=(0, 16.0)), r"'data_offsets' must be \[begin, end\] integers"),
        ({"x": [1, 2]}, r"header entry must be an object"),
        ({"x": {"dtype": 7, "shape": [], "data_offsets": [0, 0]}}, r"'dtype' must be a string"),
    ],
)
def test_hostile_tensor_entries_name_file_and_tensor(tmp_path, entry, expect):
    path = _raw_file(tmp_path / "bad.safetensors", entry, b"\1" * 16)
    with pytest.raises(ValueError, match=expect) as err:
        SafetensorsFile(path)
    assert f"{path}: tensor 'x'" in str(err.value)


@pytest.mark.parametrize(
    "raw, expect",
    [
        (b"[1, 2]", "header is a JSON list"),
        (b"[" * 200_000 + b"]" * 200_000, "corrupt safetensors header"),
        (b"\xff\xfe{}", "corrupt safetensors header"),
        (json.dumps({"__metadata__": [1]}).encode(), "'__metadata__' must be an object"),
    ],
)
def test_a_malformed_header_is_a_value_error(tmp_path, raw, expect):
    path = _raw_file(tmp_path / "bad.safetensors", raw)
    with pytest.raises(ValueError, match=expect) as err:
        SafetensorsFile(path)
    assert path in str(err.value)


# --- HF weight maps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expect",
    [
        ("OUTSIDE", "is an absolute path"),
        ("../outside.safetensors", r"'\.\.' and empty components are refused"),
        ("sub/../../outside.safetensors", r"'\.\.' and empty components are refused"),
        ("sub/model.safetensors", "must be a file name in"),
        (7, "must be a non-empty file name"),
    ],
)
def test_weight_map_names_stay_in_the_model_directory(tmp_path, name, expect):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": str(outside) if name == "OUTSIDE" else name}}))
    with pytest.raises(ValueError, match=expect) as err:
        open_checkpoint(model)
    assert str(index) in str(err.value) and "weight_map['w']" in str(err.value)


# --- index manifests ---------------------------------------------------------------------------------


def _fake_export(out, n_shards=2, shard_size=3):
    """A complete export directory written by hand (the manifest fields EmbeddingIndex reads)."""
    os.makedirs(out)
    shards = []
    for i in range(n_shards):
        path = os.path.join(out, shard_name(i))
        ids = [f"d{i}-{j}" for j in range(shard_size)]
        with open(path, "wb") as f:
            f.write(
                encode_shard(np.full((shard_size, 2, 4), i + 1, np.float32), ids, i * shard_size, "float32")
            )
        shards.append(
            {"file": shard_name(i), "start": i * shard_size, "count": shard_size, "sha256": sha256_file(path)}
        )
    manifest = {
        "format": "clara-jax-embeddings",
        "format_version": 1,
        "complete": True,
        "count": n_shards * shard_size,
        "num_shards": n_shards,
        "shard_size": shard_size,
        "n_mem": 2,
        "hidden_size": 4,
        "embedding_shape": [2, 4],
        "shards": shards,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def test_the_hand_made_export_is_a_valid_index(tmp_path):
    _fake_export(str(tmp_path / "idx"))
    index = EmbeddingIndex.open(tmp_path / "idx")
    index.verify()
    np.testing.assert_array_equal(index.embeddings([["d1-2"]])[0, 0], np.full((2, 4), 2, np.float32))


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("file", "OUTSIDE", r"shards\[1\]\.file is '/.*outside\.safetensors', expected 'shard-00001"),
        ("file", "../outside.safetensors", r"shards\[1\]\.file is '\.\./outside\.safetensors'"),
        ("file", shard_name(0), r"shards\[1\]\.file is 'shard-00000\.safetensors', expected 'shard-00001"),
        ("start", 0, r"shards\[1\]\.start is 0, expected 3"),
        ("count", 4, r"shards\[1\]\.count must be an integer in \[1, shard_size=3\]"),
        ("count", "3", r"shards\[1\]\.count must be an integer"),
    ],
)
def test_manifest_shard_entries_cannot_point_elsewhere(tmp_path, field, value, expect):
    out = str(tmp_path / "idx")
    manifest = _fake_export(out)
    outside = str(tmp_path / "outside.safetensors")
    shutil.copy(os.path.join(out, shard_name(1)), outside)  # a real, readable shard outside the index
    manifest["shards"][1][field] = outside if value == "OUTSIDE" else value
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=expect) as err:
        EmbeddingIndex.open(out)
    assert os.path.join(out, "manifest.json") in str(err.value)


# --- model directories -------------------------------------------------------------------------------


def _save_model(out, seed):
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(seed))
    add_clara_parts(
        model,
        vocab_size=tok.vocab_size,
        mem_token_ids=tok.mem_token_ids,
        lora=LoRAConfig(rank=4),
        seed=seed,
        adapter_seeds=(seed + 1,) * 3,
    )
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8)
    save_clara_model(model, tok, clara, str(out))
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _save_model(root / "a", seed=0), _save_model(root / "b", seed=1)


def _edit_meta(model_dir, **fields):
    path = os.path.join(model_dir, "clara.json")
    with open(path) as f:
        meta = json.load(f)
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


@pytest.mark.parametrize("base", ["../b/base", "base/../../b/base", "", 3])
def test_a_relative_base_must_stay_inside_the_model_directory(models, tmp_path, base):
    model = str(tmp_path / "a")
    shutil.copytree(models[0], model)
    meta_path = _edit_meta(model, base=base)
    with pytest.raises(ValueError, match="field 'base'") as err:
        load_clara_model(model)
    assert meta_path in str(err.value)


def test_an_absolute_base_must_match_the_saved_base_digest(models, tmp_path):
    a, b = models
    model = str(tmp_path / "a")
    shutil.copytree(a, model)
    # a referenced local base with the same weights (what training writes): loads
    shutil.copytree(os.path.join(a, "base"), tmp_path / "elsewhere")
    _edit_meta(model, base=str(tmp_path / "elsewhere"))
    _, loaded, _ = load_clara_model(model)
    _, reference, _ = load_clara_model(a)
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]), np.asarray(reference.embed[...]))
    # pointed at other local weights: refused, naming clara.json and the field
    meta_path = _edit_meta(model, base=os.path.abspath(os.path.join(b, "base")))
    with pytest.raises(ValueError, match="field 'base'.*not the ones this model was trained with") as err:
        load_clara_model(model)
    assert meta_path in str(err.value)
    with pytest.raises(ValueError, match="not the ones this model was trained with"):
        model_fingerprint(model)
    _edit_meta(model, base=str(tmp_path / "x" / ".." / "elsewhere"))
    with pytest.raises(ValueError, match=r"must not contain '\.\.'"):
        load_clara_model(model)


def test_the_fingerprint_covers_the_base_weights(models, tmp_path):
    a, b = models
    assert weights_digest(os.path.join(a, "base")) != weights_digest(os.path.join(b, "base"))
    # two directories that differ only in their base (no saved digest to catch the swap)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(a, one)
    shutil.copytree(a, two)
    _edit_meta(one, base_digest=None)
    _edit_meta(two, base_digest=None)
    assert model_fingerprint(one) == model_fingerprint(two)
    shutil.rmtree(os.path.join(two, "base"))
    shutil.copytree(os.path.join(b, "base"), os.path.join(two, "base"))
    assert model_fingerprint(one) != model_fingerprint(two)


def test_the_base_digest_samples_every_tensor(models, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(os.path.join(models[0], "base"), base)
    before = weights_digest(base)
    path = os.path.join(base, "model.safetensors")
    f = SafetensorsFile(path)
    key = sorted(f.keys())[-1]
    begin, end = f.entries[key]["data_offsets"]
    offset = f._offset
    del f
    with open(path, "r+b") as fh:  # change the last byte of the last tensor
        fh.seek(offset + end - 1)
        last = fh.read(1)
        fh.seek(offset + end - 1)
        fh.write(bytes([last[0] ^ 0xFF]))
    assert weights_digest(base) != before


def test_an_interrupted_resave_is_read_from_the_hidden_old_copy(models, tmp_path):
    """A crash between the swap's two renames leaves only .model.old: readers use it."""
    target = str(tmp_path / "model")
    shutil.copytree(models[0], str(tmp_path / ".model.old"))
    assert not os.path.exists(target)
    _, loaded, _ = load_clara_model(target)
    _, reference, _ = load_clara_model(models[0])
    np.testing.assert_array_equal(np.asarray(loaded.embed_rows[...]), np.asarray(reference.embed_rows[...]))
    assert model_fingerprint(target) == model_fingerprint(models[0])

"""The package's on-disk formats: file names, schemas, versions, and the writing and validating
reading of every file the package keeps or is given, with no jax and no model code.

    jsonl            JSON Lines: the one line reader (line numbers, blank lines, byte-order mark)
    strict_json      standard JSON from untrusted files (NaN, duplicate keys, surrogates, depth)
    corpus           the corpus rows {"id", "text"[, "title"]} that export and synthesis read
    safetensors_io   zero-copy, checked safetensors reading; an HF directory's weights digest
    model_dir        a trained model directory: file names, clara.json, its checks, fingerprint
    embeddings       an exported corpus: manifest.json, the shards, the progress markers
    checkpoint_meta  the JSON saved with each training checkpoint beside orbax's arrays

This layer imports only the file helpers (`clara_jax.file_io`, `clara_jax.safe_paths`) below it;
every layer that reads or writes one of these files imports it downward
(tests/test_import_layers.py).
"""

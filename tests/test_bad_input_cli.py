"""`clara-jax train` and `clara-jax eval` on hostile data: exit status 2 and a `file:line` message,
never a traceback, under both record policies.

The CLI's `main` runs in-process: data is read before any model is built or loaded, so each case
takes a fraction of a second (eval points at a model directory that does not exist, and still
reports the data first).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clara_jax import cli

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "configs" / "stage1_scp.py") + ":tiny,runlocal"  # global batch of 8
BAD_LINE = 3  # the hostile record's line in every .jsonl case


def stage1_record(i: int) -> dict:
    return {"data_type": "qa", "question": [f"Who is {i}?"], "answers": [f"A{i}"], "docs": [f"Doc {i}."]}


def eval_record(i: int) -> dict:
    return {"question": f"Who is {i}?", "golden_answers": [f"A{i}"], "docs": [f"d{i}.{j}" for j in range(3)]}


def _dumps(record: dict) -> bytes:
    return json.dumps(record).encode()


def _with(record: dict, raw_field: str) -> bytes:
    """The record's JSON with `raw_field` (raw JSON text, e.g. '"n": NaN') added as its last field."""
    return _dumps(record)[:-1] + b", " + raw_field.encode() + b"}"


# case -> (file suffix, the hostile line(s) given a good record of the stage, or None: whole-file case)
JSONL_CASES = {
    "binary_garbage": lambda good: bytes(range(256)) * 4,
    "json_array_in_jsonl": lambda good: json.dumps([good, good]).encode(),
    "missing_field": lambda good: _dumps({k: v for k, v in good.items() if k != "docs"}),
    "wrong_type": lambda good: _dumps({**good, "question": 7}),
    "10mb_line": lambda good: _dumps({**good, "docs": ["x" * (10 << 20)]}),
    "invalid_utf8_jsonl": lambda good: _dumps(good).replace(b"Who", b"Wh\xff\xfe"),
    "nan": lambda good: _with(good, '"score": NaN'),
    "duplicate_keys": lambda good: _with(good, '"question": "a second question?"'),
    "5000_digit_integer": lambda good: _with(good, '"id": ' + "7" * 5000),
    "200k_nesting": lambda good: b"[" * 200_000 + b"]" * 200_000,
    "lone_surrogate": lambda good: _dumps(good).replace(b"Who", b"\\ud800Who"),
}
CASES = ["empty_file", "invalid_utf8_json", *JSONL_CASES]


def write_case(tmp_path: Path, case: str, good_record, n_good: int) -> tuple[Path, int]:
    """The case's file and the line its error must name: `n_good` good records (then blank lines) up to
    line 2, the hostile content from line 3."""
    if case == "empty_file":
        path = tmp_path / "empty.jsonl"
        path.write_bytes(b"")
        return path, 1
    if case == "invalid_utf8_json":  # a JSON array whose third line is not UTF-8: the file is unreadable
        path = tmp_path / "bad.json"
        good = _dumps(good_record(0))
        path.write_bytes(b"[\n" + good + b",\n" + good.replace(b"Who", b"Wh\xff") + b"\n]\n")
        return path, 3
    head = [_dumps(good_record(i)) for i in range(n_good)] + [b""] * (BAD_LINE - 1 - n_good)
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(b"\n".join([*head, JSONL_CASES[case](good_record(9))]) + b"\n")
    return path, BAD_LINE


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`clara-jax ARGV` in-process: (exit status, stderr). The root logger, which the CLI reconfigures
    to write to this test's captured stderr, is put back as it was for the tests that follow."""
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return code, capsys.readouterr().err


def train_argv(tmp_path: Path, data: Path, policy: str) -> list[str]:
    return [
        "train",
        "--config",
        STAGE1,
        "--workdir",
        str(tmp_path / "run"),
        "--no-progress",
        f"--config.data.train={data}",
        f"--config.data.policy={policy}",
    ]


def eval_argv(tmp_path: Path, data: Path, policy: str) -> list[str]:
    model = tmp_path / "no-such-model"  # never reached: the data is read first
    return ["eval", "--model", str(model), "--data", str(data), "-k", "2", "--policy", policy]


def assert_refused(code: int, err: str, path: Path, line: int) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"{path}:{line}:" in err, err[-2000:]


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("case", CASES)
def test_train_refuses_hostile_data(tmp_path, capsys, case, policy):
    # one good record survives a skip: still fewer than the global batch of 8
    path, line = write_case(tmp_path, case, stage1_record, n_good=1)
    code, err = run_cli(train_argv(tmp_path, path, policy), capsys)
    assert_refused(code, err, path, line)
    assert "clara-jax train: error:" in err
    if policy == "skip" and case not in ("empty_file", "invalid_utf8_json"):
        assert "too few for one global batch of 8" in err and f"first skipped: {path}:{line}:" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_hostile_data(tmp_path, capsys, case, policy):
    path, line = write_case(tmp_path, case, eval_record, n_good=0)
    code, err = run_cli(eval_argv(tmp_path, path, policy), capsys)
    assert_refused(code, err, path, line)
    assert "clara-jax eval: error:" in err and "no-such-model" not in err
    if policy == "skip" and case not in ("empty_file", "invalid_utf8_json"):
        assert "too few for an evaluation" in err and f"first skipped: {path}:{line}:" in err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("binary_garbage", "malformed JSON"),
        ("json_array_in_jsonl", "expected a JSON object, got list"),
        ("missing_field", "field 'docs': expected a list of document strings"),
        ("wrong_type", "field 'question': expected a list of non-empty strings, got int 7"),
        ("10mb_line", "expected a record of at most 8,388,608 bytes on one line, got a line of 10,485,"),
        ("invalid_utf8_jsonl", "invalid UTF-8 (byte 0xff at byte offset"),
        ("nan", "field 'score': expected standard JSON, got the non-standard JSON constant NaN"),
        ("duplicate_keys", "expected standard JSON, got the duplicate key 'question'"),
        ("5000_digit_integer", "field 'id': expected standard JSON, got an integer with 5000 digits"),
        ("200k_nesting", "expected standard JSON, got JSON nested deeper than 64 levels"),
        ("lone_surrogate", "field 'question': expected standard JSON, got a lone UTF-16 surrogate"),
    ],
)
def test_train_messages_say_what_was_wrong(tmp_path, capsys, case, expected):
    path, _ = write_case(tmp_path, case, stage1_record, n_good=1)
    code, err = run_cli(train_argv(tmp_path, path, "error"), capsys)
    [message] = [line for line in err.splitlines() if line.startswith("clara-jax train: error:")]
    assert code == 2 and message.startswith(f"clara-jax train: error: {path}:{BAD_LINE}: "), err[-2000:]
    assert expected in message, message


def test_train_refuses_an_unusable_file_as_a_whole(tmp_path, capsys, monkeypatch):
    # Too few (good) records for one global batch.
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(stage1_record(i)) + "\n" for i in range(3)))
    code, err = run_cli(train_argv(tmp_path, few, "error"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{few}: read 3, kept 3, skipped 0; 3 usable records are too few for one global batch of 8" in err
    # An unknown extension.
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    code, err = run_cli(train_argv(tmp_path, csv, "error"), capsys)
    assert code == 2 and "Traceback" not in err and "unknown extension '.csv'" in err
    # HF datasets cannot load it (not a Parquet file); its cache goes to tmp_path, not ~/.cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet\x00\xff")
    code, err = run_cli(train_argv(tmp_path, parquet, "skip"), capsys)
    assert code == 2 and "Traceback" not in err and f"{parquet}: HF datasets could not load it" in err
    # eval: the same unknown extension, before its (missing) model is looked at.
    code, err = run_cli(eval_argv(tmp_path, csv, "error"), capsys)
    assert code == 2 and "Traceback" not in err and "unknown extension '.csv'" in err


def test_train_refuses_more_steps_than_the_data_gives(tmp_path, capsys):
    # 20 records at global batch 8: 2 steps per epoch (the partial batch is dropped), 2 epochs = 4 steps
    data = tmp_path / "twenty.jsonl"
    data.write_text("".join(json.dumps(stage1_record(i)) + "\n" for i in range(20)))
    argv = train_argv(tmp_path, data, "error") + ["--config.total_steps=5", "--config.data.num_epochs=2"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "total_steps=5" in err and "2 steps per epoch" in err and "= 4 steps" in err, err[-2000:]
    assert "--config.data.num_epochs=3" in err and "--config.total_steps=4" in err, err[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_real_entry_point_exits_2_without_a_traceback(tmp_path):
    """One case through `python -m clara_jax.cli`, as a user runs it: nothing but the message."""
    path, line = write_case(tmp_path, "200k_nesting", stage1_record, n_good=1)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "clara_jax.cli", *train_argv(tmp_path, path, "skip")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"first skipped: {path}:{line}: expected standard JSON, got JSON nested deeper" in done.stderr


# --- every command: bad input exits 2 ----------------------------------------------------------------


def test_export_search_and_convert_exit_2_on_bad_input(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "A document."}\n')
    code, err = run_cli(["export", "--model", missing, "--corpus", str(corpus), "--out", missing], capsys)
    assert code == 2 and "clara-jax export: error:" in err and "Traceback" not in err, err[-2000:]
    code, err = run_cli(
        ["export", "--model", missing, "--corpus", str(corpus), "--out", missing, "--shard-size", "0"], capsys
    )
    assert code == 2 and "clara-jax export: error: shard_size and batch_size must be >= 1" in err, err
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Who?"}\n{"question": 7}\n')
    code, err = run_cli(
        ["search", "--model", missing, "--index", missing, "--questions", str(questions)], capsys
    )
    assert code == 2 and f"clara-jax search: error: {questions}:2: expected" in err, err
    code, err = run_cli(["search", "--model", missing, "--index", missing, "--question", "Who?"], capsys)
    assert code == 2 and "clara-jax search: error:" in err and "Traceback" not in err, err[-2000:]
    code, err = run_cli(["convert", "--to-peft", missing, "--out", str(tmp_path / "peft")], capsys)
    assert code == 2 and "clara-jax convert: error:" in err and "Traceback" not in err, err[-2000:]
    code, err = run_cli(["convert", "--from-official", missing, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "clara-jax convert: error: --from-official needs --base BASE_DIR" in err, err


def test_the_parser_documents_the_exit_statuses_and_imports_nothing_heavy():
    """`clara-jax --help` builds every sub-parser without importing jax or numpy (fast, and `compile`
    pins the JAX platform before jax starts); the choices it spells out agree with the library's."""
    code = (
        "import sys; from clara_jax.cli import build_parser; text = build_parser().format_help(); "
        "print(sorted(m for m in ('jax', 'numpy', 'flax', 'transformers') if m in sys.modules)); print(text)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, text = out.split("\n", 1)
    assert heavy == "[]"
    assert "exit status:" in text
    for status in ("0  success", "1  a check that ran and failed", "2  bad input", "3  a run that stopped"):
        assert status in text, status

    from clara_jax.cli import common, export, search
    from clara_jax.inference.export import DTYPES
    from clara_jax.inference.index import BACKENDS

    assert export.DTYPES == DTYPES and search.BACKENDS == BACKENDS
    assert (common.EXIT_OK, common.EXIT_FAILED, common.EXIT_BAD_INPUT, common.EXIT_DIVERGED) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            ["train", "--config", STAGE1, "--workdir", "gs://unreachable-bucket/x", "--no-progress"],
            "--workdir",
        ),
        (
            [
                "train",
                "--config",
                STAGE1,
                "--workdir",
                "run",
                "--config.init_from=gs://unreachable-bucket/s1",
            ],
            "init_from",
        ),
        (
            ["export", "--model", "m", "--corpus", "c.jsonl", "--out", "gs://unreachable-bucket/index"],
            "--out",
        ),
        (["eval", "--model", "m", "--data", "d.jsonl", "--json", "gs://unreachable-bucket/s.json"], "--json"),
        (["synthesize", "--corpus", "c.jsonl", "--out", "gs://unreachable-bucket/synth"], "--out"),
    ],
)
def test_object_store_urls_are_refused_and_no_local_gs_folder_appears(
    tmp_path, monkeypatch, capsys, argv, flag
):
    """Until issue #20's cloud paths land, a gs:// path exits 2 naming it, and nothing is written: no
    local folder named "gs:" takes its place (os.path.abspath would make one of the URL)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps(eval_record(0)) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "0", "text": "A passage."}) + "\n")
    data = str(tmp_path / "train.jsonl")
    Path(data).write_text("".join(json.dumps(stage1_record(i)) + "\n" for i in range(8)))
    if argv[0] == "train":
        argv = [*argv, f"--config.data.train={data}"]
    code, err = run_cli(argv, capsys)
    assert code == 2, err[-2000:]
    assert f"{flag} gs://unreachable-bucket/" in err and "object-store URLs are not supported yet" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "d.jsonl", "train.jsonl"]

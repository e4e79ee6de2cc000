"""The train step compiled before step 0 (issue #18 items 1 and 3): its memory checked against the
device's, a step that cannot fit refused with exit 2 and the settings that would fit, and every bucket
shape of the run compiled ahead on request, so that no step compiles mid-run."""

from __future__ import annotations

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax import cli
from clara_jax.data.pipeline import BatchIterator, LayoutConfig
from clara_jax.data.records import CompressionRecord
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.training import memory_check as mc
from clara_jax.training.ahead import StepExecutables, batch_structs
from clara_jax.training.loop import StepClock

STAGE1 = "configs/stage1_scp.py:tiny"
SEED = 42  # the configs' seed: the batches' order below is computed from it


def _record(i: int, words: int) -> dict:
    doc = " ".join(f"word{(i * 7 + j) % 50}" for j in range(words))
    return {"data_type": "qa", "question": [f"Who is {i}?"], "answers": [f"A{i}"], "docs": [doc]}


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- the pieces, without a model ---------------------------------------------------------------------


def test_remaining_shapes_are_those_the_iterator_then_gives_and_it_does_not_move():
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    records = [
        CompressionRecord(
            kind="qa", doc=" ".join(["w"] * (3 + 40 * (i % 3 == 0))), questions=(f"q{i}?",), answers=("a",)
        )
        for i in range(24)
    ]
    layout = LayoutConfig(doc_max_length=64, query_max_length=16, generator_max_length=128, bucket=8)
    batches = BatchIterator(records, tok, "stage1", layout, global_size=4, micro_size=2, seed=0, num_epochs=2)
    next(batches)
    state = batches.state()
    shapes = batches.remaining_shapes()
    assert batches.state() == state and batches.stats.examples == 4  # nothing moved, nothing counted
    given = [{k: (v.shape, v.dtype) for k, v in b.items()} for b in batches]
    assert len(given) == 11 and len(shapes) >= 2
    assert shapes == list({str(g): g for g in given}.values())  # distinct, in first-seen order
    assert batches.remaining_shapes() == []  # at the end: nothing left
    batches.restore(state)
    assert batches.remaining_shapes(limit=1) == [given[0]]


def _step(state, frozen, batch):
    return state + batch["x"].sum() * frozen, {"loss": batch["x"].mean()}


def test_the_step_compiled_ahead_is_the_one_that_runs_and_the_clock_sees_no_compilation():
    backend_compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: (
            backend_compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    steps = StepExecutables(jax.jit(_step, donate_argnums=(0,)))
    _, seconds = steps.compile(jnp.float32(0), jnp.float32(2), batch_structs({"x": ((4,), np.float32)}))
    assert seconds > 0 and steps._cache_size() == 1
    clock = StepClock(steps)
    state, frozen, batch = jnp.float32(0), jnp.float32(2), {"x": jnp.ones(4)}
    before = len(backend_compiles)
    state, metrics = clock.dispatch(state, frozen, batch, step=1)
    clock.finished(metrics)
    assert clock.compiles == [] and len(backend_compiles) == before  # nothing compiled: it ran as compiled
    assert float(state) == 8.0
    state, metrics = clock.dispatch(state, jnp.float32(2), {"x": jnp.ones(8)}, step=2)  # not compiled ahead
    clock.finished(metrics)
    assert float(state) == 24.0 and [c["step"] for c in clock.compiles] == [2]


def test_the_search_names_the_largest_micro_batch_remat_and_a_shorter_generator():
    """A fake compiler whose temporaries follow rows x generator width (halved by remat=full)."""
    config = _config_dict(micro=16, global_size=32, remat="none")
    shapes = {"gen_ids": ((2, 16, 256), np.int32), "enc_ids": ((2, 16, 40), np.int32)}
    compiled = []

    def memory(shapes, remat=None):
        compiled.append((shapes["gen_ids"][0], remat))
        rows, width = shapes["gen_ids"][0][1:]
        temp = rows * width * 2**20 // (2 if remat == "full" else 1)
        return mc.StepMemory(100 * 2**20, 10 * 2**20, 10 * 2**20, temp)

    measured = memory(shapes)
    compiled.clear()
    available = mc.Available(1300 * 2**20, "a test's memory")  # micro 4 (1124 MiB) fits, 8 (2148) does not
    err = mc.find_fitting_settings(
        config, shapes, measured, available, memory, generator_probe=lambda n: (3, 16)
    )
    assert err.largest_micro == 4 and err.memory == measured
    text = str(err)
    assert "--config.batch.micro_size=4: needs 1.10 GiB, the largest micro-batch that fits" in text
    assert "micro_size=8 (about 2.10 GiB, estimated from micro_size=16)" in text  # not compiled
    assert "--config.model.remat=full: needs 2.10 GiB at micro_size=16: does not fit" in text
    assert "--config.clara.generator_max_length=128: needs 2.10 GiB at micro_size=16: does not fit" in text
    assert "it cuts 3 of these 16 prompts + targets" in text
    assert "--config.memory_check=false" in text
    # compiled: micro 4 only (8 was beyond the memory by its share), remat and the generator (these two
    # in threads beside the micro-batch search, so in any order)
    assert sorted(compiled, key=str) == sorted(
        [((8, 4, 256), None), ((2, 16, 256), "full"), ((2, 16, 128), None)], key=str
    )

    # the share follows the rows each device computes: here 8 rows stay whole on every device (they do
    # not divide over its mesh axes) while 16 and 4 rows are split, so micro 8 is estimated, 4 compiled
    per_device = {16: 2, 8: 8, 4: 1, 2: 1, 1: 1}

    def sharded(shapes, remat=None):
        compiled.append((shapes["gen_ids"][0], remat))
        rows, width = shapes["gen_ids"][0][1:]
        return mc.StepMemory(100 * 2**20, 10 * 2**20, 10 * 2**20, per_device[rows] * width * 2**20)

    compiled.clear()
    measured = sharded(shapes)  # 612 MiB at micro 16
    compiled.clear()
    available = mc.Available(450 * 2**20, "a test's memory")
    err = mc.find_fitting_settings(
        config,
        shapes,
        measured,
        available,
        sharded,
        rows_per_device=per_device.__getitem__,
        generator_probe=lambda n: None,  # a generator of 128 would cut the memory tokens: not compiled
    )
    assert err.largest_micro == 4
    assert sorted(compiled, key=str) == sorted([((8, 4, 256), None), ((2, 16, 256), "full")], key=str)
    assert "micro_size=8 (about 2.10 GiB, estimated from micro_size=16)" in str(err)
    assert "clara.generator_max_length=128 is not an option" in str(err)


def _config_dict(micro, global_size, remat):
    from ml_collections import ConfigDict

    return ConfigDict({"batch": {"micro_size": micro, "global_size": global_size}, "model": {"remat": remat}})


def test_host_memory_is_available_ram_plus_what_the_step_arguments_already_hold(monkeypatch):
    cpu = jax.devices("cpu")[:2]
    held = {cpu[0]: 3 * 2**20, cpu[1]: 3 * 2**20}
    monkeypatch.setattr(mc, "host_available_bytes", lambda: 100 * 2**20)
    available = mc.available_memory(cpu, held)
    assert available.bytes == 106 * 2**20 and "100.0 MiB available (MemAvailable)" in available.what
    assert mc.memory_copies(cpu) == 2  # simulated CPU devices share the host's RAM
    memory = mc.StepMemory(3 * 2**20, 2**20, 2**20, 50 * 2**20, copies=2)
    assert memory.total == 106 * 2**20 and mc.fits(memory, available)
    assert not mc.fits(mc.StepMemory(3 * 2**20, 2**20, 2**20, 50 * 2**20 + 1, copies=2), available)
    monkeypatch.undo()
    assert mc.host_available_bytes() > 0  # this machine's own figure


# -- whole runs of a tiny model (2 layers, width 64) ----------------------------------------------------


def _tiny_args(train: str, workdir, *extra) -> list[str]:
    return [
        "train",
        "--config",
        STAGE1,
        f"--config.data.train={train}",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--config.clara.doc_max_length=32",
        "--config.plot=false",
        "--config.peak_flops=1e12",
        *extra,
    ]


@pytest.mark.slow  # two compilations of the tiny step on 8 devices: ~25 s on 2 cores
def test_a_step_that_cannot_fit_exits_2_before_step_0_naming_the_largest_micro_batch_that_fits(
    tmp_path, monkeypatch, capsys
):
    """Global batch 32 in one micro-batch on the suite's 8 CPU devices (4 rows each), and a machine
    whose memory holds the step's weights and state but only 0.35 of its micro-32 temporaries: micro 16
    is beyond it by its share (not compiled), micro 8 (one row per device) is compiled and fits."""
    train = _write(tmp_path / "train.jsonl", [_record(i, 20) for i in range(32)])
    measured = []
    real_of = mc.StepMemory.of.__func__

    def recording(cls, compiled, copies=1):
        memory = real_of(cls, compiled, copies)
        measured.append(memory)
        return memory

    def fake_available(devices, resident):  # asked once the step for micro 32 has compiled
        m = measured[0]
        return mc.Available(int((m.per_device - 0.65 * m.temp_bytes) * m.copies), "a test machine")

    monkeypatch.setattr(mc.StepMemory, "of", classmethod(recording))
    monkeypatch.setattr(mc, "available_memory", fake_available)
    start = time.perf_counter()
    status = cli.main(
        _tiny_args(
            train,
            tmp_path / "run",
            "--config.batch.global_size=32",
            "--config.batch.micro_size=32",
            "--config.model.remat=full",  # already the leanest: no remat candidate to compile
            "--config.clara.generator_max_length=128",  # half of it cannot hold the prompt: not compiled
        )
    )
    err = capsys.readouterr().err
    assert status == 2 and time.perf_counter() - start < 120  # two compilations of a tiny step
    assert "--config.batch.micro_size=8: needs" in err and "the largest micro-batch that fits" in err
    assert "micro_size=16 (about" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()  # before step 0
    # what the check compiled: micro 32 (the run's), then micro 8 in 4 micro-steps, which does fit
    assert len(measured) == 2 and measured[1].total < measured[0].total


@pytest.mark.slow  # two compilations, two steps and a checkpoint: ~35 s on 2 busy cores
def test_precompiled_buckets_leave_no_compilation_mid_run(tmp_path, caplog):
    """Two global batches whose documents bucket to different widths: both shapes compile before
    step 0, the memory check reads the larger, and the steps compile nothing."""
    from clara_jax.training.config import load_config
    from clara_jax.training.loop import run_training

    order = np.random.default_rng([SEED, 0]).permutation(16)  # the pipeline's first epoch
    words = np.empty(16, int)
    words[order[:8]], words[order[8:]] = 1, 20  # the first batch short documents, the second long ones
    train = _write(tmp_path / "train.jsonl", [_record(i, int(words[i])) for i in range(16)])
    config = load_config(
        STAGE1,
        [
            f"--config.data.train={train}",
            "--config.data.precompile_buckets=true",
            "--config.data.bucket=16",
            "--config.clara.doc_max_length=32",
            "--config.clara.generator_max_length=128",
            "--config.batch.global_size=8",
            "--config.batch.micro_size=8",
            "--config.plot=false",
            "--config.peak_flops=1e12",
        ],
    )
    caplog.set_level(logging.INFO)
    summary = run_training(config, str(tmp_path / "run"), progress=False)
    assert summary.last_step == 2
    widths = [c["shapes"]["enc_ids"][2] for c in summary.compiles]
    assert widths == [
        39,
        20,
    ]  # <ENC> <s> doc </s> cut to 32 (+ 4 memory tokens), then 16 + 4: the larger first
    assert all(c["step"] == 0 and c["seconds"] > 0 for c in summary.compiles)  # none mid-run
    check = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory check:")]
    assert (
        len(check) == 1 and "enc_ids: (1, 8, 39)" in check[0] and "the largest of 2 batch shapes" in check[0]
    )

"""The controlled stage-3 experiment, shortened (issue #16): the answer's LM loss alone, through the
straight-through top-k, lifts a near-chance query reasoner's held-out Recall@1 clearly above the
control, whose top-k weights are stop-gradiented. The full-length run and its curves come from
`benchmarks/stage3_controlled.py`; the construction is in clara_jax/training/controlled_stage3.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clara_jax.training.controlled_stage3 import ControlledConfig

# A reader and a stage-3 run: the longest module of the suite, and slower under load. The per-test ceiling
# of pyproject.toml (600 s) is raised for it, not removed.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# The benchmark's settings, with fewer steps and dev questions. The control is kept short: its
# query reasoner receives no gradient, which the test checks directly.
# Training questions carry 5 candidates (dev ones 20): the rise comes sooner and each step is
# cheaper than with the benchmark's 20. One device: eight simulated ones on two cores only add
# collectives.
CI = ControlledConfig(
    train_candidates=5,
    reader_steps=400,
    stage3_steps=120,
    control_steps=5,
    eval_every=40,
    eval_questions=50,
    devices=1,
)


# Its own process: ~500 steps at batch 64 run at XLA's default optimisation level, not the suite's -O0
# (tests/conftest.py), and on the one device it uses.
_RUN = """
import dataclasses, json, sys
from clara_jax.training.controlled_stage3 import ControlledConfig, run_controlled_experiment
result = run_controlled_experiment(ControlledConfig(**json.loads(sys.argv[1])), log=print)
json.dump(result, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("controlled") / "result.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(dataclasses.asdict(CI)), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    print(run.stdout[-5000:], run.stderr[-5000:])  # the experiment's log, shown on failure or with -s
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_reader_answers_from_the_gold_passage_only(result):
    # 400 steps (the benchmark's 500 read 0.82 and 0.09): far better from the gold than from a wrong one
    reader = result["reader"]
    assert reader["em_gold"] >= 0.4 and reader["em_gold"] - reader["em_wrong_doc"] >= 0.3, reader


def test_straight_through_lifts_recall_from_chance_and_the_control_stays(result):
    st, control = result["curves"]["straight_through"], result["curves"]["control"]
    start = st[0]["dev/recall@1"]
    assert start == control[0]["dev/recall@1"]  # same query reasoner, same dev questions
    assert start <= 0.15, f"the query reasoner should start near chance (0.05), got {start}"

    # The control's query reasoner gets exactly no gradient, so its retrieval never moves.
    assert all(row["train/grad_norm/query_reasoner"] == 0.0 for row in control[1:])
    assert {row["dev/recall@1"] for row in control} == {start}

    # The straight-through run's query reasoner gets a real gradient and learns from it.
    assert all(row["train/grad_norm/query_reasoner"] > 0.0 for row in st[1:])
    final = st[-1]["dev/recall@1"]
    # This configuration read 0.04 -> 0.24 / 0.18 / 0.34 at steps 40 / 80 / 120 (50 dev questions,
    # chance 0.05; the reader: EM 0.62 from the gold, 0.04 from a wrong passage); full-length runs
    # with 5 training candidates read 0.44 and 0.59 at step 200 of 100 dev questions. The trajectory
    # depends on float rounding through the hard top-1, so the margin is wide. The control, from the
    # same start, stays exactly where it began.
    assert final >= start + 0.2, [row["dev/recall@1"] for row in st]
    assert np.isfinite([row["train/ce"] for row in st[1:]]).all()

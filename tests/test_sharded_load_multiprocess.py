"""Two processes load one base onto a mesh that spans them (fsdp=8, 4 devices each): each process
reads from the files only the slices its own devices hold, and the two halves together are the
one-device load bit for bit (tests/sharded_load_worker.py runs each process)."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")

from clara_jax.formats.safetensors_io import open_checkpoint  # noqa: E402
from tests import hf_reference as ref  # noqa: E402
from tests.test_multiprocess import _env, _free_port, _run_processes  # noqa: E402


@pytest.mark.slow
def test_two_processes_each_read_only_their_half(tmp_path):
    checkpoint = tmp_path / "llama"
    ref.build_family("llama").to(torch.bfloat16).save_pretrained(checkpoint)
    port = _free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "tests.sharded_load_worker",
            str(checkpoint),
            str(tmp_path / f"report{pid}.json"),
            f"localhost:{port}",
            str(pid),
        ]
        for pid in range(2)
    ]
    _run_processes(commands, [_env(4)] * 2, tmp_path / "workers")  # bounded; fails with both logs

    reports = [json.loads((tmp_path / f"report{pid}.json").read_text()) for pid in range(2)]
    assert [r["process"] for r in reports] == [0, 1] and all(r["devices"] == 4 for r in reports)
    shapes = {key: f.readable_shape(key) for key, f in open_checkpoint(checkpoint).items()}
    per_process = [defaultdict(int) for _ in reports]
    slices = [defaultdict(set) for _ in reports]
    for counts, seen, report in zip(per_process, slices, reports):
        assert report["reads"], "nothing was read through the sliced reader"
        for key, index, size in report["reads"]:
            counts[key] += size
            seen[key].add(json.dumps(index))
    for key, shape in shapes.items():
        size, matrix = math.prod(shape), len(shape) == 2
        for counts in per_process:
            # a matrix is split 8 ways, 4 of them on each process; a 1-D tensor is replicated
            assert counts[key] <= (size // 2 if matrix else size), (
                f"{key}: a process read more than its share"
            )
        if matrix:
            assert per_process[0][key] + per_process[1][key] == size, f"{key}: not read exactly once in all"
            assert not slices[0][key] & slices[1][key], f"{key}: both processes read the same slice"
    for report in reports:
        assert report["equal"] and all(report["equal"].values()), [
            k for k, v in report["equal"].items() if not v
        ]
        for name, a in report["addressable"].items():  # this process holds 4 of the 8 devices' shards
            assert a["held"] * a["ways"] == a["size"] * min(4, a["ways"]), name
            if a["size"] and (a["ndim"] == 3 or "embed" in name or "lm_head" in name):  # matrices, embeddings
                assert a["ways"] == 8, f"{name}: expected split 8 ways, got {a['ways']}"

"""Where training numbers go: TensorBoard events, metrics.jsonl, and PNG plots.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step; on resume, rows
past the restored step are dropped so the file always tells one consistent history.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import numpy as np

from clara_jax.file_io import write_bytes_atomic
from clara_jax.formats.jsonl import read_json_lines

# Stage-3 numbers that explain the recall curve (clara_jax/training/retrieval_diagnostics.py).
RETRIEVAL_DIAGNOSTICS = ("score_std", "topk_gap", "topk_entropy", "gold_outside_topk")
# Scores of answers generated during evaluation (clara_jax/training/stage_eval.py).
ANSWER_SCORES = ("em", "f1", "cover_em")


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            truncate_history(self.path, resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh history
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key != "step" and math.isfinite(value):  # TensorBoard names allow no '@'
                self._tb.add_scalar(key.replace("@", "_at_"), value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_history(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return read_json_lines(path)


def truncate_history(path: str, last_step: int) -> None:
    """Keep rows up to `last_step` (the restored checkpoint); later ones will be recomputed."""
    rows = [r for r in read_history(path) if r["step"] <= last_step]
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def plot_history(workdir: str, keys: Iterable[str] | None = None) -> list[str]:
    """One PNG per metric group (loss terms, train and eval; recall@k, train and dev; accuracy;
    answer scores of the evaluations; learning rate; gradient norms; stage-3 retrieval diagnostics);
    returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(os.path.join(workdir, "metrics.jsonl"))
    if not rows:
        return []
    available = sorted({k for r in rows for k in r if k != "step"})
    keys = [k for k in (keys or available) if k in available]
    groups = {
        "loss": [k for k in keys if k.rsplit("/", 1)[-1] in ("loss", "ce", "mse", "infonce")],
        "recall": [k for k in keys if "recall@" in k],
        "accuracy": [k for k in keys if "accuracy" in k],
        "answers": [k for k in keys if k.rsplit("/", 1)[-1] in ANSWER_SCORES],
        "learning_rate": [k for k in keys if k.endswith("learning_rate")],
        "grad_norm": [k for k in keys if "grad_norm" in k],
        "retrieval_diagnostics": [k for k in keys if k.rsplit("/", 1)[-1] in RETRIEVAL_DIAGNOSTICS],
    }
    paths = []
    for name, members in groups.items():
        if not members:
            continue
        # quantities of different scales (the diagnostics) get one panel each, the others share one
        panels = [[k] for k in members] if name == "retrieval_diagnostics" else [members]
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 4 if len(panels) == 1 else 2.2 * len(panels)))
        for ax, panel in zip(np.atleast_1d(axes), panels):
            for key in panel:
                pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 40 else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        fig.suptitle(f"{os.path.basename(os.path.abspath(workdir))}: {name}")
        path = os.path.join(workdir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

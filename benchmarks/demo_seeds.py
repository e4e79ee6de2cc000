"""The demo over several seeds (issue #16): does stage 3 beat stage 2 by more than the seed spread?

    python benchmarks/demo_seeds.py --out runs/demo_seeds --seeds 0 1 2     # ~10 min per seed here

Each seed is a full `clara-jax demo` (base pretraining and all three stages seeded; the corpus and
the held-out questions are the same) in OUT/seed<N>; an existing seed directory resumes. Prints
Recall@1, Recall@5 and EM after stage 2 (the query reasoner = the compressor) and after stage 3 as
mean ± sd over the seeds, the per-seed stage-3 gain in Recall@1, and writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from clara_jax.demo import run_demo

METRICS = (("recall@1", "Recall@1"), ("recall@5", "Recall@5"), ("em", "answer EM"), ("f1", "answer F1"))


def summarize(results: dict[int, dict]) -> dict:
    out = {}
    for key, _ in METRICS:
        for when in ("after_stage2", "after"):
            vals = np.array([r[when][key] for r in results.values()])
            out[f"{when}/{key}"] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            }
    gain = np.array([r["after"]["recall@1"] - r["after_stage2"]["recall@1"] for r in results.values()])
    out["gain/recall@1"] = {"per_seed": gain.tolist(), "mean": float(gain.mean())}
    return out


def format_summary(results: dict[int, dict], summary: dict) -> str:
    n = len(results)
    lines = [f"{'metric':<12}{'stage 2':>16}{'stage 3':>16}   (mean ± sd over {n} seeds)"]
    for key, label in METRICS:
        cells = [summary[f"{w}/{key}"] for w in ("after_stage2", "after")]
        lines.append(f"{label:<12}" + "".join(f"{c['mean']:>9.3f} ± {c['sd']:.3f}" for c in cells))
    gains = ", ".join(f"{g:+.3f}" for g in summary["gain/recall@1"]["per_seed"])
    lines.append(f"stage-3 gain in Recall@1 per seed: {gains}")
    minutes = [r["seconds"] / 60 for r in results.values()]
    lines.append(f"wall time per seed: {', '.join(f'{m:.1f}' for m in minutes)} min")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        results[seed] = run_demo(os.path.join(args.out, f"seed{seed}"), scale=args.scale, seed=seed)
    summary = summarize(results)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"seeds": {str(s): r for s, r in results.items()}, "summary": summary}, f, indent=1)
    print(format_summary(results, summary))
    return summary


if __name__ == "__main__":
    main()

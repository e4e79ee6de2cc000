"""Choose the demo's stage-3 settings on the dev split (issue #16): every variant starts from the
same finished stage 2 and is scored by dev Recall@k on the dev people (dev_with_pos.jsonl), never on
the held-out evaluation questions.

    clara-jax demo --workdir runs/demo                            # once: stages 1-2 (and 3)
    python benchmarks/demo_stage3_dev.py --workdir runs/demo \\
        --variant paper: \\
        --variant b64_t05:batch.global_size=64,clara.temperature=0.05,optim.lr=1e-3

A variant is NAME:key=value,... of stage-3 config overrides on top of the demo's (empty: the demo's
own settings). Each runs in WORKDIR/dev_tuning/NAME; the table is dev Recall@1/@5 at the start
(the stage-2 query reasoner, a copy of the compressor), at the end and at the best evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from clara_jax.demo import stage_overrides
from clara_jax.training.config import load_config
from clara_jax.training.loop import run_training


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, spec = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME:key=value,...; got {text!r}")
    return name, [f"--config.{kv}" for kv in spec.split(",") if kv]


def dev_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "dev/recall@1" in row]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a demo workdir whose stage 2 has finished")
    parser.add_argument("--variant", type=_variant, action="append", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the demo seed the workdir was run with")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    stage2 = os.path.join(workdir, "stage2")
    if not os.path.isdir(os.path.join(stage2, "model")):
        parser.error(f"{stage2}/model is missing: run `clara-jax demo --workdir {args.workdir}` first")
    base = stage_overrides(os.path.join(workdir, "data"), os.path.join(workdir, "base"), 1.0, args.seed)[
        "stage3"
    ]
    results = {}
    for name, extra in args.variant:
        config = load_config("stage3_e2e:tiny,runlocal", base + extra)
        config.init_from = stage2
        out = os.path.join(workdir, "dev_tuning", name)
        start = time.perf_counter()
        run_training(config, out, progress=False)
        rows = dev_rows(out)
        k = f"dev/recall@{config.clara.top_k}"
        best = max(rows, key=lambda r: r["dev/recall@1"])
        results[name] = {
            "overrides": extra,
            "start": {"recall@1": rows[0]["dev/recall@1"], f"recall@{config.clara.top_k}": rows[0][k]},
            "end": {"recall@1": rows[-1]["dev/recall@1"], f"recall@{config.clara.top_k}": rows[-1][k]},
            "best": {"step": best["step"], "recall@1": best["dev/recall@1"]},
            "curve": [(r["step"], round(r["dev/recall@1"], 3)) for r in rows],
            "seconds": time.perf_counter() - start,
        }
        r = results[name]
        print(
            f"{name:<16} dev R@1 {r['start']['recall@1']:.3f} -> {r['end']['recall@1']:.3f} "
            f"(best {best['dev/recall@1']:.3f} at step {best['step']}), "
            f"R@{config.clara.top_k} {rows[0][k]:.3f} -> {rows[-1][k]:.3f}, {r['seconds']:.0f} s  {r['curve']}",
            flush=True,
        )
    with open(os.path.join(workdir, "dev_tuning", "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

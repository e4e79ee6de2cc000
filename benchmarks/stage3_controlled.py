"""The controlled stage-3 experiment (issue #16): the LM loss alone, through the straight-through
top-k, teaches a near-chance query reasoner to retrieve; with the top-k weights stop-gradiented
(the control) it does not. See clara_jax/training/controlled_stage3.py for the construction.

    python benchmarks/stage3_controlled.py --out runs/stage3_controlled
    python benchmarks/stage3_controlled.py --out /tmp/s3c --stage3-steps 60   # shorter

Writes OUT/result.json (both curves, every logged diagnostic) and OUT/curves.png, and prints
step -> dev Recall@1 for both runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from clara_jax.training.controlled_stage3 import ControlledConfig, plot_controlled, run_controlled_experiment


def _arg_type(field: dataclasses.Field):
    if isinstance(field.default, bool):
        return lambda v: v.lower() in ("1", "true", "yes")
    return int if field.default is None else type(field.default)  # None: control_steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/stage3_controlled")
    for field in dataclasses.fields(ControlledConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=_arg_type(field), default=field.default)
    args = parser.parse_args(argv)
    cfg = ControlledConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ControlledConfig)})
    os.makedirs(args.out, exist_ok=True)
    result = run_controlled_experiment(cfg)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot = plot_controlled(result, os.path.join(args.out, "curves.png"))
    print(
        f"\n{'step':>6} {'straight-through':>17} {'control':>9}   dev Recall@1, chance {result['chance_recall@1']:.2f}"
    )
    control = {row["step"]: row["dev/recall@1"] for row in result["curves"]["control"]}
    for st in result["curves"]["straight_through"]:  # the control may be shorter (--control-steps)
        ctl = f"{control[st['step']]:>9.3f}" if st["step"] in control else f"{'':>9}"
        print(f"{st['step']:>6} {st['dev/recall@1']:>17.3f} {ctl}")
    print(f"reader: {result['reader']}")
    print(f"wall time {result['seconds'] / 60:.1f} min; plot {plot}; numbers {args.out}/result.json")
    return result


if __name__ == "__main__":
    main()

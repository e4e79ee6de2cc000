"""What does the demo's compressor keep of a passage? (issue #16: why stage 3 gains little.)

    python benchmarks/demo_compressor_probe.py --workdir runs/demo            # its stage-1 model
    python benchmarks/demo_compressor_probe.py --workdir runs/demo --model runs/demo/stage2/model

1. Paraphrase fidelity: the generator reconstructs held-out passages (stage1_eval.jsonl, people
   never trained on) from their memory vectors alone; printed is the share of the passages' fact
   values (city, colour, animal, year, job, mentor) and of their names that reappear.
2. Sensitivity: how far each memory vector moves (relative L2) when one word of a passage changes,
   the name against each fact value. A compressor that keeps names but not values answers
   "who is this about" and nothing else, so its generator cannot answer from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from clara_jax.inference.clara_model import ClaraInference
from clara_jax.interop.model_dir import load_clara_model

_TEMPLATE = set("lives in likes keeps a an was born works as mentor is s".split())
_PASSAGE = "Fato lives in Paris. Fato keeps a dog. Fato was born in 1962."
_CHANGES = {
    "name": ("Fato", "Kuvi"),
    "city": ("Paris", "Cairo"),
    "animal": ("dog", "hen"),
    "year": ("1962", "1968"),
}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9]+", text))


def paraphrase_fidelity(inference: ClaraInference, passages: list[str]) -> dict:
    out = inference.generate_from_paraphrase([""] * len(passages), [[p] for p in passages], 48, rng=0)
    values = names = total = 0
    for passage, text in zip(passages, out):
        name = passage.split()[0]
        facts = _words(passage) - _TEMPLATE - {name}
        got = _words(text)
        values += len(facts & got)
        total += len(facts)
        names += name in got
    return {"values": values / total, "names": names / len(passages), "example": [passages[0], out[0]]}


def sensitivity(inference: ClaraInference) -> dict:
    changed = [_PASSAGE.replace(a, b) for a, b in _CHANGES.values()]
    memory, _ = inference.compress_documents([_PASSAGE, *changed])
    ref = np.linalg.norm(memory[0], axis=-1)
    return {
        kind: [round(float(x), 2) for x in np.linalg.norm(m - memory[0], axis=-1) / ref]
        for kind, m in zip(_CHANGES, memory[1:])
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a demo workdir (its data/ and stage1/model)")
    parser.add_argument("--model", help="a model directory (default WORKDIR/stage1/model)")
    parser.add_argument("--passages", type=int, default=60)
    args = parser.parse_args(argv)
    model_dir = args.model or os.path.join(args.workdir, "stage1", "model")
    with open(os.path.join(args.workdir, "data", "stage1_eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    passages = [r["docs"][0] for r in rows if r.get("data_type") == "paraphrase"][: args.passages]
    inference = ClaraInference(*load_clara_model(model_dir), batch_size=25)
    result = {
        "model": model_dir,
        "fidelity": paraphrase_fidelity(inference, passages),
        "sensitivity": sensitivity(inference),
    }
    fid = result["fidelity"]
    print(f"{model_dir}: {len(passages)} held-out passages reconstructed from memory:")
    print(f"  fact values reproduced {fid['values']:.3f}, names {fid['names']:.3f}")
    print(f"  e.g. {fid['example'][0]!r} -> {fid['example'][1]!r}")
    print("  memory movement (relative L2 per memory vector) when one word changes:")
    for kind, moves in result["sensitivity"].items():
        print(f"    {kind:<7} {moves}")
    return result


if __name__ == "__main__":
    main()

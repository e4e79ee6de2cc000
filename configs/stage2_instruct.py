"""Stage 2, compression instruction tuning: QA over k compressed documents.

    clara-jax train --config configs/stage2_instruct.py:tiny,runlocal --workdir /tmp/clara/s2 \
        --config.init_from /tmp/clara/s1 --config.data.train data/stage2_train.jsonl

Starts from stage 1's compressor with a fresh generator (as the paper does). Paper defaults:
lr 1e-4 cosine, global batch 128, k = 5 documents in data order, MSE weight 0.1.
"""

from configs.common import apply_preset_defaults, base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, preset="tiny", runlocal=False)
    c = base_config("stage2", args.preset)
    c.clara.docs_per_example = 5
    apply_preset_defaults(c, args.runlocal)
    return c

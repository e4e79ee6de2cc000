"""Stage 3, end-to-end: query reasoner + generator through the straight-through top-k.

    clara-jax train --config configs/stage3_e2e.py:tiny,runlocal --workdir /tmp/clara/s3 \
        --config.init_from /tmp/clara/s2 --config.data.train data/stage3_train.jsonl

Starts from stage 2's compressor and generator; the query reasoner starts as a copy of the
compressor. Paper defaults: lr 5e-6 constant, global batch 32, top-5 of 20 candidates,
temperature 0.02, CE only (no MSE), <MEM*> rows and compressor frozen.
"""

from configs.common import apply_preset_defaults, base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, preset="tiny", runlocal=False)
    c = base_config("stage3", args.preset)
    c.optim.lr = 5e-6
    c.optim.schedule = "constant"
    c.batch.global_size = 32
    c.clara.mse_weight = 0.0
    c.clara.generator_max_length = 1024
    apply_preset_defaults(c, args.runlocal)
    return c

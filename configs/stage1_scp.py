"""Stage 1, SCP compressor pretraining: compressor + generator on QA / paraphrase targets.

    clara-jax train --config configs/stage1_scp.py:tiny,runlocal --workdir /tmp/clara/s1 \
        --config.data.train data/stage1_train.jsonl
    clara-jax train --config configs/stage1_scp.py:mistral_7b --workdir gs://bucket/s1 \
        --config.model.path /models/Mistral-7B-Instruct-v0.2 --config.data.train scp.arrayrecord

Paper defaults: lr 1e-4 cosine to 10 % after 3 % warm-up, global batch 128, compression 32,
doc_max_length 256, MSE weight 0.1, one document per example.
"""

from configs.common import apply_preset_defaults, base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, preset="tiny", runlocal=False)
    c = base_config("stage1", args.preset)
    c.clara.docs_per_example = 1
    apply_preset_defaults(c, args.runlocal)
    return c

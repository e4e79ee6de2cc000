"""`clara-jax convert`: move trained CLaRa models between clara-jax, PEFT and the official format
(clara_jax.interop.peft, clara_jax.interop.official)."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import EXIT_OK, error

DESCRIPTION = """\
Convert CLaRa models between formats. Exactly one direction per call.

--to-peft MODEL_DIR
    A clara-jax model directory (a run's WORKDIR/model) -> OUT/base (a transformers directory
    with the extended vocabulary and the trained <MEM*> rows merged, plus the tokenizer) and one
    PEFT LoRA adapter directory per role: OUT/compressor, OUT/query_reasoner, OUT/generator.
    In PyTorch:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("OUT/base"),
                                           "OUT/generator")

--from-official DIR --base BASE_DIR
    An official apple/ml-clara checkpoint -> a clara-jax model directory that
    `clara-jax eval/export` and `load_clara_model` read. Both official layouts convert: what the
    official trainer's save_pretrained writes (config.json, adapters.pth,
    decoder_first_last_layers.pth, no tokenizer) and the released checkpoints (the same plus
    tokenizer files). BASE_DIR is the LOCAL transformers directory of the base LLM the
    checkpoint was trained on (its config's decoder_model_name, e.g. Mistral-7B-Instruct-v0.2).
    Without tokenizer files in DIR (or --tokenizer), the tokenizer is rebuilt as the official
    from_pretrained does: BASE_DIR's tokenizer (else decoder_model_name's, if that is a local
    directory) plus <MEM0..n-1>, <AE>, <ENC>, <SEP>. The .pth files are read with
    torch.load(weights_only=True): anything but tensors is refused. PEFT's copies of the
    embedding and lm_head inside each adapter are checked against
    decoder_first_last_layers.pth. All adapters in the file are loaded as saved
    (encoder_adapter -> compressor, decoder_adapter -> generator, query_reasoner_adapter ->
    query_reasoner); compr_rate and doc_max_length come from the checkpoint's config.json
    (--compr-rate / --doc-max-length only assert them); a config.json field that changes the
    computation and that clara-jax does not reproduce (sep=false, kbtc_training, quantization,
    one shared <MEM> token, no LoRA) is refused by name. The base is referenced, not copied,
    when its rows equal the checkpoint's; otherwise (or with --copy-base) it is written to OUT/base.
    The reverse direction (clara-jax -> official layout) is not offered; use --to-peft.

examples:
  clara-jax convert --to-peft runs/s3/model --out runs/s3/peft
  clara-jax convert --from-official ckpt/clara-7b-e2e/compression-16 \\
      --base models/Mistral-7B-Instruct-v0.2 --out models/clara-e2e-cr16 --dtype bfloat16
"""


def run(args: argparse.Namespace) -> int:
    try:
        if args.to_peft:
            from clara_jax.interop.peft import export_peft

            for role, path in export_peft(args.to_peft, args.out).items():
                print(f"{role:>15}: {path}")
        else:
            if not args.base:
                return error("convert", "--from-official needs --base BASE_DIR")
            from clara_jax.interop.official import convert_official

            out = convert_official(
                args.from_official,
                args.base,
                args.out,
                tokenizer_dir=args.tokenizer,
                dtype=args.dtype,
                compression_rate=args.compr_rate,
                doc_max_length=args.doc_max_length,
                copy_base=args.copy_base,
                report=print,
            )
            print(f"wrote clara-jax model directory {out}")
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return error("convert", exc)
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert models: clara-jax -> PEFT adapters, official CLaRa checkpoint -> clara-jax",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-peft", metavar="MODEL_DIR", help="a clara-jax model directory to export")
    mode.add_argument("--from-official", metavar="DIR", help="an official CLaRa checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument(
        "--base", metavar="BASE_DIR", help="--from-official: local transformers directory of the base LLM"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="--from-official: tokenizer directory (default: DIR's own, else the base's plus the CLaRa tokens)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="--from-official: parameter dtype of the written model, e.g. bfloat16 (default float32)",
    )
    parser.add_argument(
        "--compr-rate", type=int, default=None, help="--from-official: assert the checkpoint's compr_rate"
    )
    parser.add_argument(
        "--doc-max-length",
        type=int,
        default=None,
        help="--from-official: assert the checkpoint's doc_max_length",
    )
    parser.add_argument(
        "--copy-base",
        action="store_true",
        help="--from-official: write the base weights into OUT/base instead of referencing BASE_DIR",
    )
    parser.set_defaults(func=run)
    return parser

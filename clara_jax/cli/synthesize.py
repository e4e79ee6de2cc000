"""`clara-jax synthesize`: SCP training data from raw passages, with a local model or an endpoint
(clara_jax.synthesis)."""

from __future__ import annotations

import argparse
import sys

from clara_jax.cli.common import EXIT_DIVERGED, EXIT_OK, configure_logging, error, refuse_urls

DEFAULT_MODEL = "smollm2"


def make_backend(args: argparse.Namespace):
    """The backend the flags ask for (imports only what it needs)."""
    from clara_jax.synthesis.backends import LocalBackend, RemoteBackend, ScriptedBackend

    if args.backend == "local":
        from clara_jax.inference.chat import load_chat_model

        return LocalBackend(
            load_chat_model(args.model, dtype=args.dtype, batch_size=args.batch_size, seed=args.seed)
        )
    if args.backend == "remote":
        if not args.base_url:
            raise ValueError("--backend remote needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return RemoteBackend(
            args.base_url,
            args.remote_model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            seed=args.seed,
        )
    if args.backend.startswith("scripted:"):
        return ScriptedBackend.from_file(args.backend.split(":", 1)[1])
    raise ValueError(f"--backend: expected local, remote or scripted:FILE, got {args.backend!r}")


def config_from_args(args: argparse.Namespace):
    from clara_jax.synthesis.pipeline import SynthesisConfig

    cap = args.max_new_tokens
    base = SynthesisConfig.__dataclass_fields__
    budgets = {
        name: min(base[name].default, cap) if cap else base[name].default
        for name in ("question_tokens", "answer_tokens", "judge_tokens", "paraphrase_tokens")
    }
    return SynthesisConfig(
        simple=args.simple,
        multihop=args.multi_hop,
        paraphrase=args.paraphrase,
        max_rounds=args.max_rounds,
        parse_retries=args.parse_retries,
        shots=args.shots,
        **budgets,
    )


def run(args: argparse.Namespace) -> int:
    if (refused := refuse_urls("synthesize", {"--out": args.out})) is not None:
        return refused

    import logging

    from clara_jax.synthesis.backends import BackendError, describe
    from clara_jax.synthesis.pipeline import SynthesisAborted, Synthesizer
    from clara_jax.synthesis.report import format_report
    from clara_jax.synthesis.store import StoreError

    configure_logging()
    backend = None
    try:
        config = config_from_args(args)
        backend = make_backend(args)
        process_index, process_count = args.process_index, args.process_count
        if process_count is None:
            process_index, process_count = 0, 1
            if args.backend == "local":
                import jax

                process_index, process_count = jax.process_index(), jax.process_count()
        logging.getLogger(__name__).info("synthesize with %s", describe(backend))
        in_flight = args.in_flight or 2 * (args.batch_size if args.backend == "local" else args.concurrency)
        report = Synthesizer(config).run(
            args.corpus,
            args.out,
            backend,
            num_shards=args.num_shards,
            process_index=process_index or 0,
            process_count=process_count,
            limit=args.limit,
            in_flight=in_flight,
            progress=not args.no_progress,
            max_consecutive_errors=args.max_consecutive_errors,
            trace=args.trace,
        )
    except (ValueError, FileNotFoundError, StoreError, BackendError) as err:
        return error("synthesize", err)
    except SynthesisAborted as err:
        print(f"clara-jax synthesize: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        if backend is not None:
            backend.close()
    print(format_report(report))
    print(f"report: {args.out}/report.json")
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synthesize",
        help="synthesise stage-1 (SCP) QA and paraphrase records from raw passages with an LLM (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For every passage: simple questions, multi-hop questions, an answer per question, a\n"
        "judge per pair, coverage checks with supplementary questions (up to --max-rounds; a passage never\n"
        "covered is excluded), a paraphrase and its judge. Writes OUT/records-SSSSS.jsonl (stage-1 records:\n"
        "data_type qa / multihop_qa / paraphrase), OUT/ledger-SSSSS.jsonl (one line per finished passage) and\n"
        "OUT/report.json (kept / dropped per reason, QA pairs per passage, rounds, calls, tokens, docs/s).\n"
        "Killed at any point and rerun with the same flags, it continues where it stopped; passages that\n"
        "failed in the backend are retried.\n\n"
        "The corpus is JSONL with one passage per line in 'text' (+ optional 'title'), 'contents',\n"
        "'passage', 'paragraph_text', or a CLaRa record's 'docs' list (its first entry).\n\n"
        "  clara-jax synthesize --corpus passages.jsonl --out synth/ --backend local --model smollm2\n"
        "  clara-jax synthesize --corpus passages.jsonl --out synth/ --backend remote \\\n"
        "      --base-url http://127.0.0.1:8000/v1 --api-key-env OPENAI_API_KEY --concurrency 16",
    )
    p.add_argument("--corpus", required=True, help="passages, JSONL")
    p.add_argument("--out", required=True, help="output directory (created; resumed if it exists)")
    p.add_argument(
        "--backend",
        default="local",
        help="local (a model in this process), remote (an OpenAI-compatible "
        "endpoint) or scripted:FILE (replayed replies, for tests); default local",
    )
    g = p.add_argument_group("local backend")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="tiny, smollm2, a transformers directory or a .gguf (default smollm2)",
    )
    g.add_argument("--dtype", default="float32", help="model dtype policy (default float32)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per generation batch (default 8)")
    g = p.add_argument_group("remote backend")
    g.add_argument(
        "--base-url", default="", help="e.g. http://127.0.0.1:8000/v1 (/v1 is added to a bare host)"
    )
    g.add_argument("--api-key-env", default=None, help="NAME of the environment variable holding the API key")
    g.add_argument(
        "--remote-model", default=None, help="model name to request (default: the first of /v1/models)"
    )
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--retries", type=int, default=4, help="retries on timeouts, 429 and 5xx (default 4)")
    g = p.add_argument_group("what to synthesise")
    g.add_argument(
        "--simple", action=argparse.BooleanOptionalAction, default=True, help="simple QA (default on)"
    )
    g.add_argument(
        "--multi-hop", action=argparse.BooleanOptionalAction, default=True, help="multi-hop QA (default on)"
    )
    g.add_argument(
        "--paraphrase", action=argparse.BooleanOptionalAction, default=True, help="paraphrase (default on)"
    )
    g.add_argument(
        "--max-rounds", type=int, default=10, help="coverage checks per QA track; 0 skips them (default 10)"
    )
    g.add_argument("--shots", type=int, default=None, help="few-shot examples per prompt (default all: 2-3)")
    g.add_argument(
        "--parse-retries", type=int, default=2, help="re-asks after an unreadable reply (default 2)"
    )
    g.add_argument(
        "--max-new-tokens", type=int, default=0, help="cap on every step's reply length (default: per step)"
    )
    g = p.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, help="only the first N passages")
    g.add_argument(
        "--in-flight", type=int, default=0, help="passages advanced together (default 2x batch/concurrency)"
    )
    g.add_argument(
        "--num-shards", type=int, default=None, help="output shards (default: the number of processes)"
    )
    g.add_argument(
        "--process-index", type=int, default=None, help="this host's index (default jax.process_index())"
    )
    g.add_argument(
        "--process-count", type=int, default=None, help="number of hosts (default jax.process_count())"
    )
    g.add_argument(
        "--max-consecutive-errors",
        type=int,
        default=32,
        help="stop after N passages in a row fail in the backend",
    )
    g.add_argument(
        "--trace", action="store_true", help="log every prompt end and reply to OUT/trace-PPPPP.jsonl"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")
    p.set_defaults(func=run)
    return p

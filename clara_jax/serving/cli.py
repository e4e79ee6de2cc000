"""`clara-jax serve`: load the models, then run the app under uvicorn until SIGINT/SIGTERM.

Shutdown is graceful: uvicorn stops accepting connections and lets in-flight requests finish
(up to --graceful-timeout seconds); requests still queued after that get 503, and the process
exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys


def _make_server(config, app):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, plus a ready line with the URL and a 503 for requests during shutdown."""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host = f"[{config.host}]" if ":" in config.host else config.host
                print(f"clara-jax serve: ready at http://{host}:{config.port}", flush=True)

        def handle_exit(self, sig, frame):
            app.state.shutting_down = True
            super().handle_exit(sig, frame)

    return Server(config)


def _serve_cmd(args: argparse.Namespace) -> int:
    import logging

    if args.model is None and args.clara_model is None:
        print("clara-jax serve: error: give --model, or --clara-model with --index, or both", file=sys.stderr)
        return 2
    if (args.clara_model is None) != (args.index is None):
        print("clara-jax serve: error: --clara-model and --index go together", file=sys.stderr)
        return 2
    for flag in ("port", "max_concurrency", "max_tokens", "batch_size", "max_request_bytes"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            print(f"clara-jax serve: error: --{flag.replace('_', '-')} must be positive", file=sys.stderr)
            return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import uvicorn

        from clara_jax.inference.chat import load_chat_model
        from clara_jax.serving.app import create_app
        from clara_jax.serving.clara_backend import ClaraBackend
    except ImportError as exc:
        print(
            f"clara-jax serve: error: {exc}; install the extra: pip install 'clara_jax[serve]'",
            file=sys.stderr,
        )
        return 2
    try:
        chat = clara = None
        if args.model is not None:
            print(f"clara-jax serve: loading chat model {args.model} ...", flush=True)
            chat = load_chat_model(args.model, dtype=args.dtype, batch_size=args.batch_size, seed=args.seed)
        if args.clara_model is not None:
            print(
                f"clara-jax serve: loading CLaRa model {args.clara_model} and index {args.index} ...",
                flush=True,
            )
            clara = ClaraBackend.load(args.clara_model, args.index, batch_size=args.batch_size)
        app = create_app(
            chat,
            clara,
            max_concurrency=args.max_concurrency,
            max_request_bytes=args.max_request_bytes,
            max_tokens=args.max_tokens,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"clara-jax serve: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    server = _make_server(config, app)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place (uvicorn restores them first) that re-raise is a no-op and the exit code is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        return 1  # e.g. the port was taken; uvicorn logged why
    print("clara-jax serve: stopped", flush=True)
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `clara-jax serve` on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "serve",
        help="HTTP server: OpenAI-compatible chat completions and a CLaRa answer endpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a base chat model as OpenAI-compatible /v1/chat/completions and /v1/models,\n"
        "and/or a trained CLaRa model over an exported index as POST /v1/clara/answer; GET /health.\n"
        "Concurrent requests are batched; SIGINT/SIGTERM shut down gracefully.\n\n"
        "  clara-jax serve --model smollm2 --port 8000\n"
        "  clara-jax serve --model smollm2 --clara-model runs/s3/model --index runs/index",
    )
    parser.add_argument(
        "--model",
        help="chat model: 'tiny' (random, for tests), 'smollm2' / 'smollm2_135m', a transformers directory "
        "or a .gguf file",
    )
    parser.add_argument("--clara-model", help="a CLaRa model directory (a run's WORKDIR/model)")
    parser.add_argument("--index", help="an index exported with that model (clara-jax export --out)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-concurrency", type=int, default=64, help="requests in flight before 429 (default 64)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="most new tokens a request may ask for (default 512)"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="requests per model batch (default 8)")
    parser.add_argument("--dtype", default="float32", help="chat model dtype policy (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'tiny' model's random weights")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on shutdown (default 30)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.set_defaults(func=_serve_cmd)
    return parser

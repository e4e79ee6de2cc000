"""`clara-jax serve`: load the models, then run the app (clara_jax.serving.app) under uvicorn until
SIGINT/SIGTERM.

Before anything is loaded, the command refuses (exit 2) to bind a non-loopback address without
a key (--api-key-env NAME: the key is read from that environment variable, never from the command
line, and never printed) unless --insecure-no-auth says so.

Shutdown is graceful: uvicorn stops accepting connections and lets in-flight requests finish
(up to --graceful-timeout seconds); requests still queued after that get 503, and the process
exits 0. A port that cannot be bound exits 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal

from clara_jax.cli.common import EXIT_FAILED, EXIT_OK, configure_logging, error

KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1); any other name is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: list[str] | None) -> list[str]:
    """Host header names to accept: the loopback names, the bound address, and --allowed-hosts."""
    from clara_jax.serving import LOOPBACK_HOSTS

    bound = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
    names = [*LOOPBACK_HOSTS, bound.lower()]
    for entry in extra or []:
        names += [name.strip().lower() for name in entry.split(",") if name.strip()]
    return list(dict.fromkeys(names))


def _error(message: str) -> int:
    return error("serve", message)


def _access(args: argparse.Namespace) -> tuple[str | None, list[str]] | int:
    """(the API key or None, the allowed Host names), or exit code 2 with a message."""
    key = None
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env, "").strip()
        if not key:
            return _error(f"--api-key-env: the environment variable {args.api_key_env!r} is not set or empty")
    if key is None and not is_loopback(args.host) and not args.insecure_no_auth:
        return _error(
            f"refusing to serve on {args.host!r}, which is not a loopback address, without "
            "authentication: put a key in an environment variable and pass --api-key-env NAME, "
            "or pass --insecure-no-auth to serve without one"
        )
    hosts = allowed_hosts(args.host, args.allowed_hosts)
    for name in hosts:
        if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            return _error(f"--allowed-hosts: {name!r}: a pattern must be '*' or look like '*.example.com'")
    return key, hosts


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


def run(args: argparse.Namespace) -> int:
    if args.model is None and args.clara_model is None:
        return _error("give --model, or --clara-model with --index, or both")
    if (args.clara_model is None) != (args.index is None):
        return _error("--clara-model and --index go together")
    for flag in ("port", "max_concurrency", "max_tokens", "batch_size", "max_request_bytes"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            return _error(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("max_prompt_chars", "max_connections"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return _error(f"--{flag.replace('_', '-')} must be positive")
    if not args.request_timeout > 0:
        return _error("--request-timeout must be a positive number of seconds")
    max_connections = args.max_connections or max(4 * args.max_concurrency, 32)
    if max_connections <= args.max_concurrency:
        return _error("--max-connections must be larger than --max-concurrency")
    access = _access(args)
    if isinstance(access, int):
        return access
    api_key, hosts = access

    configure_logging()
    try:
        import uvicorn

        from clara_jax.inference.chat import load_chat_model
        from clara_jax.serving.app import create_app
        from clara_jax.serving.clara_backend import ClaraBackend
    except ImportError as exc:
        return _error(f"{exc}; install the extra: pip install 'clara_jax[serve]'")
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
            api_key=api_key,
            allowed_hosts=hosts,
            request_timeout=args.request_timeout,
            max_prompt_chars=args.max_prompt_chars,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return _error(str(exc))
    auth = f"a bearer key from ${args.api_key_env}" if api_key else "none"
    if api_key is None and not is_loopback(args.host):
        auth += " (--insecure-no-auth: anyone who can reach this address can use the server)"
    print(f"clara-jax serve: authentication: {auth}; accepted Host names: {', '.join(hosts)}", flush=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
        # beyond this many open connections (or requests being handled) uvicorn answers 503 itself
        limit_concurrency=max_connections,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        server_header=False,
    )
    server = _make_server(config, app)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place (uvicorn restores them first) that re-raise is a no-op and the exit code is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        return EXIT_FAILED  # e.g. the port was taken; uvicorn logged why
    print("clara-jax serve: stopped", flush=True)
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    from clara_jax.serving import LOOPBACK_HOSTS

    parser = subparsers.add_parser(
        "serve",
        help="HTTP server: OpenAI-compatible chat completions and a CLaRa answer endpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a base chat model as OpenAI-compatible /v1/chat/completions and /v1/models,\n"
        "and/or a trained CLaRa model over an exported index as POST /v1/clara/answer; GET /health.\n"
        "Concurrent requests are batched; SIGINT/SIGTERM shut down gracefully.\n\n"
        "Access: with --api-key-env NAME every route but /health needs 'Authorization: Bearer <key>',\n"
        "the key being the value of the environment variable NAME (never give it on the command line).\n"
        "Without a key the server only binds a loopback address, unless --insecure-no-auth is given.\n"
        "Requests whose Host header is not an accepted name get 400 (against DNS rebinding), POSTs\n"
        "must be 'Content-Type: application/json' (415), and every request has a deadline (504).\n\n"
        "  clara-jax serve --model smollm2 --port 8000\n"
        "  clara-jax serve --model smollm2 --clara-model runs/s3/model --index runs/index\n"
        "  CLARA_KEY=$(cat key.txt) clara-jax serve --model smollm2 --host 0.0.0.0 \\\n"
        "      --api-key-env CLARA_KEY --allowed-hosts clara.example.org",
    )
    parser.add_argument(
        "--model",
        help="chat model: 'tiny' (random, for tests), 'smollm2' / 'smollm2_135m', a transformers directory "
        "or a .gguf file",
    )
    parser.add_argument("--clara-model", help="a CLaRa model directory (a run's WORKDIR/model)")
    parser.add_argument("--index", help="an index exported with that model (clara-jax export --out)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, local only; any other address needs --api-key-env "
        "or --insecure-no-auth)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <key>' on every route but /health; the key is read from "
        "the environment variable NAME",
    )
    access.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow binding a non-loopback --host without a key (anyone who reaches it can use it)",
    )
    access.add_argument(
        "--allowed-hosts",
        action="append",
        metavar="NAMES",
        help="further Host header names to accept, comma-separated, repeatable; '*.example.org' "
        f"matches subdomains, '*' any name (always accepted: {', '.join(LOOPBACK_HOSTS)} and --host)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        help="requests admitted at once (queued or running); more get 429 before their body is read "
        "(default 64)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        help="open connections (and requests being handled) before uvicorn answers 503 "
        "(default 4 x --max-concurrency, at least 32)",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request may take from admission to answer; beyond it 504 (default 300)",
    )
    limits.add_argument(
        "--max-tokens", type=int, default=512, help="most new tokens a request may ask for (default 512)"
    )
    limits.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    limits.add_argument(
        "--max-prompt-chars",
        type=int,
        help="most characters in a chat prompt or a CLaRa question, refused before tokenizing "
        "(default 8 per token of the model's context)",
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
    parser.set_defaults(func=run)
    return parser

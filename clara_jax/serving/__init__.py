"""`clara-jax serve`: an OpenAI-compatible chat server and a CLaRa answer endpoint (FastAPI + uvicorn)."""

# Host names a loopback server answers to; any other Host is a DNS-rebinding page or a misconfiguration.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

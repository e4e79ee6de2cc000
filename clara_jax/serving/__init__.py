"""`clara-jax serve`: an OpenAI-compatible chat server and a CLaRa answer endpoint (FastAPI + uvicorn)."""

"""SCP data synthesis: turn raw passages into stage-1 QA and paraphrase records with an LLM.

The paper (arXiv 2511.18659, section 2.1 and Appendix I) describes the pipeline but ships no code
for it; this package is our implementation: `prompts` (our own instructions and few-shot examples),
`parsing` (tolerant reading of what LLMs really return), `backends` (local ChatModel,
OpenAI-compatible endpoints, scripted replies), `pipeline` (the per-document state machine) and
`store` (resumable sharded output); the `clara-jax synthesize` command is
clara_jax/cli/synthesize.py.
"""

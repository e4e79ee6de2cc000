"""`clara.*`, ClaraConfig's method settings, parsed and checked in one place.

A run config's `clara` section (training/run_spec.py) and a saved model directory's clara.json
section (interop/model_dir.py) are both read with `ClaraSettings.from_section`, so a value that a
run would refuse is refused, naming the field, when a model directory holds it too.
"""

from __future__ import annotations

import dataclasses

from clara_jax.model.clara import RETRIEVAL_LOSSES, ClaraConfig
from clara_jax.model.field_checks import check_fields
from clara_jax.model.topk import MASK_MODES, SCORE_FUNCTIONS


@dataclasses.dataclass(frozen=True)
class ClaraSettings:
    """`clara.*`: ClaraConfig's method settings, checked before the tokenizer (which gives the
    <MEM*> ids) is loaded; `model_config` adds the ids."""

    doc_max_length: int = 256
    compression_rate: int = 32
    mse_weight: float = 0.1
    top_k: int = 5
    temperature: float = 0.02
    topk_mask_mode: str = "exact"
    retrieval_score: str = "cosine"
    retrieval_loss: str = "lm"
    infonce_weight: float = 1.0

    def __post_init__(self):
        rate, length = self.compression_rate, self.doc_max_length
        check_fields(
            (
                "clara.compression_rate",
                rate,
                1 <= rate <= min(256, length),
                "in [1, min(256, doc_max_length)]",
            ),
            ("clara.doc_max_length", length, length >= 1, ">= 1"),
            ("clara.mse_weight", self.mse_weight, self.mse_weight >= 0, ">= 0"),
            ("clara.top_k", self.top_k, self.top_k >= 1, ">= 1"),
            ("clara.temperature", self.temperature, self.temperature > 0, "> 0"),
            (
                "clara.topk_mask_mode",
                self.topk_mask_mode,
                self.topk_mask_mode in MASK_MODES,
                f"one of {MASK_MODES}",
            ),
            (
                "clara.retrieval_score",
                self.retrieval_score,
                self.retrieval_score in SCORE_FUNCTIONS,
                f"one of {SCORE_FUNCTIONS}",
            ),
            (
                "clara.retrieval_loss",
                self.retrieval_loss,
                self.retrieval_loss in RETRIEVAL_LOSSES,
                f"one of {RETRIEVAL_LOSSES}",
            ),
            ("clara.infonce_weight", self.infonce_weight, self.infonce_weight > 0, "> 0"),
        )

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compression_rate

    @classmethod
    def from_section(cls, section) -> ClaraSettings:
        """The settings of a `clara` section (a run config's ConfigDict, or a saved model directory's
        dict): its keys for these fields, checked; other keys (the layout's lengths) are ignored."""
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

    def model_config(self, mem_token_ids) -> ClaraConfig:
        return ClaraConfig(mem_token_ids=tuple(mem_token_ids), **dataclasses.asdict(self))

"""The three CLaRa stages, each described once: every other module reads its stage facts here.

| stage  | trains                     | <MEM*> rows | starts from | records   | loss                                |
|--------|----------------------------|-------------|-------------|-----------|-------------------------------------|
| stage1 | compressor + generator     | trained     | (the base)  | SCP QA/paraphrase | CE + λ·MSE, 1 doc per example |
| stage2 | compressor + generator     | held        | stage1      | instruct  | CE + λ·MSE over k docs, given order |
| stage3 | query reasoner + generator | frozen      | stage2      | retrieval | CE through the straight-through top-k |

Only stage 1 trains the <MEM*> rows, as in the official release (docs/official_code.md §1.2: its
stages 2 and 3 reload the model through PEFT, which leaves only LoRA weights trainable). Stage 2 *holds*
them: the rows ride unchanged in its train state and checkpoints, so stage 3 inherits stage 1's rows
from stage 2's checkpoint; `clara.stage2_trains_mem_rows=true` trains them there instead. Stage 3
keeps them out of its state altogether: an index of compressed documents built before stage 3 stays
exact, and the step may read cached candidate embeddings instead of re-compressing B×N documents.

This sits in the model layer because it names adapter roles; the data layer reads `retrieval` and
`record_kind`, the training layer everything else.
"""

from __future__ import annotations

import dataclasses

from clara_jax.model.clara import COMPRESSOR, GENERATOR, QUERY_REASONER


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    adapters: tuple[str, ...]  # the adapters this stage trains
    trains_mem_rows: bool  # by default (stage 2's `clara.stage2_trains_mem_rows` may switch it on)
    keeps_mem_rows: bool  # the rows are in the stage's train state and checkpoints (trained or held)
    starts_from: str | None  # the stage whose checkpoint `init_from` must name
    inherits: tuple[str, ...]  # adapters copied from that checkpoint (the <MEM*> rows always are)
    query_from_compressor: bool  # the query reasoner starts as a copy of the trained compressor
    retrieval: bool  # examples carry candidates: the step scores them and takes a top-k
    record_kind: str  # the JSONL record layout (data/records.py)
    config_module: str  # configs/<module>.py
    loss: str  # for logs and --help

    @property
    def fixed_docs(self) -> bool:
        """An example compresses a fixed number of given documents (`clara.docs_per_example`; stage 1's
        records always hold one) instead of ranking candidates and taking a top-k."""
        return not self.retrieval

    @property
    def successor(self) -> Stage | None:
        """The stage that starts from this one, or None for the last."""
        return next((s for s in STAGE_LIST if s.starts_from == self.name), None)


STAGE_LIST = (
    Stage(
        "stage1",
        adapters=(COMPRESSOR, GENERATOR),
        trains_mem_rows=True,
        keeps_mem_rows=True,
        starts_from=None,
        inherits=(),
        query_from_compressor=False,
        retrieval=False,
        record_kind="stage1",
        config_module="stage1_scp",
        loss="CE (QA / paraphrase) + λ·MSE, one document per example",
    ),
    Stage(
        "stage2",
        adapters=(COMPRESSOR, GENERATOR),
        trains_mem_rows=False,
        keeps_mem_rows=True,
        starts_from="stage1",
        inherits=(COMPRESSOR,),
        query_from_compressor=False,
        retrieval=False,
        record_kind="stage2",
        config_module="stage2_instruct",
        loss="CE + λ·MSE over k documents in their given order",
    ),
    Stage(
        "stage3",
        adapters=(QUERY_REASONER, GENERATOR),
        trains_mem_rows=False,
        keeps_mem_rows=False,
        starts_from="stage2",
        inherits=(COMPRESSOR, GENERATOR),
        query_from_compressor=True,
        retrieval=True,
        record_kind="stage3",
        config_module="stage3_e2e",
        loss="CE through the straight-through top-k over the candidate scores (clara.retrieval_loss: CE, InfoNCE or both)",
    ),
)
STAGES = {s.name: s for s in STAGE_LIST}
STAGE_NAMES = tuple(STAGES)


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(STAGE_NAMES)}") from None

"""A tiny, real, offline tokenizer for tests and smoke runs.

Tests cannot download Mistral's tokenizer, yet the data pipeline must be exercised on a real
tokenizer (BPE merges, added special tokens, a jinja chat template, left padding). This module
trains a byte-level BPE of at most a few hundred tokens on a small built-in English corpus (the
CLaRa prompt texts of docs/official_code.md §1.6 plus generic sentences) and gives it Mistral's conventions:
`<unk>`=0, `<s>`=1 (bos, prepended when `add_special_tokens=True`), `</s>`=2 (eos), no pad token,
and the Mistral-v0.2 chat template that folds a system message into the first `[INST]`.

The result is committed as package data in `clara_jax/assets/tiny_tokenizer/`
(`TINY_TOKENIZER_DIR`). Regenerate it with `build_tiny_tokenizer(TINY_TOKENIZER_DIR)`; the output
is deterministic, and a test checks that the asset still equals a fresh build.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from clara_jax.data.chat_templates import MISTRAL_CHAT_TEMPLATE
from clara_jax.data.prompts import PARAPHRASE_SYSTEM, PARAPHRASE_TEMPLATES, QA_SYSTEM, STANDARD_SYSTEM

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

# Leaves room for the CLaRa tokens (up to 125 <MEM*> + <AE>, <ENC>, <SEP>) under the 512-row
# vocabulary of the tiny test models.
DEFAULT_VOCAB_SIZE = 384

# The exact CLaRa prompt texts, so the tiny BPE learns merges for what the model will really read.
_SYSTEM_PROMPTS = (QA_SYSTEM, PARAPHRASE_SYSTEM, STANDARD_SYSTEM)
_PARAPHRASE_TEMPLATES = PARAPHRASE_TEMPLATES

_SENTENCES = (
    "The river flows through the old city and into the sea.",
    "Marie Curie was the first person to win two Nobel Prizes.",
    "The capital of France is Paris, a city known for its museums.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library opens at nine in the morning and closes at six.",
    "She wrote her first novel when she was twenty years old.",
    "The company was founded in 1998 by two students in California.",
    "Mount Everest is the highest mountain above sea level.",
    "The team won the national championship after a long season.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The museum holds paintings, statues and ancient coins.",
    "He moved to London to study law at the university.",
    "The bridge was built in the nineteenth century and is still in use.",
    "Many birds fly south for the winter to find food.",
    "The film was directed by a young director from Spain.",
    "The album sold more than one million copies in its first year.",
    "A small village sits at the foot of the green hills.",
    "The treaty was signed by both countries after the war ended.",
    "Students read the document and answer the questions below.",
    "The answer is short: it was the second king of the old kingdom.",
    "The document describes the history of the town and its people.",
    "Scientists found that the new drug reduces the risk of disease.",
    "The river is about three hundred kilometres long.",
    "Our model compresses each document into a few memory tokens.",
    "Retrieval and generation are trained together in one model.",
    "The question asks who wrote the book, and the answer is a name.",
    "They played music in the park every Sunday afternoon.",
    "The election was held in May, and the results came in June.",
    "The school has four hundred students and thirty teachers.",
    "It's a simple idea, but it works well in practice!",
)

_QA = (
    ("Who wrote the first novel?", "She did, at twenty."),
    ("What is the capital of France?", "Paris"),
    ("When was the company founded?", "In 1998."),
    ("What is the highest mountain?", "Mount Everest"),
    ("Where did he study law?", "In London."),
    ("How long is the river?", "About 300 km."),
    ("Who won two Nobel Prizes?", "Marie Curie"),
    ("When was the treaty signed?", "After the war ended."),
)


def tiny_corpus() -> list[str]:
    """A few hundred deterministic lines shaped like CLaRa's stage 1-3 prompts and answers."""
    lines = list(_SENTENCES)
    docs = [" ".join(p) for p in zip(_SENTENCES, _SENTENCES[1:] + _SENTENCES[:1])]
    for i, (tmpl, doc) in enumerate(zip(itertools.cycle(_PARAPHRASE_TEMPLATES), docs * 3)):
        system = _SYSTEM_PROMPTS[i % len(_SYSTEM_PROMPTS)]
        lines.append(f"[INST] {system}\n\n{tmpl.format(docs=doc)} [/INST]")
    for i, (q, a) in enumerate(_QA * 4):
        doc = docs[i % len(docs)]
        lines.append(f"[INST] {_SYSTEM_PROMPTS[2]}\n\nBackground:\n{doc}\n\nQuestion:{q} [/INST] {a}")
        lines.append(f"Question: {q}\nAnswer: {a}")
    lines.extend(_synthetic_lines())
    return lines


def _synthetic_lines() -> list[str]:
    """The demo corpus's passages, questions and answers, so its names and phrases get merges
    (about three times fewer tokens per passage than character-level pieces)."""
    from clara_jax.data.synthetic import SyntheticCorpusConfig, build_corpus

    # Without the dev split (added later): the bundled asset stays byte-identical. The dev people's
    # names get merges like the training names; the eval people's never do, with or without it.
    corpus = build_corpus(SyntheticCorpusConfig(dev_entity_fraction=0.0))
    lines = []
    for record in corpus.files["stage1_train"]:
        lines.append(record["docs"][0])
        if record["data_type"] == "qa":
            lines.extend(f"Question: {q}\nAnswer: {a}" for q, a in zip(record["question"], record["answers"]))
        else:
            lines.extend(record["answers"])
    return lines


def build_tiny_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train the tiny byte-level BPE and return it as a `PreTrainedTokenizerFast`.

    When `out_dir` is given, the tokenizer is also written there with `save_pretrained`
    (tokenizer.json, tokenizer_config.json, chat_template.jinja).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mistral / Llama
    if not len(specials) + 256 <= vocab_size <= 512:
        raise ValueError(f"vocab_size must be in [{len(specials) + 256}, 512], got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf

"""The CLaRa generator prompts, word for word as in the official code (docs/official_code.md §1.6).

The texts are frozen here because the generator was trained on them: a changed word changes the
rendered prompt, the label mask and the results. Each renderer returns the prompt alone (what
inference feeds the generator, and what fixes the label boundary) and the prompt plus the
assistant target (what training feeds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clara_jax.data.tokenizer import ClaraTokenizer, render_chat

QA_SYSTEM = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions "
    "to cover all key information of the document and answer them sequentially."
)

# "Your task is follow" (sic): the official wording, kept because the checkpoints were trained on it.
PARAPHRASE_SYSTEM = (
    "You are a helpful assistant. Your task is follow the instructions to paraphrase the background "
    "information."
)

PARAPHRASE_TEMPLATES = (
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
    "The essence of background: {docs} is captured again in the following statement:",
)

STANDARD_SYSTEM = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)


@dataclass(frozen=True)
class RenderedPrompt:
    """`prompt` ends where generation starts; `full` adds the target (None at inference)."""

    prompt: str
    full: str | None


def memory_block(tok: ClaraTokenizer, k: int) -> str:
    """The `{docs}` placeholder text: k slots of `<MEM0>…<MEM{n-1}><SEP>`, filled later by splicing."""
    if tok.n_mem < 1:
        raise ValueError("the tokenizer has no CLaRa memory tokens; load it with n_mem >= 1")
    if k < 1:
        raise ValueError(f"k (documents per prompt) must be >= 1, got {k}")
    return ("".join(f"<MEM{i}>" for i in range(tok.n_mem)) + "<SEP>") * k


def _render(tok: ClaraTokenizer, system: str, user: str, answer: str | None) -> RenderedPrompt:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = render_chat(tok, messages, add_generation_prompt=True)
    if answer is None:
        return RenderedPrompt(prompt, None)
    full = render_chat(
        tok, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False
    )
    return RenderedPrompt(prompt, full)


def qa_prompt(tok: ClaraTokenizer, questions: list[str], answers: list[str], *, k: int = 1) -> RenderedPrompt:
    """Stage-1 QA: the questions are only in the target, so the memory tokens must carry the facts."""
    if len(questions) != len(answers) or not questions:
        raise ValueError(
            f"qa_prompt needs as many answers as questions (>= 1); got {len(questions)} questions "
            f"and {len(answers)} answers"
        )
    target = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))
    return _render(tok, QA_SYSTEM, f"Background:\n{memory_block(tok, k)}", target)


def paraphrase_template_index(rng: np.random.Generator | int | None) -> int:
    """Uniform draw like the official `random.choice`, but from a seeded generator so runs repeat."""
    return int(np.random.default_rng(rng).integers(len(PARAPHRASE_TEMPLATES)))


def paraphrase_prompt(
    tok: ClaraTokenizer, paraphrase: str, rng: np.random.Generator | int, *, k: int = 1
) -> RenderedPrompt:
    """Stage-1 paraphrase. A Generator is advanced in place, so one generator gives a varied stream."""
    template = PARAPHRASE_TEMPLATES[paraphrase_template_index(rng)]
    return _render(tok, PARAPHRASE_SYSTEM, template.format(docs=memory_block(tok, k)), paraphrase)


def standard_prompt(tok: ClaraTokenizer, question: str, k: int, answer: str | None = None) -> RenderedPrompt:
    """Stages 2/3 and inference. No space after `Question:`: the official text has none."""
    user = f"Background:\n{memory_block(tok, k)}\n\nQuestion:{question}"
    return _render(tok, STANDARD_SYSTEM, user, answer)

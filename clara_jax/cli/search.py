"""`clara-jax search`: the top-k documents of an exported corpus for questions (clara_jax.inference.index)."""

from __future__ import annotations

import argparse
import json
import sys

from clara_jax.cli.common import EXIT_OK, error
from clara_jax.formats.jsonl import iter_json_lines

# clara_jax.inference.index.BACKENDS, spelled out so that building the parser imports no jax
# (tests/test_bad_input_cli.py checks that the two agree).
BACKENDS = ("jax", "faiss")
QUESTION_LINE = "{'question': TEXT} or a JSON string"


def read_questions(path: str) -> list[str]:
    """Questions from a JSONL file (read by clara_jax.formats.jsonl): one {'question': TEXT} or
    JSON string per line."""
    questions = []
    for line_no, obj in iter_json_lines(path, expected=QUESTION_LINE):
        q = obj.get("question") if isinstance(obj, dict) else obj
        if not isinstance(q, str) or not q.strip():
            got = json.dumps(obj, ensure_ascii=False)
            raise ValueError(f"{path}:{line_no}: expected {QUESTION_LINE}, got {got[:80]!r}")
        questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


SNIPPET_CHARS = 160


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _snippets(corpus: str | None, ids) -> dict[str, str]:
    """The hits' texts from the corpus file, or none (with one line on stderr saying why)."""
    from clara_jax.formats.corpus import texts_of

    if not corpus:
        return {}
    try:
        return texts_of(corpus, {doc_id for row in ids for doc_id in row})
    except (OSError, ValueError) as exc:
        print(f"search: no snippets ({exc}); pass --corpus FILE or --no-text", file=sys.stderr)
        return {}


def run(args: argparse.Namespace) -> int:
    import time

    from clara_jax.formats.model_dir import model_fingerprint
    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.inference.index import EmbeddingIndex, search_questions
    from clara_jax.interop.model_dir import load_clara_model

    try:
        questions = args.question or read_questions(args.questions)
        index = EmbeddingIndex.open(args.index)
        tok, model, clara = load_clara_model(args.model)
        inference = ClaraInference(tok, model, clara, batch_size=args.batch_size)
        t0 = time.perf_counter()
        ids, scores = search_questions(
            inference,
            questions,
            args.k,
            index=index,
            backend=args.backend,
            model_fingerprint=model_fingerprint(args.model),
        )
        seconds = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return error("search", exc)
    texts = {} if args.json or args.no_text else _snippets(args.corpus or index.manifest.get("corpus"), ids)
    for q, row_ids, row_scores in zip(questions, ids, scores):
        if args.json:
            print(
                json.dumps(
                    {"question": q, "ids": row_ids, "scores": [round(float(s), 6) for s in row_scores]}
                )
            )
        else:
            print(f"Q: {q}")
            for rank, (doc_id, score) in enumerate(zip(row_ids, row_scores), start=1):
                print(f"  {rank:>3}. {score:.4f}  {doc_id}")
                if doc_id in texts:
                    print(f"       {_snippet(texts[doc_id])}")
    if not args.json:
        print(f"{len(questions)} questions over {len(index)} documents in {seconds:.2f}s", file=sys.stderr)
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="retrieve the top-k documents of an exported corpus for questions (query reasoner + its score)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encode questions with the model's query reasoner and return the k documents of an\n"
        "index written by `clara-jax export` with the highest score (float32): cosine, or the raw dot product\n"
        "for a model trained with clara.retrieval_score=dot (saved in its clara.json). The model must\n"
        "be the one the index was exported with (same fingerprint, n_mem and hidden size).\n"
        "The jax backend streams over the shards (one shard in memory at a time); faiss (pip install\n"
        "faiss-cpu) builds an exact IndexFlatIP over all vectors in memory.\n\n"
        "  clara-jax search --model runs/s3/model --index runs/wiki-index --question 'Who founded X?' -k 5\n"
        "  clara-jax search --model runs/s3/model --index runs/wiki-index --questions q.jsonl --json",
    )
    p.add_argument("--model", required=True, help="the model directory the index was exported with")
    p.add_argument("--index", required=True, help="an export directory (clara-jax export --out)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--question", nargs="+", metavar="TEXT", help="one or more questions")
    source.add_argument(
        "--questions",
        metavar="FILE.jsonl",
        help="questions, one per line: {'question': TEXT} or a JSON string",
    )
    p.add_argument("-k", type=int, default=5, help="documents per question (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default="jax", help="jax (streaming, default) or faiss")
    p.add_argument("--batch-size", type=int, default=8, help="questions per query-encoder call (default 8)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per question: {question, ids, scores}"
    )
    p.add_argument(
        "--corpus",
        metavar="FILE",
        help="where to read the documents' text for the snippets shown under each hit (default: the "
        "corpus the index was exported from, as its manifest records it)",
    )
    p.add_argument("--no-text", action="store_true", help="show ids and scores only, no snippets")
    p.set_defaults(func=run)
    return p

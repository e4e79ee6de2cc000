"""Paraphrase-quality metrics (`clara-jax eval --task paraphrase`): ROUGE as the official evaluation
reads it, BERTScore against a local encoder (a tiny random BERT built here, offline), the rule-based
entity preservation, the evaluation driver and the CLI's refusals. No CLaRa model is built: the
driver runs on a stub with the official method's signature."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from clara_jax import cli
from clara_jax.inference.evaluate import evaluate_paraphrase, read_paraphrase_file
from clara_jax.inference.paraphrase_metrics import (
    ENTITY_KEY,
    BertScorer,
    approx_entities,
    bertscore_from_embeddings,
    entity_preservation,
    paraphrase_scores,
    rouge_scores,
)

WORDS = "the a cat dog sat on mat ran in park paris london big small red blue , . ##s".split()


# --------------------------------------------------------------------------------------- ROUGE


def test_rouge_matches_hand_counts():
    # rouge-score lower-cases and drops punctuation; ROUGE-L uses the longest common subsequence
    got = rouge_scores(["The cat sat.", "cat the sat", ""], ["the cat sat down", "the cat sat", "x"])
    assert got["rouge1"][0] == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # P 3/3, R 3/4
    assert got["rougeL"][0] == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert got["rouge1"][1] == pytest.approx(1.0)  # same words, other order
    assert got["rougeL"][1] == pytest.approx(2 / 3)  # LCS "cat sat" (or "the sat"): 2 of 3
    assert got["rouge1"][2] == got["rougeL"][2] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------- BERTScore


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT and its WordPiece tokenizer, saved as safetensors; no download."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("encoder")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    assert tok.unk_token_id not in tok("the cat sat")["input_ids"]  # the vocabulary is in use
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    return out


@functools.cache
def _load_direct(model_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return tok, AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)


def _direct_states(model_dir: Path, text: str, layer: int) -> tuple[list[int], np.ndarray]:
    """Token ids and layer states of one text, unbatched, straight from transformers."""
    import torch

    tok, model = _load_direct(model_dir)
    ids = tok(text.strip(), max_length=32, truncation=True)["input_ids"]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return ids, hidden[layer][0].numpy().astype(np.float64)


def _numpy_bertscore(pred, ref, pred_w, ref_w):
    """The BERTScore formula written out: greedy cosine matches, weighted means, harmonic mean."""
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in ref] for a in pred])
    p = sum(w * cos[i].max() for i, w in enumerate(pred_w)) / sum(pred_w)
    r = sum(w * cos[:, j].max() for j, w in enumerate(ref_w)) / sum(ref_w)
    return p, r, 2 * p * r / (p + r)


PAIRS = [
    ("the cat sat on the mat .", "the cat sat on the mat ."),
    ("a dog ran in the park", "the big red cat sat in paris"),
    ("small blue cats", "the small cat sat on a blue mat in london ."),
]


def test_bertscore_identical_texts_score_one_and_match_the_formula(encoder_dir):
    scorer = BertScorer(str(encoder_dir), layer=2, batch_size=2)  # batches pad: results must not move
    assert scorer.layer == 2 and BertScorer(str(encoder_dir)).layer == 3  # default: the last layer
    got = scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert got["precision"][0] == pytest.approx(1.0, abs=1e-6)
    assert got["recall"][0] == pytest.approx(1.0, abs=1e-6)
    assert got["f1"][0] == pytest.approx(1.0, abs=1e-6)
    for i, (pred, ref) in enumerate(PAIRS):
        p_ids, p_emb = _direct_states(encoder_dir, pred, 2)
        r_ids, r_emb = _direct_states(encoder_dir, ref, 2)
        special = {2, 3}  # [CLS], [SEP]: matched against, never averaged
        want = _numpy_bertscore(
            p_emb,
            r_emb,
            [0.0 if t in special else 1.0 for t in p_ids],
            [0.0 if t in special else 1.0 for t in r_ids],
        )
        assert (got["precision"][i], got["recall"][i], got["f1"][i]) == pytest.approx(want, abs=1e-5)


def test_bertscore_idf_weights_follow_the_references(encoder_dir):
    scorer = BertScorer(str(encoder_dir), layer=1, idf=True)
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    got = scorer.score(preds, refs)
    ref_ids = [_direct_states(encoder_dir, r, 1)[0] for r in refs]
    m = len(refs)

    def idf(t):
        if t in (2, 3):
            return 0.0
        return math.log((m + 1) / (sum(t in set(ids) for ids in ref_ids) + 1))

    for i, (pred, ref) in enumerate(PAIRS):
        p_ids, p_emb = _direct_states(encoder_dir, pred, 1)
        r_ids, r_emb = _direct_states(encoder_dir, ref, 1)
        want = _numpy_bertscore(p_emb, r_emb, [idf(t) for t in p_ids], [idf(t) for t in r_ids])
        assert got["f1"][i] == pytest.approx(want[2], abs=1e-5)


def test_bertscore_of_an_empty_side_is_zero():
    emb = np.eye(3)
    assert bertscore_from_embeddings(emb, emb, np.zeros(3), np.ones(3)) == (0.0, 0.0, 0.0)
    p, r, f = bertscore_from_embeddings(emb, emb, np.ones(3), np.ones(3))
    assert (p, r, f) == pytest.approx((1.0, 1.0, 1.0))


def test_bertscore_refuses_a_bad_directory_or_layer(tmp_path, encoder_dir):
    with pytest.raises(ValueError, match="not a directory"):
        BertScorer(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing \*\.safetensors weights"):
        BertScorer(str(tmp_path))
    with pytest.raises(ValueError, match=r"has layers 0\.\.3"):
        BertScorer(str(encoder_dir), layer=4)


# ------------------------------------------------------------------------- entity preservation


def test_approx_entities_on_hand_written_text():
    text = (
        "The Evangelical Church of the Deaf is in Toronto, Ontario. In 2012, Jake Phelps met Saari "
        'in San Francisco. Saari said the song "Big Blue" sold 1,000 copies in the 1990s, 3.5% of the U.S. market. '
        "Ludwig van Beethoven's music. Yesterday I went home."
    )
    assert approx_entities(text) == {
        "evangelical church of the deaf",  # leading "The" of a sentence dropped, connectors kept
        "toronto",
        "ontario",
        "2012",
        "jake phelps",
        "saari",  # mid-sentence; the sentence-initial "Saari" alone would not count
        "san francisco",
        "big blue",  # quoted, and capitalised
        "1,000",
        "1990s",
        "3.5%",
        "u.s",
        "ludwig van beethoven",  # possessive dropped
    }  # not "yesterday" (a lone sentence-initial word), not "i"
    assert approx_entities("nothing to see here, really.") == set()


def test_entity_preservation_is_the_official_ratio():
    ref = "Jake Phelps met Arto Saari in San Francisco in 2012."
    assert entity_preservation(ref, ref) == 1.0
    # reference entities: jake phelps, arto saari, san francisco, 2012
    assert entity_preservation("Jake Phelps met someone in 2012.", ref) == pytest.approx(2 / 4)
    assert entity_preservation("", ref) == 0.0
    assert entity_preservation("Anything at all.", "no names here") == 1.0  # none to keep


def test_paraphrase_scores_average_per_pair():
    refs = ["Jake Phelps lives in Paris.", "the cat sat on the mat"]
    scores = paraphrase_scores(["Jake Phelps lives in Paris.", "a dog"], refs)
    assert scores.per_pair["rouge1"] == pytest.approx([1.0, 0.0])
    assert scores.per_pair[ENTITY_KEY] == [1.0, 1.0]
    assert scores.means == pytest.approx({"rouge1": 0.5, "rougeL": 0.5, ENTITY_KEY: 1.0})
    with pytest.raises(ValueError, match="no predictions"):
        paraphrase_scores([], [])


# -------------------------------------------------------------------------------- the driver


class EchoClara:
    """The official method's signature; "paraphrases" each passage as given (or empties it)."""

    def __init__(self, echo: bool = True):
        self.echo, self.calls = echo, []

    def generate_from_paraphrase(self, questions, documents, max_new_tokens=128, *, rng=None):
        self.calls.append((list(questions), [list(d) for d in documents], max_new_tokens, rng))
        return [d[0] if self.echo else "" for d in documents]


def _scp(path: Path, docs: list[str]) -> Path:
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(
                json.dumps({"data_type": "qa", "question": [f"Q{i}?"], "answers": [f"A{i}"], "docs": [doc]})
            )
            f.write("\n")
    return path


def test_evaluate_paraphrase_compresses_each_passage_alone(tmp_path):
    docs = ["Jake Phelps lives in Paris.", "The cat sat in London in 2012.", "Page 3 of it."]
    path = _scp(tmp_path / "dev.jsonl", docs)
    assert read_paraphrase_file(str(path), limit=2) == docs[:2]
    clara = EchoClara()
    out = evaluate_paraphrase(clara, read_paraphrase_file(str(path)), max_new_tokens=7, seed=5)
    assert clara.calls == [([""] * 3, [[d] for d in docs], 7, 5)]
    assert out["paraphrases"] == docs
    assert out["scores"] == pytest.approx({"rouge1": 1.0, "rougeL": 1.0, ENTITY_KEY: 1.0, "n": 3})
    empty = evaluate_paraphrase(EchoClara(echo=False), docs)["scores"]
    assert empty["rouge1"] == 0.0 and empty[ENTITY_KEY] == 0.0  # every passage has an entity


# --------------------------------------------------------------------------------------- CLI


def _run(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_refuses_bad_records_with_file_and_line(tmp_path, capsys):
    path = _scp(tmp_path / "dev.jsonl", ["A passage.", "Another passage."])
    with open(path, "a") as f:
        f.write(
            json.dumps({"data_type": "qa", "question": ["Q?"], "answers": ["A"], "docs": "not a list"}) + "\n"
        )
    model = str(tmp_path / "no-such-model")  # never reached: the data is read first
    code, err = _run(["eval", "--task", "paraphrase", "--model", model, "--data", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{path}:3: field 'docs': expected a list of non-empty document strings" in err
    official = tmp_path / "official.jsonl"  # the official paraphrase file: {"doc": passage} per line
    official.write_text(json.dumps({"doc": "A passage."}) + "\n")
    code, err = _run(["eval", "--task", "paraphrase", "--model", model, "--data", str(official)], capsys)
    assert code == 2 and f"{official}:1: field 'docs'" in err


def test_cli_refuses_flags_of_the_other_task_and_a_bad_encoder(tmp_path, capsys):
    path = _scp(tmp_path / "dev.jsonl", ["A passage."])
    model = str(tmp_path / "no-such-model")
    base = ["eval", "--model", model, "--data", str(path)]
    code, err = _run([*base, "--task", "paraphrase", "-k", "3"], capsys)
    assert code == 2 and "-k belong(s) to --task qa" in err
    code, err = _run([*base, "--bertscore-model", str(tmp_path)], capsys)
    assert code == 2 and "--bertscore-model belong(s) to --task paraphrase" in err
    code, err = _run([*base, "--task", "paraphrase", "--bertscore-idf"], capsys)
    assert code == 2 and "need --bertscore-model" in err
    code, err = _run([*base, "--task", "paraphrase", "--bertscore-model", str(tmp_path / "enc")], capsys)
    assert code == 2 and "not a directory" in err and "no-such-model" not in err  # before the model


@pytest.mark.slow
def test_cli_paraphrase_end_to_end_on_a_tiny_model(tmp_path, capsys, encoder_dir):
    """A saved tiny CLaRa model (random weights) through the whole command: files, table, JSON."""
    from flax import nnx

    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.interop.model_dir import save_clara_model
    from clara_jax.model.clara import ClaraConfig
    from clara_jax.model.config import tiny_config
    from clara_jax.model.decoder import Decoder
    from clara_jax.model.factory import add_clara_parts
    from clara_jax.model.lora import LoRAConfig

    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    add_clara_parts(
        model,
        vocab_size=tok.vocab_size,
        mem_token_ids=tok.mem_token_ids,
        lora=LoRAConfig(rank=4, alpha=8),
        seed=0,
    )
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8, top_k=2)
    save_clara_model(model, tok, clara, str(tmp_path / "model"))
    data = _scp(
        tmp_path / "dev.jsonl", ["Mava lives in Vienna.", "Tavo keeps a goat.", "Sumi was born in 1962."]
    )
    scores, preds = tmp_path / "scores.json", tmp_path / "paraphrases.jsonl"
    argv = ["eval", "--task", "paraphrase", "--model", str(tmp_path / "model"), "--data", str(data)]
    argv += ["--limit", "2", "--max-new-tokens", "3", "--bertscore-model", str(encoder_dir)]
    argv += ["--json", str(scores), "--predictions", str(preds)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "entity_preservation_approx is a rule-based stand-in" in out and "layer 3" in out
    assert "passages scored: dev 2" in out
    result = json.loads(scores.read_text())["dev"]
    assert set(result) == {
        "rouge1",
        "rougeL",
        ENTITY_KEY,
        "bertscore_f1",
        "bertscore_precision",
        "bertscore_recall",
        "n",
    }
    assert result["n"] == 2 and all(0.0 <= v <= 1.0 for k, v in result.items() if k != "n")
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["doc"] for r in rows] == ["Mava lives in Vienna.", "Tavo keeps a goat."]
    assert {"paraphrase", "rouge1", "bertscore_f1", ENTITY_KEY} <= set(rows[0])

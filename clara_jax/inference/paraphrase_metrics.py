"""Paraphrase-quality metrics: how much of a passage the generator rebuilds from its memory tokens.

The official evaluate.py scores its `stage1_paraphrase` runs (`calculate_paraphrase_metrics`,
L234-280) by comparing each generated paraphrase with the ORIGINAL passage it was generated from
(the reference is the record's `doc`), one pair at a time, and averaging the per-pair scores:

- ROUGE-1 and ROUGE-L F-measure from HF `evaluate`'s "rouge" with its defaults, i.e. Google's
  `rouge-score` with its default tokenizer (lower case, non-alphanumerics as spaces) and no
  stemmer. For one pair, `evaluate`'s bootstrap aggregate is the pair's own F-measure, so
  `rouge_scores` below is the same number;
- BERTScore F1 from HF `evaluate`'s "bertscore" with `lang="en"`: `bert-score` with roberta-large,
  the hidden states of layer 17, no idf weighting, no baseline rescaling. `BertScorer` implements
  the formula itself against a LOCAL encoder directory (nothing is downloaded);
- entity preservation: the share of the reference's spaCy (`en_core_web_sm`) entities, lower-cased,
  that also appear among the prediction's (1.0 when the reference has none). No spaCy model installs
  offline, so `approx_entities` is a documented, rule-based stand-in and its score is always named
  `entity_preservation_approx`: it is NOT the official number.

The official run also splits its file at record 2000 into "seen" (the first 2000, training
passages) and "unseen" means; here each file is one mean, so pass seen and unseen passages as
separate files.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BertScorer",
    "approx_entities",
    "bertscore_from_embeddings",
    "entity_preservation",
    "paraphrase_scores",
    "rouge_scores",
]

# --------------------------------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rougeL")
_ROUGE_MISSING = (
    "ROUGE needs the `rouge-score` package: pip install 'clara_jax[eval]' (or bash scripts/bootstrap.sh)"
)


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # an install without the eval extra
        raise RuntimeError(_ROUGE_MISSING) from err
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-pair ROUGE-1 / ROUGE-L F-measures, as the official evaluation computes each pair's."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_scorer()
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge-score's order: (target, prediction)
        for name in ROUGE_TYPES:
            out[name].append(float(scores[name].fmeasure))
    return out


# ---------------------------------------------------------------------------------- BERTScore

# bert-score's choice for lang="en" (roberta-large, 24 layers) and the layer it reads there.
OFFICIAL_BERTSCORE_MODEL = "roberta-large"
OFFICIAL_BERTSCORE_LAYER = 17


def bertscore_from_embeddings(
    pred: np.ndarray,
    ref: np.ndarray,
    pred_weights: np.ndarray,
    ref_weights: np.ndarray,
) -> tuple[float, float, float]:
    """BERTScore (P, R, F1) of one pair from its token embeddings [n, D] / [m, D].

    Every token is matched to its most cosine-similar token on the other side (special tokens
    included as match targets); precision averages the prediction's best matches, recall the
    reference's, each weighted by its side's `weights` (1 per token, or idf; 0 for [CLS]/[SEP]).
    A side whose weights are all zero (nothing but special tokens) scores 0, as in bert-score."""
    pw, rw = np.asarray(pred_weights, np.float64), np.asarray(ref_weights, np.float64)
    if pw.sum() <= 0 or rw.sum() <= 0:
        return 0.0, 0.0, 0.0
    p = np.asarray(pred, np.float64)
    r = np.asarray(ref, np.float64)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
    sim = p @ r.T  # [n, m]
    precision = float((sim.max(axis=1) * pw).sum() / pw.sum())
    recall = float((sim.max(axis=0) * rw).sum() / rw.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, float(f1) if math.isfinite(f1) else 0.0


def default_layer(model_type: str, num_layers: int) -> int:
    """The layer bert-score reads for roberta-large (17 of 24, the official setting) when the local
    model looks like it; the last layer for any other encoder (pass `layer` to choose)."""
    if model_type == "roberta" and num_layers == 24:
        return OFFICIAL_BERTSCORE_LAYER
    return num_layers


class BertScorer:
    """BERTScore against a local Hugging Face encoder directory (config, tokenizer, safetensors).

    Loaded with `local_files_only=True`, `use_safetensors=True` and `trust_remote_code=False`: no
    download, no pickle, no code from the directory. `layer` counts from 1 (0 = the embeddings);
    None = `default_layer`. `idf` (off by default, as in the official run) weights tokens by
    log((M + 1) / (df + 1)) over the M references of each `score` call, as bert-score does."""

    def __init__(self, model_dir: str, *, layer: int | None = None, idf: bool = False, batch_size: int = 16):
        self.model_dir, self.idf, self.batch_size = str(model_dir), idf, max(1, batch_size)
        _check_encoder_dir(self.model_dir)
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self._torch = torch
        safe = dict(local_files_only=True, trust_remote_code=False)
        config = AutoConfig.from_pretrained(self.model_dir, **safe)
        tok_kw = {}
        if config.model_type in ("roberta", "gpt2", "bart", "longformer"):
            tok_kw["add_prefix_space"] = True  # bert-score encodes GPT-2-style BPE with a leading space
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, **safe, **tok_kw)
            self.model = AutoModel.from_pretrained(self.model_dir, use_safetensors=True, **safe)
        except (OSError, ValueError) as err:
            raise ValueError(f"--bertscore-model {self.model_dir}: cannot load the encoder: {err}") from err
        self.model.eval()
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        self.layer = default_layer(config.model_type, n_layers) if layer is None else int(layer)
        if not 0 <= self.layer <= n_layers:
            raise ValueError(
                f"--bertscore-layer {self.layer}: the encoder in {self.model_dir} has layers 0..{n_layers}"
            )
        limits = [
            int(self.tokenizer.model_max_length or 0),
            int(getattr(config, "max_position_embeddings", 0)),
        ]
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):
            limits[1] -= 2  # their position ids start after the padding index
        self.max_length = min(x for x in limits if x > 0) if any(x > 0 for x in limits) else 512
        self.special_ids = {
            i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if i is not None
        }

    def encode_ids(self, text: str) -> list[int]:
        """The token ids bert-score reads for `text`: stripped, special tokens added, truncated."""
        return self.tokenizer(
            text.strip(), add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"]

    def embed(self, texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
        """(token ids, hidden states of `layer` [n, D]) of every text, in batches padded per batch."""
        torch = self._torch
        encoded = [self.encode_ids(t) for t in texts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[tuple[list[int], np.ndarray]] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            with torch.inference_mode():
                hidden = self.model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True
                ).hidden_states
            states = hidden[self.layer].float().numpy()
            out.extend((row, states[i, : len(row)]) for i, row in enumerate(chunk))
        return out

    def _weights(self, ids: list[int], idf: dict[int, float] | None, default: float) -> np.ndarray:
        w = np.array([default if idf is None else idf.get(i, default) for i in ids], np.float64)
        w[[i in self.special_ids for i in ids]] = 0.0
        return w

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """Per-pair BERTScore precision / recall / F1 of each prediction against its reference."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        preds, refs = self.embed(predictions), self.embed(references)
        idf, default = None, 1.0
        if self.idf:
            df = Counter(i for ids, _ in refs for i in set(ids))
            m = len(refs)
            idf = {i: math.log((m + 1) / (c + 1)) for i, c in df.items()}
            default = math.log(m + 1)  # a token no reference holds
        out: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
        for (p_ids, p_emb), (r_ids, r_emb) in zip(preds, refs):
            p, r, f = bertscore_from_embeddings(
                p_emb, r_emb, self._weights(p_ids, idf, default), self._weights(r_ids, idf, default)
            )
            out["precision"].append(p)
            out["recall"].append(r)
            out["f1"].append(f)
        return out


def _check_encoder_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"--bertscore-model {path}: not a directory (expected a local Hugging Face encoder)")
    missing = [name for name in ("config.json",) if not os.path.isfile(os.path.join(path, name))]
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        missing.append("*.safetensors weights")
    if missing:
        raise ValueError(
            f"--bertscore-model {path}: expected a Hugging Face encoder directory (config.json, "
            f"tokenizer files, safetensors weights); missing {', '.join(missing)}"
        )


# ------------------------------------------------------------------ entity preservation (approx)

# Lower-case words allowed inside a capitalised name ("Bank of America", "Ludwig van Beethoven").
_CONNECTORS = frozenset("of the de la le du del della der den van von da di y al el bin".split())
# Capitalised words that start sentences without being names; dropped from the front of a span
# that begins a sentence ("The Evangelical Church" -> "evangelical church").
_FUNCTION_WORDS = frozenset(
    """a an the this that these those it its he she they his her their him them we our you your i
    in on at by for from with to of as after before during when while since until if although though
    but and or so yet however also there here then thus meanwhile moreover according despite
    following under over between among about into through upon within without one some many most
    each every both all no not what which who whom whose where why how""".split()
)
_WORD = re.compile(r"(?:[A-Z]\.){2,}|[^\W\d_][\w'’\-]*")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/]\d+)*(?:st|nd|rd|th|s)?%?")
_QUOTED = re.compile(r"\"([^\"\n]{1,100})\"|“([^”\n]{1,100})”")
_SENTENCE_END = re.compile(r"(?<=[.!?])['\"’”)\]]*\s+|\n+")  # the end mark stays ("U.S.")
_EDGE_PUNCT = "\"'“”‘’.,;:!?()[]{}"
MAX_QUOTED_WORDS = 6


def _clean(span: str) -> str:
    """Lower case, single spaces, no punctuation at the edges, no possessive "'s"."""
    text = " ".join(span.strip().strip(_EDGE_PUNCT).lower().split())
    return re.sub(r"['’]s$", "", text).strip(_EDGE_PUNCT)


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _capitalised_spans(sentence: str) -> list[str]:
    """Runs of capitalised words in one sentence (see `approx_entities` for the rules)."""
    words = list(_WORD.finditer(sentence))

    def joined(m: int) -> bool:  # only whitespace between words[m - 1] and words[m]
        return not sentence[words[m - 1].end() : words[m].start()].strip()

    def capitalised(m: int) -> bool:  # the pronoun "I" is no name
        return words[m].group()[0].isupper() and words[m].group() != "I"

    spans, i = [], 0
    while i < len(words):
        if not capitalised(i):
            i += 1
            continue
        last = i  # the run's last capitalised word
        while True:
            m = last + 1
            while m < len(words) and m - last <= 2 and words[m].group() in _CONNECTORS and joined(m):
                m += 1
            if m < len(words) and m - last <= 3 and capitalised(m) and joined(m):
                last = m
            else:
                break
        run = words[i : last + 1]
        if i == 0:  # the run opens the sentence
            if run[0].group().lower() in _FUNCTION_WORDS:
                run = run[1:]
                while run and run[0].group() in _CONNECTORS:
                    run = run[1:]
            elif len(run) == 1:
                run = []  # a lone capitalised word opening a sentence: most often not a name
        if run:
            text = sentence[run[0].start() : run[-1].end()]
            if _clean(text) not in _FUNCTION_WORDS:
                spans.append(text)
        i = last + 1
    return spans


def approx_entities(text: str) -> set[str]:
    """A rule-based stand-in for spaCy NER (lower-cased, as the official comparison uses them):

    - names: maximal runs of capitalised words, joined by at most two lower-case connectors
      ("of", "the", "de", "van", ...), with no punctuation between them; a run that opens a sentence
      loses a leading function word ("The", "In", "He", ...), and a single capitalised word that
      opens a sentence is not counted (it is usually an ordinary word);
    - numbers: digit groups with their separators and suffixes ("2012", "1,000", "3.5", "1990s",
      "21st", "40%"), which cover spaCy's DATE years and CARDINAL digits;
    - quoted strings of 1-6 words (titles, names of works).

    Not covered: number words ("two"), ordinals in words, dates as one span ("March 3, 2012" gives
    "march", "3", "2012"), lower-case entities, and names spaCy would merge across punctuation."""
    found: set[str] = set()
    for sentence in _sentences(text):
        found.update(_clean(s) for s in _capitalised_spans(sentence))
    found.update(_clean(m.group()) for m in _NUMBER.finditer(text))
    for m in _QUOTED.finditer(text):
        quoted = _clean(m.group(1) or m.group(2) or "")
        if quoted and len(quoted.split()) <= MAX_QUOTED_WORDS:
            found.add(quoted)
    found.discard("")
    return found


def entity_preservation(prediction: str, reference: str, extract=approx_entities) -> float:
    """The official rule on the entities `extract` finds: |ref ∩ pred| / |ref|, 1.0 if ref has none."""
    ref = extract(reference)
    if not ref:
        return 1.0
    return len(ref & extract(prediction)) / len(ref)


# ------------------------------------------------------------------------------------ together

ENTITY_KEY = "entity_preservation_approx"


@dataclass
class ParaphraseScores:
    """Per-pair scores (lists aligned with the inputs) and their means."""

    per_pair: dict[str, list[float]]

    @property
    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) if v else 0.0 for k, v in self.per_pair.items()}


def paraphrase_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    bertscore: BertScorer | None = None,
) -> ParaphraseScores:
    """ROUGE-1, ROUGE-L, the approximate entity preservation and (with a `bertscore` scorer)
    BERTScore P/R/F1 of every prediction against its reference; `.means` averages them as the
    official evaluation does (a plain mean over pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    per_pair = dict(rouge_scores(predictions, references))
    per_pair[ENTITY_KEY] = [entity_preservation(p, r) for p, r in zip(predictions, references)]
    if bertscore is not None:
        bs = bertscore.score(predictions, references)
        per_pair["bertscore_f1"] = bs["f1"]
        per_pair["bertscore_precision"] = bs["precision"]
        per_pair["bertscore_recall"] = bs["recall"]
    return ParaphraseScores(per_pair)

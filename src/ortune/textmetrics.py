"""Scores for free-text answers (data.task=generation), per row and over a set of rows.

Per row (so a bootstrap over rows can put an interval on every mean, and the report can list the worst
rows first): normalized exact match, token F1 (SQuAD's definitions), chrF (sacrebleu's sentence chrF),
ROUGE-L F (Google's rouge-score, the package the ROUGE paper's metric is usually computed with), and for
references that are JSON objects: whether the generation parses as a JSON object, and field-level F1 over
its (key, value) pairs. Over the set: the mean of each, and corpus BLEU (sacrebleu; BLEU is defined on a
corpus, its sentence form is unreliable). Every score is in [0, 1]; the headline is exact match.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections import Counter

# the scores every row gets, in eval.json's order; the JSON ones only where the reference is a JSON object
ROW_SCORES = ("exact_match", "token_f1", "chrf", "rouge_l")
JSON_SCORES = ("json_valid", "json_field_f1")
HEADLINE = "exact_match"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean(text: str) -> str:
    """A generation as scored and compared: surrounding spaces dropped, and U+FFFD, which onnxruntime-genai
    decodes an incomplete UTF-8 character at the end of a generation to (transformers to nothing): the same
    token ids must read as the same text whichever runtime decoded them."""
    return text.replace("\ufffd", "").strip()


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, punctuation and articles (a, an, the) dropped, spaces squeezed."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized words the two share (counted with multiplicity); 1.0 when both are empty."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def chrf(prediction: str, reference: str) -> float:
    """sacrebleu's sentence chrF (character 6-grams, beta 2), scaled to [0, 1]."""
    return _chrf().sentence_score(prediction, [reference]).score / 100


@functools.cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), rouge-score's default tokenizer."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenizer, exponential smoothing), scaled to [0, 1]."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return 0.0
    return BLEU().corpus_score(list(predictions), [list(references)]).score / 100


def json_object(text: str) -> dict | None:
    """The JSON object a text is (surrounding spaces allowed), or None."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pairs(obj: dict) -> Counter:
    """Field-level items: (key, value as canonical JSON), nested objects flattened to dotted keys."""
    items: Counter = Counter()
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            for (inner, text), count in _pairs(value).items():
                items[(f"{key}.{inner}", text)] += count
        else:
            items[(str(key), json.dumps(value, sort_keys=True, ensure_ascii=False))] += 1
    return items


def json_field_f1(prediction: str, reference: str) -> float:
    """F1 over (field, value) pairs of two JSON objects: a field counts when its value is exactly the
    reference's (null included: a field the text does not hold must be predicted null). 0.0 if the
    prediction is not a JSON object; 1.0 when both are empty objects."""
    expected, predicted = json_object(reference), json_object(prediction)
    if expected is None:
        raise ValueError("json_field_f1: the reference is not a JSON object")
    if predicted is None:
        return 0.0
    want, got = _pairs(expected), _pairs(predicted)
    if not want and not got:
        return 1.0
    shared = sum((want & got).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / sum(got.values()), shared / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every per-row score of one generation against its reference (JSON ones for a JSON reference)."""
    prediction = clean(prediction)
    scores = {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "chrf": chrf(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }
    if json_object(reference) is not None:
        scores["json_valid"] = float(json_object(prediction) is not None)
        scores["json_field_f1"] = json_field_f1(prediction, reference)
    return scores


def scores(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(the mean of each per-row score plus corpus BLEU and n, the per-row scores)."""
    if len(predictions) != len(references):
        raise ValueError(f"cannot score {len(predictions)} generations against {len(references)} references")
    rows = [row_scores(p, r) for p, r in zip(predictions, references)]
    summary: dict[str, float] = {}
    for name in (*ROW_SCORES, *JSON_SCORES):
        values = [row[name] for row in rows if name in row]
        if values:
            summary[name] = sum(values) / len(values)
    summary["bleu"] = corpus_bleu([clean(p) for p in predictions], references)
    summary["n"] = len(rows)
    return summary, rows


def identical_share(first: list[str], second: list[str]) -> float:
    """Share of rows whose two generations are the same text (as clean() reads them)."""
    if len(first) != len(second):
        raise ValueError(f"cannot compare {len(first)} generations with {len(second)}")
    return sum(clean(a) == clean(b) for a, b in zip(first, second)) / len(first) if first else 0.0


def first_divergence(first: list[int], second: list[int]) -> int | None:
    """The first token position where two generations differ (None if identical)."""
    for position, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return position
    return None if len(first) == len(second) else min(len(first), len(second))

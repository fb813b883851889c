"""Turning generations into labels, and classification scores (documented in docs/evaluation.md)."""

from __future__ import annotations

import re
from collections import Counter

# The confusion matrix's last column: generations that name no label.
UNPARSED = "(unparsed)"


def parse_label(generation: str, labels: list[str]) -> str | None:
    """The label a generation names, or None.

    Rule: take the first non-empty line, strip whitespace and trailing punctuation, lowercase it;
    an exact match with a label wins, otherwise the label that the line starts with (longest first).
    """
    line = next((part for part in generation.splitlines() if part.strip()), "")
    word = line.strip().strip(".!?,;:'\"").strip().lower()
    lowered = {label.lower(): label for label in labels}
    if word in lowered:
        return lowered[word]
    for candidate in sorted(lowered, key=len, reverse=True):
        if word.startswith(candidate):
            return lowered[candidate]
    return None


def lenient_label(generation: str, labels: list[str]) -> str | None:
    """The label a free answer names, for a model never taught the answer format (the prompted baseline):
    parse_label's answer if the answer is a label, else the one label named anywhere in it as a whole word,
    case-insensitively ("The tone of the text is fear." -> fear); None when it names none, or several."""
    strict = parse_label(generation, labels)
    if strict is not None:
        return strict
    text = generation.lower()
    named = {label for label in labels if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text)}
    return named.pop() if len(named) == 1 else None


def majority_label(train_labels: list[str]) -> str:
    """The most frequent training label; ties go to the alphabetically first, so reruns agree."""
    counts = Counter(train_labels)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(train_labels: list[str], eval_labels: list[str]) -> float:
    """Accuracy of always answering the most frequent training label on the eval labels."""
    if not eval_labels or not train_labels:
        return 0.0
    majority = majority_label(train_labels)
    return sum(label == majority for label in eval_labels) / len(eval_labels)


def per_class_scores(truth: list[str], predicted: list[str | None], labels: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each label (0.0 where undefined, as scikit-learn's zero_division=0)."""
    scores = {}
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return scores


def classification_scores(truth: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """Accuracy and macro-F1 over `labels`; an unparsed prediction (None) counts as wrong."""
    total = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted))
    f1s = [s["f1"] for s in per_class_scores(truth, predicted, labels).values()]
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "unparsed": sum(p is None for p in predicted),
        "n": total,
    }


def confusion_matrix(truth: list[str], predicted: list[str | None], labels: list[str]) -> list[list[int]]:
    """counts[i][j]: rows whose true label is labels[i] and prediction labels[j]; the extra last
    column counts unparsed generations, so every row sums to that label's support."""
    column = {label: j for j, label in enumerate(labels)}
    counts = [[0] * (len(labels) + 1) for _ in labels]
    for t, p in zip(truth, predicted):
        counts[column[t]][column[p] if p is not None else len(labels)] += 1
    return counts


def agreement(first: list[str | None], second: list[str | None]) -> float:
    """Share of rows on which two models give the same parsed label (both unparsed counts as the same)."""
    if len(first) != len(second):
        raise ValueError(f"cannot compare {len(first)} predictions with {len(second)}")
    return sum(a == b for a, b in zip(first, second)) / len(first) if first else 0.0

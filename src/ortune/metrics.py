"""Turning generations into labels, and classification scores (documented in the README)."""

from __future__ import annotations

from collections import Counter


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


def majority_baseline(train_labels: list[str], eval_labels: list[str]) -> float:
    """Accuracy of always answering the most frequent training label on the eval labels."""
    if not eval_labels:
        return 0.0
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(label == majority for label in eval_labels) / len(eval_labels)


def classification_scores(truth: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """Accuracy and macro-F1 over `labels`; an unparsed prediction (None) counts as wrong."""
    total = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted))
    f1s = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "unparsed": sum(p is None for p in predicted),
        "n": total,
    }

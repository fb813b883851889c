"""The documented rule that turns a generation into a label, and the scores built on it."""

from __future__ import annotations

import pytest

from ortune.metrics import classification_scores, majority_baseline, parse_label

LABELS = ["fear", "joy", "sadness", "surprise"]


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("joy", "joy"),
        ("  Joy.\nmore text", "joy"),
        ("\n\nsadness", "sadness"),
        ("surprised", "surprise"),
        ("happy", None),
        ("", None),
        ("fear joy", "fear"),
    ],
)
def test_parse_label(generation, expected):
    assert parse_label(generation, LABELS) == expected


def test_scores_on_a_known_confusion():
    truth = ["joy", "joy", "fear", "fear"]
    predicted = ["joy", "fear", "fear", None]
    scores = classification_scores(truth, predicted, ["fear", "joy"])
    assert scores["accuracy"] == 0.5
    assert scores["unparsed"] == 1
    # fear: p=1/2 r=1/2 f1=0.5; joy: p=1 r=1/2 f1=2/3
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_majority_baseline_uses_the_training_majority():
    assert majority_baseline(["joy", "joy", "fear"], ["joy", "fear", "fear", "fear"]) == 0.25

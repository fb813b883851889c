"""95 % bootstrap intervals (ortune.intervals) and the log-likelihood baselines' scoring (ortune.baselines)."""

from __future__ import annotations

import numpy as np
import pytest

from ortune import baselines, intervals
from ortune.metrics import classification_scores


def test_the_interval_of_a_mean_matches_the_normal_approximation_and_is_seeded():
    correct = [1.0] * 137 + [0.0] * 7  # 0.951 on 144 rows
    draws = intervals.resample_rows(len(correct), 2000, seed=0)
    bounds = intervals.mean_interval(correct, draws)
    # the textbook interval: 1.96 * sqrt(p(1-p)/n) = 0.035
    assert intervals.half_width(bounds) == pytest.approx(1.96 * (0.951 * 0.049 / 144) ** 0.5, abs=0.004)
    assert bounds["low"] < 0.951 < bounds["high"] <= 1.0
    assert intervals.mean_interval(correct, intervals.resample_rows(144, 2000, seed=0)) == bounds
    assert not np.array_equal(intervals.resample_rows(144, 2000, seed=1), draws)
    assert intervals.shown(0.951, bounds, 144) == f"0.951 ± {intervals.half_width(bounds):.3f} (n=144)"


def test_a_paired_difference_is_narrower_than_either_interval():
    rng = np.random.default_rng(0)
    first = rng.random(200) < 0.8
    second = first.copy()
    second[:10] = ~second[:10]  # the two models differ on 10 rows only
    draws = intervals.resample_rows(200, 1000, seed=0)
    single = intervals.half_width(intervals.mean_interval(first, draws))
    paired = intervals.half_width(intervals.difference_interval(first, second, draws))
    assert paired < single / 2


def test_the_macro_f1_interval_holds_the_macro_f1_of_the_rows():
    labels = ["fear", "joy", "sadness"]
    truth = ["joy", "fear", "sadness"] * 20
    predicted = ["joy", "joy", None] * 10 + ["joy", "fear", "sadness"] * 10
    draws = intervals.resample_rows(len(truth), 500, seed=0)
    bounds = intervals.macro_f1_interval(truth, predicted, labels, draws)
    assert bounds["low"] < classification_scores(truth, predicted, labels)["macro_f1"] < bounds["high"]
    # on the identity draw, the vectorized F1 is ortune.metrics' own
    identity = np.arange(len(truth))[None, :].repeat(3, axis=0)
    same = intervals.macro_f1_interval(truth, predicted, labels, identity)
    assert same["low"] == pytest.approx(classification_scores(truth, predicted, labels)["macro_f1"])


def test_a_perfect_or_hopeless_model_has_a_zero_width_interval():
    draws = intervals.resample_rows(50, 200, seed=0)
    assert intervals.mean_interval([1.0] * 50, draws) == {"low": 1.0, "high": 1.0}
    assert intervals.mean_interval([0.0] * 50, draws) == {"low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        intervals.mean_interval([1.0] * 49, draws)


# ---- log-likelihood multiple choice -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_texts):
    from export_helpers import TINY
    from ortune import modeling

    folder = tmp_path_factory.mktemp("tiny")
    modeling.build_tiny_phi3(TINY, tiny_texts, seed=3, out_dir=folder)
    return modeling.load_causal_lm(folder).eval(), modeling.load_tokenizer(folder)


def test_label_log_likelihoods_equal_one_unpadded_forward_of_each_whole_sequence(tiny):
    model, tokenizer = tiny
    shots = "### Text: what a lovely day\n### The tone is:\njoy\n\n"
    prompts = [f"{shots}### Text: {text}\n### The tone is:\n" for text in ("I am scared", "oh no", "wow, you came!")]
    labels = ["fear", "joy", "sadness", "surprise", "no idea at all"]  # one label of several tokens at least
    assert max(len(baselines.continuation_ids(tokenizer, prompts[0], label)) for label in labels) > 1
    scores = baselines.label_log_likelihoods(model, tokenizer, prompts, labels, batch_size=2)
    for prompt, row in zip(prompts, scores):
        alone = [
            baselines._alone(model, tokenizer, prompt, baselines.continuation_ids(tokenizer, prompt, label))
            for label in labels
        ]
        assert row == pytest.approx(alone, abs=1e-4)
    assert baselines.best_labels(scores, labels) == [labels[int(np.argmax(row))] for row in scores]


def test_the_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert baselines._shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert baselines._shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert baselines._shared_prefix([[7], [8, 9]]) == 0

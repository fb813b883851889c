"""Free-text scores (ortune.textmetrics) on tiny in-memory data, each against a value worked out by hand."""

from __future__ import annotations

import pytest

from ortune import textmetrics as tm


def test_normalized_exact_match_ignores_case_punctuation_articles_and_spaces():
    assert tm.exact_match("The  Eiffel tower!", "eiffel Tower") == 1.0
    assert tm.exact_match("Eiffel towers", "Eiffel tower") == 0.0
    assert tm.normalize("A cat, an Owl and THE dog.") == "cat owl and dog"


def test_token_f1_counts_shared_words_with_multiplicity():
    # prediction: paris paris france (3), reference: paris france (2); shared 2 -> p 2/3, r 1 -> f1 0.8
    assert tm.token_f1("Paris Paris France", "Paris, France") == pytest.approx(0.8)
    assert tm.token_f1("nothing shared", "entirely other") == 0.0
    assert tm.token_f1("", "") == 1.0 and tm.token_f1("", "x") == 0.0


def test_chrf_and_rouge_l_are_one_for_identical_text_and_lower_otherwise():
    assert tm.chrf("the same words", "the same words") == pytest.approx(1.0)
    assert 0 < tm.chrf("the same word", "the same words") < 1
    assert tm.rouge_l("a b c d", "a b c d") == pytest.approx(1.0)
    # LCS of "a x c d" and "a b c d" is "a c d": p = r = 3/4
    assert tm.rouge_l("a x c d", "a b c d") == pytest.approx(0.75)


def test_corpus_bleu_is_one_for_exact_copies_and_zero_with_no_overlap():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over"]
    assert tm.corpus_bleu(refs, refs) == pytest.approx(1.0)
    assert tm.corpus_bleu(["zz yy", "qq ww"], refs) == pytest.approx(0.0, abs=1e-6)


def test_json_field_f1_scores_fields_and_nulls_and_refuses_unparsable_output():
    ref = '{"name": "Ann", "city": "Oslo", "amount": 12, "date": null}'
    assert tm.json_field_f1('{"city":"Oslo","name":"Ann","amount":12,"date":null}', ref) == 1.0  # order is free
    # two of four fields right, four predicted: p = r = 0.5
    assert tm.json_field_f1('{"name": "Ann", "city": "Bergen", "amount": 12.5, "date": null}', ref) == 0.5
    assert tm.json_field_f1('{"name": "Ann"', ref) == 0.0  # not JSON
    assert tm.json_field_f1('["Ann"]', ref) == 0.0  # JSON, not an object
    assert tm.json_field_f1('{"a": {"b": 1}}', '{"a": {"b": 1, "c": 2}}') == pytest.approx(2 / 3)  # nested: a.b, a.c
    with pytest.raises(ValueError):
        tm.json_field_f1("{}", "not json")


def test_row_scores_add_json_scores_only_for_json_references():
    assert set(tm.row_scores("x", "y")) == set(tm.ROW_SCORES)
    scores = tm.row_scores(' {"a": 1} ', '{"a": 1}')
    assert scores["json_valid"] == 1.0 and scores["json_field_f1"] == 1.0 and scores["exact_match"] == 1.0


def test_scores_average_per_row_and_keep_each_row():
    summary, rows = tm.scores(["Paris", "Rome", '{"a":1}'], ["paris", "Milan", '{"a":2}'])
    assert summary["exact_match"] == pytest.approx(1 / 3) and summary["n"] == 3
    assert summary["json_valid"] == 1.0 and summary["json_field_f1"] == 0.0  # over the one JSON row only
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        tm.scores(["a"], ["a", "b"])


def test_identical_share_and_first_divergence():
    assert tm.identical_share(["a ", "b", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert tm.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert tm.first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped earlier
    assert tm.first_divergence([1, 2], [1, 2]) is None


def test_an_incomplete_character_at_the_end_reads_the_same_in_both_runtimes():
    # onnxruntime-genai decodes a generation cut mid-character to U+FFFD, transformers to nothing
    assert tm.identical_share(["caf\ufffd", " x "], ["caf", "x"]) == 1.0
    assert tm.row_scores("Paris\ufffd", "Paris")["exact_match"] == 1.0

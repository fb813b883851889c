"""Eval's scores, baselines and the summary that becomes metrics/eval.json, on tiny in-memory data."""

from __future__ import annotations

import json
import statistics

import pytest

from ortune import baselines, evaluation
from ortune.errors import OrtuneError
from ortune.metrics import agreement, confusion_matrix, majority_baseline, majority_label, per_class_scores
from ortune.records import read_records

LABELS = ["fear", "joy", "sadness"]


def test_per_class_scores_on_a_known_confusion():
    truth = ["joy", "joy", "joy", "fear", "fear", "sadness"]
    predicted = ["joy", "joy", "fear", "fear", None, "joy"]
    scores = per_class_scores(truth, predicted, LABELS)
    # joy: tp 2, fp 1 (the sadness row), fn 1 -> p 2/3, r 2/3; fear: tp 1, fp 1, fn 1; sadness: never predicted
    assert scores["joy"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert scores["fear"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert scores["sadness"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_confusion_matrix_has_an_unparsed_column_and_rows_sum_to_support():
    truth = ["joy", "joy", "fear", "sadness", "sadness"]
    predicted = ["joy", None, "sadness", "sadness", None]
    matrix = confusion_matrix(truth, predicted, LABELS)
    assert matrix == [[0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert [sum(row) for row in matrix] == [1, 2, 2]


def test_agreement_counts_equal_labels_including_both_unparsed():
    assert agreement(["joy", None, "fear", "joy"], ["joy", None, "joy", None]) == 0.5
    with pytest.raises(ValueError):
        agreement(["joy"], [])


def test_majority_label_breaks_ties_alphabetically():
    assert majority_label(["joy", "fear", "joy", "fear", "sadness"]) == "fear"
    assert majority_baseline(["joy", "fear", "joy", "fear"], ["fear", "joy", "joy"]) == pytest.approx(1 / 3)


def fake_result(generations, ms=1.0):
    return {
        "generations": generations,
        "generated_tokens": 2 * len(generations),
        "ttft_ms": 10 * ms,
        "ms_per_token": ms,
        "tokens_per_second": 1000 / ms,
        "peak_memory_mb": 100.0,
        "model_size_mb": 2.0,
        "load_seconds": 0.1,
        "eval_seconds": 0.2,
    }


ROWS = [{"prompt": f"p{i}", "label": label} for i, label in enumerate(["joy", "joy", "fear", "sadness"])]
TRAIN = [{"prompt": "t0", "label": "joy"}, {"prompt": "t1", "label": "joy"}, {"prompt": "p3", "label": "sadness"}]


def test_summary_puts_headline_numbers_on_top_and_details_beside_them():
    results = {
        "onnx": fake_result(["joy", "Joy!", "fear\nmore", "???"], ms=0.5),
        "base": fake_result(["", "", "", ""], ms=3.0),
        "merged": fake_result(["joy", "fear", "fear", "sadness"], ms=2.0),
    }
    metrics, predictions = evaluation.summarize(ROWS, LABELS, TRAIN, results)
    assert predictions["onnx"] == ["joy", "joy", "fear", None]
    assert metrics["accuracy"] == 0.75 and metrics["unparsed"] == 1 and metrics["n"] == 4
    assert metrics["majority_baseline"] == 0.5  # "joy" is the training majority
    assert metrics["base_accuracy"] == 0.0 and metrics["base_unparsed"] == 4
    # merged: 3/4 right; ONNX agrees with it on rows 0 and 2 only
    assert metrics["quantization_accuracy_delta"] == pytest.approx(0.0)
    assert metrics["quantization_agreement"] == 0.5
    assert metrics["ms_per_token"] == 0.5 and metrics["ttft_ms"] == 5.0 and metrics["model_size_mb"] == 2.0
    assert metrics["train_overlap"] == 1  # p3 is also a training prompt
    assert metrics["per_class"]["joy"]["support"] == 2
    assert metrics["runtimes"]["merged"]["agreement_with_onnx"] == 0.5
    assert metrics["runtimes"]["base"]["onnx_accuracy_delta"] == 0.75
    assert metrics["runtimes"]["onnx"]["agreement_with_onnx"] == 1.0
    # every figure has its 95 % interval, around it
    for key in ("accuracy", "macro_f1", "quantization_agreement"):
        assert metrics["ci95"][key]["low"] <= metrics[key] <= metrics["ci95"][key]["high"], key
    assert metrics["runtimes"]["merged"]["ci95"]["accuracy"]["high"] <= 1.0
    # the strongest baseline here is the majority class (0.5; the base model's answers are all empty)
    assert metrics["strongest_baseline"]["name"] == "majority" and metrics["gain_over_strongest_baseline"] == 0.25
    assert set(metrics["baselines"]) == {"majority", "base"}
    # everything but the nested details is a number: `dvc metrics diff` and `dvc exp show` columns
    nested = ("per_class", "runtimes", "ci95", "baselines", "strongest_baseline")
    for key, value in metrics.items():
        assert isinstance(value, dict) if key in nested else isinstance(value, (int, float)), key
    json.dumps(metrics)


def test_summary_without_merged_or_base_has_no_quantization_or_base_numbers():
    metrics, _ = evaluation.summarize(ROWS, LABELS, TRAIN, {"onnx": fake_result(["joy"] * 4)})
    assert not {"quantization_accuracy_delta", "quantization_agreement", "base_accuracy"} & set(metrics)
    assert list(metrics["runtimes"]) == ["onnx"]


def test_prediction_rows_carry_every_runtime_label():
    results = {"onnx": fake_result(["joy", "x", "fear", "sadness"]), "merged": fake_result(["joy"] * 4)}
    _, predictions = evaluation.summarize(ROWS, LABELS, TRAIN, results)
    lines = evaluation.prediction_rows(ROWS, [r["prompt"] for r in ROWS], results, predictions)
    assert lines[1] == {
        "prompt": "p1",
        "label": "joy",
        "generation": "x",
        "prediction": None,
        "predictions": {"onnx": None, "merged": "joy", "majority": "joy"},
    }


class FakeGenerator:
    """Token times of a run: 20 ms to the first token, then 5 ms each; the third timed run is slow."""

    def __init__(self):
        self.calls = 0

    def token_times(self, prompt, new_tokens):
        self.calls += 1
        slow = 10.0 if self.calls == 2 + 3 else 1.0  # after 2 warm-ups, the 3rd repeat
        return [slow * (0.020 + 0.005 * i) for i in range(new_tokens)]


def test_latency_is_the_median_of_repeats_after_warmup():
    generator = FakeGenerator()
    latency = evaluation.measure_latency(generator, "p", new_tokens=9, warmup=2, repeats=5)
    assert generator.calls == 7
    assert latency["ttft_ms"] == pytest.approx(20.0)  # the slow run is outvoted
    assert latency["ms_per_token"] == pytest.approx(5.0)
    assert latency["tokens_per_second"] == pytest.approx(statistics.median([9 / 0.060] * 4 + [9 / 0.6]))
    assert latency["latency_new_tokens"] == 9


# ---- which rows are judged -----------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps(["fear", "joy"]))
    train = [{"prompt": "### Text: a\n### The tone is:\n", "completion": "joy", "label": "joy"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    evaluation_rows = [
        {"prompt": f"### Text: e{i}\n### The tone is:\n", "completion": "fear", "label": "fear"} for i in range(5)
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation_rows))
    validation_rows = [{**row, "prompt": row["prompt"].replace(": e", ": v")} for row in evaluation_rows[:3]]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation_rows))
    return folder


def test_default_eval_path_is_the_prepared_split_and_follows_paths_prepared(make_cfg, prepared, tmp_path):
    cfg = make_cfg()
    assert cfg.eval.path == str(tmp_path / "prepared" / "test.jsonl")
    rows, labels, train = evaluation.load_rows(cfg)
    assert len(rows) == 5 and labels == ["fear", "joy"] and train[0]["label"] == "joy"
    rows, _, _ = evaluation.load_rows(make_cfg("eval.limit=2"))
    assert len(rows) == 2


def test_held_out_file_is_rendered_like_prepare_data_renders(make_cfg, prepared, tmp_path):
    from ortune import data

    held_out = tmp_path / "heldout.csv"
    held_out.write_text("phrase,tone\nI won the lottery,joy\nA spider on my bed,fear\n")
    cfg = make_cfg(f"eval.path={held_out}")
    rows, _, _ = evaluation.load_rows(cfg)
    expected = [
        data.render(r, cfg.data.template.prompt, cfg.data.template.completion, cfg.data.label_field)
        for r in read_records(held_out)
    ]
    assert rows == expected
    assert rows[0]["prompt"] == "### Text: I won the lottery\n### The tone is:\n" and rows[0]["label"] == "joy"


def test_held_out_file_in_chat_format_becomes_messages(make_cfg, prepared, tmp_path):
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text(json.dumps({"phrase": "A spider on my bed", "tone": "fear"}) + "\n")
    rows, _, _ = evaluation.load_rows(make_cfg("data.format=chat", f"eval.path={held_out}"))
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "A spider on my bed"}],
            "completion": [{"role": "assistant", "content": "fear"}],
            "label": "fear",
        }
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "eval.path=.*file not found"),
        ("phrase,tone\nI am furious,anger\n", "anger were never trained on"),
        ("text,tone\nhello,joy\n", "no field 'phrase'"),
    ],
)
def test_bad_held_out_file_fails_with_one_line(make_cfg, prepared, tmp_path, content, needle):
    held_out = tmp_path / "heldout.csv"
    if content is not None:
        held_out.write_text(content)
    with pytest.raises(OrtuneError, match=needle) as caught:
        evaluation.load_rows(make_cfg(f"eval.path={held_out}"))
    assert "\n" not in str(caught.value)


def test_missing_prepared_split_says_to_run_prepare_data(make_cfg):
    with pytest.raises(OrtuneError, match="prepare_data"):
        evaluation.load_rows(make_cfg())


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("eval.compare=[merged,nope]", "eval.compare: nope unknown"),
        ("eval.compare=[merged,merged]", "names a model twice"),
        ("eval.latency.repeats=0", "eval.latency.repeats=0"),
        ("eval.latency.new_tokens=1", "eval.latency.new_tokens=1"),
        ("eval.batch_size=0", "eval.batch_size=0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0"),
        ("eval.limit=-1", "eval.limit=-1"),
        ("eval.latency.warm=3", "eval.latency.warm"),
    ],
)
def test_bad_eval_settings_fail_naming_the_setting(make_cfg, override, needle):
    with pytest.raises(OrtuneError, match=needle) as caught:
        make_cfg(override)
    assert "\n" not in str(caught.value)


# ---- the prompted baseline: the untuned base asked as a user would ---------------------------------------


def test_summary_reports_the_prompted_baseline_beside_the_others():
    prompted = {
        **fake_result(["Joy", "fear.", "The tone is fear", "sadness"], ms=3.0),
        "prompt_format": "chat",
        "shots": 0,
    }
    metrics, predictions = evaluation.summarize(
        ROWS, LABELS, TRAIN, {"onnx": fake_result(["joy"] * 4), "prompted": prompted}
    )
    # truth joy, joy, fear, sadness; never taught the answer format, its sentence is read leniently
    assert predictions["prompted"] == ["joy", "fear", "fear", "sadness"]
    assert metrics["prompted_baseline_accuracy"] == 0.75 and metrics["prompted_baseline_unparsed"] == 0
    # two of its answers, as it said them, for the summary
    assert metrics["baselines"]["prompted"]["samples"] == [
        {"answer": "Joy", "label": "joy", "read_as": "joy"},
        {"answer": "fear.", "label": "joy", "read_as": "fear"},
    ]
    # the strongest baseline (0.75) is what fine-tuning is measured against, not the majority (0.5)
    assert metrics["strongest_baseline"]["name"] == "prompted"
    assert metrics["gain_over_strongest_baseline"] == pytest.approx(0.5 - 0.75)
    assert metrics["runtimes"]["prompted"]["prompt_format"] == "chat" and metrics["runtimes"]["prompted"]["shots"] == 0
    assert "base_accuracy" not in metrics


@pytest.mark.parametrize(
    ("template", "prompt", "expected"),
    [
        ("### Text: {phrase}\n### The tone is:\n", "### Text: Wow, you came!\n### The tone is:\n", "Wow, you came!"),
        # the text may itself hold the template's literal parts
        ("### Text: {phrase}\n### The tone is:\n", "### Text: a\n### Text: b\n### The tone is:\n", "a\n### Text: b"),
        ("Title: {title}\nBody: {body}\n", "Title: Hi\nBody: It went {well}\n", "Hi\nIt went {well}"),
        ("{phrase} / {phrase}?", "so / so?", "so"),
    ],
)
def test_row_input_reads_the_text_back_out_of_a_rendered_prompt(template, prompt, expected):
    from omegaconf import OmegaConf

    spec = OmegaConf.create({"template": {"prompt": template}})
    assert baselines.row_input(prompt, spec) == expected


def test_row_input_of_a_chat_prompt_is_its_user_turn_and_a_stale_prompt_is_an_error(make_cfg):
    spec = make_cfg().data
    assert baselines.row_input([{"role": "user", "content": "A spider"}], spec) == "A spider"
    with pytest.raises(OrtuneError, match="rerun prepare_data"):
        baselines.row_input("Text: made with another template", spec)


def test_shots_show_every_label_before_any_label_twice():
    train = [{"prompt": f"t{i}", "label": label} for i, label in enumerate(["joy", "joy", "joy", "fear", "sadness"])]
    assert [r["prompt"] for r in baselines.pick_shots(train, 4)] == ["t3", "t0", "t4", "t1"]
    assert baselines.pick_shots(train, 0) == []
    with pytest.raises(OrtuneError, match="eval.baseline_shots=6: the training split has only 5 rows"):
        baselines.pick_shots(train, 6)


@pytest.fixture
def base_tokenizer(tmp_path):
    """A Phi-3-style tokenizer (chat template included) saved where paths.base_model points."""
    from ortune import modeling

    tokenizer = modeling.train_tiny_tokenizer(["I am scared of spiders", "what a lovely day"], 300)
    tokenizer.chat_template = modeling.PHI3_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "base_model")
    return tmp_path / "base_model"


ASK = "Classify the tone of the text. Answer with exactly one of: fear, joy.\n\nText: "


def test_prompted_baseline_asks_through_the_chat_template_with_the_label_set(make_cfg, prepared, base_tokenizer):
    cfg = make_cfg()
    rows, labels, train = evaluation.load_rows(cfg)
    prompts, how = baselines.prompted_prompts(cfg, rows, labels, train, shots=0)
    assert how == "chat" and len(prompts) == 5
    assert prompts[0] == f"<|user|>\n{ASK}e0<|end|>\n<|assistant|>\n"
    prompts, _ = baselines.prompted_prompts(make_cfg("eval.baseline_shots=1"), rows, labels, train)
    # the training row "a" (joy) answered first, as an earlier turn
    assert (
        prompts[1] == f"<|user|>\n{ASK}a<|end|>\n<|assistant|>\njoy<|end|>\n<|user|>\n{ASK}e1<|end|>\n<|assistant|>\n"
    )


def test_prompted_baseline_without_a_chat_template_asks_in_plain_text(make_cfg, prepared, base_tokenizer, caplog):
    config = json.loads((base_tokenizer / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base_tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    (base_tokenizer / "chat_template.jinja").unlink(missing_ok=True)
    cfg = make_cfg("eval.baseline_shots=1")
    # the untuned base is asked through its own tokenizer, never the shipped model's (here: one with a template)
    from ortune import modeling

    shipped = modeling.train_tiny_tokenizer(["I am scared of spiders"], 300)
    shipped.chat_template = modeling.PHI3_CHAT_TEMPLATE
    shipped.save_pretrained(cfg.paths.onnx)
    rows, labels, train = evaluation.load_rows(cfg)
    prompts, how = baselines.prompted_prompts(cfg, rows, labels, train)
    assert how == "text" and prompts[0] == f"{ASK}a\nAnswer: joy\n\n{ASK}e0\nAnswer:"
    assert "no chat template" in caplog.text


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("eval.baseline_prompt='Which tone? {labels}'", "has no {input}"),
        (
            "eval.baseline_prompt='{text} -> one of {labels}, {input}'",
            r"\{text\} unknown; its placeholders are \{labels\}",
        ),
        ("eval.baseline_prompt='Tone of {input'", "not a valid template"),
        ("eval.baseline_shots=-1", "eval.baseline_shots=-1 must be >= 0"),
    ],
)
def test_bad_prompted_baseline_settings_fail_naming_the_setting(make_cfg, override, needle):
    with pytest.raises(OrtuneError, match=needle) as caught:
        make_cfg(override)
    assert "\n" not in str(caught.value)


def test_log_likelihood_baselines_ask_zero_shot_and_k_shot(make_cfg, prepared, base_tokenizer):
    rows, labels, train = evaluation.load_rows(make_cfg())
    asked = baselines.choice_prompts(make_cfg("eval.baseline_shots=1"), rows, labels, train)
    assert {name: (a["shots"], a["delimiter"], a["format"]) for name, a in asked.items()} == {
        "loglik_zero_shot": (0, "", "chat"),
        "loglik_k_shot": (1, "", "chat"),
    }
    assert asked["loglik_zero_shot"]["prompts"][0] == f"<|user|>\n{ASK}e0<|end|>\n<|assistant|>\n"
    assert asked["loglik_k_shot"]["prompts"][0].startswith(f"<|user|>\n{ASK}a<|end|>\n<|assistant|>\njoy<|end|>")
    # eval.baseline_shots=0: the zero-shot one alone
    assert list(baselines.choice_prompts(make_cfg("eval.baseline_shots=0"), rows, labels, train)) == [
        "loglik_zero_shot"
    ]


def test_the_validation_split_is_what_eval_reads_for_make_best(make_cfg, prepared):
    cfg = make_cfg()
    assert [r["prompt"] for r in evaluation.load_validation(cfg)][0] == "### Text: v0\n### The tone is:\n"
    assert len(evaluation.load_validation(make_cfg("eval.limit=2"))) == 2
    (prepared / "validation.jsonl").unlink()
    with pytest.raises(OrtuneError, match="no validation.jsonl; rerun prepare_data"):
        evaluation.load_validation(cfg)


def test_the_shipped_models_validation_scores_sit_beside_the_test_headline():
    validation = [{"prompt": "v0", "label": "joy"}, {"prompt": "v1", "label": "fear"}]
    results = {"onnx": {**fake_result(["joy", "joy", "fear", "sadness"]), "validation_generations": ["joy", "joy"]}}
    metrics, _ = evaluation.summarize(ROWS, LABELS, TRAIN, results, validation)
    assert metrics["accuracy"] == 1.0 and metrics["validation"]["accuracy"] == 0.5
    assert metrics["validation"]["n"] == 2 and metrics["validation"]["ci95"]["accuracy"] == {"low": 0.0, "high": 1.0}

"""The eval stage for free text (data.task=generation, issues 21 and 22): the shipped model judged on the
validation split too (what `make best` ranks on), 95 % intervals on every per-row score, the prompted
baseline zero-shot and k-shot with the gain stated over the strongest, the token limit counted per runtime,
and the per-row table for W&B. Fast: in-memory rows, fake runtimes, no model."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser

import pytest

from ortune import freetext, plots
from test_eval_metrics import base_tokenizer  # noqa: F401 - a fixture
from test_hostile_report import report
from test_plots_report import plots_project  # noqa: F401 - a fixture

SPEED = {"ttft_ms": 1.0, "ms_per_token": 2.0, "tokens_per_second": 3.0, "peak_memory_mb": 4.0}
GENERATION = ("data.task=generation", "data.input_column=question", "data.output_column=answer")
PROMPT = "### Text: {}\n### The tone is:\n"  # the default template with data.input_column=question


def result(generations: list[str], new_tokens: list[int] | None = None, **extra) -> dict:
    return {
        "generations": generations,
        "new_tokens": new_tokens or [3] * len(generations),
        "generated_tokens": sum(new_tokens or [3] * len(generations)),
        "model_size_mb": 1.0,
        "load_seconds": 0.1,
        "eval_seconds": 0.2,
        **extra,
    }


def rows(answers: list[str], prefix: str = "q") -> list[dict]:
    return [{"prompt": PROMPT.format(f"{prefix}{i}"), "completion": a} for i, a in enumerate(answers)]


ANSWERS = [f"answer number {i}" for i in range(10)]


def test_the_summary_judges_validation_puts_intervals_on_scores_and_states_the_gain_over_the_strongest():
    test, validation = rows(ANSWERS), rows(ANSWERS[:4], "v")
    wrong = ["something else"] * 10
    results = {
        # right on 8 of 10 test rows, on 1 of 4 validation rows
        "onnx": result(ANSWERS[:8] + wrong[:2], **SPEED, validation_generations=["x", "y", "z", ANSWERS[3]]),
        "base": result(wrong),
        "prompted": result(ANSWERS[:3] + wrong[:7], [30] * 10, max_new_tokens=30, shots=2),
        "prompted_zero_shot": result(ANSWERS[:1] + wrong[:9], [8] * 10, max_new_tokens=30, shots=0),
        "merged": result(ANSWERS[:8] + wrong[:2]),
    }
    metrics, per_row = freetext.summarize(test, results, 8, validation, resamples=200, seed=1)
    assert metrics["exact_match"] == 0.8 and metrics["n"] == 10
    low, high = metrics["ci95"]["exact_match"]["low"], metrics["ci95"]["exact_match"]["high"]
    assert 0.4 <= low < 0.8 < high <= 1.0
    assert set(metrics["ci95"]) >= {"exact_match", "token_f1", "chrf", "rouge_l", "gain_over_strongest_baseline"}
    # what make best ranks on: the validation split, with its own interval
    assert metrics["validation"]["exact_match"] == 0.25 and metrics["validation"]["n"] == 4
    assert (
        metrics["validation"]["ci95"]["exact_match"]["low"]
        <= 0.25
        <= metrics["validation"]["ci95"]["exact_match"]["high"]
    )
    # the gain is over the strongest of the untuned model's ways (the 2-shot prompt), paired by row
    assert list(metrics["baselines"]) == ["base", "prompted_zero_shot", "prompted"]
    assert metrics["strongest_baseline"]["name"] == "prompted" and metrics["strongest_baseline"]["shots"] == 2
    assert metrics["gain_over_strongest_baseline"] == pytest.approx(0.5)
    gain = metrics["ci95"]["gain_over_strongest_baseline"]
    assert 0.0 < gain["low"] <= 0.5 <= gain["high"]
    assert metrics["prompted_zero_shot_exact_match"] == 0.1 and metrics["prompted_baseline_exact_match"] == 0.3
    # each runtime's cut generations against the limit it ran under (the baselines' is larger)
    assert metrics["hit_token_limit"] == 0 and metrics["runtimes"]["prompted"]["hit_token_limit"] == 10
    assert metrics["runtimes"]["prompted_zero_shot"]["hit_token_limit"] == 0
    assert metrics["quantization_identical"] == 1.0 and metrics["ci95"]["quantization_identical"]["low"] == 1.0
    assert len(per_row["onnx"]) == 10 and per_row["onnx"][9]["exact_match"] == 0.0


def test_a_json_score_only_some_rows_have_gets_an_interval_over_those_rows():
    answers = ['{"a": 1}', '{"a": 2}', "plain", "text"]
    results = {"onnx": result(['{"a": 1}', "oops", "plain", "text"], **SPEED)}
    metrics, _ = freetext.summarize(rows(answers), results, 8, resamples=200)
    assert metrics["json_valid"] == 0.5 and metrics["ci95"]["json_valid"] == {"low": 0.0, "high": 1.0}
    assert "bleu" not in metrics["ci95"]  # a corpus figure, not a mean of rows


def test_the_run_summary_reports_the_test_split_with_intervals_the_gain_and_the_validation_split():
    test, validation = rows(ANSWERS), rows(ANSWERS[:4], "v")
    results = {
        "onnx": result(ANSWERS[:8] + ["no"] * 2, **SPEED, validation_generations=ANSWERS[:2] + ["x", "y"]),
        "prompted": result(ANSWERS[:3] + ["no"] * 7, shots=1),
        "prompted_zero_shot": result(["no"] * 10, shots=0),
    }
    metrics, _ = freetext.summarize(test, results, 8, validation, resamples=200)
    metrics["judged"] = {"split": "test split"}
    text = freetext.run_summary({"onnx": "models/onnx", "metrics": "metrics"}, metrics, {"precision": "int4"}, {})
    lines = text.splitlines()
    assert lines[0].startswith("eval (int4 ONNX, free text, test split, 10 rows): exact match 0.800 ± ")
    assert lines[1].startswith(
        "baselines (the untuned base, same rows, exact match): eval.baseline_prompt zero-shot 0.000"
    )
    assert "eval.baseline_prompt 1-shot 0.300 ± " in lines[1]
    assert lines[2].startswith("fine-tuning gained +0.500 ± ")
    assert lines[2].endswith("exact match over the strongest baseline (eval.baseline_prompt 1-shot, 0.300)")
    assert lines[3].startswith("validation split (4 rows; what `make best` chooses on): exact match 0.500 ± ")
    # eval.baseline_shots=0: the one prompted baseline is zero-shot
    del results["prompted_zero_shot"]
    results["prompted"]["shots"] = 0
    metrics, _ = freetext.summarize(test, results, 8, validation, resamples=200)
    text = freetext.run_summary({"onnx": "models/onnx", "metrics": "metrics"}, metrics, {}, {})
    assert "over the strongest baseline (eval.baseline_prompt zero-shot, 0.300)" in text


def test_the_eval_stage_judges_free_text_on_validation_and_asks_the_baseline_zero_and_k_shot(
    make_cfg,
    tmp_path,
    base_tokenizer,  # noqa: F811
    monkeypatch,
):
    import eval as eval_stage

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    splits = {"train": rows(["t0", "t1"], "t"), "validation": rows(ANSWERS[:4], "v"), "test": rows(ANSWERS)}
    for name, split in splits.items():
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    (prepared / "labels.json").write_text("[]")
    specs = {}

    def judge(spec):  # right on every test row, on half the validation rows; the baselines on none
        specs[spec["kind"]] = spec
        if spec["kind"] == "onnx":
            return result(ANSWERS, **SPEED, validation_generations=ANSWERS[:2] + ["x", "y"], max_new_tokens=8)
        gens = result(["no"] * 10, max_new_tokens=spec["max_new_tokens"])
        if spec.get("variants"):
            gens["variants"] = {name: {**result(["no"] * 10), "eval_seconds": 0.3} for name in spec["variants"]}
        return gens

    monkeypatch.setattr(eval_stage.evaluation, "judge_in_fresh_process", judge)
    cfg = make_cfg(
        *GENERATION, "eval.max_new_tokens=8", "eval.compare=[prompted]", "eval.baseline_shots=1", "eval.limit=0"
    )
    metrics = eval_stage.run(cfg)
    assert specs["onnx"]["validation_prompts"] == [r["prompt"] for r in splits["validation"]]
    k_shot, zero_shot = specs["prompted"]["prompts"][0], specs["prompted"]["variants"]["prompted_zero_shot"][0]
    assert "t0" in k_shot and "t0" not in zero_shot and zero_shot.count("q0") == 1
    assert metrics["exact_match"] == 1.0 and metrics["judged"] == {"split": "test split"}
    assert metrics["validation"]["exact_match"] == 0.5 and metrics["validation"]["n"] == 4
    assert {k: b["shots"] for k, b in metrics["baselines"].items()} == {"prompted_zero_shot": 0, "prompted": 1}
    lines = (tmp_path / "metrics" / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and set(json.loads(lines[0])["generations"]) == {"onnx", "prompted", "prompted_zero_shot"}


class Tracker:
    active = True

    def __init__(self):
        self.logged = {}

    def log_media(self, items):
        self.logged.update(items)


def test_the_wandb_table_lists_every_runtimes_output_and_score_worst_rows_first():
    test = rows(["right answer", "a long reference text"])
    results = {
        "onnx": result(["right answer", "wrong"], [2, 8], **SPEED, max_new_tokens=8),
        "merged": result(["right answer", "a long"], [2, 2], max_new_tokens=8),
    }
    metrics, per_row = freetext.summarize(test, results, 8, resamples=200)
    lines = freetext.prediction_rows(test, ["p0", "p1"], results, per_row)
    tracker = Tracker()
    freetext.log_media(tracker, lines)
    table = tracker.logged["eval/predictions"]
    assert table.columns == [
        "prompt",
        "reference",
        "generation_onnx",
        "exact_match_onnx",
        "chrf_onnx",
        "generation_merged",
        "exact_match_merged",
        "chrf_merged",
        "cut",
    ]
    assert table.data[0][:4] == ["p1", "a long reference text", "wrong", 0.0]  # the worst row first
    assert table.data[0][5] == "a long" and 0 < table.data[0][7] < 1 and table.data[0][8] == "onnx"
    assert table.data[1][8] == ""


HOSTILE = '</script><script>alert(1)</script><!-- <img src=x onerror=alert(2)> & "quoted"'


class Page(HTMLParser):
    """Every tag a browser would make of the page, and its text."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text += data


def hostile_lines() -> list[dict]:
    """Free-text predictions whose prompt, reference and outputs hold HTML, with a row that is worse."""
    test = rows([f"{HOSTILE} good", f"{HOSTILE} bad"])
    results = {
        "onnx": result([f"{HOSTILE} good", f"<b>{HOSTILE}</b>"], [3, 8], **SPEED, max_new_tokens=8),
        "merged": result([f"{HOSTILE} good", "</td></tr></table><script>alert(3)</script>"]),
    }
    _, per_row = freetext.summarize(test, results, 8, resamples=200)
    return freetext.prediction_rows(test, [f"prompt {HOSTILE} 0", f"prompt {HOSTILE} 1"], results, per_row)


def test_the_report_lists_free_text_rows_worst_first_with_every_string_escaped():
    section = plots.predictions_section(hostile_lines(), "metrics/<x>.jsonl")
    page = Page()
    page.feed(section)
    # only what the section itself writes: data never becomes a tag
    assert set(page.tags) == {"h2", "p", "table", "thead", "tbody", "tr", "th", "td", "pre", "small"}
    assert page.tags.count("tr") == 3 and page.tags.count("pre") == 2 * 4  # prompt, reference, onnx, merged
    for text in (HOSTILE, f"<b>{HOSTILE}</b>", "</td></tr></table><script>alert(3)</script>", "metrics/<x>.jsonl"):
        assert text in page.text  # each reads as itself
    # the worst row (the shipped model wrong) first, with each runtime's per-row scores
    assert page.text.index(f"prompt {HOSTILE} 1") < page.text.index(f"prompt {HOSTILE} 0")
    assert "exact_match 0.000 · chrf" in page.text and "exact_match 1.000 · chrf 1.000" in page.text
    assert page.text.count("cut at the token limit") == 1  # the shipped model's second row used all 8 tokens
    assert plots.predictions_section([{"prompt": "p", "label": "joy", "predictions": {}}], "x") == ""  # labels


def test_a_json_answer_shows_its_field_f1_in_the_report_and_the_wandb_table():
    test = rows(['{"a": 1, "b": 2}', "plain"])
    results = {"onnx": result(['{"a": 1, "b": 3}', "plain"], **SPEED)}
    _, per_row = freetext.summarize(test, results, 8, resamples=200)
    lines = freetext.prediction_rows(test, ["p0", "p1"], results, per_row)
    section = plots.predictions_section(lines, "x")
    assert "exact_match 0.000 · chrf" in section and "· json_field_f1 0.500" in section
    tracker = Tracker()
    freetext.log_media(tracker, lines)
    table = tracker.logged["eval/predictions"]
    assert table.columns[2:6] == ["generation_onnx", "exact_match_onnx", "chrf_onnx", "json_field_f1_onnx"]
    assert table.data[0][5] == 0.5 and table.data[1][5] is None  # the plain row has no JSON score


def test_the_report_caps_the_rows_it_lists(monkeypatch):
    monkeypatch.setattr(plots, "PREDICTION_ROWS", 1)
    section = plots.predictions_section(hostile_lines(), "metrics/eval_predictions.jsonl")
    assert "the 1 worst of 2 rows, worst first" in section and section.count("<tr>") == 2


def test_make_plots_ends_with_the_free_text_predictions(plots_project):  # noqa: F811
    root, env = plots_project
    (root / "metrics").mkdir()
    (root / "metrics" / "eval_predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in hostile_lines()))
    done = report(root, env)
    assert done.returncode == 0, done.stderr
    page = (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    body = page.rpartition("</head>")[2]  # vega-embed's code, in the head, holds a "</head>" of its own
    assert "alert(1)</script>" not in body and "<!--" not in body
    assert body.index("Per-row predictions (free text): all 2 rows") < body.index("</body>")
    assert html.escape(f"<b>{HOSTILE}</b>") in body


def test_the_default_baseline_question_names_nothing_the_data_does_not(make_cfg):
    # the tone example asks what it always asked
    assert make_cfg().eval.baseline_prompt == (
        "Classify the tone of the text. Answer with exactly one of: {labels}.\n\nText: {input}"
    )
    # another label field is named as itself; free text is asked its question as it is
    assert make_cfg("data.output_column=stars").eval.baseline_prompt.startswith("Classify the stars of the text.")
    assert make_cfg(*GENERATION).eval.baseline_prompt == "{input}"
    # a question set on the command line or by a data config wins
    assert make_cfg(*GENERATION, "eval.baseline_prompt='Answer: {input}'").eval.baseline_prompt == "Answer: {input}"
    assert "tone" not in make_cfg("data=extract").eval.baseline_prompt


def test_a_text_baseline_is_read_up_to_its_first_blank_line_and_the_rest_left_alone():
    """Gemma 3 270M (a base model, no chat template) answered the 1-shot extraction prompt with the right
    one-line JSON and went on writing the next example until the token limit: scored whole, 0.000 exact
    match on 120 rows; read up to the blank line that separates the prompt's examples, 0.117."""
    answer = '{"name":"Tom Murphy","amount":5}'
    results = {
        "onnx": {"generations": [f"{answer}\n\nmore"]},
        "prompted": {"generations": [f" {answer}\n\nExtract the customer's name"], "prompt_format": "text"},
        "prompted_zero_shot": {"generations": ["\n\nJSON:\n{}\n\nText"], "prompt_format": "text"},
        "chatted": {"generations": [f"{answer}\n\nmore"], "prompt_format": "chat"},
    }
    read = freetext.answers_as_read(results)
    assert read["prompted"]["generations"] == [answer] and read["prompted"]["read_until"] == "\n\n"
    assert read["prompted_zero_shot"]["generations"] == ["JSON:\n{}"]
    assert read["onnx"] == results["onnx"] and read["chatted"] == results["chatted"]  # fine-tuned, chat: as generated
    assert results["prompted"]["generations"] == [f" {answer}\n\nExtract the customer's name"]  # not mutated


def test_the_eval_stage_reads_a_text_format_baseline_to_its_first_blank_line(
    make_cfg,
    tmp_path,
    base_tokenizer,  # noqa: F811
    monkeypatch,
):
    """A base model asked in plain text (no chat template) answers, then writes the next example: the eval
    stage scores the answer, not what follows it."""
    import eval as eval_stage

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, split in {
        "train": rows(["t0"], "t"),
        "validation": rows(ANSWERS[:2], "v"),
        "test": rows(ANSWERS),
    }.items():
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    (prepared / "labels.json").write_text("[]")
    monkeypatch.setattr(
        eval_stage.freetext, "prompted_prompts", lambda cfg, rows_, *a, **k: ([r["prompt"] for r in rows_], "text")
    )

    def judge(spec):
        if spec["kind"] == "onnx":
            return result(ANSWERS, **SPEED, validation_generations=ANSWERS[:2], max_new_tokens=8)
        return result([f" {a}\n\nText: the next example" for a in ANSWERS], max_new_tokens=8)

    monkeypatch.setattr(eval_stage.evaluation, "judge_in_fresh_process", judge)
    metrics = eval_stage.run(
        make_cfg(*GENERATION, "eval.max_new_tokens=8", "eval.compare=[prompted]", "eval.baseline_shots=0")
    )
    assert metrics["baselines"]["prompted"]["exact_match"] == 1.0
    assert metrics["runtimes"]["prompted"]["read_until"] == "\n\n"

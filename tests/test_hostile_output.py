"""Hostile data reaching Markdown and a terminal (issue 20): the model card renders labels and settings as
their text, never as HTML or Markdown; predict and chat print control characters escaped, never raw."""

from __future__ import annotations

import html
import io
import re
import sys
from types import SimpleNamespace

import pytest
from markdown_it import MarkdownIt

from ortune import app, model_card
from test_model_card import DATASET, PARITY, TASK

LABELS = ["<img src=x onerror=alert(1)>", "**bold** [link](http://x) `tick` a|b", "</script><script>alert(1)</script>"]


def card_html(**task) -> str:
    card = model_card.render(
        model={"name": "<b>m</b>", "hub_id": None, "revision": None, "path": "</a>`x`", "resolved_revision": None},
        dataset={**DATASET, "path": "data/<script>.jsonl"},
        settings={"data.template.prompt": "say `x` | <b>{phrase}</b>\n# heading", "precision": "int4"},
        lora=None,
        metrics={
            "precision": "int4",
            "execution_provider": "cpu",
            "size_mb": 1.0,
            "build_seconds": 2.0,
            "parity": PARITY,
            "adapter_parity": {"<i>a</i>": {"skipped": "<b>no</b>"}},
        },
        task={**TASK, "labels": LABELS, "prompt_template": "<script>{phrase}", **task},
    )
    body = card.split("\n---\n", 1)[1]
    return MarkdownIt("commonmark").enable("table").render(body)


def test_the_model_card_renders_data_as_text_never_as_html_or_markdown():
    rendered = card_html(active_adapter='x"`<b>')
    tags = {tag.lower() for tag in re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", rendered)}
    # only what the card itself writes: headings, paragraphs, lists, tables, code
    assert tags <= {"h1", "h2", "p", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "code", "pre"}, tags
    for label in LABELS:  # each label reads as itself in the rendered heading and label line
        assert rendered.count(html.escape(label, quote=False)) >= 2, label
    # a setting with a line break stays one table row, its value one code span
    assert "<code>say `x` | &lt;b&gt;{phrase}&lt;/b&gt;\\n# heading</code>" in rendered


@pytest.mark.parametrize(
    ("value", "fence"), [("plain", "`plain`"), ("a`b", "``a`b``"), ("`x`", "`` `x` ``"), ("a|b", "`a\\|b`")]
)
def test_code_spans_hold_any_value(value, fence):
    assert model_card.code(value) == fence


def test_printable_escapes_control_characters_and_keeps_text():
    hostile = "ok \x1b]0;pwned\x07 \x1b[31mred\x1b[0m \x9b2J\x00\r\t"
    shown = app.printable(hostile)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in shown)
    assert shown == "ok \\x1b]0;pwned\\x07 \\x1b[31mred\\x1b[0m \\x9b2J\\x00\\r\\t"
    assert app.printable("Ünïcödé \u2028 日本 🙂") == "Ünïcödé \u2028 日本 🙂"
    assert app.printable("two\nlines\tok", keep="\n\t") == "two\nlines\tok"


class FakeApp:
    """The model as predict and chat see it: answers with an escape sequence of its own."""

    task = {"format": "text", "labels": ["joy"], "max_new_tokens": 4}

    def __init__(self, *args, **kwargs):
        pass

    def classify(self, text):
        return "joy\x1b[2J", "joy\x1b]0;title\x07"

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def stream(self, prompt, max_new_tokens):
        yield from ("hi ", "\x1b]0;pwned\x07", "\nthere")


def test_predict_prints_a_phrase_and_a_label_from_a_file_escaped(monkeypatch, tmp_path, capsys):
    import predict

    monkeypatch.setattr(predict, "App", FakeApp)
    phrases = tmp_path / "phrases.txt"
    phrases.write_bytes(b"a \x1b]0;pwned\x07 title\n\x1b[31mred\x1b[0m\n")
    assert predict.main(["--file", str(phrases), "--show"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.splitlines()[0] == "joy\\x1b[2J\t'joy\\x1b]0;title\\x07'\ta \\x1b]0;pwned\\x07 title"


def test_chat_prints_the_models_reply_escaped(monkeypatch, capsys):
    import chat

    monkeypatch.setattr(chat, "App", FakeApp)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"hello\n"), isatty=lambda: False))
    assert chat.main([]) == 0
    assert capsys.readouterr().out == "hi \\x1b]0;pwned\\x07\nthere\n"

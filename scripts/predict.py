"""Classify phrases with the built ONNX model (or, for a free-text model, answer them): one phrase, a file
of phrases, or lines on stdin. A model trained with data.task=generation prints its generated text instead
of a label (one answer per line, escaped, when there are several phrases).

    python scripts/predict.py "cricket is a wonderful sport!"      # prints the label
    python scripts/predict.py --file phrases.txt                    # label<TAB>phrase per line
    cat phrases.txt | python scripts/predict.py                     # the same, from stdin
    make predict TEXT="cricket is a wonderful sport!"

The prompt is rendered as in training (models/onnx/ortune.json), decoded greedily for at most the
longest label plus the end token, and turned into a label by ortune.metrics.parse_label. A
generation that names no label prints as `?` (`--show` prints what the model said). Exit status 2
on bad input (missing model, empty file, text that is not UTF-8, a damaged model folder), 1 on
anything unexpected (its traceback goes to the file the error line names). No torch/transformers
import: starts in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ortune.app import DEFAULT_MODEL, MAX_INPUT_BYTES, App, printable, read_bounded
from ortune.data import text_lines
from ortune.errors import OrtuneError, unexpected

UNPARSED = "?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Classify phrases with the built ONNX model.")
    parser.add_argument("text", nargs="*", help="phrase(s) to classify; none: read --file or stdin")
    parser.add_argument("--file", type=Path, help="a UTF-8 text file, one phrase per line")
    parser.add_argument(
        "--model", type=Path, default=Path(DEFAULT_MODEL), help=f"model folder (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--adapter",
        default="auto",
        help="adapter to activate (onnx.adapter=separate builds); default: the pipeline's own; 'none': the bare base",
    )
    parser.add_argument("--show", action="store_true", help="also print the raw generation")
    return parser.parse_args(argv)


def phrases(args: argparse.Namespace) -> tuple[list[tuple[str | None, str]], bool]:
    """(where, phrase) pairs to classify ("file:line", or None for the argument), and whether to print
    each beside its label (more than a single argument)."""
    if args.text and args.file:
        raise OrtuneError("give phrases as arguments or --file, not both")
    if args.text:
        text = " ".join(args.text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode arrive as lone surrogates
            raise OrtuneError("the phrase is not UTF-8 text; pass it as UTF-8") from None
        return [(None, text)], False
    if args.file:
        if not args.file.exists():
            raise OrtuneError(f"--file {args.file}: no such file")
        if not args.file.is_file():  # a FIFO, a device (/dev/zero): no end to wait for
            raise OrtuneError(f"--file {args.file}: not a regular file; pass a text file, or pipe it to stdin")
        try:
            with args.file.open("rb") as handle:
                payload = read_bounded(handle, MAX_INPUT_BYTES, f"--file {args.file}")
        except OSError as exc:
            raise OrtuneError(f"--file {args.file}: cannot be read ({exc.strerror or exc})") from None
        lines = text_lines(utf8(payload, f"--file {args.file}"))
    else:
        if sys.stdin.isatty():
            raise OrtuneError('nothing to classify: pass a phrase ("..."), --file FILE, or lines on stdin')
        lines = text_lines(utf8(read_bounded(sys.stdin.buffer, MAX_INPUT_BYTES, "stdin"), "stdin"))
    source = args.file or "stdin"
    found = [(f"{source}:{n}", line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not found:
        raise OrtuneError(f"{source}: no phrases (one per line, blank lines skipped)")
    return found, True


def utf8(payload: bytes, source: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = payload[: exc.start].count(b"\n") + 1
        raise OrtuneError(
            f"{source}: not UTF-8 text (byte 0x{payload[exc.start]:02x} on line {line}); re-save it as UTF-8"
        ) from None


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        texts, tabular = phrases(args)
        app = App(args.model, adapter=None if args.adapter == "none" else args.adapter)
        for where, text in texts:
            try:
                label, raw = app.classify(text)
            except OrtuneError as exc:
                raise OrtuneError(f"{where}: {exc}" if where else str(exc)) from None
            # what a file or the model holds is printed escaped: an ANSI/OSC sequence must not drive the terminal
            head = label or UNPARSED
            if app.task.get("task") == "generation":  # free text (data.task=generation): what the model wrote
                head = raw.strip()
                if not tabular and not args.show:  # one answer: its lines as lines
                    print(printable(head, keep="\n\t"), flush=True)
                    continue
            fields = [head] + ([repr(raw)] if args.show else []) + ([text] if tabular else [])
            print("\t".join(map(printable, fields)), flush=True)
    except OrtuneError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: one line naming the traceback's file, not a traceback
        print(unexpected(exc, "predict"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Chat with the built ONNX model, prompts rendered with its chat template (make chat).

    python scripts/chat.py [--model models/onnx] [--max-new-tokens 128] [--system "..."]

Each turn appends the user's line and the model's reply to the conversation (so the model sees the
whole history); `/reset` starts over, `/quit` or end of input (Ctrl-D) leaves. Decoding is greedy
and streamed token by token. The tiny default model was fine-tuned on one task from random
weights, so its replies are only meaningful for that task's phrases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ortune.app import DEFAULT_MODEL, MAX_LINE_BYTES, App, printable
from ortune.errors import OrtuneError, unexpected


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with the built ONNX model.")
    parser.add_argument(
        "--model", type=Path, default=Path(DEFAULT_MODEL), help=f"model folder (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--adapter", default="auto", help="adapter to activate; 'none': the bare base")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens (default 128)")
    parser.add_argument("--system", default=None, help="a system message opening the conversation")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        if args.max_new_tokens < 1:
            raise OrtuneError("--max-new-tokens must be >= 1")
        app = App(args.model, adapter=None if args.adapter == "none" else args.adapter)
        opening = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(opening)
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"chatting with {args.model} (/reset starts over, /quit or Ctrl-D leaves)")
        while True:
            if interactive:
                print("> ", end="", flush=True)
            raw = sys.stdin.buffer.readline(MAX_LINE_BYTES + 1)  # /dev/zero has no line end: never read it all
            if len(raw) > MAX_LINE_BYTES:
                raise OrtuneError(f"stdin: a line longer than {MAX_LINE_BYTES >> 20} MB; a chat turn is one short line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise OrtuneError("stdin: a line that is not UTF-8 text; type or pipe UTF-8") from None
            if not line or line.strip() == "/quit":
                return 0
            if not line.strip():
                continue
            if line.strip() == "/reset":
                messages = list(opening)
                continue
            messages.append({"role": "user", "content": line.strip()})
            reply = []
            for piece in app.stream(app.chat_prompt(messages), args.max_new_tokens):
                reply.append(piece)
                print(printable(piece, keep="\n\t"), end="", flush=True)  # never a raw escape sequence
            print(flush=True)
            messages.append({"role": "assistant", "content": "".join(reply).strip()})
    except OrtuneError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0
    except Exception as exc:  # noqa: BLE001 - a bug: one line naming the traceback's file, not a traceback
        print(unexpected(exc, "chat"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

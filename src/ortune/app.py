"""The shipped model as an app: classify phrases (scripts/predict.py) or chat (scripts/chat.py).

Only onnxruntime-genai and the standard library are imported (no torch, transformers or Hydra), so
an app starts in a fraction of a second on the tiny model. Prompts are rendered from the model
folder's ortune.json exactly as training rendered them: the text template, or the chat template
(onnxruntime-genai's renderer, checked against transformers' at build time).
"""

from __future__ import annotations

import json
from pathlib import Path

from ortune import lastgood
from ortune.errors import OrtuneError
from ortune.generation import OnnxGenerator
from ortune.metrics import parse_label

DEFAULT_MODEL = "models/onnx"


def printable(text: str, keep: str = "") -> str:
    """Text as a terminal shows it without obeying it: control characters (ESC of ANSI and OSC sequences, BEL,
    CR, C1's CSI, ...) as their escape, \\x1b, except those in `keep`. Phrases, labels and generations come from
    files and a model: printed raw, they could retitle, clear or rewrite the user's terminal."""
    return "".join(c if c in keep or not (c < " " or "\x7f" <= c < "\xa0") else repr(c)[1:-1] for c in text)


# What the apps read at most: far more than a model's context holds, far less than memory (`make predict
# < /dev/zero` read 1.7 GB in 12 s before these bounds)
MAX_INPUT_BYTES = 32 << 20  # predict: a file or stdin of phrases
MAX_LINE_BYTES = 1 << 20  # chat: one turn


def read_bounded(stream, limit: int, source: str) -> bytes:
    """All of `stream`, or one line naming `source` when it holds more than `limit` bytes."""
    payload = stream.read(limit + 1)
    if len(payload) > limit:
        raise OrtuneError(
            f"{source}: more than {limit >> 20} MB; classify it in parts (split -l 100000 FILE part.) "
            "or check that it is the file you meant"
        )
    return payload


REBUILD = "rebuild the model (`dvc repro -f build_onnx`) or restore the file"
# what the apps read from ortune.json (written by build_onnx)
TASK_KEYS = ("format", "labels", "max_new_tokens")


def read_json(path: Path) -> dict:
    """A model folder's JSON file, or one line naming the file and what is wrong with it."""
    try:
        loaded = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise OrtuneError(f"{path}: not UTF-8 text (byte {exc.start}); {REBUILD}") from None
    except json.JSONDecodeError as exc:
        raise OrtuneError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {REBUILD}"
        ) from None
    except OSError as exc:
        raise OrtuneError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(loaded, dict):
        raise OrtuneError(f"{path}: holds a {type(loaded).__name__}, not an object; {REBUILD}")
    return loaded


def read_task(model_dir: Path) -> dict:
    path = Path(model_dir) / "ortune.json"
    if not path.is_file():
        raise OrtuneError(
            f"{model_dir}: no ortune.json; build the model with ortune (`dvc repro build_onnx`) "
            "or pass --model with a folder build_onnx wrote"
        )
    task = read_json(path)
    needed = [*TASK_KEYS, *(("prompt_template",) if task.get("format") != "chat" else ())]
    if missing := [key for key in needed if key not in task]:
        raise OrtuneError(f"{path}: no {', '.join(missing)}; {REBUILD}")
    if task["format"] not in ("text", "chat"):
        raise OrtuneError(f"{path}: format={task['format']!r} is neither 'text' nor 'chat'; {REBUILD}")
    if (
        not isinstance(task["labels"], list)
        or not isinstance(task["max_new_tokens"], int)
        or task["max_new_tokens"] < 1
    ):
        raise OrtuneError(f"{path}: labels must be a list and max_new_tokens a positive integer; {REBUILD}")
    return task


def context_length(model_dir: Path) -> int:
    path = model_dir / "genai_config.json"
    try:
        length = int(read_json(path)["model"]["context_length"])
    except (KeyError, TypeError, ValueError):
        raise OrtuneError(f"{path}: no positive integer model.context_length; {REBUILD}") from None
    if length < 1:
        raise OrtuneError(f"{path}: model.context_length={length} must be positive; {REBUILD}")
    return length


class App:
    def __init__(self, model_dir: str | Path = DEFAULT_MODEL, adapter: str | None = "auto"):
        model_dir = self.model_dir = Path(model_dir)
        lastgood.recover(Path.cwd())  # a killed run's half-replaced outputs are put back before reading them
        self.task = read_task(model_dir)
        self.context_length = context_length(model_dir)
        try:
            self.generator = OnnxGenerator(model_dir, adapter=adapter)
        except RuntimeError as exc:
            # onnxruntime-genai's one error type for a config it cannot parse or a model it cannot load
            message = " ".join(str(exc).split())[:300]
            raise OrtuneError(f"{model_dir}: onnxruntime-genai cannot load the model ({message}); {REBUILD}") from None

    def chat_prompt(self, messages: list[dict]) -> str:
        try:
            return self.generator.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except RuntimeError as exc:
            if "chat template" not in str(exc).lower():
                raise
            # a base model (Gemma 3 270M) ships none: genai says only "Empty chat template."
            raise OrtuneError(
                f"{self.model_dir}: the model has no chat template (a base model), so a conversation cannot be "
                "rendered for it; `make predict` asks it with the prompt template it was fine-tuned on"
            ) from None

    def classification_prompt(self, text: str) -> str:
        if self.task["format"] == "chat":
            return self.chat_prompt([{"role": "user", "content": text}])
        field = self.task.get("input_field")
        if not field:
            raise OrtuneError(
                "the model's prompt template has several fields "
                f"({self.task['prompt_template']!r}); predict fills exactly one"
            )
        try:
            return self.task["prompt_template"].format(**{field: text})
        except (KeyError, IndexError, ValueError) as exc:
            raise OrtuneError(
                f"ortune.json: prompt_template {self.task['prompt_template']!r} does not fill from "
                f"{field!r} alone ({type(exc).__name__}: {exc}); {REBUILD}"
            ) from None

    def classify(self, text: str) -> tuple[str | None, str]:
        """(label or None if the generation names none, the raw generation)."""
        prompt = self.classification_prompt(text)
        tokens, room = len(self.generator.tokenizer.encode(prompt)), self.task["max_new_tokens"]
        if tokens + room > self.context_length:
            raise OrtuneError(
                f"the phrase makes a prompt of {tokens} tokens; with the {room} of the answer that is over "
                f"the model's context of {self.context_length}; shorten the phrase"
            )
        generation = self.generator.generate(prompt, room)
        return parse_label(generation.text, self.task["labels"]), generation.text

    def stream(self, prompt: str, max_new_tokens: int):
        """Yield the decoded text piece by piece (greedy), as the model produces it."""
        og, tokenizer = self.generator._og, self.generator.tokenizer
        input_ids = tokenizer.encode(prompt)
        context = self.context_length
        if len(input_ids) >= context:
            raise OrtuneError(
                f"the conversation is {len(input_ids)} tokens, the model's context is {context}; "
                "start a new one (/reset)"
            )
        params = og.GeneratorParams(self.generator.model)
        params.set_search_options(do_sample=False, max_length=min(context, len(input_ids) + max_new_tokens))
        generator = self.generator.new_generator(params)
        generator.append_tokens(input_ids)
        stream = tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            yield stream.decode(int(generator.get_next_tokens()[0]))
        del generator

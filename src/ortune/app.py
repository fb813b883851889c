"""The shipped model as an app: classify phrases (scripts/predict.py) or chat (scripts/chat.py).

Only onnxruntime-genai and the standard library are imported (no torch, transformers or Hydra), so
an app starts in a fraction of a second on the tiny model. Prompts are rendered from the model
folder's ortune.json exactly as training rendered them: the text template, or the chat template
(onnxruntime-genai's renderer, checked against transformers' at build time).
"""

from __future__ import annotations

import json
from pathlib import Path

from ortune.errors import OrtuneError
from ortune.generation import OnnxGenerator
from ortune.metrics import parse_label

DEFAULT_MODEL = "models/onnx"


def read_task(model_dir: Path) -> dict:
    path = Path(model_dir) / "ortune.json"
    if not path.is_file():
        raise OrtuneError(f"{model_dir}: no ortune.json; build the model with ortune (`dvc repro build_onnx`) "
                          "or pass --model with a folder build_onnx wrote")
    return json.loads(path.read_text(encoding="utf-8"))


class App:
    def __init__(self, model_dir: str | Path = DEFAULT_MODEL, adapter: str | None = "auto"):
        model_dir = Path(model_dir)
        self.task = read_task(model_dir)
        self.generator = OnnxGenerator(model_dir, adapter=adapter)
        genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        self.context_length = int(genai["model"]["context_length"])

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.generator.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def classification_prompt(self, text: str) -> str:
        if self.task["format"] == "chat":
            return self.chat_prompt([{"role": "user", "content": text}])
        field = self.task.get("input_field")
        if not field:
            raise OrtuneError("the model's prompt template has several fields "
                              f"({self.task['prompt_template']!r}); predict fills exactly one")
        return self.task["prompt_template"].format(**{field: text})

    def classify(self, text: str) -> tuple[str | None, str]:
        """(label or None if the generation names none, the raw generation)."""
        prompt = self.classification_prompt(text)
        tokens, room = len(self.generator.tokenizer.encode(prompt)), self.task["max_new_tokens"]
        if tokens + room > self.context_length:
            raise OrtuneError(f"the phrase makes a prompt of {tokens} tokens; with the {room} of the answer that is over "
                              f"the model's context of {self.context_length}; shorten the phrase")
        generation = self.generator.generate(prompt, room)
        return parse_label(generation.text, self.task["labels"]), generation.text

    def stream(self, prompt: str, max_new_tokens: int):
        """Yield the decoded text piece by piece (greedy), as the model produces it."""
        og, tokenizer = self.generator._og, self.generator.tokenizer
        input_ids = tokenizer.encode(prompt)
        context = self.context_length
        if len(input_ids) >= context:
            raise OrtuneError(f"the conversation is {len(input_ids)} tokens, the model's context is {context}; "
                              "start a new one (/reset)")
        params = og.GeneratorParams(self.generator.model)
        params.set_search_options(do_sample=False, max_length=min(context, len(input_ids) + max_new_tokens))
        generator = self.generator.new_generator(params)
        generator.append_tokens(input_ids)
        stream = tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            yield stream.decode(int(generator.get_next_tokens()[0]))
        del generator

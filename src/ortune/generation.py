"""Greedy generation with onnxruntime-genai: the runtime the shipped model is judged in."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ortune.errors import OrtuneError


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float


class OnnxGenerator:
    def __init__(self, model_dir: str | Path):
        import onnxruntime_genai as og

        if not (Path(model_dir) / "genai_config.json").is_file():
            raise OrtuneError(f"{model_dir}: no genai_config.json; build the model first (dvc repro build_onnx)")
        self._og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(self, prompt: str, max_new_tokens: int) -> Generation:
        og = self._og
        input_ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(input_ids) + max_new_tokens)
        generator = og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(input_ids)
        new_tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new_tokens.append(int(generator.get_next_tokens()[0]))
        seconds = time.perf_counter() - started
        del generator
        return Generation(self.tokenizer.decode(new_tokens), len(new_tokens), seconds)

"""Greedy generation with onnxruntime-genai (the runtime the shipped model is judged in), and with
transformers for the PyTorch models it is compared with."""

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
    def __init__(self, model_dir: str | Path, *, cpu: bool = False, adapter: str | None = "auto"):
        """`cpu`: run on the CPU whatever provider the model was built for (parity checks of cuda/dml/
        webgpu graphs on a machine without that hardware). `adapter`: for a model built with
        onnx.adapter=separate, the adapter to activate; "auto" = the one its ortune.json names
        (the pipeline's own), None = the bare base model."""
        import onnxruntime_genai as og

        if not (Path(model_dir) / "genai_config.json").is_file():
            raise OrtuneError(f"{model_dir}: no genai_config.json; build the model first (dvc repro build_onnx)")
        self._og = og
        config = og.Config(str(model_dir))
        if cpu:
            config.clear_providers()
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        # encode as transformers' tokenizer(text) does, which training and the PyTorch runtimes use: with the
        # tokenizer's own special tokens (Gemma's <bos>: genai 0.18 leaves them out by default, and Gemma
        # without <bos> answers with noise); a tokenizer that adds none (SmolLM2, the tiny model) is unchanged
        self.tokenizer.update_options(add_special_tokens="true")
        self.adapter_files = _adapter_files(Path(model_dir))
        self.adapters = None
        self.adapter: str | None = None
        if self.adapter_files:
            self.adapters = og.Adapters(self.model)
            for name, path in self.adapter_files.items():
                self.adapters.load(str(path), name)
        self.use_adapter(_task_spec(Path(model_dir)).get("active_adapter") if adapter == "auto" else adapter)

    def use_adapter(self, name: str | None) -> None:
        """Switch the adapter later generations run with (None: the base model alone)."""
        if name is not None and name not in self.adapter_files:
            known = ", ".join(self.adapter_files) or "none: the model was built with onnx.adapter=merged"
            raise OrtuneError(f"adapter '{name}' is not in the model folder (adapters: {known})")
        self.adapter = name

    def new_generator(self, params):
        """An og.Generator with the active adapter set (callers build their own search params)."""
        generator = self._og.Generator(self.model, params)
        if self.adapter is not None:
            generator.set_active_adapter(self.adapters, self.adapter)
        return generator

    def last_logits(self, prompt: str):
        """The logits after the whole prompt (float32 numpy vector), as the runtime computes them."""
        import numpy as np

        input_ids = self.tokenizer.encode(prompt)
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(input_ids) + 1)
        generator = self.new_generator(params)
        generator.append_tokens(input_ids)
        logits = np.array(generator.get_output("logits"), dtype=np.float32)
        del generator
        return logits.reshape(-1, logits.shape[-1])[-1]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(self, prompt: str, max_new_tokens: int) -> Generation:
        og = self._og
        input_ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(input_ids) + max_new_tokens)
        generator = self.new_generator(params)
        started = time.perf_counter()
        generator.append_tokens(input_ids)
        new_tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new_tokens.append(int(generator.get_next_tokens()[0]))
        seconds = time.perf_counter() - started
        del generator
        return Generation(self.tokenizer.decode(new_tokens), len(new_tokens), seconds)

    def token_times(self, prompt: str, new_tokens: int) -> list[float]:
        """Seconds from the prompt text until each of exactly `new_tokens` greedy tokens is out.

        The clock covers what serving one request costs: tokenizing and creating the generator (tens
        of ms for a small model) as well as decoding. The end token is suppressed (min_length), so
        every run decodes the same number of tokens.
        """
        og = self._og
        started = time.perf_counter()
        input_ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        length = len(input_ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = self.new_generator(params)
        generator.append_tokens(input_ids)
        times: list[float] = []
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            times.append(time.perf_counter() - started)
        del generator
        return times


def _task_spec(model_dir: Path) -> dict:
    """The model folder's ortune.json (written by build_onnx), or {} for a folder without one."""
    from ortune.artifacts import read_json

    return read_json(model_dir / "ortune.json", {})


def _adapter_files(model_dir: Path) -> dict[str, Path]:
    return {name: model_dir / rel for name, rel in (_task_spec(model_dir).get("adapters") or {}).items()}


class TorchGenerator:
    """Greedy generation with transformers for the PyTorch models judged beside the ONNX one:
    same prompts, same tokenizer, batched with left padding so each prompt ends where generation starts."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        configured = getattr(model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.end_ids = {int(t) for t in [*configured, tokenizer.eos_token_id] if t is not None}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[Generation]:
        """One padded batch; each row's text stops at its first end token, which counts as generated
        (as onnxruntime-genai counts it). `seconds` is the batch's time shared equally by its rows."""
        import torch

        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - started
        results = []
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.end_ids), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            results.append(Generation(text, end, seconds / len(prompts)))
        return results

    def generate(self, prompt: str, max_new_tokens: int) -> Generation:
        return self.generate_batch([prompt], max_new_tokens)[0]

    def token_times(self, prompt: str, new_tokens: int) -> list[float]:
        """As OnnxGenerator.token_times: exactly `new_tokens` greedy tokens, timed one by one."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Clock(StoppingCriteria):
            # generate calls its stopping criteria once per step, right after choosing the token
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores, **kwargs):
                self.times.append(time.perf_counter() - started)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        clock = Clock()
        started = time.perf_counter()
        batch = self.tokenizer([prompt], return_tensors="pt")
        with torch.inference_mode():
            self.model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        return clock.times

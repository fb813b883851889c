"""The model card build_onnx writes: huggingface_hub's ModelCard with the Hub's metadata block, and the
facts the card states in its text."""

from __future__ import annotations

from huggingface_hub import ModelCard

from ortune import model_card

DATASET = {
    "path": "data/raw/tones.jsonl",
    "sha256": "0" * 64,
    "train_rows": 3,
    "validation_rows": 2,
    "test_rows": 2,
    "train_sha256": "1" * 64,
    "validation_sha256": "2" * 64,
    "test_sha256": "3" * 64,
}
TASK = {"labels": ["a", "b"], "max_new_tokens": 3, "format": "text", "prompt_template": "### {phrase}\n"}
PARITY = {"prompts": 8, "max_abs_logit_diff": 0.0123, "label_agreement": 0.875, "target": "t", "passed": False}


def render(model: dict, **metrics) -> str:
    return model_card.render(
        model={"name": "m", "hub_id": None, "revision": None, "path": None, "resolved_revision": None, **model},
        dataset=DATASET,
        settings={"precision": "int4"},
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": None},
        metrics={"precision": "int4", "execution_provider": "cpu", "size_mb": 1.0, "build_seconds": 2.0, **metrics},
        task=TASK,
    )


def test_the_card_carries_the_hubs_metadata_block_with_the_parity_figures():
    text = render(
        {"hub_id": "org/base", "resolved_revision": "abc123"},
        parity=PARITY,
        adapter_parity={"b": {"skipped": "no CPU kernel"}},
    )
    card = ModelCard(text)
    data = card.data
    assert data.base_model == "org/base" and data.library_name == "onnxruntime-genai"
    assert data.datasets == ["data/raw/tones.jsonl"] and {"onnx", "int4", "lora"} <= set(data.tags)
    results = {(r.task_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {
        ("Parity with PyTorch (model)", "label_agreement"): 0.875,
        ("Parity with PyTorch (model)", "max_abs_logit_diff"): 0.0123,
    }  # the adapter whose parity was not run states no figure
    assert data.eval_results[0].dataset_revision == "0" * 64 and data.eval_results[0].dataset_split == "validation"
    # the text says what it said before the metadata block existed
    assert card.text.startswith("\n# m fine-tuned for a, b (int4/cpu ONNX)\n")
    assert "- Base model: `org/base` at revision `abc123`" in text and "| precision | `int4` |" in text
    assert "| model | 8 | 1.23e-02 | 0.875 | `t` | False |" in text and "not run: no CPU kernel" in text
    # the validation split it was measured on, and the test split the accuracy is reported on, are named
    assert "Parity with PyTorch (validation prompts)" in text and "accuracy on the test split" in text
    with_interval = render({}, parity={**PARITY, "label_agreement_ci95": {"low": 0.625, "high": 1.0}})
    assert "| model | 8 | 1.23e-02 | 0.875 (95 % interval 0.625-1.000) | `t` | False |" in with_interval


def test_a_gguf_or_local_base_names_no_hub_model_and_a_card_without_parity_has_no_model_index():
    gguf = {"gguf_file": "x.gguf", "gguf_package": None, "gguf_sha256": "ab" * 32, "hub_id": "org/ignored"}
    data = ModelCard(render(gguf)).data
    assert data.base_model is None and data.eval_results is None and data.library_name == "onnxruntime-genai"
    assert "model-index" not in data.to_dict() and ModelCard(render({"path": "/local/base"})).data.base_model is None

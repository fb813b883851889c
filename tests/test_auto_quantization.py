"""onnx.quantization=auto and onnx.int8_share on a tiny project: real builds, the nodes the builder emits
at int8, and the choice among candidates (fastest first, the first that keeps the labels ships)."""

from __future__ import annotations

import json

import pytest

import build_onnx
from export_helpers import REPO, make_project, stage_cfg
from ortune import onnx_build, quantize
from ortune.data import SPLITS


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_texts):
    return make_project(tmp_path_factory.mktemp("auto"), tiny_texts)


pytestmark = pytest.mark.usefixtures("in_repo")  # conftest: from the repository root


def bits_by_node(model_dir) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return {
        node.name: next(a.i for a in node.attribute if a.name == "bits")
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


def test_int8_share_upgrades_the_most_sensitive_units_in_the_built_graph(project):
    metrics = build_onnx.run(
        stage_cfg(
            project,
            "precision=int4",
            "onnx.block_size=32",
            "onnx.int8_share=0.4",
            "onnx.require_parity=false",
            "onnx.parity_prompts=4",
            onnx_dir="onnx-mixed",
        )
    )
    bits = bits_by_node(project / "onnx-mixed")
    upgraded = {name.rsplit("_Q", 1)[0] for name, b in bits.items() if b == 8}
    assert upgraded and upgraded == set(metrics["int8_nodes"]), (upgraded, metrics["int8_nodes"])
    assert any(b == 4 for b in bits.values())  # still an int4 model
    # the upgraded ones are the worst under the same measure, recomputed here from the merged model
    from ortune import data, modeling

    model = modeling.load_causal_lm(project / "merged").eval()
    rows = data.read_jsonl(project / "prepared" / "train.jsonl")
    texts = [r["prompt"] + r["completion"] for r in rows][: onnx_build.CALIBRATION_ROWS]
    units = quantize.unit_errors(quantize.output_errors(model, modeling.load_tokenizer(project / "merged"), texts, 32))
    worst = max(units, key=units.get)
    assert set(quantize.unit_nodes(*worst, fused_gate_up=True)) <= upgraded


def test_auto_ships_the_first_candidate_that_keeps_the_labels(project, monkeypatch):
    from ortune import data, evaluation, parity

    real_compare, real_latency = parity.compare, evaluation.measure_latency
    seen = []  # every prompt the choice among candidates read: parity's and the speed run's

    def timed(generator, prompt, *args, **kwargs):
        seen.append(prompt)
        return real_latency(generator, prompt, *args, **kwargs)

    def int4_misses(reference, generator, prompts, labels, max_new_tokens, precision, min_agreement, *args, **kwargs):
        seen.extend(prompts)
        # a random tiny model keeps its labels at int4: make int4 miss the target, as on SmolLM2
        result = real_compare(
            reference, generator, prompts, labels, max_new_tokens, precision, min_agreement, *args, **kwargs
        )
        return {**result, "passed": False} if precision == "int4" else result

    monkeypatch.setattr(parity, "compare", int4_misses)
    monkeypatch.setattr(evaluation, "measure_latency", timed)
    cfg = stage_cfg(
        project,
        "onnx.quantization=auto",
        "onnx.parity_prompts=8",
        "onnx.candidates=[{precision: int4, block_size: 32, int8_share: 0.4}, {precision: int8}, {precision: fp32}]",
        onnx_dir="onnx-auto",
    )
    metrics = build_onnx.run(cfg)
    candidates = metrics["candidates"]
    # tried in order, stopped at the first that passed: fp32 was never built
    assert [(c["precision"], c["passed"]) for c in candidates] == [("int4", False), ("int8", True)]
    assert metrics["shipped_candidate"] == 1 and metrics["precision"] == "int8" and metrics["parity"]["passed"]
    assert candidates[0]["int8_nodes"] > 0 and candidates[1]["int8_nodes"] == 0
    assert all(c["ms_per_token"] > 0 and c["size_mb"] > 0 for c in candidates)
    # the shipped folder holds the int8 build, not the int4 one tried first
    assert set(bits_by_node(project / "onnx-auto").values()) == {8}
    assert "int8" in (project / "onnx-auto" / "README.md").read_text()
    # the choice was made on the validation split: no prompt of the test split (other rows, export_helpers)
    # was read, so the test figures eval reports were never chosen on
    split = {name: {r["prompt"] for r in data.read_jsonl(project / "prepared" / f"{name}.jsonl")} for name in SPLITS}
    assert seen and set(seen) <= split["validation"] and not set(seen) & split["test"]


def test_auto_with_no_candidate_meeting_the_target_fails_the_stage_naming_each(project, monkeypatch):
    from ortune import parity
    from ortune.errors import OrtuneError

    real_compare = parity.compare
    monkeypatch.setattr(parity, "compare", lambda *a, **k: {**real_compare(*a, **k), "passed": False})
    cfg = stage_cfg(
        project,
        "onnx.quantization=auto",
        "onnx.parity_prompts=4",
        "onnx.candidates=[{precision: int4}, {precision: int8}]",
        onnx_dir="onnx-auto-none",
    )
    with pytest.raises(OrtuneError, match=r"parity with PyTorch: .*candidate 0 \(int4\) kept [01]\.\d+"):
        build_onnx.run(cfg)
    assert not (project / "onnx-auto-none").exists()  # nothing half-shipped


def test_a_cpu_graph_that_onnxruntime_cannot_load_fails_the_stage(project, monkeypatch):
    from ortune import parity
    from ortune.errors import OrtuneError

    monkeypatch.setattr(
        parity, "runnable_on_cpu", lambda folder: "Type Error: Type (tensor(uint8)) of output arg does not match"
    )
    with pytest.raises(
        OrtuneError, match=r"int8/cpu graph the builder wrote does not load in onnxruntime \(Type Error"
    ):
        build_onnx.run(stage_cfg(project, "precision=int8", "onnx.parity_prompts=2", onnx_dir="onnx-unloadable"))
    assert not (project / "onnx-unloadable").exists()
    # a cuda graph is only reported: its ops may have no CPU kernels here
    metrics = build_onnx.run(
        stage_cfg(
            project, "precision=int4", "onnx.execution_provider=cuda", "onnx.parity_prompts=2", onnx_dir="onnx-cuda"
        )
    )
    assert metrics["parity"]["passed"] is None and "no CPU kernel" in metrics["parity"]["skipped"]


def test_asymmetric_int4_with_tied_embeddings_is_refused_before_building(tmp_path):
    from ortune import config, export
    from ortune.errors import OrtuneError

    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    settings = lambda *o: config.validate(config.compose(["model=tiny-phi3", *o], config_dir=REPO / "conf"), "t").onnx  # noqa: E731
    with pytest.raises(OrtuneError, match="is_symmetric=false with a model that ties its embeddings"):
        export.check_tied_asymmetric(tmp_path, "int4", settings("+onnx.extra_options.is_symmetric=false"))
    # symmetric, unshared, int8 or untied: allowed
    export.check_tied_asymmetric(tmp_path, "int4", settings())
    export.check_tied_asymmetric(
        tmp_path,
        "int4",
        settings("+onnx.extra_options.is_symmetric=false", "+onnx.extra_options.shared_embeddings=false"),
    )
    export.check_tied_asymmetric(tmp_path, "int8", settings("+onnx.extra_options.is_symmetric=false"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    export.check_tied_asymmetric(tmp_path, "int4", settings("+onnx.extra_options.is_symmetric=false"))

"""Results: results.json keeps one run per CPU family; results.md and the README's table render them,
judging the goals per family."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from ortune.artifacts import read_json
from ortune_bench import ROOT
from ortune_bench.machine import CONTENDED_CORES, MAX_TRIES, cpu_family
from ortune_bench.models import FULL, MODELS
from ortune_bench.pipeline import PIPELINES

# judged per CPU family on the random bench model (decode) and on the pipeline tables (no-op repro)
GOALS = {"speedup_vs_torch_fp32": 7.0, "percent_of_floor": 85.0, "noop_repro_s": 1.0}
CPU_TIME_1_THREAD = "cpu_time_1_thread"  # a decode section recorded by bench/cpu_decode.py --record
QUICK_NOTE = (
    " (QUICK: small model, few tokens and repeats; its quantized weights fit in the CPU caches, so % of "
    "floor can pass 100: QUICK checks that the benchmark works, not the hardware)"
)


def family_of(run: dict) -> dict:
    """A run's CPU family; runs recorded before families were (family/model only in cpu_detail) too."""
    machine = run.get("machine", {})
    if machine.get("cpu_family"):
        return machine["cpu_family"]
    found = re.search(r"family (\d+) model (\d+)", machine.get("cpu_detail", ""))
    cpu = machine.get("cpu", "")
    vendor = "AuthenticAMD" if re.search(r"\bAMD\b", cpu) else "GenuineIntel" if "Intel" in cpu else cpu
    old_isa = {"AVX2": "avx2", "AVX-512": "avx512f", "VNNI": "avx512_vnni", "BF16": "avx512_bf16"}
    flags = [old_isa[word] for word in machine.get("cpu_detail", "").split(", ")[-1].split() if word in old_isa]
    return (
        cpu_family(vendor, int(found.group(1)), int(found.group(2)), flags=flags)
        if found
        else cpu_family(vendor, -1, -1)
    )


def decode_sections(run: dict) -> list[dict]:
    """A run's decode results, one per model (runs recorded before the real model held one, unnamed)."""
    decode = run.get("decode") or []
    return [{**decode, "model": {"name": "random", **decode["model"]}}] if isinstance(decode, dict) else decode


def merge_results(recorded: dict, run: dict) -> dict:
    """results.json: {"families": {family name: its latest run}}. A run replaces its own family's entry
    only; a file from before families were recorded becomes its family's entry."""
    families = dict(recorded.get("families") or {})
    if "decode" in recorded:
        families[family_of(recorded)["name"]] = recorded
    families[family_of(run)["name"]] = run
    return {"families": dict(sorted(families.items()))}


def load_results(path: Path) -> dict:
    return read_json(path, {})


def met(condition: bool) -> str:
    return "met" if condition else "not met"


def goals_line(int4: dict, family: str) -> str:
    return (
        f"Goals on {family}: ≥ {GOALS['speedup_vs_torch_fp32']:.0f}× PyTorch fp32 "
        f"({met((int4.get('speedup_vs_torch_fp32') or 0) >= GOALS['speedup_vs_torch_fp32'])}), "
        f"≥ {GOALS['percent_of_floor']:.0f} % of floor ({met(int4['percent_of_floor'] >= GOALS['percent_of_floor'])})."
    )


def decode_markdown(section: dict, family: str, quick: bool, compact: bool = False) -> list[str]:
    model = section["model"]
    spec = MODELS.get(model.get("name") or "random", FULL)
    bandwidth = section["copy_bandwidth_gb_s"]
    samples = bandwidth.get("samples") or [bandwidth["used"]]
    one_thread = section.get("timing") == CPU_TIME_1_THREAD
    if one_thread:  # bench/cpu_decode.py --record: a shared machine, one core, CPU time
        others = section.get("others_cores") or []
        load = f" while other processes used {statistics.median(others):.1f} cores" if others else ""
        lines = [
            f"**One thread per engine, CPU time** (not a `make bench` run: the machine was shared{load}; "
            "`bench/cpu_decode.py --record`): ms/token = CPU time of the decoding thread per token "
            f"(a {section['new_tokens']}-token decode minus a {section.get('short_tokens', 8)}-token one), "
            f"batch 1, greedy, {spec.describe(model)}"
            + (
                "."
                if compact
                else f"; median of {section['repeats']} interleaved rounds after a warm-up round. Floor = bytes read "
                f"per token / what one core copies per CPU second ({bandwidth['used']:.1f} GB/s, median of "
                f"{len(samples)}, {min(samples):.0f}-{max(samples):.0f})."
            ),
            "",
        ]
    else:
        lines = [
            f"Decode, batch 1, greedy, {section['new_tokens']} new tokens, {spec.describe(model)}"
            + (
                "."
                if compact
                else f"; median of {section['repeats']} interleaved runs after {section['warmup_rounds']} warm-up "
                f"rounds. Floor = bytes read per token / copy bandwidth ({bandwidth['used']:.1f} GB/s: median "
                f"of {len(samples)} measurements in the same run, {min(samples):.0f}-{max(samples):.0f} GB/s)."
            ),
            "",
        ]
    lines += [
        "| engine | tok/s | ms/token | × PyTorch fp32 | MB read/token | floor ms/token | % of floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in section["engines"]:
        speedup = f"{row['speedup_vs_torch_fp32']:.2f}×" if row["speedup_vs_torch_fp32"] else "-"
        lines.append(
            f"| {row['engine']} | {row['tokens_per_s']:.1f} | {row['ms_per_token']:.2f} | {speedup} | "
            f"{row['bytes_per_token'] / 1e6:.0f} | {row['floor_ms_per_token']:.2f} | "
            f"{row['percent_of_floor']:.0f} % |"
        )
    int4 = next((r for r in section["engines"] if r["engine"] == "genai int4"), None)
    contended = {r["engine"]: r.get("contended_runs", 0) for r in section["engines"] if r.get("contended_runs")}
    if not compact and not one_thread:
        lines += [
            "",
            "Contention: "
            + (
                ", ".join(f"{name} {count} of {section['repeats']}" for name, count in contended.items())
                + f" timed runs had other processes using > {CONTENDED_CORES} cores even after {MAX_TRIES} tries"
                " (shared machine: treat those engines' figures as pessimistic)."
                if contended
                else f"every timed run had other processes using ≤ {CONTENDED_CORES} cores."
            ),
        ]
    if not compact:
        if int4:
            settings = int4["settings"]
            quant, session = settings.get("quantization", {}), settings.get("session_options", {})
            extra = ", ".join(f"{k} {v}" for k, v in session.items() if k != "intra_op_num_threads")
            lines += [
                "",
                f"genai int4 = ortune's defaults: block_size {quant.get('block_size')}, accuracy_level "
                f"{quant.get('accuracy_level')}, {'asymmetric' if quant.get('zero_points') else 'symmetric'}, "
                f"gate/up {'fused' if settings.get('fused_gate_up') else 'separate'}, "
                + (
                    "1 intra-op thread for this measurement (ortune's genai_config.json: all cores)"
                    if one_thread
                    else f"{session.get('intra_op_num_threads')} intra-op threads"
                    if session.get("intra_op_num_threads")
                    else "intra-op threads on every core"
                )
                + f"{', ' + extra if extra else ''}.",
            ]
    if int4 and model.get("name") == "random":
        lines += [
            "",
            goals_line(int4, family)
            + (" (QUICK: not a verdict.)" if quick else "")
            + (
                " (1 thread, CPU time: the ratio as measured on one core; the % of floor against one core's "
                "copy bandwidth.)"
                if one_thread
                else ""
            ),
        ]
    elif int4 and int4.get("speedup_vs_torch_fp32"):
        lines += [
            "",
            f"No goal is set on this model: int4 decodes {int4['speedup_vs_torch_fp32']:.1f}× faster than "
            f"PyTorch fp32 at {int4['percent_of_floor']:.0f} % of its floor (where the time goes: "
            "bench/NOTES.md).",
        ]
    return lines + [""]


def pipeline_markdown(pipeline) -> list[str]:
    """The pipeline tables: a list of runs (one per entry of PIPELINES), or one run as recorded before
    the real model became the default (the tiny model then, goal 90 s)."""
    if pipeline is None or "skipped" in pipeline:
        return [f"Pipeline: {pipeline['skipped'] if pipeline else 'skipped'}.", ""]
    tiny_goal = next(goal for name, _, goal in PIPELINES if name == "tiny")
    runs = pipeline if isinstance(pipeline, list) else [{"name": "tiny", "goal_s": tiny_goal, **pipeline}]
    return [line for run in runs for line in _one_pipeline_markdown(run)]


def _one_pipeline_markdown(pipeline: dict) -> list[str]:
    def cell(value, form, missing="(not reported)"):
        return form.format(value) if value is not None else missing

    order = {name: index for index, name in enumerate(_dvc_stages())}  # results.json sorts its keys
    stages = ", ".join(
        f"{name} {seconds:.1f} s"
        for name, seconds in sorted(pipeline["stages_s"].items(), key=lambda item: order.get(item[0], len(order)))
    )
    agreement = pipeline["label_agreement"]
    same = (
        "greedy outputs identical to PyTorch fp32's (validation prompts, build_onnx gate)"
        if pipeline.get("free_text")
        else "label agreement with PyTorch fp32 (build_onnx parity: validation prompts since the three-way split)"
    )
    target = "≥ 95 %" if pipeline.get("free_text") else "≥ 98 %"
    command = f'`make all ARGS="{pipeline["overrides"]}"`' if pipeline.get("overrides") else "`make all`"
    model = f", {pipeline['model']}" if pipeline.get("model") else ""
    goal = pipeline["goal_s"]
    met = "met" if pipeline["make_all_s"] <= goal else "not met"
    return [
        f"| pipeline ({pipeline['name']}{model}) | measured | goal |",
        "|---|---:|---:|",
        f"| {command} from clean, wall (imports included) | {pipeline['make_all_s']:.1f} s | ≤ {goal:.0f} s ({met}) |",
        f"| no-op `dvc repro` | {pipeline['noop_repro_s']:.2f} s | ≤ {GOALS['noop_repro_s']:.0f} s |",
        f"| no-op `make all` (`dvc exp run`) | {pipeline['noop_make_all_s']:.1f} s | |",
        f"| training tokens/s | {cell(pipeline['train_tokens_per_s'], '{:.0f}')} | |",
        f"| padding waste | {cell(pipeline['padding_waste'], '{:.1%}')} | |",
        f"| shipped model's {same} | {cell(agreement['int4_vs_torch_fp32'], '{:.1%}')} of {agreement['n']} "
        f"| {target} |",
        *_headline_rows(pipeline.get("headline")),
        "",
        f"Per stage: {stages}; outside the stages (make, DVC start-up and hashing): "
        f"{pipeline['outside_stages_s']:.1f} s. Other processes used {pipeline.get('make_all_other_cores', 0):.1f} "
        "cores on average during `make all`.",
        "",
    ]


def _headline_rows(headline: dict | None) -> list[str]:
    """The run's own headline on the test split, beside its strongest baseline (recorded since issue 21)."""
    if not headline or headline.get("value") is None:
        return []
    name = headline["metric"].replace("_", " ")
    ci = headline.get("ci95") or {}
    interval = f" ({ci['low']:.3f}-{ci['high']:.3f})" if "low" in ci and "high" in ci else ""
    rows = [f"| shipped model's {name}, test split (n = {headline.get('n')}) | {headline['value']:.3f}{interval} | |"]
    if headline.get("gain_over_strongest_baseline") is not None:
        rows.append(
            f"| gain over the strongest baseline ({headline.get('strongest_baseline')}) "
            f"| {headline['gain_over_strongest_baseline']:+.3f} | |"
        )
    return rows


def _dvc_stages() -> list[str]:
    import yaml

    try:
        return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


def render_markdown(run: dict, compact: bool = False) -> str:
    """One run (one CPU family): every model's decode table and, unless `compact` (the README), the
    contention, settings and pipeline details."""
    machine = run["machine"]
    family = family_of(run)
    detail = f": {', '.join(family['isa'])}" if family.get("isa") else ""
    l3 = f", L3 {machine['l3_cache']}" if machine.get("l3_cache") else ""
    lines = [
        f"### {family['name']}",
        "",
        f"Measured {run['date']} on {machine['cpu']} (family {family['family']} model {family['model']}{detail}), "
        f"{machine['cores']} cores{l3}, {machine['ram_gib']} GiB RAM, CPU only"
        + (f", transparent huge pages {machine['transparent_hugepage']}" if machine.get("transparent_hugepage") else "")
        + (f" (GLIBC_TUNABLES {machine['glibc_tunables']})" if machine.get("glibc_tunables") else "")
        + f"{QUICK_NOTE if run['quick'] else ''}.",
        "",
    ]
    sections = decode_sections(run)
    if compact:  # the README (200 lines at most) shows the model the goals are judged on; results.md shows all
        sections = [section for section in sections if section["model"].get("name") == "random"] or sections
    for section in sections:
        lines += decode_markdown(section, family["name"], run["quick"], compact)
    if not compact:
        lines += pipeline_markdown(run.get("pipeline"))
        lines.append("GPU: none in this run (CPU-only machine); GPU engines not measured.")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_results(results: dict, compact: bool = False) -> str:
    """Every CPU family's latest run; the goals are judged per family."""
    families = results.get("families") or {}
    one_thread = [
        name
        for name, run in families.items()
        if all(section.get("timing") == CPU_TIME_1_THREAD for section in decode_sections(run))
    ]
    head = (
        f"Decode speed per CPU family: the latest `make bench` on each family measured so far "
        f"({', '.join(families) or 'none'})"
        + (
            f", except {', '.join(one_thread)}: no quiet `make bench` there yet, so one thread per engine in CPU "
            "time (`bench/cpu_decode.py --record`)"
            if one_thread
            else ""
        )
        + f"; the goals (≥ {GOALS['speedup_vs_torch_fp32']:.0f}× PyTorch fp32, "
        f"≥ {GOALS['percent_of_floor']:.0f} % of the floor for int4) are judged per family on the random bench "
        "model."
        + (
            " The real models (SmolLM2, and Gemma 3 where installed), pipeline timings, contention and settings: "
            "[bench/results.md](bench/results.md)."
            if compact
            else ""
        )
    )
    return "\n".join([head, "", *(render_markdown(run, compact) for run in families.values())])


README_MARKERS = ("<!-- bench:results:start -->", "<!-- bench:results:end -->")


def update_readme(markdown: str, readme: Path | None = None) -> bool:
    """Put the latest full results between the README's markers (its "Benchmark" section)."""
    start, end = README_MARKERS
    readme = readme or ROOT / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{markdown}{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    return True

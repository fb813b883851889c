"""Training settings without training: every key typed, validated and passed to the trainer; the
launchers' command lines; checkpoint bookkeeping; chat rendering shared by training and inference."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ortune import checkpoints, config, data, launch, modeling
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]


def full(*overrides: str):
    """The config on the tiny model unless an override names another."""
    tiny = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny-phi3"]
    return config.validate(config.compose([*tiny, *overrides], config_dir=REPO / "conf"), "test")


def test_defaults_are_the_seed_workflows():
    cfg = full()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (64, 64, 0.1, "none")
    assert cfg.train.method == "lora" and cfg.train.loss == "completion"
    assert (cfg.train.qlora.quant_type, cfg.train.qlora.double_quant) == ("nf4", True)
    for model in ("phi3-mini-4k", "phi3.5-mini"):
        assert sorted(full(f"model={model}").lora.target_modules) == ["o_proj", "qkv_proj"]
    gpu = full("train=gpu", "model=phi3-mini-4k")
    assert gpu.train.method == "qlora" and gpu.train.qlora.compute_dtype == "bfloat16" and gpu.train.bf16


def test_every_train_key_reaches_the_trainer(tmp_path):
    from ortune import training

    schema = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert schema == {*training.SAME_NAME, *training.TRANSLATED, *training.BEFORE_TRAINER}
    unusual = {
        "learning_rate": 3e-4,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 2.5,
        "max_steps": 7,
        "per_device_train_batch_size": 3,
        "per_device_eval_batch_size": 5,
        "gradient_accumulation_steps": 2,
        "max_length": 99,
        "logging_steps": 3,
        "eval_steps": 4,
        "save_total_limit": 3,
        "adam_beta2": 0.95,
        "max_grad_norm": 0.3,
        "bf16": True,
    }
    assert set(unusual) == set(training.SAME_NAME)
    cfg = full(
        *(f"train.{k}={v}" for k, v in unusual.items()),
        "train.seed=5",
        "train.data_seed=9",
        "train.warmup_ratio=0",
        "train.warmup_steps=6",
        "train.group_by_length=false",
        "train.eval_strategy=steps",
        "train.save_steps=11",
        "train.loss=full",
        "train.gradient_checkpointing=true",
    )
    args = training.sft_config(cfg, tmp_path, has_eval=True)
    for key, value in unusual.items():
        assert getattr(args, key) == value, key
    assert (args.seed, args.data_seed, args.warmup_steps) == (5, 9, 6)
    assert args.train_sampling_strategy == "random" and args.eval_strategy == "steps"
    assert args.save_strategy == "steps" and args.save_steps == 11
    assert args.completion_only_loss is False and args.gradient_checkpointing is True
    assert args.use_cpu and args.report_to == []

    defaults = training.sft_config(full(), tmp_path, has_eval=False)
    assert defaults.seed == defaults.data_seed == 42  # null falls back to the top-level seed
    assert defaults.warmup_steps == 0.05 and defaults.train_sampling_strategy == "group_by_length"
    assert defaults.eval_strategy == "no" and defaults.completion_only_loss is True
    assert defaults.gradient_checkpointing is False and defaults.bf16 is False
    assert training.sft_config(full("train.save_steps=0"), tmp_path, has_eval=False).save_strategy == "no"


def test_same_name_keys_are_sftconfigs_own_and_a_key_trl_lacks_stops_training(tmp_path, monkeypatch):
    from trl import SFTConfig

    from ortune import training

    assert set(training.SAME_NAME) <= {f.name for f in dataclasses.fields(SFTConfig)}
    # as if TRL renamed max_length: the key would reach no argument, so sft_config refuses, naming it
    monkeypatch.setattr(training, "SAME_NAME", tuple(k for k in training.SAME_NAME if k != "max_length"))
    with pytest.raises(OrtuneError, match=r"^train\.max_length: trl [\d.]+'s SFTConfig has no argument") as caught:
        training.sft_config(full(), tmp_path, has_eval=False)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.lora_alpha=64", "lora.alpha"),
        ("train.evaluation_strategy=steps", "train.eval_strategy"),
        ("train.max_seq_length=512", "train.max_length"),
        ("train.lr=1e-4", "train.learning_rate"),
        ("train.batchsize=4", "train.batchsize"),
    ],
)
def test_unknown_keys_fail_naming_them_and_the_new_name(override, needle):
    with pytest.raises(OrtuneError) as caught:
        full(override)
    message = str(caught.value)
    assert needle in message and override.split("=")[0] in message and "\n" not in message


def test_cookbook_key_in_params_yaml_is_refused_not_ignored(tmp_path):
    composed = config.compose([], config_dir=REPO / "conf")
    composed["lora"]["lora_alpha"] = composed["lora"].pop("alpha")
    with pytest.raises(OrtuneError, match=r"lora\.lora_alpha.*ortune calls it lora\.alpha"):
        config.validate(composed, "params.yaml")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.method=qlora4", "train.method"),
        ("train.loss=prompt", "train.loss"),
        ("train.eval_strategy=always", "train.eval_strategy"),
        ("train.lr_scheduler_type=cosine_with_min_lr", "train.lr_scheduler_type"),
        ("train.qlora.quant_type=int4", "train.qlora.quant_type"),
        ("train.qlora.compute_dtype=float8", "train.qlora.compute_dtype"),
        ("train.qlora.quant_storage=int3", "train.qlora.quant_storage"),
        ("lora.bias=some", "lora.bias"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        ("train.warmup_steps=10", "train.warmup_steps"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.adam_beta2=1.0", "train.adam_beta2"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("train.save_steps=-1", "train.save_steps"),
        ("train.launcher=mpirun", "train.launcher"),
        ("train.node_rank=1", "train.node_rank"),
        ("train.accelerate_config=conf/train/accelerate/fsdp.yaml", "train.accelerate_config"),
        ("train.seed=-1", "train.seed"),
        ("train.group_by_length=maybe", "train.group_by_length"),
        ("data.format=sharegpt", "data.format"),
    ],
)
def test_bad_training_settings_fail_in_one_line(override, needle):
    with pytest.raises(OrtuneError) as caught:
        full(override)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# --- launching


def test_torchrun_command_single_and_multi_node():
    one = launch.command(full("train.num_processes=2").train, "s.py", ["lora.r=8"], cuda=False)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "s.py", "lora.r=8"]
    multi = launch.command(
        full("train.num_processes=4", "train.num_nodes=2", "train.node_rank=1", "train.master_addr=10.0.0.1").train,
        "s.py",
        [],
        cuda=True,
    )
    assert multi[multi.index("--nnodes") + 1] == "2" and multi[multi.index("--node_rank") + 1] == "1"
    assert multi[multi.index("--master_addr") + 1] == "10.0.0.1" and "--standalone" not in multi


def test_accelerate_is_refused_on_cpu_and_gets_the_config_file_on_gpus():
    train = full("train.num_processes=2", "train.launcher=accelerate").train
    with pytest.raises(OrtuneError, match="silently runs one process"):
        launch.command(train, "s.py", [], cuda=False)
    fsdp = full(
        "train.num_processes=8", "train.launcher=accelerate", "train.accelerate_config=conf/train/accelerate/fsdp.yaml"
    ).train
    cmd = launch.command(fsdp, "s.py", [], cuda=True)
    assert cmd[cmd.index("--config_file") + 1] == "conf/train/accelerate/fsdp.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "8"


def test_a_launcher_that_starts_too_few_processes_is_caught(monkeypatch):
    train = full("train.num_processes=2").train
    with pytest.raises(OrtuneError, match="launches the processes"):
        launch.check_world_size(train)  # asked for 2, not launched at all
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(OrtuneError, match="asks for 2 processes but the launcher started 1"):
        launch.check_world_size(train)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.check_world_size(train) == 2


@pytest.mark.parametrize(("name", "kind"), [("fsdp.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_accelerate_config_files_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "conf/train/accelerate" / name
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == kind
    assert yaml.safe_load(path.read_text())["compute_environment"] == "LOCAL_MACHINE"


# --- checkpoints


def test_fingerprint_follows_settings_and_inputs_but_not_paths(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    view = lambda *o: config.stage_view(full(*o), config.declared_params("train_qlora", REPO / "dvc.yaml"))  # noqa: E731
    base = checkpoints.fingerprint(view(), [tmp_path])
    assert checkpoints.fingerprint(view("paths.adapter=/elsewhere", "wandb.mode=disabled"), [tmp_path]) == base
    assert checkpoints.fingerprint(view("lora.r=8"), [tmp_path]) != base
    assert checkpoints.fingerprint(view("train.num_processes=2"), [tmp_path]) != base
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    assert checkpoints.fingerprint(view(), [tmp_path]) != base


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}) if complete else '{"global_st')
    return path


def test_resume_picks_the_latest_complete_checkpoint_of_this_run_only(tmp_path):
    mine = checkpoints.checkpoint_dir(tmp_path / "adapter", "a" * 64)
    other = checkpoints.checkpoint_dir(tmp_path / "adapter", "b" * 64)
    assert mine.parent == other.parent == tmp_path / ".checkpoints"
    _checkpoint(mine, 10)
    _checkpoint(mine, 20)
    _checkpoint(mine, 30, complete=False)  # killed while writing
    _checkpoint(other, 40)
    assert checkpoints.resumable_checkpoint(mine, world_size=1, tidy=False) == mine / "checkpoint-20"
    assert checkpoints.resumable_checkpoint(mine, world_size=2, tidy=False) is None  # rng states of 2 ranks missing
    assert checkpoints.resumable_checkpoint(mine, world_size=1, tidy=True) == mine / "checkpoint-20"
    assert not other.exists() and not (mine / "checkpoint-30").exists()
    checkpoints.remove_checkpoints(mine)
    assert not (tmp_path / ".checkpoints").exists()


def test_tidying_keeps_the_checkpoints_of_a_run_still_training(tmp_path):
    """Another configuration's checkpoints go only once the process training into them is gone."""
    import subprocess

    from ortune import artifacts

    live = subprocess.Popen(["sleep", "60"])
    finished = subprocess.Popen(["true"])
    finished.wait()
    try:
        mine, running, dead, old = (checkpoints.checkpoint_dir(tmp_path / "adapter", c * 64) for c in "abcd")
        for folder, owner in ((running, live.pid), (dead, finished.pid)):
            _checkpoint(folder, 10)
            (folder / checkpoints.CHECKPOINT_OWNER).write_text(f"{artifacts.HOST}-{owner}\n")
        _checkpoint(old, 10)  # no owner recorded: left by an earlier ortune
        assert checkpoints.resumable_checkpoint(mine, world_size=1, tidy=True) is None
        assert running.exists() and not dead.exists() and not old.exists()
        assert (mine / checkpoints.CHECKPOINT_OWNER).read_text() == f"{artifacts.HOST}-{os.getpid()}\n"
    finally:
        live.kill()
        live.wait()


def test_checkpoints_are_ignored_by_git_and_dvc():
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", "models/.checkpoints/adapter-0/x"], cwd=REPO)
    assert ignored.returncode == 0
    assert "models/.checkpoints" in (REPO / ".dvcignore").read_text()


# --- data formats


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_texts):
    out = tmp_path_factory.mktemp("tok")
    modeling.train_tiny_tokenizer(tiny_texts, 300).save_pretrained(out)
    return out


def test_chat_rows_render_in_phi3_format_from_the_models_template(tokenizer_dir):
    row = data.render_chat(
        {"question": "Is ice cold?", "answer": "yes", "topic": "physics"}, "question", "answer", "answer"
    )
    assert row["prompt"] == [{"role": "user", "content": "Is ice cold?"}]
    assert row["completion"] == [{"role": "assistant", "content": "yes"}] and row["label"] == "yes"
    assert data.prompt_text(row["prompt"], tokenizer_dir) == "<|user|>\nIs ice cold?<|end|>\n<|assistant|>\n"
    assert data.prompt_text("### Text: hi\n", tokenizer_dir) == "### Text: hi\n"  # text prompts pass through


def test_columns_drive_both_formats(make_cfg):
    text = make_cfg("data.input_column=question", "data.output_column=answer").data
    assert text.template.prompt == "### Text: {question}\n### The tone is:\n" and text.label_field == "answer"
    chat = make_cfg("data.format=chat", "data.input_column=question", "data.output_column=answer").data
    assert data.input_output_fields(chat) == (["question"], ["answer"], "data.input_column/data.output_column")


def test_prepare_data_writes_chat_rows_for_a_question_answer_dataset(make_cfg, tmp_path):
    import prepare_data

    source = tmp_path / "qa.jsonl"
    answers = {
        "yes": ["Is fire hot", "Is the sea salty", "Do fish swim", "Is snow white"],
        "no": ["Is ice hot", "Do cats bark", "Is the sun cold", "Can stones fly"],
    }
    source.write_text(
        "".join(json.dumps({"question": f"{q}?", "answer": a}) + "\n" for a, qs in answers.items() for q in qs)
    )
    cfg = make_cfg(
        f"data.path={source}",
        "data.format=chat",
        "data.input_column=question",
        "data.output_column=answer",
        "data.test_fraction=0.25",
    )
    metrics = prepare_data.run(cfg)
    assert (metrics["train_rows"], metrics["validation_rows"], metrics["test_rows"]) == (4, 2, 2)
    assert metrics["train_test_overlap"] == metrics["train_validation_overlap"] == 0
    row = data.read_jsonl(tmp_path / "prepared" / "train.jsonl")[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("?")
    assert row["completion"] == [{"role": "assistant", "content": row["label"]}]
    with pytest.raises(OrtuneError, match=r"no field 'query' named by data\.input_column"):
        prepare_data.run(
            make_cfg(f"data.path={source}", "data.format=chat", "data.input_column=query", "data.output_column=answer")
        )


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_texts):
    out = tmp_path_factory.mktemp("tiny-base")
    tiny = OmegaConf.create(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "vocab_size": 300,
        }
    )
    modeling.build_tiny_phi3(tiny, tiny_texts, seed=0, out_dir=out)
    return out


def test_lora_settings_reach_peft_and_unknown_modules_are_named(tiny_base):
    from ortune import training

    model = modeling.load_causal_lm(tiny_base)
    lora = full(
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.05",
        "lora.bias=lora_only",
        "lora.target_modules=[o_proj]",
        "lora.modules_to_save=[lm_head]",
    ).lora
    peft = training.peft_config(lora, model)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.bias) == (8, 16, 0.05, "lora_only")
    assert set(peft.target_modules) == {"o_proj"} and list(peft.modules_to_save) == ["lm_head"]
    with pytest.raises(OrtuneError, match=r"lora\.target_modules: q_proj not in this model.*qkv_proj"):
        training.peft_config(full("lora.target_modules=[q_proj]").lora, model)
    with pytest.raises(OrtuneError, match=r"lora\.modules_to_save: wte not in this model"):
        training.peft_config(full("lora.modules_to_save=[wte]").lora, model)


@pytest.mark.parametrize("override", ["lora.target_modules=all-linear", "lora.target_modules=[all-linear]"])
def test_all_linear_reaches_peft_and_adapts_every_linear_layer_but_the_head(override, tiny_base):
    from peft import get_peft_model

    from ortune import training

    model = modeling.load_causal_lm(tiny_base)
    peft = training.peft_config(full(override).lora, model)
    assert peft.target_modules == "all-linear"  # PEFT's shorthand works only as a string
    adapted = get_peft_model(model, peft)
    leaves = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in adapted.named_parameters() if ".lora_A" in name
    }
    assert leaves == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with pytest.raises(OrtuneError, match=r"all-linear already names every linear layer; list it alone"):
        training.peft_config(full("lora.target_modules=[all-linear,o_proj]").lora, model)


def test_separate_adapters_compare_targets_by_layer_name_as_all_linear_saves_full_paths():
    from ortune import onnx_adapters

    # what PEFT writes to adapter_config.json for all-linear: every module's full path
    expanded = [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    onnx_adapters.check_targets(
        {"default": {"target_modules": expanded}, "b": {"target_modules": ["o_proj"]}}, "default"
    )
    with pytest.raises(OrtuneError, match=r"onnx.extra_adapters.b: adapts down_proj, gate_up_proj, qkv_proj"):
        onnx_adapters.check_targets(
            {"default": {"target_modules": ["o_proj"]}, "b": {"target_modules": expanded}}, "default"
        )


def test_qlora_loads_the_base_in_4bit_with_the_configured_quantization(tiny_base):
    import torch

    qlora = full("train.qlora.quant_type=fp4", "train.qlora.double_quant=false").train.qlora
    model = modeling.load_causal_lm(tiny_base, quantization=qlora)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "fp4"
    assert layer.weight.quant_state.nested is False and layer.compute_dtype == torch.float32
    assert type(model.lm_head).__name__ == "Linear"  # the head stays in full precision
    nf4 = modeling.load_causal_lm(tiny_base, quantization=full().train.qlora).model.layers[0].self_attn.o_proj
    assert nf4.weight.quant_state.quant_type == "nf4" and nf4.weight.quant_state.nested is True


def test_every_lora_key_reaches_peft_under_peft_s_own_name():
    from ortune import training
    from ortune.settings.lora import LoraConfig

    names = {f.name: training.peft_name(f.name) for f in dataclasses.fields(LoraConfig)}
    assert names == {
        "r": "r",
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
        "bias": "bias",
        "target_modules": "target_modules",
        "modules_to_save": "modules_to_save",
    }
    with pytest.raises(OrtuneError, match=r"^lora\.rank: peft \S+'s LoraConfig has no field rank or lora_rank"):
        training.peft_name("rank")

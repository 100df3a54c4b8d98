"""The accelerate config files in `training/accelerate/`: each parses with accelerate's own loader, every nested key
is an `accelerate launch` option, the launcher turns each file into the intended plugin (checked down to the
FSDP / DeepSpeed plugin objects, without GPUs), and `ddp.yaml` really trains with 2 processes on CPU.
"""

import json
import logging
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_workers import launch_and_wait  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "accelerate"
# file -> (distributed type, processes, launcher flag that the file must switch on)
EXPECTED = {
    "default.yaml": ("NO", 1, None),
    "single_gpu.yaml": ("NO", 1, None),
    "ddp.yaml": ("MULTI_GPU", 8, "multi_gpu"),
    "fsdp.yaml": ("FSDP", 8, "use_fsdp"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, "use_deepspeed"),
}
# default.yaml (the README's commands) must run anywhere, CPU included: full precision; the GPU files use bf16
MIXED_PRECISION = {name: "no" if name == "default.yaml" else "bf16" for name in EXPECTED}


def _launch_args(name, *extra):
    """`accelerate launch --config_file <file> [extra] train.py` after the launcher's own validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(CONFIGS / name), *extra, "training/train.py", "--config", "x.yaml"]
    return _validate_launch_command(launch_command_parser().parse_args(argv))


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_config_parses_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIGS / name))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    distributed_type, processes, _ = EXPECTED[name]
    assert config.distributed_type == DistributedType[distributed_type]  # `NO` unquoted would be YAML false
    assert config.num_processes == processes and config.num_machines == 1
    assert config.mixed_precision == MIXED_PRECISION[name]  # a bare `no` would be the YAML boolean false
    assert config.use_cpu is False


@pytest.mark.parametrize("name", list(EXPECTED))
def test_nested_keys_are_accelerate_launch_options(name):
    """accelerate copies `fsdp_config` / `deepspeed_config` entries onto the launch arguments without checking
    them: a misspelt key would be silently ignored, so compare with the launcher's own options."""
    import yaml
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load((CONFIGS / name).read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section) or {}:
            option = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert option in options, f"{name}: {section}.{key} is not an `accelerate launch` option"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_launcher_reads_the_intended_setup(name):
    args, _, _ = _launch_args(name)
    _, processes, flag = EXPECTED[name]
    for launcher_flag in ("multi_gpu", "use_fsdp", "use_deepspeed"):
        assert bool(getattr(args, launcher_flag)) == (launcher_flag == flag), launcher_flag
    assert args.num_processes == processes
    assert args.mixed_precision == MIXED_PRECISION[name]
    # the command line wins over the file (how the DDP test below runs 2 processes)
    overridden, _, _ = _launch_args(name, "--num_processes", "2", "--mixed_precision", "no")
    assert overridden.num_processes == 2 and overridden.mixed_precision == "no"


def test_the_default_config_launches_one_process_without_the_launchers_warning(tmp_path, monkeypatch, caplog):
    """Without a config file (and no `accelerate config` of the user's) the launcher warns that it picked defaults
    for `--num_processes` and the rest (the value it picks without a GPU changed across accelerate releases: 0, then
    1); the README's commands pass default.yaml, which sets them all: no warning, one process, full precision, no
    dynamo, on a machine with or without a GPU."""
    import accelerate.commands.launch as launch

    monkeypatch.setattr(launch, "default_config_file", str(tmp_path / "no_user_config.yaml"))  # as on a new machine
    caplog.set_level(logging.WARNING, logger="accelerate.commands.launch")
    for gpus in (0, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        caplog.clear()
        parser = launch.launch_command_parser()
        launch._validate_launch_command(parser.parse_args(["training/train.py", "--config", "x.yaml"]))
        assert "--num_processes` was set to a value of `" in caplog.text  # the warning this avoids
        caplog.clear()
        args, _, _ = _launch_args("default.yaml")
        assert not caplog.records, caplog.text
        assert (args.num_processes, args.num_machines, args.mixed_precision, args.dynamo_backend) == (1, 1, "no", "no")
        assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed or args.cpu)


def test_fsdp_config_builds_an_fsdp2_full_shard_plugin_that_wraps_mivc_layers():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    args, _, _ = _launch_args("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()  # validates every FSDP_* value
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # save_model writes full safetensors
    assert plugin.transformer_cls_names_to_wrap == ["ViTLayer", "LlamaDecoderLayer"]
    assert plugin.cpu_ram_efficient_loading is False and plugin.activation_checkpointing is False

    # every class name exists in a (tiny) MIVC model with a ViT tower and a Llama LM: accelerate raises otherwise
    from vlalign import MIVCConfig, MIVCForConditionalGeneration

    model = MIVCForConditionalGeneration(
        MIVCConfig(
            vision_config=dict(
                model_type="vit",
                image_size=16,
                patch_size=8,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            ),
            text_config=dict(
                model_type="llama",
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=32,
            ),
            image_token_id=63,
            pooling_attention_dim=8,
        )
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m)}
    assert {"ViTLayer", "LlamaDecoderLayer"} <= wrapped


def test_deepspeed_config_builds_a_zero2_bf16_plugin():
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, mp_from_config = _launch_args("deepspeed_zero2.yaml")
    # what `accelerate launch` does before its DeepSpeed launcher (which itself needs deepspeed installed)
    args.deepspeed_fields_from_accelerate_config = ",".join(
        list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    )
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")  # as TrainingArguments does with ACCELERATE_MIXED_PRECISION
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["zero_optimization"]["offload_param"]["device"] == "none"
    assert config["bf16"]["enabled"] is True
    # taken from the training arguments, so that they cannot disagree with them
    assert config["gradient_accumulation_steps"] == "auto" and config["gradient_clipping"] == "auto"
    assert config["train_micro_batch_size_per_gpu"] == "auto"


# ----------------------------------------------------------------------------------------------------------------
# ddp.yaml on CPU: 2 real processes (torchrun-based multi-GPU launcher, gloo because train.py gets --use_cpu true)

TINY_TCL = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--queue_size",
    "32",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "20",
    "--logging_steps",
    "1",
    "--alpha_ramp_steps",
    "2",
    "--embed_dim",
    "16",
    "--model.vision_config.hidden_size",
    "32",
    "--model.vision_config.num_hidden_layers",
    "1",
    "--model.vision_config.intermediate_size",
    "64",
    "--model.text_config.hidden_size",
    "32",
    "--model.text_config.intermediate_size",
    "64",
    "--model.text_config.num_hidden_layers",
    "2",
]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_ddp_config_trains_with_two_cpu_processes(tmp_path):
    out = tmp_path / "out"

    def cmd(port):
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "ddp.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            str(REPO / "training/train.py"),
            "--config",
            str(REPO / "training/configs/tcl_digits.yaml"),
            "--use_cpu",
            "true",
            "--output_dir",
            str(out),
            *TINY_TCL,
        ]

    launch_and_wait(cmd, tmp_path, timeout=900)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["train_steps"] == 2 and results["num_eval_images"] == 20
    assert 0.0 <= results["zero_shot_accuracy"] <= 100.0
    # 2 processes: the batch is a setting of the run (training_args.json, the card), not of the saved model
    assert "train_batch_size" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "training_args.json").read_text())["per_device_train_batch_size"] == 8
    assert json.loads((out / "training_args.json").read_text())["use_cpu"] is True
    assert re.search(r"world\\?_size \| 2 \|", (out / "README.md").read_text())
    assert "model.safetensors" in os.listdir(out)

"""training/train.py: config + overrides, end-to-end runs (TCL, CODIS, MIVC; through `accelerate launch`, on a
dataset with bad images, on hostile data, on streamed shards), push from the script, what it does when a run goes
wrong, and exact resume after a crash.

* When a run goes wrong: a second run on a folder in use, a final save that fails half-way, an eval split or a
  training split with nothing usable, a SIGTERM (directly, or to the `accelerate launch` parent), a tokenizer
  larger than the model's vocabulary, resuming on other training data, and data-issue counts that must cover only
  the batches trained on.
* Hostile data: corrupt, truncated, empty and oversized files, unusual colour modes and broken captions are
  skipped or sanitised, counted by reason, and reported; the run completes (TCL rows, MIVC items).
* Own data, offline: a tokenizer trained on the run's captions (WordPiece, byte-level BPE) saved with the model and
  fitting it; the warnings about a tokenizer that fits the captions badly (unknown tokens, captions cut).
* Streaming: parquet and WebDataset shards (conftest.py's `shards`) with `--streaming true` and max_steps.
* Exact resume: a run killed with SIGKILL after a checkpoint and resumed with `--resume_from_checkpoint latest`
  ends with the weights of an uninterrupted run (see the section's comment); a kill during a checkpoint save.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from fixtures import (
    NUM_TEST,
    TINY_TRAIN_MIVC,
    TINY_TRAIN_MODEL,
    cmyk_jpeg,
    digit_png,
    hostile_rows,
    one_by_one_png,
    png_claiming_size,
    rgba_png,
    sklearn_digits,
    truncated_png,
    write_split,
)
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlalign.data import DIGIT_NAMES, build_digits_processor
from vlalign.output_folder import DiskFullError, OutputFolderLock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

from train import apply_overrides, load_config, parse_overrides  # noqa: E402


def test_overrides_go_to_the_right_section():
    config = {"model": {"embed_dim": 64, "vision_config": {"hidden_size": 8}}, "training": {"max_steps": 5}}
    pairs = parse_overrides(
        [
            "--max_steps",
            "10",
            "--learning_rate",
            "1e-4",
            "--embed_dim=32",
            "--push_to_hub",
            "--model.vision_config.hidden_size",
            "16",
            "--label_column",
            "null",
            "--report_to",
            "[tensorboard]",
        ]
    )
    config = apply_overrides(config, pairs)
    assert config["training"]["max_steps"] == 10
    assert config["training"]["learning_rate"] == pytest.approx(1e-4)
    assert config["model"]["embed_dim"] == 32
    assert config["model"]["vision_config"]["hidden_size"] == 16
    assert config["run"]["push_to_hub"] is True
    assert config["data"]["label_column"] is None
    assert config["training"]["report_to"] == ["tensorboard"]
    with pytest.raises(SystemExit, match="unknown option --no_such_field"):
        apply_overrides({}, parse_overrides(["--no_such_field", "1"]))


@pytest.mark.parametrize(
    "argv, field, shown",
    [
        (["--max_steps", "ten"], "training.max_steps", "'ten'"),  # was: "'>' not supported" deep in transformers
        (["--max_steps", "10.5"], "training.max_steps", "10.5"),
        (["--learning_rate", "fast"], "training.learning_rate", "'fast'"),
        (["--bf16", "maybe"], "training.bf16", "'maybe'"),
        (["--push_to_hub", "7"], "run.push_to_hub", "7"),
        (["--cpu_threads", "two"], "run.cpu_threads", "'two'"),
        (["--max_train_samples", "all"], "data.max_train_samples", "'all'"),
        (["--class_names", "cat"], "data.class_names", "'cat'"),  # would become ['c', 'a', 't']
        (["--embed_dim", "[16]"], "model.embed_dim", "[16]"),
        (["--temperature", "no"], "model.temperature", "'no'"),  # the text given, not YAML 1.1's False
        (["--image_column", "[a, b]"], "data.image_column", "['a', 'b']"),
        (["--hub_model_id", "7"], "run.hub_model_id", "7"),
    ],
)
def test_override_values_are_checked_against_the_field_types(argv, field, shown):
    with pytest.raises(SystemExit) as caught:
        load_config(None, parse_overrides(argv))
    message = str(caught.value)
    assert message.startswith(f"{field} = {shown}: expected "), message


def test_string_fields_keep_yes_no_on_off_as_text_and_the_values_reach_the_arguments(tmp_path):
    import train

    from vlalign.data import DataArguments

    config = load_config(
        None,
        parse_overrides(
            [
                "--save_strategy",
                "no",
                "--include_num_input_tokens_seen",
                "no",
                "--run_name",
                "Yes",
                "--caption_column",
                "off",
                "--eval_split",
                "null",
                "--push_to_hub",
                "--hub_model_id",
                "me/x",
                "--streaming",
                "on",
                "--max_steps",
                "10",
                "--learning_rate",
                "1e-4",
                "--eval_steps",
                "5",
                "--report_to",
                "[tensorboard]",
                "--contrastive_loss",
                "decomposable",
                "--resume_from_checkpoint",
                "--output_dir",
                str(tmp_path),
            ]
        ),
    )
    training, data, run = config["training"], config["data"], config["run"]
    assert (training["save_strategy"], training["include_num_input_tokens_seen"], training["run_name"]) == (
        "no",
        "no",
        "Yes",
    )
    assert (data["caption_column"], data["eval_split"], data["streaming"]) == ("off", None, True)
    assert (run["push_to_hub"], run["hub_model_id"]) == (True, "me/x")
    assert (training["max_steps"], training["learning_rate"], training["eval_steps"]) == (10, 1e-4, 5)
    assert training["report_to"] == ["tensorboard"] and training["resume_from_checkpoint"] is True
    assert type(training["save_strategy"]) is str  # a plain str, whatever the YAML loader made of it
    (tmp_path / "checkpoint-3").mkdir()  # as complete as `latest` requires: a trainer state and readable weights
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    save_file({"w": torch.zeros(1)}, str(tmp_path / "checkpoint-3" / "model.safetensors"))
    training_args = train._training_arguments(config, str(tmp_path))
    assert training_args.save_strategy == "no" and training_args.max_steps == 10  # was: a bool, refused there
    assert training_args.resume_from_checkpoint == str(tmp_path / "checkpoint-3")
    assert DataArguments(**data).caption_column == "off"
    # the same words in a config file; YAML 1.1's booleans stay booleans where a field is not a string
    path = tmp_path / "config.yaml"
    path.write_text(
        "training:\n  save_strategy: no\n  bf16: off\n  max_steps: 3\nrun:\n  push_to_hub: yes\n"
        "model:\n  vision_config: {qkv_bias: no}\n  learnable_temperature: on\n"
    )
    config = load_config(str(path), [])
    assert config["training"] == {"save_strategy": "no", "bf16": False, "max_steps": 3}
    assert config["run"]["push_to_hub"] is True and config["model"]["learnable_temperature"] is True
    assert config["model"]["vision_config"] == {"qkv_bias": False}
    path.write_text("training:\n  max_steps: ten\n")
    with pytest.raises(SystemExit, match=r"^training.max_steps = 'ten': expected an integer"):
        load_config(str(path), [])
    path.write_text("data:\n  eval_split: 2017\n")  # a number where text is wanted: say how to write the text
    with pytest.raises(
        SystemExit,
        match=r"^data.eval_split = 2017: expected a string or null, got an integer "
        r"\(quote it",
    ):
        load_config(str(path), [])


@pytest.mark.parametrize(
    "text, found",
    [
        ("- training\n- data\n", "a list"),
        ("just some text\n", "a string"),
        ("42\n", "an integer"),
        ("training: 5\n", "section 'training' is an integer"),
        ("data: [digits]\n", "section 'data' is a list"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_of_sections_is_refused_naming_it(text, found, tmp_path):
    path = tmp_path / "my config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as caught:
        load_config(str(path), [])
    message = str(caught.value)
    assert str(path) in message and found in message and "mapping" in message, message


def test_default_demo_config_parses():
    config = load_config(str(REPO / "training/configs/tcl_digits.yaml"), [])
    assert config["data"]["dataset_name"] == "digits"
    assert config["model"]["vision_config"]["image_size"] == 32
    codis = load_config(str(REPO / "training/configs/codis_digits.yaml"), [])
    assert codis["model"]["model_type"] == "codis" and codis["run"]["model_card_template"] == "model_cards/codis.md"


def _write_imagefolder(root: Path) -> int:
    """A few real digit scans with captions, plus files that cannot be decoded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i in range(60):
        pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(root / f"{i}.png")
        rows.append(
            {
                "file_name": f"{i}.png",
                "caption": f"a handwritten digit {names[digits.target[i]]}",
                "label": int(digits.target[i]),
            }
        )
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "empty.png").write_bytes(b"")
    good = (root / "0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    for name in ("corrupt.png", "empty.png", "truncated.png"):
        rows.append({"file_name": name, "caption": "a handwritten digit zero", "label": 0})
    with open(root / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return 3


def test_accelerate_launch_end_to_end_with_bad_images(tmp_path):
    data_dir = tmp_path / "data" / "train"
    bad = _write_imagefolder(data_dir)
    config = {
        "model": TINY_TRAIN_MODEL,
        "data": {
            "dataset_name": "imagefolder",
            "data_dir": str(tmp_path / "data"),
            "label_column": "label",
            "image_id_column": None,
            "eval_split": "train",
            "class_names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
            "zero_shot_templates": ["a handwritten digit {name}"],
        },
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 6,
            "per_device_train_batch_size": 16,
            "learning_rate": 1e-3,
            "logging_steps": 2,
            "save_strategy": "no",
            "report_to": "none",
            "dataloader_drop_last": True,
            "use_cpu": True,
            "seed": 0,
        },
        "run": {
            "tokenizer_name_or_path": None,
            "processor_name_or_path": str(tmp_path / "processor"),
            "hub_model_id": "someone/tiny-tcl",
        },
    }
    from vlalign.data import build_digits_processor

    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret_token_never_written")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        str(REPO / "training/train.py"),
        "--config",
        str(tmp_path / "config.yaml"),
        "--seed",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "eval_results.json").read_text())
    for key in (
        "zero_shot_accuracy",
        "i2t_recall@1",
        "i2t_recall@5",
        "i2t_recall@10",
        "t2i_recall@1",
        "t2i_recall@5",
        "t2i_recall@10",
    ):
        assert 0.0 <= results[key] <= 100.0, key
    assert results["train_steps"] == 6
    assert results["train_items_skipped"] >= 1  # bad images met during training were skipped and counted
    assert results["num_eval_images_skipped"] == bad
    assert "Skipped an undecodable image" in proc.stderr
    config_json = json.loads((out / "config.json").read_text())
    assert set(config_json["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"}
    for name in (
        "model.safetensors",
        "modeling_tcl.py",
        "configuration_tcl.py",
        "modeling_albef.py",
        "losses.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
    ):
        assert (out / name).exists(), name
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "temp" in handle.keys() and "image_queue.features" in handle.keys()
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["zero_shot_accuracy"] == pytest.approx(results["zero_shot_accuracy"])
    assert "| seed | 1 |" in card.content  # the hyperparameters actually used, command-line override included
    assert "| lr\\_scheduler\\_type | linear |" in card.content
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_secret_token_never_written" not in path.read_bytes(), path
    assert "hf_secret_token_never_written" not in proc.stdout + proc.stderr


def test_push_to_hub_uploads_the_complete_folder(tmp_path, monkeypatch, caplog):
    """--push_to_hub sends model, processor, code and card; the Hub is intercepted (no network in CI)."""
    import train
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["token"] = self.token
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(operation.path_in_repo for operation in operations)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1",
            commit_message="m",
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_never_written")
    config = {
        "model": TINY_TRAIN_MODEL,
        "data": {"max_train_samples": 64, "max_eval_samples": 20},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 16,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id", "someone/tiny-tcl"])
    assert uploaded["repo_id"] == "someone/tiny-tcl"
    assert uploaded["token"] == "hf_secret_token_never_written"
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_tcl.py",
        "configuration_tcl.py",
        "modeling_albef.py",
        "losses.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "eval_results.json",
    ):
        assert name in uploaded["files"], name
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.model_name == "someone/tiny-tcl"
    assert "hf_secret_token_never_written" not in caplog.text
    for path in (tmp_path / "out").rglob("*"):
        assert b"hf_secret_token_never_written" not in path.read_bytes(), path
    assert not list((tmp_path / "out").glob("*.bin"))  # no pickle files in a Hub folder
    assert "training_args.json" not in uploaded["files"]  # local only: it names paths of this machine


def test_codis_run_reports_code_usage_in_results_and_card(tmp_path):
    """`model_type: codis` trains CODIS from the same script; eval_results.json and the card carry code usage."""
    import train

    model = {k: v for k, v in TINY_TRAIN_MODEL.items() if k != "lmi_image_grid"}
    config = {
        "model": {**model, "model_type": "codis", "codebook_size": 8},
        "data": {"max_train_samples": 64, "max_eval_samples": 30},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 16,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    results = train.main(["--config", str(tmp_path / "config.yaml"), "--code_targets", "own"])
    out = tmp_path / "out"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["codebook_size"] == 8
    for modality in ("image", "text"):
        assert 1 <= saved[f"{modality}_codes_used"] <= 8
        assert 1.0 <= saved[f"{modality}_code_perplexity"] <= saved[f"{modality}_codes_used"] + 1e-6
    assert 0.0 < saved["image_code_purity"] <= 100.0
    assert results["codebook_size"] == 8
    config_json = json.loads((out / "config.json").read_text())
    # the command-line override, not the default (swapped)
    assert config_json["model_type"] == "codis" and config_json["code_targets"] == "own"
    assert config_json["auto_map"]["AutoModel"] == "modeling_codis.CODISModel"
    for name in ("modeling_codis.py", "configuration_codis.py", "configuration_albef.py", "modeling_albef.py"):
        assert (out / name).exists(), name
    card = ModelCard.load(out / "README.md")
    assert "codis" in card.data.tags
    assert "## Codebook usage" in card.content
    assert f"| image | {saved['image_codes_used']} | {saved['image_code_perplexity']:.2f} |" in card.content
    assert "| code\\_targets | own |" in card.content  # CODIS's own fields are in the hyperparameters
    assert "lmi" not in card.content.split("## Training hyperparameters")[1].split("## Evaluation")[0]


def test_model_section_rejects_fields_of_another_model(tmp_path):
    import train

    config = {
        "model": {**TINY_TRAIN_MODEL, "model_type": "codis"},  # lmi_image_grid is a TCL field
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "use_cpu": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"\['lmi_image_grid'\] are not fields of CODISConfig"):
        train.main(["--config", str(tmp_path / "config.yaml")])
    with pytest.raises(SystemExit, match="unknown model.model_type 'nope'"):
        train.main(["--config", str(tmp_path / "config.yaml"), "--model_type", "nope"])


def test_processor_of_another_image_size_is_refused_before_training(tmp_path):
    import train

    from vlalign.data import build_digits_processor

    build_digits_processor(image_size=32).save_pretrained(str(tmp_path / "processor"))
    config = {
        "model": TINY_TRAIN_MODEL,  # image_size 16
        "data": {"max_train_samples": 16, "max_eval_samples": 8},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "use_cpu": True, "report_to": "none"},
        "run": {"processor_name_or_path": str(tmp_path / "processor")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"resizes images to 32x32 but the vision tower takes 16x16"):
        train.main(["--config", str(tmp_path / "config.yaml")])
    assert not (tmp_path / "out").exists()


def test_mivc_run_trains_evaluates_and_writes_a_loadable_folder(tmp_path):
    """`model_type: mivc` trains the generative model on multi-view digits and writes weights, processor, code,
    eval_results.json (exact match, pooling weights on clean vs degraded images) and an image-text-to-text card."""
    import train
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = {
        "model": TINY_TRAIN_MIVC,
        "data": {"num_train_items": 40, "num_test_items": 12, "image_size": 16},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "learning_rate": 1e-3,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    results = train.main(["--config", str(tmp_path / "config.yaml"), "--seed", "3"])
    out = tmp_path / "out"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == pytest.approx(results, nan_ok=True)
    assert saved["num_eval_items"] == 12 and 0.0 <= saved["exact_match_accuracy"] <= 100.0
    # weights are per-image shares: the clean/degraded means bracket the equal-weight reference
    low, high = sorted((saved["mean_weight_clean_images"], saved["mean_weight_degraded_images"]))
    assert low <= saved["uniform_weight_reference"] <= high
    assert saved["train_steps"] == 3 and saved["train_images_skipped"] == 0
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "mivc"
    assert config_json["auto_map"]["AutoModelForImageTextToText"] == "modeling_mivc.MIVCForConditionalGeneration"
    for name in (
        "model.safetensors",
        "modeling_mivc.py",
        "configuration_mivc.py",
        "mivc_pooling.py",
        "processor_config.json",
        "README.md",
    ):
        assert (out / name).exists(), name
    assert not list(out.glob("*.bin"))
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and "mivc" in card.data.tags
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"exact_match_accuracy": pytest.approx(saved["exact_match_accuracy"])}
    assert "| pooling\\_mode | gated\\_attention |" in card.content
    # the folder loads back and its processor expands the placeholder for this model
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_seq_length == model.config.image_seq_length == 4
    assert not processor.concatenate_images


def test_type_checks_read_the_declared_annotations_even_after_hfargumentparser():
    """HfArgumentParser rewrites `field.type` of Optional fields in place (`str | None` -> `str`); the config check must
    still accept null for them afterwards (it failed once the suite had built a parser for DataArguments)."""
    import dataclasses

    import train
    from transformers import HfArgumentParser

    from vlalign.data import DataArguments

    HfArgumentParser(DataArguments)
    assert {f.name: f.type for f in dataclasses.fields(DataArguments)}["label_column"] is str  # what it rewrote
    kinds = train._field_kinds(DataArguments)
    assert type(None) in kinds["label_column"] and str in kinds["label_column"]
    assert kinds["positives_by"] == (str,)


def test_training_settings_in_their_old_sections_are_refused_naming_the_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("run:\n  alpha_ramp_steps: 100\nmodel:\n  gradient_cache_chunk_size: 32\n")
    with pytest.raises(
        SystemExit,
        match=r"model.gradient_cache_chunk_size, run.alpha_ramp_steps: training settings "
        r"now.*write them under training:",
    ):
        load_config(str(path), [])
    # on the command line the field name alone finds its section
    assert load_config(None, parse_overrides(["--alpha_ramp_steps", "5", "--gradient_cache_chunk_size", "8"]))[
        "training"
    ] == {"alpha_ramp_steps": 5, "gradient_cache_chunk_size": 8}


def test_a_contrastive_setting_is_refused_for_mivc(tmp_path):
    import train

    from vlalign.trainer import VLAlignTrainingArguments

    with pytest.raises(SystemExit, match=r"\['itm_rerank_k'\] are not settings of VLAlignTrainingArguments"):
        train.load_config(None, train.parse_overrides(["--model_type", "mivc", "--itm_rerank_k", "5"]))
    assert train.task_of("mivc").training_arguments is VLAlignTrainingArguments


# ---------------------------------------------------------------------------------------------------------------------
# When a run goes wrong
# ---------------------------------------------------------------------------------------------------------------------


FAILURE_TRAINING = {
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "logging_steps": 1,
    "report_to": "none",
    "use_cpu": True,
    "save_strategy": "no",
    "dataloader_drop_last": True,
    "learning_rate": 1e-3,
}
BROKEN_IMAGE = {"bytes": b"\x89PNG\r\n\x1a\n but not really", "path": None}


def _parquet_case(
    tmp_path: Path, train_rows: list[dict], num_good: int, eval_rows=(), num_eval_good=8, **training
) -> Path:
    write_split(tmp_path / "train.parquet", list(train_rows), num_good=num_good, first_digit=0)
    write_split(tmp_path / "test.parquet", list(eval_rows), num_good=num_eval_good, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {
        "model": {**TINY_TRAIN_MODEL, "queue_size": 16},
        "data": {
            "dataset_name": "parquet",
            "cache_dir": str(tmp_path / "cache"),
            "image_id_column": None,
            "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
            "class_names": DIGIT_NAMES,
            "zero_shot_templates": ["a handwritten digit {name}"],
        },
        "training": {**FAILURE_TRAINING, "output_dir": str(tmp_path / "out"), **training},
        "run": {"processor_name_or_path": str(tmp_path / "processor"), "cpu_threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _digits_config(tmp_path: Path, **training) -> Path:
    config = {
        "model": TINY_TRAIN_MODEL,
        "data": {"max_train_samples": 64, "max_eval_samples": 16},
        "training": {**FAILURE_TRAINING, "output_dir": str(tmp_path / "out"), **training},
        "run": {"cpu_threads": 1},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    import train

    config = _digits_config(tmp_path)
    holder = OutputFolderLock(tmp_path / "out").acquire()  # the first run, alive
    try:
        with pytest.raises(SystemExit, match=r"output_dir .*out is in use by another run \(pid \d+ on .*\)"):
            train.main(["--config", str(config)])
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        holder.release()
    # a run that ended (or crashed: the kernel drops its lock) leaves the lock file, which blocks nothing
    assert (tmp_path / "out" / ".vlalign-run.lock").is_file()
    OutputFolderLock(tmp_path / "out").acquire().release()


def test_a_final_save_that_fails_half_way_keeps_the_previous_model_whole(tmp_path, monkeypatch):
    import train

    config = _digits_config(tmp_path)
    train.main(["--config", str(config)])
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json", "README.md")}

    def full_disk(*args, **kwargs):  # the card is written after the weights, config and processor
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_model_card", full_disk)
    with pytest.raises(DiskFullError, match=r"the disk is full: the final model could not be written to .*out"):
        train.main(["--config", str(config), "--seed", "7", "--model.embed_dim", "24"])
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before  # weights, config and card all still the first run's
    assert not [p.name for p in out.iterdir() if p.name.startswith(".incomplete-")]


def test_an_eval_split_with_nothing_usable_stops_before_training(tmp_path):
    import train

    config = _parquet_case(
        tmp_path, [], num_good=32, eval_rows=[{"image": BROKEN_IMAGE, "caption": "a digit"}] * 3, num_eval_good=0
    )
    start = time.time()
    with pytest.raises(
        SystemExit,
        match=r"eval split 'test': 3 rows give 0 usable images and 0 usable captions "
        r"\(3 images skipped \(corrupt 3\)",
    ):
        train.main(["--config", str(config), "--max_steps", "200"])
    assert time.time() - start < 60  # not after 200 steps
    assert not (tmp_path / "out").exists()


def test_training_on_nothing_exits_non_zero_without_a_card(tmp_path):
    import train

    broken = [{"image": BROKEN_IMAGE, "caption": "a handwritten digit one"}] * 16
    config = _parquet_case(tmp_path, broken, num_good=0)
    with pytest.raises(SystemExit, match=r"nothing was trained: 2 optimizer steps on 0 usable training rows"):
        train.main(["--config", str(config)])
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out" / "model.safetensors").exists()
    # fewer rows than one batch with drop_last, and zero epochs: refused before training
    (tmp_path / "small").mkdir()
    with pytest.raises(SystemExit, match=r"it has 5 rows, fewer than one batch of 8 with dataloader_drop_last"):
        train.main(["--config", str(_parquet_case(tmp_path / "small", [], num_good=5))])
    with pytest.raises(SystemExit, match=r"num_train_epochs=0 gives 0 optimizer steps"):
        train.main(["--config", str(_digits_config(tmp_path / "zero")), "--max_steps", "-1", "--num_train_epochs", "0"])


def test_skip_counts_cover_only_the_batches_trained_on(tmp_path):
    """The data loader collates one batch ahead; its broken rows were never trained on."""
    import train

    rows = [{"image": BROKEN_IMAGE, "caption": "a handwritten digit one"}] * 32
    config = _parquet_case(tmp_path, rows, num_good=32)  # half of every batch broken, on average
    results = train.main(["--config", str(config), "--max_steps", "2"])
    assert results["train_steps"] == 2
    # only broken images here, so the images skipped are exactly the rows dropped from the trained batches
    assert results["train_images_skipped"] == results["train_items_skipped"] > 0
    assert results["train_images_skipped"] < 16 + 1  # of 2 batches of 8; the look-ahead batch's are not counted


# ---- SIGTERM ------------------------------------------------------------------------------------------------------
SIGNAL_LAUNCHER = """
import os, runpy, signal, sys, time
from transformers import TrainerCallback
import vlalign.trainer

class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == int(os.environ["SIGNAL_AT_STEP"]):
            target = os.getppid() if os.environ.get("SIGNAL_PARENT") else os.getpid()
            os.kill(target, signal.SIGTERM)
            time.sleep(1)  # the signal arrives during the step, as on a preempted machine

original_init = vlalign.trainer.VLAlignTrainer.__init__

def init_with_signal(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(SignalAtStep())

vlalign.trainer.VLAlignTrainer.__init__ = init_with_signal
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
"""


def _signal_run(tmp_path: Path, *extra: str, parent: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "signal_launcher.py"
    script.write_text(SIGNAL_LAUNCHER)
    env = {
        **os.environ,
        "REPO_ROOT": str(REPO),
        "SIGNAL_AT_STEP": "3",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "training")]),
    }
    if parent:
        env["SIGNAL_PARENT"] = "1"
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--cpu",
            str(script),
        ]
    else:
        command = [sys.executable, str(script)]
    config = _digits_config(tmp_path, max_steps=40, save_strategy="steps", save_steps=100)
    return subprocess.run(
        [*command, "--config", str(config), *extra], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("jit", [False, True], ids=["plain", "enable_jit_checkpoint"])
def test_sigterm_saves_a_checkpoint_and_exits_non_zero_without_a_final_model(tmp_path, jit):
    extra = ["--enable_jit_checkpoint", "true"] if jit else []
    done = _signal_run(tmp_path, *extra)
    out = tmp_path / "out"
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "training stopped by SIGTERM after step 3" in done.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


def test_sigterm_to_the_accelerate_launcher_stops_the_trainer_too(tmp_path):
    pytest.importorskip("accelerate")
    done = _signal_run(tmp_path, parent=True)
    out = tmp_path / "out"
    assert done.returncode != 0
    # the trainer, orphaned before, got SIGTERM when its launcher died: it saved and exited
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-3" / "trainer_state.json").is_file():
        time.sleep(1)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    deadline = time.time() + 60
    lock_free = False
    while time.time() < deadline and not lock_free:  # the trainer process has ended: its lock is free
        try:
            OutputFolderLock(out).acquire().release()
            lock_free = True
        except Exception:
            time.sleep(1)
    assert lock_free
    assert not (out / "model.safetensors").exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_before_training(tmp_path):
    import train

    from vlalign.data import build_digits_tokenizer

    config = _digits_config(tmp_path)
    processor = build_digits_processor(image_size=16)
    processor.tokenizer = build_digits_tokenizer(extra_words=[f"word{i}" for i in range(300)])
    processor.save_pretrained(tmp_path / "big_processor")
    with pytest.raises(SystemExit, match=r"tokenizer.*\d+.*vocab"):
        train.main(
            [
                "--config",
                str(config),
                "--processor_name_or_path",
                str(tmp_path / "big_processor"),
                "--model.text_config.vocab_size",
                "200",
            ]
        )
    assert not (tmp_path / "out").exists()


def test_a_mask_token_id_that_is_not_the_tokenizers_is_refused_before_training(tmp_path):
    """The model section's mask_token_id would make MLM write another token than the tokenizer's [MASK]."""
    import train

    config = _digits_config(tmp_path)
    with pytest.raises(SystemExit, match=r"mask_token_id is 7, the tokenizer's mask token '\[MASK\]' is 4"):
        train.main(["--config", str(config), "--model.mask_token_id", "7"])
    assert not (tmp_path / "out").exists()


def test_resuming_on_other_training_data_is_refused_and_an_allowed_change_reaches_the_card(tmp_path):
    import train

    config = _digits_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    train.main(["--config", str(config)])
    with pytest.raises(Exception, match=r"train_data: '[0-9a-f]{16}' in the checkpoint, '[0-9a-f]{16}' now"):
        train.main(
            [
                "--config",
                str(config),
                "--max_steps",
                "6",
                "--max_train_samples",
                "48",
                "--resume_from_checkpoint",
                "latest",
            ]
        )
    results = train.main(
        [
            "--config",
            str(config),
            "--max_steps",
            "6",
            "--learning_rate",
            "2e-3",
            "--resume_from_checkpoint",
            "latest",
            "--resume_with_changed_arguments",
            "true",
        ]
    )
    assert results["resumed_with_changed_arguments"] == {
        "learning_rate": {"checkpoint": 1e-3, "now": 2e-3, "from_step": 5}
    }
    card = (tmp_path / "out" / "README.md").read_text()
    assert r"| changed\_on\_resume | learning\_rate 0.001 -\> 0.002 from step 5 |" in card  # Markdown-escaped


def test_a_multi_image_eval_split_without_a_decodable_image_is_refused():
    import train

    from vlalign.data import MIVCDataArguments
    from vlalign.data.multiview_digits import build_mivc_digits_processor

    rows = [{"images": [BROKEN_IMAGE, BROKEN_IMAGE], "prompt": "<image> which digit?", "answer": "one"}] * 3
    with pytest.raises(
        SystemExit,
        match=r"eval split 'test': none of its 3 items has a decodable image "
        r"\(6 images skipped \(corrupt 6\)",
    ):
        train._check_multi_image_eval(
            rows, build_mivc_digits_processor(image_seq_length=1, image_size=16), MIVCDataArguments()
        )


# ---------------------------------------------------------------------------------------------------------------------
# A training run on hostile data
# ---------------------------------------------------------------------------------------------------------------------


def test_training_run_on_hostile_data_completes_and_reports_counts(tmp_path, caplog):
    import train

    (tmp_path / "files").mkdir()
    rows, expected = hostile_rows(tmp_path / "files")
    eval_rows = [rows[0], rows[2], rows[3], rows[5], rows[13], rows[17]]  # 4 bad images, caption None / bad UTF-8
    write_split(tmp_path / "train.parquet", rows, num_good=48 - len(rows), first_digit=0)
    write_split(tmp_path / "test.parquet", eval_rows, num_good=10, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {
        "model": TINY_TRAIN_MODEL,
        "data": {
            "dataset_name": "parquet",
            "cache_dir": str(tmp_path / "cache"),
            "image_id_column": None,
            "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
            "class_names": DIGIT_NAMES,
            "zero_shot_templates": ["a handwritten digit {name}"],
        },
        # 48 rows, batch 16, 3 steps: every training row is read exactly once, so the counts are exact
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "per_device_train_batch_size": 16,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
        },
        "run": {"processor_name_or_path": str(tmp_path / "processor"), "eval_batch_size": 32},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO):
        results = train.main(["--config", str(tmp_path / "config.yaml")])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["train_steps"] == 3 and np.isfinite(saved["train_loss"])
    assert saved["train_items_skipped"] == 9
    assert {k: v for k, v in saved.items() if k.startswith(("train_images", "train_captions"))} == {
        f"train_{k}": v for k, v in expected.items()
    }
    assert {k: v for k, v in saved.items() if k.startswith(("eval_images", "eval_captions"))} == {
        "eval_images_skipped": 4,
        "eval_images_skipped_truncated": 1,
        "eval_images_skipped_empty_file": 1,
        "eval_images_skipped_corrupt": 1,
        "eval_images_skipped_too_large": 1,
        "eval_captions_skipped": 1,
        "eval_captions_skipped_missing": 1,
        "eval_captions_sanitised": 1,
        "eval_captions_sanitised_invalid_utf8": 1,
    }
    assert saved["num_eval_images_skipped"] == 4 and saved["num_eval_images"] == 12
    assert results["train_images_skipped"] == 6
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data issues:")]
    assert summary == [
        (
            "Data issues: training: 6 images skipped (corrupt 1, empty_file 1, file_not_found 1, too_large 1, "
            "truncated 2), 3 captions skipped (empty 2, missing 1), 3 captions sanitised (control_chars 1, "
            "invalid_utf8 1, too_long 1); evaluation: 4 images skipped (corrupt 1, empty_file 1, too_large 1, "
            "truncated 1), 1 captions skipped (missing 1), 1 captions sanitised (invalid_utf8 1)"
        )
    ]


def test_mivc_run_on_items_with_hostile_images_counts_train_and_eval_apart(tmp_path):
    """A list-of-images parquet column is read undecoded, so a bad file drops one image, not the run; evaluation
    decodes with the training collator, and its skips are reported apart."""
    import train

    from vlalign.data.multiview_digits import build_mivc_digits_processor

    (tmp_path / "empty.png").write_bytes(b"")
    good = [{"bytes": digit_png(i), "path": None} for i in range(10)]
    bad = {
        "truncated": {"bytes": truncated_png(), "path": None},
        "bomb": {"bytes": png_claiming_size(30_000, 30_000), "path": None},
        "empty": {"bytes": None, "path": str(tmp_path / "empty.png")},
        "missing": {"bytes": None, "path": str(tmp_path / "missing.png")},
        "corrupt": {"bytes": b"GIF89a but no more", "path": None},
    }
    odd = [{"bytes": data, "path": None} for data in (cmyk_jpeg((0, 0, 0, 255)), rgba_png(), one_by_one_png())]
    train_items = [
        [good[0], bad["truncated"], bad["bomb"]],
        [bad["empty"], bad["missing"]],
        odd,
        *[[good[i], good[i + 1]] for i in range(1, 6)],
    ]
    eval_items = [[good[6], bad["corrupt"]], [good[7]], [good[8], good[9]]]
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    for name, items in (("train", train_items), ("test", eval_items)):
        rows = [{"images": images, "prompt": "<image> which digit?", "answer": "one"} for images in items]
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(tmp_path / f"{name}.parquet"), batch_size=1000
        )
    build_mivc_digits_processor(image_seq_length=1, image_size=16).save_pretrained(tmp_path / "processor")
    config = {
        "model": TINY_TRAIN_MIVC,
        "data": {
            "dataset_name": "parquet",
            "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
        },
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 1,
            "per_device_train_batch_size": 8,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
        "run": {"processor_name_or_path": str(tmp_path / "processor")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "config.yaml")])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["train_steps"] == 1 and saved["num_eval_items"] == 3
    assert {k: v for k, v in saved.items() if "_skipped" in k} == {
        "train_images_skipped": 4,
        "train_images_skipped_truncated": 1,
        "train_images_skipped_too_large": 1,
        "train_images_skipped_empty_file": 1,
        "train_images_skipped_file_not_found": 1,
        "train_items_skipped": 1,
        "eval_images_skipped": 1,
        "eval_images_skipped_corrupt": 1,
        "train_nonfinite_steps_skipped": 0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Streaming training data
# ---------------------------------------------------------------------------------------------------------------------


def _streaming_config(root: Path, fmt: str) -> dict:
    if fmt == "parquet":
        data = {
            "dataset_name": "parquet",
            "data_files": {
                "train": str(root / "parquet" / "train-*.parquet"),
                "test": str(root / "parquet" / "test-*.parquet"),
            },
        }
    else:
        data = {
            "dataset_name": "webdataset",
            "data_files": {"train": str(root / "wds" / "train-*.tar"), "test": str(root / "wds" / "test-*.tar")},
            "image_column": "png",
            "caption_column": "txt",
            "label_column": "cls",
        }
    data.update(
        {
            "image_id_column": None,
            "max_eval_samples": NUM_TEST,
            "max_train_samples": 24,
            "shuffle_buffer_size": 32,
            "class_names": DIGIT_NAMES,
            "zero_shot_templates": ["a handwritten digit {name}"],
        }
    )
    return {
        "model": TINY_TRAIN_MODEL,
        "data": data,
        "training": {
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
        },
        "run": {"processor_name_or_path": str(root / "processor")},
    }


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.usefixtures("short_arrow_shutdown_pause")
def test_train_script_streams_shards_with_max_steps(shards, tmp_path, fmt):
    import train

    if not (shards / "processor").exists():
        build_digits_processor(image_size=16).save_pretrained(shards / "processor")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_streaming_config(shards, fmt)))
    out = tmp_path / "out"
    # 24 rows (one corrupt) in 3 batches of 8: one pass over the limited stream
    results = train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(out)])
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["train_steps"] == 3 and np.isfinite(saved["train_loss"])
    assert saved["train_items_skipped"] == 1
    assert saved["num_eval_images"] == NUM_TEST
    for key in ("zero_shot_accuracy", "i2t_recall@1", "t2i_recall@1"):
        assert 0.0 <= saved[key] <= 100.0, key
    assert results["train_items_skipped"] == 1
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


@pytest.mark.usefixtures("short_arrow_shutdown_pause")
def test_streaming_without_max_steps_is_refused(shards, tmp_path):
    import train

    config = _streaming_config(shards, "parquet")
    del config["training"]["max_steps"]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="set training.max_steps"):
        train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(tmp_path / "out")])


@pytest.mark.usefixtures("short_arrow_shutdown_pause")
def test_streaming_refuses_running_z(shards, tmp_path):
    import train

    config = _streaming_config(shards, "parquet")
    config["model"] = {
        **TINY_TRAIN_MODEL,
        "use_momentum": False,
        "contrastive_loss": "decomposable",
        "z_estimate": "running",
        "num_train_samples": 60,
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="running"):
        train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume after a crash
# ---------------------------------------------------------------------------------------------------------------------
# A training run killed with SIGKILL after a checkpoint and resumed with
# `--resume_from_checkpoint latest` ends with the same weights as an uninterrupted run (tolerance 1e-6), for TCL, CODIS
# and MIVC.
#
# The runs are real `training/train.py` processes. The killed one gets a callback that sends itself SIGKILL at the end
# of a step after the last checkpoint (no clean-up runs, as on a pre-empted machine). The set-up makes every piece of
# state matter: the resumed checkpoint is in the second epoch (data order, skipped batches), queues wrap around
# (pointers), the alpha ramp is still rising, EMA teachers move every step, BERT dropout and MLM masking draw from the
# RNG, captions are drawn at random per batch, and TCL uses gradient accumulation. A fourth run trains TCL on data
# with every kind of hostile image and caption (rows skipped, refilled with copies, sanitised): same weights, and
# every data-issue count covers the whole run exactly once.


# (max_steps, save_steps, kill after step): 40 rows at batch 8 are 5 steps per epoch, so checkpoint-6 is one step
# into the second epoch; killed after step 7
SCHEDULE = (9, 3, 7)

KILLING_LAUNCHER = textwrap.dedent("""
    import os, runpy, signal, sys
    from transformers import TrainerCallback
    import vlalign.trainer

    class KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    original_init = vlalign.trainer.VLAlignTrainer.__init__

    def init_with_kill(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(KillAfterStep())

    vlalign.trainer.VLAlignTrainer.__init__ = init_with_kill
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
""")

RESUME_TRAINING = {
    "max_steps": SCHEDULE[0],
    "save_strategy": "steps",
    "save_steps": SCHEDULE[1],
    "logging_steps": 1,
    "report_to": "none",
    "use_cpu": True,
    "seed": 5,
    "dataloader_drop_last": True,
    "learning_rate": 1e-3,
}

RESUME_CASES = {
    "tcl": {
        "model": {**TINY_TRAIN_MODEL, "queue_size": 16},
        "data": {"max_train_samples": 40, "max_eval_samples": 20},
        "training": {
            **RESUME_TRAINING,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "alpha_ramp_steps": 20,
        },
        "run": {"cpu_threads": 1},
    },
    "codis": {
        "model": {
            **{k: v for k, v in TINY_TRAIN_MODEL.items() if k != "lmi_image_grid"},
            "model_type": "codis",
            "codebook_size": 8,
            "queue_size": 16,
        },
        "data": {"max_train_samples": 40, "max_eval_samples": 20},
        "training": {**RESUME_TRAINING, "per_device_train_batch_size": 8, "alpha_ramp_steps": 20},
        "run": {"cpu_threads": 1},
    },
    # a locked vision tower (its EMA teacher the student's tensors) and a text tower locked but for its last layer
    "tcl_locked": {
        "model": {**TINY_TRAIN_MODEL, "queue_size": 16},
        "data": {"max_train_samples": 40, "max_eval_samples": 20},
        "training": {**RESUME_TRAINING, "per_device_train_batch_size": 8, "alpha_ramp_steps": 20},
        "run": {"cpu_threads": 1, "lock_image": True, "lock_text": True, "lock_text_unlocked_layers": 1},
    },
    "mivc": {
        "model": TINY_TRAIN_MIVC,
        "data": {"num_train_items": 40, "num_test_items": 8, "image_size": 16},
        "training": {**RESUME_TRAINING, "per_device_train_batch_size": 8},
        "run": {"cpu_threads": 1},
    },
}


def hostile_case(tmp_path: Path) -> tuple[dict, tuple[int, int, int]]:
    """TCL on 48 rows of which 18 hold every kind of hostile image or caption (skipped, refilled, sanitised), 6 steps
    per epoch; checkpoint-8 is two steps into the second epoch, killed after step 9."""
    (tmp_path / "files").mkdir()
    rows, _ = hostile_rows(tmp_path / "files")
    write_split(tmp_path / "train.parquet", rows, num_good=48 - len(rows), first_digit=0)
    write_split(tmp_path / "test.parquet", [], num_good=10, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {
        "model": {**TINY_TRAIN_MODEL, "queue_size": 16},
        "data": {
            "dataset_name": "parquet",
            "cache_dir": str(tmp_path / "cache"),
            "image_id_column": None,
            "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
            "class_names": DIGIT_NAMES,
            "zero_shot_templates": ["a handwritten digit {name}"],
        },
        "training": {
            **RESUME_TRAINING,
            "per_device_train_batch_size": 8,
            "max_steps": 10,
            "save_steps": 4,
            "alpha_ramp_steps": 20,
        },
        "run": {"processor_name_or_path": str(tmp_path / "processor"), "cpu_threads": 1},
    }
    return config, (10, 4, 9)


def _case(model_type: str, tmp_path: Path) -> tuple[dict, tuple[int, int, int]]:
    return hostile_case(tmp_path) if model_type == "tcl_hostile_data" else (RESUME_CASES[model_type], SCHEDULE)


def _resume_run(
    script: list[str], config: Path, output_dir: Path, *extra: str, kill_at: int = 0
) -> subprocess.CompletedProcess:
    env = {**os.environ, "REPO_ROOT": str(REPO), "KILL_AT_STEP": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *script, "--config", str(config), "--output_dir", str(output_dir), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("model_type", [*sorted(RESUME_CASES), "tcl_hostile_data"])
def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(model_type, tmp_path):
    case, (max_steps, save_steps, kill_at) = _case(model_type, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(case))
    train_py = [str(REPO / "training" / "train.py")]

    uninterrupted = _resume_run(train_py, config, tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    launcher = tmp_path / "killing_launcher.py"
    launcher.write_text(KILLING_LAUNCHER)
    killed_dir = tmp_path / "killed"
    killed = _resume_run([str(launcher)], config, killed_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = f"checkpoint-{2 * save_steps}"
    checkpoints = sorted(p.name for p in killed_dir.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{save_steps}", last]  # killed mid-run, after the second checkpoint
    assert not (killed_dir / "model.safetensors").exists()
    assert (killed_dir / last / "vlalign_trainer_state.json").exists()

    resumed = _resume_run(train_py, config, killed_dir, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last in resumed.stderr  # resumed from the newest checkpoint

    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    actual = load_file(killed_dir / "model.safetensors")
    assert sorted(actual) == sorted(expected)
    before = load_file(killed_dir / last / "model.safetensors")
    moved = max(
        (expected[k].double() - before[k].double()).abs().max().item()
        for k in expected
        if expected[k].is_floating_point()
    )
    assert moved > 1e-4  # the three steps after the checkpoint changed the weights far beyond the tolerance
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)
    if model_type != "mivc":  # the queues wrapped around: their pointers and contents are part of the state
        assert int(expected["image_queue.ptr"]) == (max_steps * 8) % 16
    results = {
        name: json.loads((d / "eval_results.json").read_text())
        for name, d in (("uninterrupted", tmp_path / "uninterrupted"), ("resumed", killed_dir))
    }
    assert results["resumed"]["train_steps"] == results["uninterrupted"]["train_steps"] == max_steps
    # every data-issue count covers the whole run once, as in the uninterrupted run
    counts = {
        name: {k: v for k, v in r.items() if k.startswith("train_") and ("skipped" in k or "sanitised" in k)}
        for name, r in results.items()
    }
    assert counts["resumed"] == counts["uninterrupted"]
    assert counts["resumed"]["train_nonfinite_steps_skipped"] == 0
    if model_type == "tcl_hostile_data":  # 10 steps x 8 rows over 48 rows of which 18 are hostile
        assert counts["resumed"]["train_items_skipped"] > 10 and counts["resumed"]["train_images_skipped"] > 5
        assert counts["resumed"]["train_captions_sanitised"] > 0
    else:
        assert counts["resumed"]["train_items_skipped"] == 0


def test_resume_latest_without_a_checkpoint_says_so(tmp_path):
    import train

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(RESUME_CASES["tcl"]))
    with pytest.raises(SystemExit, match="no complete checkpoint-N folder"):
        train.main(
            ["--config", str(config), "--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "latest"]
        )
    with pytest.raises(SystemExit, match="no such checkpoint folder"):
        train.main(
            [
                "--config",
                str(config),
                "--output_dir",
                str(tmp_path / "empty"),
                "--resume_from_checkpoint",
                str(tmp_path / "typo"),
            ]
        )


KILL_DURING_SAVE = textwrap.dedent("""
    import os, runpy, signal, sys
    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):  # the weights of this checkpoint are written, the rest never is
        if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save_then_die
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
""")


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_to_resume_from(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(RESUME_CASES["tcl"]))
    launcher = tmp_path / "kill_during_save.py"
    launcher.write_text(KILL_DURING_SAVE)
    killed = _resume_run([str(launcher)], config, tmp_path / "out", kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = _resume_run(
        [str(REPO / "training" / "train.py")], config, tmp_path / "out", "--resume_from_checkpoint", "latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from " in resumed.stderr and "checkpoint-3" in resumed.stderr
    assert "Removed 1 incomplete save(s) left by an interrupted run" in resumed.stderr
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["train_steps"] == SCHEDULE[0]


def test_a_siglip_dual_encoder_trains_with_captions_padded_to_its_max_length(tmp_path):
    """The run's processor for a SigLIP checkpoint is built from its own tokenizer and image processor and pads
    every caption to the text tower's max_length (SigLIP pools the last position); the model starts with the
    checkpoint's embeddings."""
    import io

    import train
    from PIL import Image
    from transformers import SiglipConfig, SiglipModel

    from vlalign.data import build_digits_processor

    digits = build_digits_processor(image_size=16)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    text = dict(tower, vocab_size=len(digits.tokenizer), max_position_embeddings=12)
    siglip = SiglipModel(SiglipConfig(vision_config=dict(tower, image_size=16, patch_size=4), text_config=text))
    siglip.save_pretrained(tmp_path / "siglip")
    digits.tokenizer.save_pretrained(tmp_path / "siglip")
    digits.image_processor.save_pretrained(tmp_path / "siglip")
    processor = train._dual_encoder_processor(str(tmp_path / "siglip"))
    assert (processor.text_padding, processor.max_length) == ("max_length", 12)
    inputs = processor(images=[Image.open(io.BytesIO(digit_png(3)))], text=["a handwritten digit one"])
    assert inputs["input_ids"].shape == (1, 12)
    run = train.RunArguments(dual_encoder_name_or_path=str(tmp_path / "siglip"))
    model = train.build_model(run, {"model_type": "tcl", "use_momentum": False, "lmi_weight": 0.0}, processor.tokenizer)
    siglip.eval()
    model.eval()
    with torch.no_grad():
        expected = siglip(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        ours = model(**inputs)
    torch.testing.assert_close(ours.text_embeds, expected.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.image_embeds, expected.image_embeds, rtol=0, atol=1e-5)


def test_memory_is_pinned_only_with_a_gpu_unless_the_config_says():
    """Pinned memory serves copies to a GPU; on a CPU-only machine torch warned about it at every epoch."""
    import train

    training_args = train._training_arguments({"training": {"use_cpu": True}}, "out")
    assert training_args.dataloader_pin_memory is torch.cuda.is_available()
    training_args = train._training_arguments({"training": {}}, "out")
    assert training_args.dataloader_pin_memory is torch.cuda.is_available()
    forced = train._training_arguments({"training": {"dataloader_pin_memory": True}}, "out")
    assert forced.dataloader_pin_memory is True


def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path):
    """`eval_strategy: steps` computes retrieval and zero-shot metrics at every evaluation, logs them (TensorBoard
    too), and `metric_for_best_model: t2i_recall@1` with `load_best_model_at_end` ends on the best checkpoint's
    weights, which are the ones saved."""
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    config = {
        "model": {**TINY_TRAIN_MODEL, "model_type": "tcl"},
        "data": {"max_train_samples": 64, "max_eval_samples": 30},
        "training": {
            "output_dir": str(out),
            "max_steps": 6,
            "per_device_train_batch_size": 16,
            "learning_rate": 2e-3,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "save_strategy": "steps",
            "save_steps": 2,
            "metric_for_best_model": "t2i_recall@1",
            "load_best_model_at_end": True,
            "logging_steps": 2,
            "report_to": "tensorboard",
            "use_cpu": True,
        },
        "run": {"cpu_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    results = train.main(["--config", str(tmp_path / "config.yaml")])

    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_t2i_recall@1" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4, 6]
    for entry in evaluations:
        assert {"eval_i2t_recall@1", "eval_zero_shot_accuracy", "eval_zero_shot_mean_per_class_recall"} <= set(entry)
    scores = [entry["eval_t2i_recall@1"] for entry in evaluations]
    best_step = evaluations[scores.index(max(scores))]["step"]  # the first of equal scores, as transformers keeps
    assert state["best_global_step"] == best_step
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    # the final model is the best checkpoint's, and its evaluation is that checkpoint's
    final = load_file(str(out / "model.safetensors"))
    best = load_file(str(out / f"checkpoint-{best_step}" / "model.safetensors"))
    assert final.keys() == best.keys()
    assert [k for k in final if not torch.equal(final[k], best[k])] == []
    assert results["t2i_recall@1"] == max(scores)
    # TensorBoard has every evaluation
    (events,) = list(out.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    logged = accumulator.Scalars("eval/t2i_recall@1")
    assert [event.step for event in logged] == [2, 4, 6]
    assert [event.value for event in logged] == pytest.approx(scores)


# ----------------------------------------------------------------------------------------------------------------
# CPU threads: from the CPUs this process may use (affinity, cgroup quota), divided among the local processes


def _cgroup_v2(root: Path, path: str, quotas: dict[str, str]) -> Path:
    """A fake cgroup v2 tree: `quotas` maps a cgroup folder (relative to root) to its cpu.max line."""
    for folder, line in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(line + "\n")
    proc = root / "proc_self_cgroup"
    proc.write_text(f"0::{path}\n")
    return proc


def test_available_cpus_is_the_affinity_capped_by_the_smallest_cgroup_quota(tmp_path, monkeypatch):
    import train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    root = tmp_path / "v2"
    # no quota anywhere ("max"): the affinity mask
    proc = _cgroup_v2(root, "/jobs/mine", {".": "max 100000", "jobs": "max 100000", "jobs/mine": "max 100000"})
    assert train.available_cpus(root, proc) == (8, "CPU affinity")
    # 1.5 CPUs on the process's own cgroup: rounded down
    (root / "jobs/mine/cpu.max").write_text("150000 100000\n")
    assert train.available_cpus(root, proc) == (1, "cgroup CPU quota 1.5")
    # an ancestor's quota binds too: the smallest wins
    (root / "jobs/mine/cpu.max").write_text("600000 100000\n")
    (root / "jobs/cpu.max").write_text("300000 100000\n")
    assert train.available_cpus(root, proc) == (3, "cgroup CPU quota 3")
    # a quota above the affinity mask changes nothing
    (root / "jobs/cpu.max").write_text("1600000 100000\n")
    assert train.available_cpus(root, proc) == (6, "cgroup CPU quota 6")
    (root / "jobs/mine/cpu.max").write_text("max 100000\n")
    assert train.available_cpus(root, proc) == (8, "CPU affinity")
    # a quota below one CPU still leaves one thread
    (root / "cpu.max").write_text("20000 100000\n")
    assert train.available_cpus(root, proc) == (1, "cgroup CPU quota 0.2")


def test_available_cpus_in_a_container_and_with_cgroup_v1(tmp_path, monkeypatch):
    import train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    # a container: /proc/self/cgroup names the host's path, the mount is the container's own cgroup
    root = tmp_path / "container"
    proc = _cgroup_v2(root, "/docker/0123abcd", {".": "200000 100000"})
    assert train.available_cpus(root, proc) == (2, "cgroup CPU quota 2")
    # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us in the cpu controller's hierarchy; -1 is no quota
    root = tmp_path / "v1"
    (root / "cpu,cpuacct/batch").mkdir(parents=True)
    (root / "cpu,cpuacct/batch/cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct/batch/cpu.cfs_period_us").write_text("100000\n")
    proc = root / "proc_self_cgroup"
    proc.write_text("12:memory:/batch\n4:cpu,cpuacct:/batch\n0::/\n")
    assert train.available_cpus(root, proc) == (4, "CPU affinity")
    (root / "cpu,cpuacct/batch/cpu.cfs_quota_us").write_text("250000\n")
    assert train.available_cpus(root, proc) == (2, "cgroup CPU quota 2.5")
    # nothing readable at all (no cgroup file system, no /proc): the affinity mask
    assert train.available_cpus(tmp_path / "absent", tmp_path / "absent/cgroup") == (4, "CPU affinity")
    (root / "cpu,cpuacct/batch/cpu.cfs_quota_us").write_text("garbage\n")  # unreadable values are ignored
    assert train.available_cpus(root, proc) == (4, "CPU affinity")


def test_cpu_threads_are_the_available_cpus_divided_among_local_processes_and_logged_once(monkeypatch, caplog):
    import types

    import train

    chosen = []
    monkeypatch.setattr(train.torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(train, "available_cpus", lambda: (5, "cgroup CPU quota 5"))
    on_cpu = types.SimpleNamespace(device=torch.device("cpu"))
    caplog.set_level(logging.INFO, logger="vlalign.train")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    train._set_cpu_threads(train.RunArguments(), on_cpu)
    assert chosen == [2]
    (message,) = [r.getMessage() for r in caplog.records if "thread" in r.getMessage()]
    assert message == (
        "Training on the CPU with 2 threads per process (5 CPUs (cgroup CPU quota 5) among 2 local processes)"
    )
    caplog.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other local process sets its threads without a second line
    train._set_cpu_threads(train.RunArguments(), on_cpu)
    assert chosen == [2, 2] and not [r for r in caplog.records if "thread" in r.getMessage()]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more processes than CPUs: one thread each
    train._set_cpu_threads(train.RunArguments(), on_cpu)
    assert chosen[-1] == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    train._set_cpu_threads(train.RunArguments(cpu_threads=3), on_cpu)  # the setting wins
    assert chosen[-1] == 3 and "3 threads per process (--cpu_threads)" in caplog.text
    train._set_cpu_threads(train.RunArguments(), types.SimpleNamespace(device=torch.device("meta")))
    assert len(chosen) == 4  # not on the CPU: torch's threads are left alone


# ---- a tokenizer trained on the training captions (run.train_tokenizer) ------------------------------------------

NEW_WORDS = ["giraffe", "lantern", "meadow", "umbrella", "hedgehog", "lighthouse"]  # not in the digits vocabulary


def _own_imagefolder(root: Path, rows: int = 24) -> Path:
    """An image folder of real digit scans whose captions use words the digits tokenizer would spell letter by
    letter."""
    from vlalign.data import DIGIT_NAMES

    train = root / "train"
    train.mkdir(parents=True)
    target = sklearn_digits().target
    with open(train / "metadata.jsonl", "w") as metadata:
        for i in range(rows):
            (train / f"{i}.png").write_bytes(digit_png(i))
            caption = f"a {DIGIT_NAMES[target[i]]} beside a {NEW_WORDS[i % len(NEW_WORDS)]} in the meadow"
            metadata.write(json.dumps({"file_name": f"{i}.png", "caption": [caption, caption.upper()]}) + "\n")
    return root


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_a_run_on_its_own_data_trains_a_tokenizer_that_loads_from_the_output_folder(kind, tmp_path):
    import train
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = {
        "model": TINY_TRAIN_MODEL,  # text tower of 32 positions
        "data": {
            "dataset_name": "imagefolder",
            "data_dir": str(_own_imagefolder(tmp_path / "data")),
            "label_column": None,
            "positives_by": "image",
            "image_id_column": None,
            "eval_split": None,
        },
        "training": {**FAILURE_TRAINING, "output_dir": str(tmp_path / "out")},
        "run": {"cpu_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    results = train.main(
        ["--config", str(tmp_path / "config.yaml"), "--train_tokenizer", kind, "--tokenizer_vocab_size", "600"]
    )
    assert results["train_steps"] == 2
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    # the default 64 tokens, lowered to the text tower's 32 positions
    assert processor.max_length == tokenizer.model_max_length == 32
    for word in NEW_WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, (word, tokenizer.convert_ids_to_tokens(ids))
    model_config = AutoConfig.from_pretrained(out)
    assert model_config.text_config.vocab_size == len(tokenizer) <= 600
    assert model_config.mask_token_id == tokenizer.mask_token_id == 4
    assert model_config.text_config.pad_token_id == tokenizer.pad_token_id == (0 if kind == "wordpiece" else 1)


def test_train_tokenizer_settings_that_make_no_sense_are_refused(tmp_path):
    import train

    with pytest.raises(ValueError, match=r"train_tokenizer must be one of \['wordpiece', 'bpe'\] or null, got 'spm'"):
        train.RunArguments(train_tokenizer="spm")
    with pytest.raises(ValueError, match=r"tokenizer_vocab_size must be an integer >= 300, got 10"):
        train.RunArguments(train_tokenizer="bpe", tokenizer_vocab_size=10)
    with pytest.raises(ValueError, match=r"tokenizer_max_length must be an integer >= 3 .*got 2"):
        train.RunArguments(tokenizer_max_length=2)
    for name in ("tokenizer_name_or_path", "processor_name_or_path", "model_name_or_path", "dual_encoder_name_or_path"):
        with pytest.raises(ValueError, match=rf"train_tokenizer learns a new vocabulary, but run.{name} brings"):
            train.RunArguments(train_tokenizer="wordpiece", **{name: "somewhere"})
    with pytest.raises(ValueError, match=r"run.processor_name_or_path brings its own max_length"):
        train.RunArguments(tokenizer_max_length=40, processor_name_or_path="somewhere")
    with pytest.raises(ValueError, match=r"run.processor_name_or_path brings its own augmentation"):
        train.RunArguments(augmentation={"hflip_p": 0.0}, processor_name_or_path="somewhere")
    with pytest.raises(ValueError, match=r"run.augmentation: Unknown augmentation keys \['flip_p'\]"):
        train.RunArguments(augmentation={"flip_p": 0.0})
    # longer captions than the text tower has positions: refused before any data is read
    config = _digits_config(tmp_path)
    with pytest.raises(SystemExit, match=r"tokenizer_max_length=48: the text tower takes captions of at most 32"):
        train.main(["--config", str(config), "--train_tokenizer", "wordpiece", "--tokenizer_max_length", "48"])
    with pytest.raises(SystemExit, match=r"run.train_tokenizer is for the processors of TCL / CODIS"):
        train.main(["--config", str(REPO / "training/configs/mivc_digits.yaml"), "--train_tokenizer", "bpe"])
    assert not (tmp_path / "out").exists()


def test_tokenizer_max_length_and_augmentation_set_those_of_a_built_processor():
    import train

    from vlalign.data import DataArguments

    run = train.RunArguments(tokenizer_max_length=24, augmentation={"color_jitter_p": 0.0, "crop_scale": [0.9, 1.0]})
    processor = train.build_processor(run, DataArguments(), 16, {"text_config": TINY_TRAIN_MODEL["text_config"]})
    assert processor.max_length == 24  # the digits demo's processor, 16 by default
    augmentation = processor.augmentation
    assert (augmentation["color_jitter_p"], augmentation["crop_scale"]) == (0.0, [0.9, 1.0])
    assert augmentation["hflip_p"] == 0.0  # the demo's own setting, kept under the overrides
    with pytest.raises(SystemExit, match=r"tokenizer_max_length=40: the text tower takes captions of at most 32"):
        train.build_processor(
            train.RunArguments(tokenizer_max_length=40),
            DataArguments(),
            16,
            {"text_config": TINY_TRAIN_MODEL["text_config"]},
        )


def _caption_split(captions: list[str]):
    return datasets.Dataset.from_dict({"image": [None] * len(captions), "caption": captions})


@pytest.mark.parametrize(
    "captions, warned",
    [
        (["a handwritten digit seven", "the number 3 written by hand"] * 50, []),
        (["a handwritten digit seven"] * 95 + ["ein 漢字 digit"] * 5, ["unknown"]),
        (["a handwritten digit seven"] * 95 + ["a giraffe beside a lighthouse in the meadow"] * 5, ["cut"]),
    ],
    ids=["fits", "unknown-characters", "long-captions"],
)
def test_a_tokenizer_that_fits_the_captions_badly_is_warned_about(captions, warned, caplog):
    """The digits processor (max_length 16) on captions it fits; with 5% of them holding two characters it does not
    know (10 of 410 tokens: 2.4%); with 5% of them made of words it spells letter by letter, longer than 16 tokens."""
    import train

    from vlalign.data import DataArguments

    processor = build_digits_processor(image_size=16)
    with caplog.at_level(logging.WARNING, logger="vlalign.train"):
        fit = train._warn_about_caption_fit(processor, _caption_split(captions), DataArguments())
    messages = [r.getMessage() for r in caplog.records if r.name == "vlalign.train"]
    assert len(messages) == len(warned), messages
    if "unknown" in warned:
        assert fit.unknown_share > 0.02 and fit.truncated_share == 0
        assert messages[0].startswith(
            f"{100 * fit.unknown_share:.1f}% of the training captions' tokens are the unknown"
        )
        assert "--train_tokenizer wordpiece" in messages[0]
    if "cut" in warned:
        assert fit.truncated_share == pytest.approx(0.05) and fit.unknown_share == 0
        assert messages[0].startswith("5.0% of the training captions (5 of 100) are longer than max_length=16 tokens")
        assert "--tokenizer_max_length" in messages[0] and "--train_tokenizer wordpiece" in messages[0]
    if not warned:
        assert fit.unknown_share == 0 and fit.truncated_share == 0


# ---------------------------------------------------------------------------------------------------------------------
# Locked towers (LiT) from the command line
# ---------------------------------------------------------------------------------------------------------------------


def _locked_run_config(tmp_path: Path) -> Path:
    model = {**TINY_TRAIN_MODEL, "vision_config": {**TINY_TRAIN_MODEL["vision_config"], "num_hidden_layers": 2}}
    config = {
        "model": model,
        "data": {"max_train_samples": 32, "max_eval_samples": 16},
        "training": {**FAILURE_TRAINING, "output_dir": str(tmp_path / "out"), "learning_rate": 1e-2},
        "run": {"cpu_threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_locked_towers_stay_as_they_were_while_the_rest_trains_and_the_model_loads_strictly(
    tmp_path, monkeypatch, caplog
):
    """--lock_image --lock_image_unlocked_layers 1 --lock_text --lock_text_unlocked_projection: after training the
    vision tower's embeddings and first block and the whole text tower are bit for bit what they were, their EMA
    teachers too; the last vision block, the projections and the fusion encoder moved. The optimizer holds the
    trainable parameters only, the log gives the counts, and the saved model loads with the strict loader."""
    import train

    from vlalign import TCLModel

    seen = {}
    original = train._apply_locks

    def recording(model, run):
        model = original(model, run)
        seen["model"], seen["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(train, "_apply_locks", recording)
    original_train = train._train

    def recording_train(trainer, training_args):
        seen["trainer"] = trainer
        return original_train(trainer, training_args)

    monkeypatch.setattr(train, "_train", recording_train)
    caplog.set_level(logging.INFO, logger="vlalign.train")
    argv = ["--config", str(_locked_run_config(tmp_path)), "--lock_image", "--lock_image_unlocked_layers", "1"]
    train.main([*argv, "--lock_text", "--lock_text_unlocked_projection"])

    model, before = seen["model"], seen["before"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable} parameters trainable" in caplog.text
    optimized = {id(p) for group in seen["trainer"].optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    saved = TCLModel.from_pretrained(tmp_path / "out")  # strict: every key of the model is in the file
    after = saved.state_dict()
    assert after.keys() == before.keys()
    fixed = ("vision_model.embeddings.", "vision_model.layers.0.", "text_model.")
    moved = ("vision_model.layers.1.", "vision_model.layernorm.", "vision_proj.", "text_proj.", "fusion_model.")
    for key, value in before.items():
        name = key.removeprefix("momentum_")
        if name.startswith(fixed):
            assert torch.equal(after[key], value), key
        elif name.startswith(moved) and not key.startswith("momentum_") and value.is_floating_point():
            assert not torch.equal(after[key], value), key
    # the teachers of the unlocked parts followed their students
    assert not torch.equal(
        after["momentum_vision_model.layers.1.mlp.fc1.weight"], before["momentum_vision_model.layers.1.mlp.fc1.weight"]
    )
    assert (
        model.momentum_text_model.encoder.layer[0].output.dense.weight
        is model.text_model.encoder.layer[0].output.dense.weight
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "| lock\\_image\\_unlocked\\_layers | 1 |" in card.content
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not any("lock" in key for key in config_json)  # a run-time setting


def test_locked_tower_settings_that_make_no_sense_are_refused(tmp_path):
    import train
    from fixtures import tiny_tcl_config

    config = str(_locked_run_config(tmp_path))
    tiny_tcl_config().save_pretrained(tmp_path / "base")  # a saved model's config: what LoRA would adapt
    with pytest.raises(
        ValueError, match=r"run.lock_image_unlocked_layers says what stays trainable .* set run.lock_image"
    ):
        train.main(["--config", config, "--lock_image_unlocked_layers", "1"])
    with pytest.raises(ValueError, match=r"run.lock_text_unlocked_layers must be an integer >= 0, got -1"):
        train.main(["--config", config, "--lock_text", "--lock_text_unlocked_layers", "-1"])
    with pytest.raises(SystemExit, match=r"run.lock_image: unlocked_layers = 3: vision_model has 2 blocks"):
        train.main(["--config", config, "--lock_image", "--lock_image_unlocked_layers", "3", "--max_steps", "1"])
    with pytest.raises(SystemExit, match=r"run.lock_text with run.lora_r: LoRA already freezes every base weight"):
        train.main(["--config", config, "--lock_text", "--lora_r", "4", "--model_name_or_path", str(tmp_path / "base")])
    mivc = {"model": TINY_TRAIN_MIVC, "training": {"output_dir": str(tmp_path / "mivc"), "use_cpu": True}}
    (tmp_path / "mivc.yaml").write_text(yaml.safe_dump(mivc))
    with pytest.raises(SystemExit, match=r"run.lock_image locks a tower of TCL / CODIS; an MIVC model freezes"):
        train.main(["--config", str(tmp_path / "mivc.yaml"), "--lock_image"])


def test_resuming_with_other_locks_is_refused_naming_them(tmp_path):
    """The optimizer's state is per trainable parameter: a checkpoint resumes with the locks it was trained with."""
    import train

    config = _digits_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    train.main(["--config", str(config), "--lock_image"])
    with pytest.raises(Exception, match=r"lock_image: True in the checkpoint, False now"):
        train.main(["--config", str(config), "--max_steps", "3", "--resume_from_checkpoint", "latest"])

"""training/train.py: config + overrides, and an end-to-end `accelerate launch` run on a dataset with bad images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from fixtures import TINY_TRAIN_MODEL
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

from train import apply_overrides, load_config, parse_overrides  # noqa: E402



def test_overrides_go_to_the_right_section():
    config = {"model": {"embed_dim": 64, "vision_config": {"hidden_size": 8}}, "training": {"max_steps": 5}}
    pairs = parse_overrides(["--max_steps", "10", "--learning_rate", "1e-4", "--embed_dim=32", "--push_to_hub",
                             "--model.vision_config.hidden_size", "16", "--label_column", "null",
                             "--report_to", "[tensorboard]"])
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


@pytest.mark.parametrize("argv, field, shown", [
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
])
def test_override_values_are_checked_against_the_field_types(argv, field, shown):
    with pytest.raises(SystemExit) as caught:
        load_config(None, parse_overrides(argv))
    message = str(caught.value)
    assert message.startswith(f"{field} = {shown}: expected "), message


def test_string_fields_keep_yes_no_on_off_as_text_and_the_values_reach_the_arguments(tmp_path):
    import train

    from vlalign.data import DataArguments

    config = load_config(None, parse_overrides([
        "--save_strategy", "no", "--include_num_input_tokens_seen", "no", "--run_name", "Yes", "--caption_column",
        "off", "--eval_split", "null", "--push_to_hub", "--hub_model_id", "me/x", "--streaming", "on",
        "--max_steps", "10", "--learning_rate", "1e-4", "--eval_steps", "5", "--report_to", "[tensorboard]",
        "--contrastive_loss", "decomposable", "--resume_from_checkpoint", "--output_dir", str(tmp_path)]))
    training, data, run = config["training"], config["data"], config["run"]
    assert (training["save_strategy"], training["include_num_input_tokens_seen"], training["run_name"]) == (
        "no", "no", "Yes")
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
    path.write_text("training:\n  save_strategy: no\n  bf16: off\n  max_steps: 3\nrun:\n  push_to_hub: yes\n"
                    "model:\n  vision_config: {qkv_bias: no}\n  learnable_temperature: on\n")
    config = load_config(str(path), [])
    assert config["training"] == {"save_strategy": "no", "bf16": False, "max_steps": 3}
    assert config["run"]["push_to_hub"] is True and config["model"]["learnable_temperature"] is True
    assert config["model"]["vision_config"] == {"qkv_bias": False}
    path.write_text("training:\n  max_steps: ten\n")
    with pytest.raises(SystemExit, match=r"^training.max_steps = 'ten': expected an integer"):
        load_config(str(path), [])
    path.write_text("data:\n  eval_split: 2017\n")  # a number where text is wanted: say how to write the text
    with pytest.raises(SystemExit, match=r"^data.eval_split = 2017: expected a string or null, got an integer "
                                         r"\(quote it"):
        load_config(str(path), [])


@pytest.mark.parametrize("text, found", [
    ("- training\n- data\n", "a list"),
    ("just some text\n", "a string"),
    ("42\n", "an integer"),
    ("training: 5\n", "section 'training' is an integer"),
    ("data: [digits]\n", "section 'data' is a list"),
])
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
        rows.append({"file_name": f"{i}.png", "caption": f"a handwritten digit {names[digits.target[i]]}",
                     "label": int(digits.target[i])})
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
        "data": {"dataset_name": "imagefolder", "data_dir": str(tmp_path / "data"), "label_column": "label",
                 "image_id_column": None, "eval_split": "train",
                 "class_names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
                 "zero_shot_templates": ["a handwritten digit {name}"]},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 16,
                     "learning_rate": 1e-3, "logging_steps": 2, "save_strategy": "no", "report_to": "none",
                     "dataloader_drop_last": True, "use_cpu": True, "seed": 0},
        "run": {"tokenizer_name_or_path": None, "processor_name_or_path": str(tmp_path / "processor"),
                "hub_model_id": "someone/tiny-tcl"},
    }
    from vlalign.data import build_digits_processor

    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret_token_never_written")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(REPO / "training/train.py"), "--config", str(tmp_path / "config.yaml"), "--seed", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("zero_shot_accuracy", "i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "t2i_recall@1",
                "t2i_recall@5", "t2i_recall@10"):
        assert 0.0 <= results[key] <= 100.0, key
    assert results["train_steps"] == 6
    assert results["train_items_skipped"] >= 1  # bad images met during training were skipped and counted
    assert results["num_eval_images_skipped"] == bad
    assert "Skipped an undecodable image" in proc.stderr
    config_json = json.loads((out / "config.json").read_text())
    assert set(config_json["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"}
    for name in ("model.safetensors", "modeling_tcl.py", "configuration_tcl.py", "modeling_albef.py", "losses.py",
                 "processor_config.json", "tokenizer.json", "README.md"):
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
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    import train

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["token"] = self.token
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(operation.path_in_repo for operation in operations)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="m",
                          commit_description="", oid="1" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_never_written")
    config = {"model": TINY_TRAIN_MODEL,
              "data": {"max_train_samples": 64, "max_eval_samples": 20},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 16,
                           "save_strategy": "no", "report_to": "none", "use_cpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id", "someone/tiny-tcl"])
    assert uploaded["repo_id"] == "someone/tiny-tcl"
    assert uploaded["token"] == "hf_secret_token_never_written"
    for name in ("config.json", "model.safetensors", "modeling_tcl.py", "configuration_tcl.py", "modeling_albef.py",
                 "losses.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "eval_results.json"):
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
    config = {"model": {**model, "model_type": "codis", "codebook_size": 8},
              "data": {"max_train_samples": 64, "max_eval_samples": 30},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 16,
                           "save_strategy": "no", "report_to": "none", "use_cpu": True}}
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

    config = {"model": {**TINY_TRAIN_MODEL, "model_type": "codis"},  # lmi_image_grid is a TCL field
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "use_cpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"\['lmi_image_grid'\] are not fields of CODISConfig"):
        train.main(["--config", str(tmp_path / "config.yaml")])
    with pytest.raises(SystemExit, match="unknown model.model_type 'nope'"):
        train.main(["--config", str(tmp_path / "config.yaml"), "--model_type", "nope"])



def test_processor_of_another_image_size_is_refused_before_training(tmp_path):
    import train

    from vlalign.data import build_digits_processor

    build_digits_processor(image_size=32).save_pretrained(str(tmp_path / "processor"))
    config = {"model": TINY_TRAIN_MODEL,  # image_size 16
              "data": {"max_train_samples": 16, "max_eval_samples": 8},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "use_cpu": True, "report_to": "none"},
              "run": {"processor_name_or_path": str(tmp_path / "processor")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"resizes images to 32x32 but the vision tower takes 16x16"):
        train.main(["--config", str(tmp_path / "config.yaml")])
    assert not (tmp_path / "out").exists()

TINY_MIVC = {
    "model_type": "mivc",
    "vision_config": {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    "text_config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128},
    "pooling_mode": "gated_attention", "pooling_attention_dim": 16,
    "freeze_vision_model": False, "freeze_language_model": False,
}


def test_mivc_run_trains_evaluates_and_writes_a_loadable_folder(tmp_path):
    """`model_type: mivc` trains the generative model on multi-view digits and writes weights, processor, code,
    eval_results.json (exact match, pooling weights on clean vs degraded images) and an image-text-to-text card."""
    import train
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = {"model": TINY_MIVC,
              "data": {"num_train_items": 40, "num_test_items": 12, "image_size": 16},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 8,
                           "save_strategy": "no", "report_to": "none", "use_cpu": True, "learning_rate": 1e-3}}
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
    for name in ("model.safetensors", "modeling_mivc.py", "configuration_mivc.py", "mivc_pooling.py",
                 "processor_config.json", "README.md"):
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
    with pytest.raises(SystemExit, match=r"model.gradient_cache_chunk_size, run.alpha_ramp_steps: training settings "
                                         r"now.*write them under training:"):
        load_config(str(path), [])
    # on the command line the field name alone finds its section
    assert load_config(None, parse_overrides(["--alpha_ramp_steps", "5", "--gradient_cache_chunk_size", "8"]))[
        "training"] == {"alpha_ramp_steps": 5, "gradient_cache_chunk_size": 8}


def test_a_contrastive_setting_is_refused_for_mivc(tmp_path):
    import train

    from vlalign.trainer import VLAlignTrainingArguments

    with pytest.raises(SystemExit, match=r"\['itm_rerank_k'\] are not settings of VLAlignTrainingArguments"):
        train.load_config(None, train.parse_overrides(["--model_type", "mivc", "--itm_rerank_k", "5"]))
    assert train.task_of("mivc").training_arguments is VLAlignTrainingArguments

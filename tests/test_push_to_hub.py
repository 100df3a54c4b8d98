"""push_to_hub end to end for TCL, CODIS and MIVC, from training/train.py and from Python.

The Hub is unreachable from CI: `HfApi.create_repo` and `HfApi.create_commit` (the single call that would send the
files) are intercepted, and the tests check what would have been uploaded: every file needed to load the model, a
model card that parses back with valid metadata, and no token anywhere.
"""

import json
import sys
from pathlib import Path

import huggingface_hub.hf_api
import pytest
import yaml
from conftest import TINY_TRAIN_MODEL
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

TOKEN = "hf_secret_token_never_written_anywhere"

VISION = TINY_TRAIN_MODEL["vision_config"]
ALBEF_STACK = {k: v for k, v in TINY_TRAIN_MODEL.items() if k != "lmi_image_grid"}
MODELS = {
    "tcl": {"model_type": "tcl", **TINY_TRAIN_MODEL},
    "codis": {"model_type": "codis", **ALBEF_STACK, "codebook_size": 8},
    "mivc": {"model_type": "mivc", "vision_config": dict(VISION, patch_size=8),
             "text_config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
                             "max_position_embeddings": 128},
             "pooling_attention_dim": 16, "freeze_vision_model": False, "freeze_language_model": False},
}
CODE_FILES = {
    "tcl": {"modeling_tcl.py", "configuration_tcl.py", "configuration_albef.py", "albef_stack.py", "losses.py",
            "processing_vlalign.py"},
    "codis": {"modeling_codis.py", "configuration_codis.py", "configuration_albef.py", "albef_stack.py", "losses.py",
              "processing_vlalign.py"},
    "mivc": {"modeling_mivc.py", "configuration_mivc.py", "mivc_pooling.py", "albef_stack.py", "losses.py",
             "processing_vlalign.py"},
}
PIPELINE_TAG = {"tcl": "zero-shot-image-classification", "codis": "zero-shot-image-classification",
                "mivc": "image-text-to-text"}
TASK_CLASS = {"tcl": "AutoModelForZeroShotImageClassification", "codis": "AutoModelForZeroShotImageClassification",
              "mivc": "AutoModelForImageTextToText"}


@pytest.fixture
def hub(monkeypatch):
    """Intercepts repo creation and the commit; `hub["files"]` maps path_in_repo -> uploaded bytes."""
    calls = {"files": {}, "commits": 0, "tokens": set()}

    def create_repo(self, repo_id, **kwargs):
        calls["tokens"].add(kwargs.get("token") or self.token)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        calls["tokens"].add(kwargs.get("token") or self.token)
        calls["commits"] += 1
        calls["repo_id"] = repo_id
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, Path)):
                data = Path(source).read_bytes()
            elif isinstance(source, bytes):
                data = source
            else:
                data = source.read() if hasattr(source, "read") else bytes(source)
            calls["files"][operation.path_in_repo] = data
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message=commit_message,
                          commit_description="", oid="1" * 40)

    def validate_yaml(self, content, *args, **kwargs):
        # upload_folder asks the Hub to validate README.md's metadata: parse it locally instead
        calls["validated_yaml"] = yaml.safe_load(content.split("---")[1])

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    # with hf_xet installed upload_folder streams through a multi-commit pipeline; the plain path ends in one
    # create_commit, the call intercepted here
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    return calls


def _no_token_anywhere(files: dict, *logs: str) -> None:
    for name, data in files.items():
        assert TOKEN.encode() not in data, name
    for text in logs:
        assert TOKEN not in text


def _load_card(files: dict, tmp_path: Path) -> ModelCard:
    (tmp_path / "card.md").write_bytes(files["README.md"])
    return ModelCard.load(tmp_path / "card.md")


@pytest.mark.parametrize("model_type", ["tcl", "codis", "mivc"])
def test_train_script_push_uploads_everything_needed_to_load(model_type, tmp_path, hub, monkeypatch, caplog, capsys):
    import train
    from transformers import AutoConfig

    data = ({"num_train_items": 24, "num_test_items": 8, "image_size": 16} if model_type == "mivc"
            else {"max_train_samples": 48, "max_eval_samples": 20})
    config = {"model": MODELS[model_type], "data": data,
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 8,
                           "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    train.main(["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id",
                f"someone/tiny-{model_type}"])
    files = hub["files"]
    assert hub["commits"] == 1 and hub["repo_id"] == f"someone/tiny-{model_type}"
    assert hub["validated_yaml"]["library_name"] == "transformers"
    assert hub["tokens"] == {TOKEN}  # the token reached HfApi, and only HfApi
    needed = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "README.md", "eval_results.json", "training_curves.png"} | CODE_FILES[model_type]
    assert needed <= set(files), needed - set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    config_json = json.loads(files["config.json"])
    assert config_json["model_type"] == model_type
    auto_map = config_json["auto_map"]
    assert TASK_CLASS[model_type] in auto_map and "AutoConfig" in auto_map
    for target in auto_map.values():  # every class the auto_map names is in an uploaded file
        module = target.split(".")[0]
        assert f"{module}.py" in files, target
    processor_json = json.loads(files["processor_config.json"])
    assert processor_json["auto_map"]["AutoProcessor"].startswith("processing_vlalign.")

    card = _load_card(files, tmp_path)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert {"vlalign", model_type} <= set(card.data.tags)
    assert card.data.pipeline_tag == PIPELINE_TAG[model_type]
    assert card.data.model_name == f"someone/tiny-{model_type}" and card.data.eval_results
    eval_results = json.loads(files["eval_results.json"])
    for result in card.data.eval_results:
        assert result.metric_value == pytest.approx(eval_results[result.metric_type])
    for picture in ("training_curves.png",) + (("retrieval_examples.png",) if model_type != "mivc"
                                               else ("multi_image_examples.png",)):
        assert files[picture][:8] == b"\x89PNG\r\n\x1a\n", picture
        assert f"]({picture})" in card.content
    _no_token_anywhere(files, caplog.text, capsys.readouterr().out)

    # what was uploaded is a complete, loadable repository
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, payload in files.items():
        (mirror / name).write_bytes(payload)
    assert AutoConfig.from_pretrained(mirror).model_type == model_type
    import transformers

    model = getattr(transformers, TASK_CLASS[model_type]).from_pretrained(mirror)
    assert type(model).__name__ == auto_map[TASK_CLASS[model_type]].split(".")[1]


@pytest.mark.parametrize("model_type", ["tcl", "codis", "mivc"])
def test_push_from_python_uploads_weights_code_and_processor_files(model_type, tmp_path, hub, caplog):
    import vlalign
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from vlalign.data import build_digits_processor
    from vlalign.multiview_digits import build_mivc_digits_processor

    section = {k: v for k, v in MODELS[model_type].items() if k != "model_type"}
    if model_type == "mivc":
        processor = build_mivc_digits_processor(image_seq_length=4, image_size=16)
        section["text_config"] = dict(section["text_config"], vocab_size=len(processor.tokenizer))
        config = AutoConfig.for_model("mivc", image_token_id=processor.image_token_id, **section)
        model = AutoModelForImageTextToText.from_config(config)
    else:
        processor = build_digits_processor(image_size=16)
        config = AutoConfig.for_model(model_type, **section)
        model = AutoModel.from_config(config)
    assert isinstance(config, (vlalign.ALBEFStackConfig, vlalign.MIVCConfig))
    model.push_to_hub(f"someone/py-{model_type}", token=TOKEN)
    model_files = dict(hub["files"])
    assert {"config.json", "model.safetensors"} | (CODE_FILES[model_type] - {"processing_vlalign.py"}) <= set(
        model_files)
    hub["files"].clear()
    processor.push_to_hub(f"someone/py-{model_type}", token=TOKEN)
    processor_files = dict(hub["files"])
    assert {"processor_config.json", "tokenizer.json", "processing_vlalign.py"} <= set(processor_files)
    assert hub["tokens"] == {TOKEN}
    _no_token_anywhere({**model_files, **processor_files}, caplog.text)

"""push_to_hub end to end for TCL, CODIS and MIVC, from training/train.py and from Python.

The Hub is unreachable from CI: `HfApi.create_repo` and `HfApi.create_commit` (the single call that would send the
files) are intercepted, and the tests check what would have been uploaded: every file needed to load the model, a
model card that parses back with valid metadata, exactly the allow-list of vlalign.hub.publishable_files (no
checkpoints, logs, training arguments or stale files), no token and no absolute path anywhere; and that a failed push
says so in one line with a command that pushes the saved model later.
"""

import io
import json
import shlex
import sys
import zipfile
from pathlib import Path

import huggingface_hub.hf_api
import pytest
import yaml
from fixtures import TINY_TRAIN_MODEL
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
ALBEF_CODE = {"configuration_albef.py", "modeling_albef.py", "loading.py", "momentum.py", "gradient_cache.py",
              "losses.py", "processing_vlalign.py"}
CODE_FILES = {
    "tcl": {"modeling_tcl.py", "configuration_tcl.py"} | ALBEF_CODE,
    "codis": {"modeling_codis.py", "configuration_codis.py"} | ALBEF_CODE,
    "mivc": {"modeling_mivc.py", "configuration_mivc.py", "mivc_pooling.py", "loading.py", "processing_vlalign.py"},
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
        # create_commit / upload_folder ask the Hub to validate README.md's metadata: parse it locally instead
        calls["validated_yaml"] = yaml.safe_load(content.split("---")[1])

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    # model.push_to_hub goes through upload_folder, which with hf_xet installed streams through a multi-commit
    # pipeline; the plain path ends in one create_commit, the call intercepted here
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
    # the metadata that the Hub validates (the real create_commit sends README.md's front matter first)
    assert yaml.safe_load(files["README.md"].decode().split("---")[1])["library_name"] == "transformers"
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
    from vlalign.data.multiview_digits import build_mivc_digits_processor

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


# ----------------------------------------------------------------------------- what a push publishes, and nothing else
RUN_TOKEN = "hf_SECRETtesttoken_given_on_the_command_line"
# left in the output folder by an earlier run: none of it may be published
STALE = {"checkpoint-0/optimizer.pt": b"old pickle", "checkpoint-0/training_args.bin": b"old pickle",
         "runs/Jan01_oldhost/events.out.tfevents.1.oldhost": b"old events", "old_picture.png": b"\x89PNG old",
         "old_module.py": b"x = 1\n", "pytorch_model.bin": b"old pickle", "notes.txt": b"old notes"}


def _payloads(files: dict):
    """(name, bytes) of every uploaded file and of every member of an uploaded zip archive (torch pickles are zips)."""
    for name, data in files.items():
        yield name, data
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    yield f"{name}:{member}", archive.read(member)


def _tiny_towers(root: Path) -> tuple[str, str]:
    """Local vision and text checkpoints for `from_vision_text_pretrained`: absolute paths a card must not show."""
    import torch
    import transformers
    from fixtures import TINY_TEXT, TINY_VISION

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(**{k: v for k, v in TINY_TEXT.items()
                                                                   if k != "model_type"}))
    vit.save_pretrained(root / "vit")
    bert.save_pretrained(root / "bert")
    return str(root / "vit"), str(root / "bert")


def test_push_publishes_the_allow_list_only_and_no_token_is_written(tmp_path, hub, monkeypatch, caplog, capsys):
    """A run with checkpoints, TensorBoard logs, stale files in its output folder, local tower checkpoints and a
    --hub_token on the command line: the commit holds exactly the allow-list, with no token and no absolute path of
    this machine in any byte; the token is in no file of the output folder either."""
    import train
    from vlalign.hub import publishable_files

    monkeypatch.delenv("HF_TOKEN", raising=False)  # the token comes from the command line only
    out = tmp_path / "out"
    for name, data in STALE.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    vision_path, text_path = _tiny_towers(tmp_path / "towers")
    model = {"model_type": "tcl", "vision_config": {"image_size": 16},  # sizes the processor's images
             **{k: TINY_TRAIN_MODEL[k] for k in ("num_fusion_layers", "embed_dim", "queue_size", "lmi_image_grid")}}
    config = {"model": model, "data": {"max_train_samples": 32, "max_eval_samples": 12},
              "run": {"vision_model_name_or_path": vision_path, "text_model_name_or_path": text_path},
              "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 16,
                           "logging_steps": 1, "save_steps": 1, "report_to": "tensorboard", "use_cpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id", "someone/tiny-tcl",
                "--hub_token", RUN_TOKEN])

    # the run did leave checkpoints, logs and training arguments next to the model
    assert {"checkpoint-1", "checkpoint-2", "runs", "training_args.json"} <= {p.name for p in out.iterdir()}
    assert (out / "checkpoint-2" / "training_args.bin").is_file()
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 2  # the stale one and this run's

    files = hub["files"]
    assert hub["commits"] == 1 and hub["tokens"] == {RUN_TOKEN}
    expected = {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json", "README.md", "eval_results.json", "training_curves.png",
                "retrieval_examples.png"} | CODE_FILES["tcl"]
    assert set(files) == expected
    assert sorted(files) == publishable_files(out)
    for name, data in files.items():
        assert data == (out / name).read_bytes(), name
    for name, data in _payloads(files):
        assert RUN_TOKEN.encode() not in data, name
        for path in (out.resolve(), tmp_path.resolve(), Path(vision_path), Path(text_path)):
            assert str(path).encode() not in data, (name, path)
    card = _load_card(files, tmp_path)
    assert card.data.base_model is None and "vit (local folder)" in card.text  # named, not a path, not metadata

    for path in out.rglob("*"):  # nothing written by the run holds the token: checkpoints' training_args.bin neither
        if path.is_file():
            for name, data in _payloads({str(path): path.read_bytes()}):
                assert RUN_TOKEN.encode() not in data, name
    assert RUN_TOKEN not in caplog.text and RUN_TOKEN not in "".join(capsys.readouterr())


def _connect_error(message):
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub 1.x
        import httpx
    return httpx.ConnectError(message)


def _http_error(status):
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    response = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(f"{status} Server Error: Service Unavailable for url: {response.url}\n(Request ID: x)",
                          response=response)


def test_failed_push_says_so_in_one_line_keeps_the_folder_and_gives_a_working_command(tmp_path, hub, monkeypatch):
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    import train
    from vlalign.hub import publishable_files

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    config = {"model": MODELS["tcl"], "data": {"max_train_samples": 16, "max_eval_samples": 8},
              "training": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 16,
                           "save_strategy": "no", "report_to": "none", "use_cpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def unreachable(self, *args, **kwargs):
        raise _connect_error("[Errno -3] Temporary failure in name resolution")

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", unreachable)
        with pytest.raises(SystemExit) as failed:
            train.main(["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id",
                        "someone/tiny-tcl"])
    saved = publishable_files(out)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(saved)

    def check(exit_info, error_name):
        message = exit_info.value.code
        assert isinstance(message, str) and "\n" not in message  # non-zero exit status, one line, no traceback
        assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__
        assert message.startswith("Push to the Hub repo someone/tiny-tcl failed") and error_name in message
        assert f"saved locally at {out.resolve()};" in message and TOKEN not in message
        return message.split(" with: ", 1)[1]

    command = check(failed, "ConnectError")
    assert publishable_files(out) == saved and not hub["files"]

    run = train.RunArguments(push_to_hub=True, hub_model_id="someone/tiny-tcl")
    for error in (requests.exceptions.ConnectionError("Max retries exceeded"), _http_error(503),
                  OfflineModeIsEnabled("HF_HUB_OFFLINE=1")):
        def fail(self, *args, _error=error, **kwargs):
            raise _error

        with monkeypatch.context() as patch:
            patch.setattr(HfApi, "create_repo", fail)
            with pytest.raises(SystemExit) as failed:
                train.push_to_hub(out, run)
        assert check(failed, type(error).__name__) == command

    # the suggested command pushes the saved model, the allow-list only (what `python -c` would run)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    exec(argv[2], {})
    assert sorted(hub["files"]) == saved


def test_hub_settings_never_reach_the_training_arguments(tmp_path):
    """From the command line or a YAML `training:` section, the token and push settings go to `run`: the
    TrainingArguments that the Trainer pickles into each checkpoint hold no token and never push by themselves."""
    import pickle

    import train

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"training": {"output_dir": str(tmp_path / "out"), "hub_token": RUN_TOKEN, "push_to_hub": True,
                      "hub_model_id": "someone/x", "hub_private_repo": True}}))
    for argv in ([], ["--hub_token", RUN_TOKEN]):
        config = train.load_config(str(tmp_path / "config.yaml"), train.parse_overrides(argv))
        assert not set(train.HUB_SETTINGS) & set(config["training"])
        run = train.RunArguments(**config["run"])
        assert (run.hub_token, run.push_to_hub, run.hub_model_id, run.hub_private_repo) == (
            RUN_TOKEN, True, "someone/x", True)
        assert RUN_TOKEN not in repr(run)
        training_args = train._training_arguments(config, str(tmp_path / "out"))
        assert training_args.hub_token is None and not training_args.push_to_hub
        assert RUN_TOKEN.encode() not in pickle.dumps(training_args)

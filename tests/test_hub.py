"""Tests for vlalign.hub: model card rendering / round trip and Hub upload (network mocked)."""

import ast
import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from vlalign.hub import (
    build_model_card,
    is_hub_id,
    publishable_files,
    push_command,
    push_folder_to_hub,
    save_model_card,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "tcl.md"

HPARAMS = {
    "learning_rate": 1e-4,
    "weight_decay": 0.02,
    "per_device_train_batch_size": 64,
    "embed_dim": 256,
    "queue_size": 65536,
    "momentum": 0.995,
    "betas": [0.9, 0.98],
    "lr_scheduler_type": "cosine",
}
METRICS = {
    "zero_shot_accuracy": 71.25,
    "i2t_recall@1": 93.0,
    "i2t_recall@5": 99.2,
    "i2t_recall@10": 99.8,
    "t2i_recall@1": 79.6,
    "t2i_recall@5": 95.1,
    "t2i_recall@10": 97.7,
}
BOOKKEEPING = {"i2t_num_queries": 1000, "t2i_num_queries": 5000, "train_loss": 1.2345}


def _build(**overrides):
    kwargs = {
        "model_id": "vlalign-test/tcl-coco",
        "base_model": ["google/vit-base-patch16-224-in21k", "bert-base-uncased"],
        "dataset_name": "vlalign-test/coco-karpathy",
        "dataset_split": "train",
        "dataset_description": "COCO captions, Karpathy split",
        "num_train_samples": 566_747,
        "hyperparameters": HPARAMS,
        "eval_results": {**METRICS, **BOOKKEEPING},
        "eval_split": "test",
        "tags": ["coco"],
    }
    kwargs.update(overrides)
    return build_model_card(TEMPLATE, **kwargs)


def _front_matter(path):
    """The YAML block exactly as the Hub reads it: between the first two '---' lines."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert m, "README.md must start with a YAML front matter block"
    return yaml.safe_load(m.group(1)), text[m.end() :]


def _table_rows(body):
    """Markdown table rows split on unescaped pipes."""
    rows = []
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            rows.append([c.strip() for c in cells])
    return rows


# ----------------------------------------------------------------------------- round trip
def test_card_round_trip(tmp_path):
    card = _build()
    path = save_model_card(tmp_path, card)
    assert path == tmp_path / "README.md"
    loaded = ModelCard.load(path)
    data = loaded.data

    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.tags == ["vlalign", "vision-language", "contrastive-learning", "tcl", "coco"]
    assert data.datasets == ["vlalign-test/coco-karpathy"]
    assert data.base_model == ["google/vit-base-patch16-224-in21k", "bert-base-uncased"]
    assert data.metrics == ["accuracy", "recall"]
    assert data.model_name == "vlalign-test/tcl-coco"

    # every metric went into model-index with its value, nothing else did
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got == METRICS
    tasks = {r.metric_type: r.task_type for r in data.eval_results}
    assert tasks["zero_shot_accuracy"] == "zero-shot-image-classification"
    assert {tasks[k] for k in METRICS if "recall" in k} == {"image-text-retrieval"}
    assert {(r.dataset_name, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("vlalign-test/coco-karpathy", "vlalign-test/coco-karpathy", "test")
    }

    # loading and re-serialising is stable (nothing lost or reordered)
    assert loaded.content == card.content


def test_card_body_tables_and_usage(tmp_path):
    card = _build()
    save_model_card(tmp_path, card)
    meta, body = _front_matter(tmp_path / "README.md")
    assert meta["library_name"] == "transformers"
    assert body.lstrip().startswith("# vlalign-test/tcl-coco")

    rows = _table_rows(body)
    eval_rows = {r[1]: r[2] for r in rows if len(r) == 3}
    assert eval_rows["Zero-shot top-1 accuracy"] == "71.25"
    for k in (1, 5, 10):
        assert eval_rows[f"Image→text recall@{k}"] == f"{METRICS[f'i2t_recall@{k}']:.2f}"
        assert eval_rows[f"Text→image recall@{k}"] == f"{METRICS[f't2i_recall@{k}']:.2f}"
    pairs = {r[0].replace("\\_", "_"): r[1] for r in rows if len(r) == 2}
    assert pairs["learning_rate"] == "0.0001" and pairs["queue_size"] == "65536"
    assert pairs["lr_scheduler_type"] == "cosine"
    assert pairs["i2t_num_queries"] == "1000" and pairs["train_loss"] == "1.2345"  # listed, not exported
    assert "566,747" in body and "Karpathy split" in body

    # usage: package import, remote code and pipeline; the code blocks are valid Python
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    assert len(blocks) == 3
    for b in blocks:
        ast.parse(b)
    assert 'AutoModel.from_pretrained("vlalign-test/tcl-coco")' in blocks[0] and "import vlalign" in blocks[0]
    assert 'AutoModel.from_pretrained("vlalign-test/tcl-coco", trust_remote_code=True)' in blocks[1]
    assert (
        'pipeline("zero-shot-image-classification", model="vlalign-test/tcl-coco", trust_remote_code=True)' in blocks[2]
    )
    assert "2202.10401" in body and "@inproceedings" in body and "Triple Contrastive Learning" in body


def test_nested_eval_results_nan_and_numpy_values(tmp_path):
    card = _build(
        eval_results={
            "nlphuji/flickr30k": {"i2t_recall@1": np.float32(88.5), "t2i_recall@1": float("nan")},
            "CIFAR-10 (test)": {"eval_zero_shot_accuracy": np.float64(90.0)},
        },
        eval_split=None,
    )
    save_model_card(tmp_path, card)
    data = ModelCard.load(tmp_path / "README.md").data
    got = {(r.dataset_name, r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    # numpy scalars became plain floats (yaml.safe_load could read them); NaN is not exported
    assert got == {
        ("nlphuji/flickr30k", "nlphuji/flickr30k", "i2t_recall@1"): float(np.float32(88.5)),
        ("CIFAR-10 (test)", "cifar-10-test", "eval_zero_shot_accuracy"): 90.0,
    }
    assert all(type(v) is float for v in got.values())
    rows = _table_rows(card.text)
    assert ["Image-Text Retrieval", "Text→image recall@1", "n/a"] in rows
    assert data.metrics == ["accuracy", "recall"]


def test_non_hub_names_stay_out_of_metadata():
    card = _build(dataset_name="digits", base_model="/data/checkpoints/vit", eval_results={})
    assert card.data.datasets is None and card.data.base_model is None
    assert card.data.eval_results is None
    assert "digits" in card.text and "/data/checkpoints/vit" in card.text
    assert "No evaluation results were recorded." in card.text
    assert is_hub_id("user/name") and not is_hub_id("digits") and not is_hub_id("a/b/c")


# ----------------------------------------------------------------------------- adversarial input
BAD = [
    'evil"\n---\nfoo: bar\n---\n# injected',
    "key: value # comment\r\n- list: item",
    'it\'s "quoted" | pipe `code` ```fence``` <!-- html --> [link](x) *bold* {{ card_data }} {% raw %}',
    "line\u2028sep\u2029para\x85nel\x00nul \\ backslash",
]


@pytest.mark.parametrize("bad", BAD)
def test_adversarial_strings_keep_card_parseable(tmp_path, bad):
    card = _build(
        model_id=bad,
        dataset_name=bad,
        dataset_description=bad,
        tags=[bad],
        hyperparameters={bad: bad, "lr": 1e-4},
        extra={bad: bad},
        eval_results=METRICS,
        license=bad,
    )
    save_model_card(tmp_path, card)
    meta, body = _front_matter(tmp_path / "README.md")
    # the front matter holds exactly the keys we wrote, nothing injected
    assert set(meta) == {"library_name", "license", "metrics", "pipeline_tag", "tags", "base_model", "model-index"}
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.model_name == bad and loaded.data.license == bad
    assert bad in loaded.data.tags
    assert {r.dataset_name for r in loaded.data.eval_results} == {bad}
    assert {r.metric_type: r.metric_value for r in loaded.data.eval_results} == METRICS

    # body: no stray front-matter delimiters or headings, tables keep their columns
    for line in body.splitlines():
        assert line.strip() != "---"
        assert not line.lstrip().startswith("# injected")  # no new heading: newlines were flattened
    for row in _table_rows(body):
        assert len(row) in (2, 3), row
    if "{{ card_data }}" in bad:  # shown as text, never evaluated as a template expression
        assert "{{ card\\_data }}" in body and "library_name" not in body
    # the usage snippets are still valid Python and load exactly this model id
    for block in re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL):
        tree = ast.parse(block)
        calls = [
            n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"
        ]
        for call in calls:
            assert ast.literal_eval(call.args[0]) == bad


def test_template_must_start_with_front_matter(tmp_path):
    t = tmp_path / "bad.md"
    t.write_text("# title\n{{ card_data }}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="front matter"):
        build_model_card(t, model_id="a/b", dataset_name="a/c", hyperparameters={}, eval_results={})


# ----------------------------------------------------------------------------- push
TOKEN = "hf_" + "SeCrEt" * 6


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercepts repo creation and the commit; `calls["upload"]["files"]` maps path_in_repo -> uploaded bytes."""
    calls = {}

    def create_repo(self, repo_id, *, exist_ok=False, private=None, **kw):
        calls["create"] = dict(repo_id=repo_id, exist_ok=exist_ok, private=private, token=self.token, **kw)
        full = repo_id if "/" in repo_id else f"someuser/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{full}")

    def create_commit(self, repo_id, operations, *, commit_message=None, **kw):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["upload"] = dict(repo_id=repo_id, files=files, commit_message=commit_message, token=self.token, **kw)
        logging.getLogger("huggingface_hub").info("uploading %s", sorted(files))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd",
            commit_message=commit_message,
            commit_description="",
            oid="0123abcd",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def _model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "tcl"}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"weights")
    save_model_card(folder, _build())
    return folder


def _write(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


# what a training run leaves next to the model, and what earlier runs left there
RUN_LEFTOVERS = {
    "checkpoint-2/model.safetensors": b"w", "checkpoint-2/config.json": "{}", "checkpoint-2/optimizer.pt": b"pk",
    "checkpoint-2/scheduler.pt": b"pk", "checkpoint-2/rng_state.pth": b"pk", "checkpoint-2/training_args.bin": b"pk",
    "checkpoint-2/trainer_state.json": "{}", "runs/Dec01_host/events.out.tfevents.1.host": b"ev",
    "training_args.json": '{"output_dir": "/home/me/out"}', "training_args.bin": b"pk", "optimizer.pt": b"pk",
    "pytorch_model.bin": b"pk", "old_picture.png": b"png", "old_module.py": "x = 1\n", "notes.txt": "n",
    "all_results.json": "{}", "trainer_state.json": "{}", "adapter_model.bin": b"pk",
}
CODE = {
    "configuration_x.py": "X = 1\n",
    "modeling_x.py": "from .configuration_x import X\nfrom .helpers import h\n",
    "helpers.py": "import torch\nfrom .deep import d\n",
    "deep.py": "d = 1\n",
    "processing_x.py": "P = 1\n",
}
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
            "AutoModelForCausalLM": "someone/other-repo--modeling_other.Other"}
CARD = ("---\nlicense: mit\n---\n# m\n\n![curves \\[left\\]](curves.png)\n\n![grid](retrieval.png)\n"
        "![remote](https://example.com/remote.png) [a link](notes.txt) ![escape](../outside.png)\n")


def _full_folder(tmp_path, sharded=False):
    folder = tmp_path / "model"
    _write(folder, {**RUN_LEFTOVERS, **CODE, "README.md": CARD, "curves.png": b"png", "retrieval.png": b"png",
                    "config.json": json.dumps({"model_type": "x", "auto_map": AUTO_MAP}),
                    "processor_config.json": json.dumps({"auto_map": {"AutoProcessor": "processing_x.P"}}),
                    "preprocessor_config.json": "{}", "tokenizer.json": "{}", "tokenizer_config.json": "{}",
                    "generation_config.json": "{}", "eval_results.json": "{}"})
    _write(tmp_path, {"outside.png": b"png"})
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        _write(folder, {shards[0]: b"a", shards[1]: b"b", "model-00001-of-00003.safetensors": b"stale",
                        "model.safetensors.index.json": json.dumps({"weight_map": {"a": shards[0], "b": shards[1],
                                                                                   "c": shards[1]}})})
    else:
        _write(folder, {"model.safetensors": b"w"})
    return folder


ALLOWED = {"config.json", "README.md", "curves.png", "retrieval.png", "eval_results.json", "generation_config.json",
           "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
           "configuration_x.py", "modeling_x.py", "helpers.py", "deep.py", "processing_x.py"}


def test_publishable_files_are_exactly_the_allow_list(tmp_path):
    folder = _full_folder(tmp_path)
    assert publishable_files(folder) == sorted(ALLOWED | {"model.safetensors"})


def test_publishable_files_of_a_sharded_model_are_the_index_and_its_shards(tmp_path):
    folder = _full_folder(tmp_path, sharded=True)
    assert set(publishable_files(folder)) == ALLOWED | {
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_publishable_files_of_a_peft_adapter(tmp_path):
    folder = tmp_path / "adapter"
    _write(folder, {"adapter_config.json": "{}", "adapter_model.safetensors": b"w", "adapter_model.bin": b"pk",
                    "README.md": "---\nlicense: mit\n---\n", "checkpoint-1/adapter_model.safetensors": b"w"})
    assert publishable_files(folder) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("problem", ["no_weights", "stale_single_file", "missing_shard", "missing_code"])
def test_an_inconsistent_folder_is_refused_before_any_network_call(tmp_path, fake_hub, problem):
    folder = _full_folder(tmp_path, sharded=problem in ("stale_single_file", "missing_shard"))
    if problem == "no_weights":
        (folder / "model.safetensors").unlink()
    elif problem == "stale_single_file":
        _write(folder, {"model.safetensors": b"old"})
    elif problem == "missing_shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    else:
        (folder / "helpers.py").unlink()
    message = {"no_weights": "no model weights", "stale_single_file": "earlier save", "missing_shard": "not in the",
               "missing_code": "helpers.py"}[problem]
    with pytest.raises(ValueError, match=message):
        push_folder_to_hub(folder, "a/b", token=TOKEN)
    assert fake_hub == {}


def test_push_folder_to_hub(tmp_path, fake_hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    folder = _full_folder(tmp_path)
    url = push_folder_to_hub(folder, "vlalign-test/tcl-coco", token=TOKEN, private=True, commit_message="v1")
    assert url == "https://huggingface.co/vlalign-test/tcl-coco/commit/0123abcd"
    assert fake_hub["create"]["repo_id"] == "vlalign-test/tcl-coco"
    assert fake_hub["create"]["exist_ok"] is True and fake_hub["create"]["private"] is True
    assert fake_hub["upload"]["repo_id"] == "vlalign-test/tcl-coco"
    assert set(fake_hub["upload"]["files"]) == ALLOWED | {"model.safetensors"}  # one commit, the allow-list only
    for name, data in fake_hub["upload"]["files"].items():
        assert data == (folder / name).read_bytes(), name
    assert fake_hub["upload"]["commit_message"] == "v1"
    assert fake_hub["create"]["token"] == fake_hub["upload"]["token"] == TOKEN  # reached HfApi, nowhere else

    out = capsys.readouterr()
    assert TOKEN not in out.out and TOKEN not in out.err
    assert TOKEN not in caplog.text and all(TOKEN not in str(r.args) for r in caplog.records)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_push_command_pushes_the_same_allow_list(tmp_path, fake_hub):
    folder = _full_folder(tmp_path / "it's a dir")
    command = push_command(folder, "someone/x", private=False)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3 and "\n" not in command
    exec(argv[2], {})  # what `python -c` would run
    assert fake_hub["create"]["repo_id"] == "someone/x" and fake_hub["create"]["private"] is False
    assert set(fake_hub["upload"]["files"]) == ALLOWED | {"model.safetensors"}


def test_push_bare_name_uploads_to_resolved_repo(tmp_path, fake_hub):
    folder = _model_folder(tmp_path)
    url = push_folder_to_hub(folder, "tcl-coco", token=TOKEN)
    assert fake_hub["create"]["private"] is None
    assert fake_hub["upload"]["repo_id"] == "someuser/tcl-coco"
    assert set(fake_hub["upload"]["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert url.startswith("https://huggingface.co/someuser/tcl-coco/commit/")


def test_push_missing_folder_raises_before_network(tmp_path, fake_hub):
    with pytest.raises(NotADirectoryError):
        push_folder_to_hub(tmp_path / "nope", "a/b", token=TOKEN)
    assert fake_hub == {}


# ----------------------------------------------------------------------------- CODIS: code usage in the card
CODIS_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "codis.md"


def _codis_card(usage):
    return build_model_card(CODIS_TEMPLATE, model_id="someone/codis-digits", model_type_name="CODIS",
                            dataset_name="digits", hyperparameters={"codebook_size": 64}, eval_results=METRICS,
                            code_usage=usage)


def test_codis_card_reports_code_usage_and_flags_a_collapse(tmp_path):
    healthy = _codis_card({"codebook_size": 64, "image_codes_used": 62, "image_code_perplexity": 45.99,
                           "text_codes_used": 58, "text_code_perplexity": 53.35, "image_code_purity": 87.2})
    rows = _table_rows(healthy.text)
    assert ["image", "62", "45.99"] in rows and ["text", "58", "53.35"] in rows
    assert "64 codewords" in healthy.text and "87.2%" in healthy.text
    assert "codebook collapsed" not in healthy.text
    assert "codis" in healthy.data.tags and "Multi-modal Alignment using Representation Codebook" in healthy.text

    collapsed = _codis_card({"codebook_size": 64, "image_codes_used": 1, "image_code_perplexity": 1.0,
                             "text_codes_used": 3, "text_code_perplexity": 2.5})
    assert "the codebook collapsed** for image inputs" in collapsed.text
    save_model_card(tmp_path, collapsed)
    loaded = ModelCard.load(tmp_path / "README.md")  # still a valid card with its metadata
    assert {r.metric_type for r in loaded.data.eval_results} == set(METRICS)


def test_exact_match_is_an_image_text_to_text_result():
    card = build_model_card(Path(__file__).resolve().parents[1] / "model_cards" / "mivc.md",
                            model_id="someone/mivc-digits", model_type_name="MIVC", dataset_name="multiview_digits",
                            hyperparameters={"pooling_mode": "attention"},
                            eval_results={"exact_match_accuracy": 97.5, "mean_weight_clean_images": 0.5},
                            pipeline_tag="image-text-to-text")
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == (
        "image-text-to-text", "exact_match_accuracy", 97.5)
    assert card.data.metrics == ["exact_match"] and card.data.pipeline_tag == "image-text-to-text"
    assert ["Image-Text-to-Text", "Exact-match accuracy", "97.50"] in _table_rows(card.text)
    assert ["mean\\_weight\\_clean\\_images", "0.5"] in _table_rows(card.text)
    assert "Multiple Instance Visual Component" in card.text

def test_card_warns_when_alignment_never_started(tmp_path):
    for template in ("tcl.md", "codis.md"):
        path = Path(__file__).resolve().parents[1] / "model_cards" / template
        kwargs = dict(model_id="someone/model", model_type_name=template[:-3].upper(), dataset_name="scenes",
                      hyperparameters={}, eval_results={"i2t_recall@1": 0.2})
        healthy = build_model_card(path, **kwargs)
        assert "alignment never started" not in healthy.text
        stuck = build_model_card(path, alignment_not_started={"step": 300, "loss_i2t": 6.96, "loss_t2i": 6.95,
                                                              "num_keys": 1056}, **kwargs)
        assert "alignment never started" in stuck.text
        assert "After 300 steps" in stuck.text and "6.960 and 6.950" in stuck.text and "1,056 keys" in stuck.text
        assert "6.962" in stuck.text  # ln(1056)
        save_model_card(tmp_path, stuck)
        assert ModelCard.load(tmp_path / "README.md").data.eval_results[0].metric_value == 0.2

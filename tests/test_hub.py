"""vlalign.hub: model card rendering and round trip, cards built from hostile strings, and Hub upload (network
mocked) from Python, from `vlalign.hub.push_folder_to_hub` / its command, and from training/train.py."""

import ast
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from pathlib import Path

import huggingface_hub.hf_api
import numpy as np
import pytest
import yaml
from fixtures import TINY_TRAIN_MODEL
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from vlalign.data import DIGIT_NAMES, DIGIT_ZERO_SHOT_TEMPLATES
from vlalign.hub import (
    DEFAULT_TAGS,
    MAX_SNIPPET_LABELS,
    _valid_repo_id,
    build_model_card,
    is_hub_id,
    publishable_files,
    push_command,
    push_folder_to_hub,
    save_model_card,
    snippet_folder,
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
    # the usage snippets are still valid Python and load exactly the folder placeholder of this name (not a Hub id)
    for block in re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL):
        tree = ast.parse(block)
        calls = [
            n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"
        ]
        for call in calls:
            assert ast.literal_eval(call.args[0]) == f"path/to/{bad}"


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
    "checkpoint-2/model.safetensors": b"w",
    "checkpoint-2/config.json": "{}",
    "checkpoint-2/optimizer.pt": b"pk",
    "checkpoint-2/scheduler.pt": b"pk",
    "checkpoint-2/rng_state.pth": b"pk",
    "checkpoint-2/training_args.bin": b"pk",
    "checkpoint-2/trainer_state.json": "{}",
    "runs/Dec01_host/events.out.tfevents.1.host": b"ev",
    "training_args.json": '{"output_dir": "/home/me/out"}',
    "training_args.bin": b"pk",
    "optimizer.pt": b"pk",
    "pytorch_model.bin": b"pk",
    "old_picture.png": b"png",
    "old_module.py": "x = 1\n",
    "notes.txt": "n",
    "all_results.json": "{}",
    "trainer_state.json": "{}",
    "adapter_model.bin": b"pk",
}
CODE = {
    "configuration_x.py": "X = 1\n",
    "modeling_x.py": "from .configuration_x import X\nfrom .helpers import h\n",
    "helpers.py": "import torch\nfrom .deep import d\n",
    "deep.py": "d = 1\n",
    "processing_x.py": "P = 1\n",
}
AUTO_MAP = {
    "AutoConfig": "configuration_x.XConfig",
    "AutoModel": "modeling_x.XModel",
    "AutoModelForCausalLM": "someone/other-repo--modeling_other.Other",
}
CARD = (
    "---\nlicense: mit\n---\n# m\n\n![curves \\[left\\]](curves.png)\n\n![grid](retrieval.png)\n"
    "![remote](https://example.com/remote.png) [a link](notes.txt) ![escape](../outside.png)\n"
)


def _full_folder(tmp_path, sharded=False):
    folder = tmp_path / "model"
    _write(
        folder,
        {
            **RUN_LEFTOVERS,
            **CODE,
            "README.md": CARD,
            "curves.png": b"png",
            "retrieval.png": b"png",
            "config.json": json.dumps({"model_type": "x", "auto_map": AUTO_MAP}),
            "processor_config.json": json.dumps({"auto_map": {"AutoProcessor": "processing_x.P"}}),
            "preprocessor_config.json": "{}",
            "tokenizer.json": "{}",
            "tokenizer_config.json": "{}",
            "generation_config.json": "{}",
            "eval_results.json": "{}",
        },
    )
    _write(tmp_path, {"outside.png": b"png"})
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        _write(
            folder,
            {
                shards[0]: b"a",
                shards[1]: b"b",
                "model-00001-of-00003.safetensors": b"stale",
                "model.safetensors.index.json": json.dumps(
                    {"weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}
                ),
            },
        )
    else:
        _write(folder, {"model.safetensors": b"w"})
    return folder


ALLOWED = {
    "config.json",
    "README.md",
    "curves.png",
    "retrieval.png",
    "eval_results.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "configuration_x.py",
    "modeling_x.py",
    "helpers.py",
    "deep.py",
    "processing_x.py",
}


def test_publishable_files_are_exactly_the_allow_list(tmp_path):
    folder = _full_folder(tmp_path)
    assert publishable_files(folder) == sorted(ALLOWED | {"model.safetensors"})


def test_publishable_files_of_a_sharded_model_are_the_index_and_its_shards(tmp_path):
    folder = _full_folder(tmp_path, sharded=True)
    assert set(publishable_files(folder)) == ALLOWED | {
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_publishable_files_of_a_peft_adapter(tmp_path):
    folder = tmp_path / "adapter"
    _write(
        folder,
        {
            "adapter_config.json": "{}",
            "adapter_model.safetensors": b"w",
            "adapter_model.bin": b"pk",
            "README.md": "---\nlicense: mit\n---\n",
            "checkpoint-1/adapter_model.safetensors": b"w",
        },
    )
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
    message = {
        "no_weights": "no model weights",
        "stale_single_file": "earlier save",
        "missing_shard": "not in the",
        "missing_code": "helpers.py",
    }[problem]
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
    return build_model_card(
        CODIS_TEMPLATE,
        model_id="someone/codis-digits",
        model_type_name="CODIS",
        dataset_name="digits",
        hyperparameters={"codebook_size": 64},
        eval_results=METRICS,
        code_usage=usage,
    )


def test_codis_card_reports_code_usage_and_flags_a_collapse(tmp_path):
    healthy = _codis_card(
        {
            "codebook_size": 64,
            "image_codes_used": 62,
            "image_code_perplexity": 45.99,
            "text_codes_used": 58,
            "text_code_perplexity": 53.35,
            "image_code_purity": 87.2,
        }
    )
    rows = _table_rows(healthy.text)
    assert ["image", "62", "45.99"] in rows and ["text", "58", "53.35"] in rows
    assert "64 codewords" in healthy.text and "87.2%" in healthy.text
    assert "codebook collapsed" not in healthy.text
    assert "codis" in healthy.data.tags and "Multi-modal Alignment using Representation Codebook" in healthy.text

    collapsed = _codis_card(
        {
            "codebook_size": 64,
            "image_codes_used": 1,
            "image_code_perplexity": 1.0,
            "text_codes_used": 3,
            "text_code_perplexity": 2.5,
        }
    )
    assert "the codebook collapsed** for image inputs" in collapsed.text
    save_model_card(tmp_path, collapsed)
    loaded = ModelCard.load(tmp_path / "README.md")  # still a valid card with its metadata
    assert {r.metric_type for r in loaded.data.eval_results} == set(METRICS)


def test_float32_noise_is_rounded_on_the_card_only(tmp_path):
    """77 / 90 in percent computed in float32 carries noise beyond 7 significant digits: the card shows 7
    (model-index and the body), the metrics dict the card was built from is left as it is (eval_results.json keeps
    full values)."""
    import torch

    noisy = float(torch.tensor(77.0) / torch.tensor(90.0) * 100)
    assert len(repr(noisy)) > 12  # 85.55555725097656
    results = {"i2t_recall@1": noisy, "eval_loss": float(torch.tensor(1.0) / torch.tensor(3.0))}
    card = build_model_card(
        Path(__file__).resolve().parents[1] / "model_cards" / "tcl.md",
        model_id="someone/tcl-digits",
        model_type_name="TCL",
        dataset_name="digits",
        hyperparameters={"embed_dim": 16},
        eval_results=results,
    )
    save_model_card(tmp_path, card)
    (result,) = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert result.metric_value == 85.55556
    assert ["eval\\_loss", "0.3333333"] in _table_rows(card.text)
    assert repr(noisy) not in card.content and "0.33333334" not in card.content
    assert results["i2t_recall@1"] == noisy


def test_exact_match_is_an_image_text_to_text_result():
    card = build_model_card(
        Path(__file__).resolve().parents[1] / "model_cards" / "mivc.md",
        model_id="someone/mivc-digits",
        model_type_name="MIVC",
        dataset_name="multiview_digits",
        hyperparameters={"pooling_mode": "attention"},
        eval_results={"exact_match_accuracy": 97.5, "mean_weight_clean_images": 0.5},
        pipeline_tag="image-text-to-text",
    )
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == (
        "image-text-to-text",
        "exact_match_accuracy",
        97.5,
    )
    assert card.data.metrics == ["exact_match"] and card.data.pipeline_tag == "image-text-to-text"
    assert ["Image-Text-to-Text", "Exact-match accuracy", "97.50"] in _table_rows(card.text)
    assert ["mean\\_weight\\_clean\\_images", "0.5"] in _table_rows(card.text)
    assert "Multiple Instance Visual Component" in card.text


def test_card_warns_when_alignment_never_started(tmp_path):
    for template in ("tcl.md", "codis.md"):
        path = Path(__file__).resolve().parents[1] / "model_cards" / template
        kwargs = dict(
            model_id="someone/model",
            model_type_name=template[:-3].upper(),
            dataset_name="scenes",
            hyperparameters={},
            eval_results={"i2t_recall@1": 0.2},
        )
        healthy = build_model_card(path, **kwargs)
        assert "alignment never started" not in healthy.text
        stuck = build_model_card(
            path, alignment_not_started={"step": 300, "loss_i2t": 6.96, "loss_t2i": 6.95, "num_keys": 1056}, **kwargs
        )
        assert "alignment never started" in stuck.text
        assert "After 300 steps" in stuck.text and "6.960 and 6.950" in stuck.text and "1,056 keys" in stuck.text
        assert "6.962" in stuck.text  # ln(1056)
        save_model_card(tmp_path, stuck)
        assert ModelCard.load(tmp_path / "README.md").data.eval_results[0].metric_value == 0.2


# ---------------------------------------------------------------------------------------------------------------------
# Cards built from hostile strings
# ---------------------------------------------------------------------------------------------------------------------
# Every user-controlled string of `build_model_card` (model id, method name, base model, dataset name / description /
# splits, hyperparameters, metric names and values, tags, language, license, pipeline tag, extra facts, picture
# captions) is set to the same adversarial value: YAML breakers, Markdown / HTML injection, Jinja, control and
# Unicode line-separator characters, very long strings. Then:
#
# * the YAML front matter parses (yaml.safe_load and huggingface_hub's ModelCard.load) to exactly the intended values;
# * there is exactly one front-matter block, and the body has the same structure (headings, lists, rules, tables,
#   fences) and the same unescaped Markdown characters as a card built from a harmless value;
# * the usage snippets stay valid Python that loads exactly the given model id.


TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
HARMLESS = "harmless"

ADVERSARIAL = {
    "front-matter-break": 'evil"\n---\nfoo: bar\n---\n# injected',
    "dashes": "---",
    "yaml-document-end": "...",
    "colon-space": "key: value",
    "comment": "# comment",
    "trailing-comment": "value # comment",
    "yaml-tag": "!python/object/apply:os.system ['ls']",
    "anchor": "&anchor value",
    "alias": "*alias",
    "flow-map": "{a: 1}",
    "flow-sequence": "[a, b]",
    "literal-block": "| literal",
    "folded-block": "> folded",
    "quotes": "it's \"quoted\" 'twice'",
    "newlines": "line1\nline2\n\nline3",
    "carriage-returns": "cr\ronly\r\nand crlf",
    "tabs": "\ttab\tseparated\t",
    "nul": "nul\x00byte",
    "unicode-line-separators": "ls\u2028ps\u2029nel\x85vt\x0bff\x0c",
    "next-line": "next\x85line\x85",  # alone, PyYAML writes NEL raw in single quotes: it read back as a space
    "line-separator": "line\u2028separator",
    "bom-and-escape": "\ufeffbom \x1b[31mred",
    "yaml-bool": "yes",
    "yaml-null": "null",
    "yaml-tilde": "~",
    "yaml-date": "2024-01-01",
    "yaml-float": "1e3",
    "yaml-hex": "0x1F",
    "long-word": "y" * 10_000,
    "long-sentence": "word " * 2_000,
    "script": "<script>alert(1)</script>",
    "html-attribute": '<img src=x onerror="alert(1)">',
    "markdown-link": "[click](javascript:alert(1))",
    "markdown-image": "![x](javascript:alert(1))",
    "autolink": "<javascript:alert(1)>",
    "entity": "&lt;script&gt;",
    "jinja-expression": "{{ card_data }} {{ 7*7 }}",
    "jinja-statement": "{% for x in range(3) %}x{% endfor %}",
    "jinja-comment": "{# hidden #}",
    "bullet": "- item",
    "ordered-item": "1. first",
    "setext": "===",
    "table-row": "| a | b |",
    "code-fence": "```python\nimport os\n```",
    "heading": "## heading",
    "backslashes": "\\ \\\\ \\n",
    "unicode": "é中文🙂 →",
}
# Markdown characters that start markup; in the body they may only come from the template, or appear escaped.
MARKUP = set("<>[]`*_|#~&$")
FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n", flags=re.DOTALL)
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _build_hostile(value, template="tcl.md"):
    """A card with `value` in every user-controlled string."""
    return build_model_card(
        TEMPLATES / template,
        model_id=value,
        model_type_name=value,
        base_model=[value],
        dataset_name=value,
        dataset_description=value,
        dataset_split=value,
        eval_split=value,
        hyperparameters={value: value, "learning_rate": 1e-4},
        eval_results={f"recall {value}": 50.0, "i2t_recall@1": 90.0, f"note {value}": value},
        license=value,
        language=value,
        tags=[value],
        pipeline_tag=value,
        extra={value: value},
        pictures=[(value, "curve.png")],
        load_from=value,
        class_names=[value],
        zero_shot_templates=[f"{value} {{name}}"],
    )


def _saved(tmp_path, value, template="tcl.md"):
    save_model_card(tmp_path, _build_hostile(value, template))
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    match = FRONT_MATTER.match(text)
    assert match, "README.md must open with one YAML front matter block"
    return text, yaml.safe_load(match.group(1)), text[match.end() :]


def _outside_code(body):
    return re.sub(r"```.*?```", "", body, flags=re.DOTALL)


def _bare_markup(text):
    """Unescaped markup characters (a backslash escapes the character after it)."""
    counts, i = Counter(), 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in MARKUP:
            counts[text[i]] += 1
        i += 1
    return counts


def _line_kind(line):
    """The Markdown block structure a line contributes (content ignored)."""
    stripped = line.strip()
    if not stripped:
        return "blank"
    if re.match(r"^#{1,6}(\s|$)", stripped):
        return "heading" + stripped.split()[0]
    if stripped.startswith(("```", "~~~")):
        return "fence"
    if re.fullmatch(r"(-[ \t]*){3,}|(=+)|(\*[ \t]*){3,}|(_[ \t]*){3,}", stripped):
        return "rule"
    if re.match(r"^([-+*]|\d{1,9}[.)])(\s|$)", stripped):
        return "list"
    if stripped.startswith("|"):
        return f"table{len(UNESCAPED_PIPE.split(stripped))}"
    if stripped.startswith((">", "<")):
        return "quote-or-html"
    return "text"


def _skeleton(body):
    return [_line_kind(line) for line in body.split("\n")]


@pytest.fixture(scope="module")
def harmless_bodies(tmp_path_factory):
    bodies = {}
    for template in ("tcl.md", "codis.md", "mivc.md"):
        _, _, body = _saved(tmp_path_factory.mktemp(template), HARMLESS, template)
        bodies[template] = body
    return bodies


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_front_matter_reads_back_exactly(tmp_path, value):
    _, meta, _ = _saved(tmp_path, value)
    # nothing injected, nothing lost: only the keys we write; the base model only when it is a repo id
    # (legacy bare ids such as "yes" are), the dataset only for a namespace/name id (none of these)
    keys = {"library_name", "license", "language", "tags", "metrics", "pipeline_tag", "model-index"}
    assert set(meta) == keys | ({"base_model"} if _valid_repo_id(value) else set())
    assert meta.get("base_model", value) == value
    assert meta["library_name"] == "transformers" and meta["metrics"] == ["recall"]
    for data in (meta, ModelCard.load(tmp_path / "README.md").data.to_dict()):
        assert data["license"] == value and data["language"] == value and data["pipeline_tag"] == value
        assert data["tags"] == list(dict.fromkeys([*DEFAULT_TAGS, value.lower(), value]))  # duplicates dropped
        (entry,) = data["model-index"]
        assert entry["name"] == value
        (result,) = entry["results"]
        assert result["dataset"] == {"name": value, "type": result["dataset"]["type"], "split": value}
        assert {m["type"]: m["value"] for m in result["metrics"]} == {f"recall {value}": 50.0, "i2t_recall@1": 90.0}
        assert {m["type"]: m["name"] for m in result["metrics"]}[f"recall {value}"] == f"recall {value}"
    assert all(type(v) is str for v in (meta["license"], meta["language"], meta["pipeline_tag"]))  # no coercion


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_exactly_one_front_matter_block_and_unchanged_body_structure(tmp_path, value, harmless_bodies):
    text, _, body = _saved(tmp_path, value)
    assert text.startswith("---\n")
    assert not any(_line_kind(line) == "rule" for line in body.split("\n")), "a second '---' / rule line"
    assert _skeleton(body) == _skeleton(harmless_bodies["tcl.md"])
    assert _bare_markup(_outside_code(body)) == _bare_markup(_outside_code(harmless_bodies["tcl.md"]))


@pytest.mark.parametrize("template", ["codis.md", "mivc.md"])
@pytest.mark.parametrize(
    "value",
    [
        ADVERSARIAL[k]
        for k in ("front-matter-break", "dashes", "script", "bullet", "jinja-expression", "unicode-line-separators")
    ],
)
def test_other_templates_keep_their_structure(tmp_path, value, template, harmless_bodies):
    _, _, body = _saved(tmp_path, value, template)
    assert _skeleton(body) == _skeleton(harmless_bodies[template])
    assert _bare_markup(_outside_code(body)) == _bare_markup(_outside_code(harmless_bodies[template]))


def test_template_syntax_in_values_is_shown_not_run(tmp_path):
    _, _, body = _saved(tmp_path, ADVERSARIAL["jinja-expression"])
    assert "{{ card\\_data }} {{ 7\\*7 }}" in body
    assert "library_name" not in body and "49" not in body
    _, _, body = _saved(tmp_path, ADVERSARIAL["jinja-statement"])
    assert "{% for x in range(3) %}x{% endfor %}" in body


@pytest.mark.parametrize("key", ["script", "markdown-link", "autolink", "html-attribute"])
def test_html_and_links_are_escaped_text(tmp_path, key):
    _, _, body = _saved(tmp_path, ADVERSARIAL[key])
    prose = _outside_code(body)
    assert not re.search(r"(?<!\\)<(script|img|javascript)", prose)
    assert not re.search(r"(?<!\\)\]\(javascript", prose)


@pytest.mark.parametrize("value", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_usage_snippets_load_exactly_the_given_source_with_the_given_labels(tmp_path, value):
    _, _, body = _saved(tmp_path, value)
    assert len(re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)) == 3
    loaded_ids, labels, call = _snippets(body)
    assert loaded_ids and all(loaded == value for loaded in loaded_ids)
    assert labels == [value]
    template = call["hypothesis_template"]
    # the run's prompt as the pipeline fills it ("{}"), or the generic one when the prompt has other fields
    try:
        expected = f"{value} {{name}}".format(name="LABEL")
    except (KeyError, IndexError, ValueError):
        expected = "a photo of a LABEL."
    assert template.format("LABEL") == expected


def test_language_list_and_absent_language():
    card = build_model_card(
        TEMPLATES / "tcl.md",
        model_id="user/model",
        dataset_name="digits",
        hyperparameters={},
        eval_results={},
        language=["en", "fr"],
    )
    assert card.data.language == ["en", "fr"]
    card = build_model_card(
        TEMPLATES / "tcl.md", model_id="user/model", dataset_name="digits", hyperparameters={}, eval_results={}
    )
    assert "language" not in card.data.to_dict()


def _snippets(card) -> tuple[list[str], list[str], dict]:
    """(sources the snippets load, the pipeline's candidate labels, the pipeline call's keywords as values) of a
    card or of a card's text."""
    blocks = re.findall(r"```python\n(.*?)```", getattr(card, "text", card), flags=re.DOTALL)
    sources, labels, keywords = [], None, {}
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                sources.append(ast.literal_eval(node.args[0]))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "pipeline":
                sources.append(ast.literal_eval(next(k.value for k in node.keywords if k.arg == "model")))
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "labels":
                labels = ast.literal_eval(node.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "classifier":
                keywords = {k.arg: k.value for k in node.keywords}
    if "hypothesis_template" in keywords:
        keywords["hypothesis_template"] = ast.literal_eval(keywords["hypothesis_template"])
    return sources, labels, keywords


def _card(template="tcl.md", **kwargs):
    return build_model_card(TEMPLATES / template, dataset_name="digits", hyperparameters={}, eval_results={}, **kwargs)


@pytest.mark.parametrize("template", ["tcl.md", "codis.md", "mivc.md"])
def test_a_card_without_a_hub_id_loads_a_folder_and_warns_nothing(template, caplog):
    caplog.set_level(logging.WARNING)
    card = _card(template, model_id="tcl_digits")  # a run name, as train.py passes without --hub_model_id
    sources, _, _ = _snippets(card)
    assert sources and set(sources) == {"path/to/tcl_digits"}
    assert card.text.lstrip().startswith("# tcl\\_digits")  # the title is still the run's name
    assert "replace it with the folder the model was saved to" in card.text
    card = _card(template, model_id="tcl_digits", load_from="./outputs/tcl_digits")
    sources, _, _ = _snippets(card)
    assert set(sources) == {"./outputs/tcl_digits"}
    assert "load the model from its folder, ./outputs/tcl\\_digits: run them from the directory" in card.text
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    card = _card(template, model_id="someone/tcl-digits")
    sources, _, _ = _snippets(card)
    assert set(sources) == {"someone/tcl-digits"} and "saved to" not in card.text
    with pytest.raises(ValueError, match="load_from"):
        _card(template, model_id="x", load_from=" ")


def test_snippet_folder_keeps_relative_paths_and_hides_the_machines_own():
    assert snippet_folder("outputs/tcl_digits") == "./outputs/tcl_digits"
    assert snippet_folder("./outputs/tcl_digits/") == "./outputs/tcl_digits"
    assert not is_hub_id(snippet_folder("outputs/tcl_digits"))  # a folder, not read as namespace/name
    for folder in ("/home/me/outputs/run", "../elsewhere/run", "~/run", ""):
        assert snippet_folder(folder) is None, folder


def test_the_pipeline_snippet_uses_the_runs_class_names_and_prompt():
    _, labels, keywords = _snippets(
        _card(model_id="a/b", class_names=DIGIT_NAMES, zero_shot_templates=DIGIT_ZERO_SHOT_TEMPLATES)
    )
    assert labels == DIGIT_NAMES
    assert keywords["hypothesis_template"] == "a handwritten digit {}"
    assert ast.unparse(keywords["candidate_labels"]) == "labels"
    # prompts with the class index only cannot be filled by the pipeline: the first one naming the class is taken,
    # and a literal brace stays literal
    _, _, keywords = _snippets(
        _card(model_id="a/b", class_names=["x"], zero_shot_templates=["digit {digit}", "{{x}} {name}!"])
    )
    assert keywords["hypothesis_template"] == "{{x}} {}!" and "{{x}} {}!".format("y") == "{x} y!"
    card = _card(model_id="a/b", class_names=["x"], zero_shot_templates=["digit {digit}", "{name} {digit}"])
    _, _, keywords = _snippets(card)
    assert keywords["hypothesis_template"] == "a photo of a {}." and "adapt it to your data" in card.text
    # many classes: the first ones, and the comment says how many there are
    names = [f"class {i}" for i in range(25)]
    card = _card(model_id="a/b", class_names=names, zero_shot_templates=["a photo of a {name}."])
    _, labels, _ = _snippets(card)
    assert labels == names[:MAX_SNIPPET_LABELS] and f"# {MAX_SNIPPET_LABELS} of the 25 class names" in card.text
    # nothing known about the classes: generic labels and prompt
    card = _card(model_id="a/b")
    _, labels, keywords = _snippets(card)
    assert labels == ["cat", "dog"] and keywords["hypothesis_template"] == "a photo of a {}."
    assert "# your class names" in card.text


def test_the_card_of_a_training_run_has_snippets_that_run_as_shown(tmp_path, monkeypatch, caplog):
    """A tiny TCL run on the digits, without a Hub id, from the directory it was started in: its card's snippets
    load the saved folder (no warning about Hub ids), and the pipeline call shown, run as written next to the
    output folder, classifies an image among the digit names with the demo's prompt: its scores are the model's
    softmax over exactly those prompts."""
    import train

    config = {
        "model": MODELS["tcl"],
        "data": {"max_train_samples": 48, "max_eval_samples": 20},
        "training": {
            "output_dir": "runs/tcl_digits",
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
        "run": {"cpu_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    train.main(["--config", str(tmp_path / "config.yaml")])
    assert not [r.getMessage() for r in caplog.records if "Hub repo id" in r.getMessage()]
    card = ModelCard.load(tmp_path / "runs/tcl_digits/README.md")
    sources, labels, keywords = _snippets(card)
    assert set(sources) == {"./runs/tcl_digits"}
    assert labels == DIGIT_NAMES and keywords["hypothesis_template"] == "a handwritten digit {}"

    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    from PIL import Image

    Image.fromarray((np.indices((32, 32)).sum(0) % 7 * 36).astype(np.uint8)).convert("RGB").save(tmp_path / "photo.jpg")
    script = textwrap.dedent(
        """
        import ast, json
        import torch
        from PIL import Image

        blocks = json.load(open("blocks.json"))
        ns = {}
        exec(blocks[0], ns)  # import vlalign; AutoModel / AutoProcessor from the folder
        tree = ast.parse(blocks[2])  # the pipeline snippet, its last line evaluated for its result
        call = tree.body.pop()
        exec(compile(tree, "pipeline-snippet", "exec"), ns)
        result = eval(compile(ast.Expression(call.value), "pipeline-call", "eval"), ns)
        template = ast.literal_eval(next(k.value for k in call.value.keywords if k.arg == "hypothesis_template"))
        labels, processor, model = ns["labels"], ns["processor"], ns["classifier"].model
        prompts = [template.format(label) for label in labels]
        image = Image.open("photo.jpg").convert("RGB")
        inputs = processor(images=[image], text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            probs = model(**inputs).logits_per_image.softmax(-1)[0].tolist()
        print("RESULT", json.dumps({"result": result, "expected": dict(zip(labels, probs))}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    scores = {r["label"]: r["score"] for r in out["result"]}
    assert sorted(scores) == sorted(DIGIT_NAMES)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    for label, probability in out["expected"].items():
        assert scores[label] == pytest.approx(probability, abs=1e-4), label


def test_long_local_path_or_nul_as_base_model_is_not_looked_up_as_a_file():
    for name in ("/data/" + "x" * 5000, "bad\x00name"):
        card = build_model_card(
            TEMPLATES / "tcl.md",
            model_id="user/model",
            dataset_name="digits",
            hyperparameters={},
            eval_results={},
            base_model=name,
        )
        assert card.data.base_model is None


# ---------------------------------------------------------------------------------------------------------------------
# Pushing to the Hub
# ---------------------------------------------------------------------------------------------------------------------
# push_to_hub end to end for TCL, CODIS and MIVC, from training/train.py and from Python.
#
# The Hub is unreachable from CI: `HfApi.create_repo` and `HfApi.create_commit` (the single call that would send the
# files) are intercepted, and the tests check what would have been uploaded: every file needed to load the model, a
# model card that parses back with valid metadata, exactly the allow-list of vlalign.hub.publishable_files (no
# checkpoints, logs, training arguments or stale files), no token and no absolute path anywhere; and that a failed push
# says so in one line with a command that pushes the saved model later.


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

PUSH_TOKEN = "hf_secret_token_never_written_anywhere"

VISION = TINY_TRAIN_MODEL["vision_config"]
ALBEF_STACK = {k: v for k, v in TINY_TRAIN_MODEL.items() if k != "lmi_image_grid"}
MODELS = {
    "tcl": {"model_type": "tcl", **TINY_TRAIN_MODEL},
    "codis": {"model_type": "codis", **ALBEF_STACK, "codebook_size": 8},
    "mivc": {
        "model_type": "mivc",
        "vision_config": dict(VISION, patch_size=8),
        "text_config": {
            "model_type": "llama",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
        },
        "pooling_attention_dim": 16,
        "freeze_vision_model": False,
        "freeze_language_model": False,
    },
}
ALBEF_CODE = {
    "configuration_albef.py",
    "modeling_albef.py",
    "loading.py",
    "towers.py",
    "momentum.py",
    "gradient_cache.py",
    "losses.py",
    "processing_vlalign.py",
}
CODE_FILES = {
    "tcl": {"modeling_tcl.py", "configuration_tcl.py"} | ALBEF_CODE,
    "codis": {"modeling_codis.py", "configuration_codis.py"} | ALBEF_CODE,
    "mivc": {
        "modeling_mivc.py",
        "configuration_mivc.py",
        "mivc_pooling.py",
        "loading.py",
        "towers.py",
        "processing_vlalign.py",
    },
}
PIPELINE_TAG = {
    "tcl": "zero-shot-image-classification",
    "codis": "zero-shot-image-classification",
    "mivc": "image-text-to-text",
}
TASK_CLASS = {
    "tcl": "AutoModelForZeroShotImageClassification",
    "codis": "AutoModelForZeroShotImageClassification",
    "mivc": "AutoModelForImageTextToText",
}


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
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1",
            commit_message=commit_message,
            commit_description="",
            oid="1" * 40,
        )

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
        assert PUSH_TOKEN.encode() not in data, name
    for text in logs:
        assert PUSH_TOKEN not in text


def _load_card(files: dict, tmp_path: Path) -> ModelCard:
    (tmp_path / "card.md").write_bytes(files["README.md"])
    return ModelCard.load(tmp_path / "card.md")


@pytest.mark.parametrize("model_type", ["tcl", "codis", "mivc"])
def test_train_script_push_uploads_everything_needed_to_load(model_type, tmp_path, hub, monkeypatch, caplog, capsys):
    import train
    from transformers import AutoConfig

    data = (
        {"num_train_items": 24, "num_test_items": 8, "image_size": 16}
        if model_type == "mivc"
        else {"max_train_samples": 48, "max_eval_samples": 20}
    )
    config = {
        "model": MODELS[model_type],
        "data": data,
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HF_TOKEN", PUSH_TOKEN)
    train.main(
        ["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id", f"someone/tiny-{model_type}"]
    )
    files = hub["files"]
    assert hub["commits"] == 1 and hub["repo_id"] == f"someone/tiny-{model_type}"
    # the metadata that the Hub validates (the real create_commit sends README.md's front matter first)
    assert yaml.safe_load(files["README.md"].decode().split("---")[1])["library_name"] == "transformers"
    assert hub["tokens"] == {PUSH_TOKEN}  # the token reached HfApi, and only HfApi
    needed = {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "eval_results.json",
        "training_curves.png",
    } | CODE_FILES[model_type]
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
    if model_type == "mivc":  # the chat template travels too: pipelines on the Hub take chat messages
        from vlalign.processing_vlalign import mivc_chat_template

        assert files["chat_template.jinja"].decode() == mivc_chat_template("<image>")

    card = _load_card(files, tmp_path)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert {"vlalign", model_type} <= set(card.data.tags)
    assert card.data.pipeline_tag == PIPELINE_TAG[model_type]
    assert card.data.model_name == f"someone/tiny-{model_type}" and card.data.eval_results
    eval_results = json.loads(files["eval_results.json"])
    for result in card.data.eval_results:
        assert result.metric_value == pytest.approx(eval_results[result.metric_type])
    for picture in ("training_curves.png",) + (
        ("retrieval_examples.png",) if model_type != "mivc" else ("multi_image_examples.png",)
    ):
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
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    import vlalign
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
    model.push_to_hub(f"someone/py-{model_type}", token=PUSH_TOKEN)
    model_files = dict(hub["files"])
    assert {"config.json", "model.safetensors"} | (CODE_FILES[model_type] - {"processing_vlalign.py"}) <= set(
        model_files
    )
    hub["files"].clear()
    processor.push_to_hub(f"someone/py-{model_type}", token=PUSH_TOKEN)
    processor_files = dict(hub["files"])
    assert {"processor_config.json", "tokenizer.json", "processing_vlalign.py"} <= set(processor_files)
    assert hub["tokens"] == {PUSH_TOKEN}
    _no_token_anywhere({**model_files, **processor_files}, caplog.text)


# ----------------------------------------------------------------------------- what a push publishes, and nothing else
RUN_TOKEN = "hf_SECRETtesttoken_given_on_the_command_line"
# left in the output folder by an earlier run: none of it may be published
STALE = {
    "checkpoint-0/optimizer.pt": b"old pickle",
    "checkpoint-0/training_args.bin": b"old pickle",
    "runs/Jan01_oldhost/events.out.tfevents.1.oldhost": b"old events",
    "old_picture.png": b"\x89PNG old",
    "old_module.py": b"x = 1\n",
    "pytorch_model.bin": b"old pickle",
    "notes.txt": b"old notes",
}


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
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})
    )
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
    model = {
        "model_type": "tcl",
        "vision_config": {"image_size": 16},  # sizes the processor's images
        **{k: TINY_TRAIN_MODEL[k] for k in ("num_fusion_layers", "embed_dim", "queue_size", "lmi_image_grid")},
    }
    config = {
        "model": model,
        "data": {"max_train_samples": 32, "max_eval_samples": 12},
        "run": {"vision_model_name_or_path": vision_path, "text_model_name_or_path": text_path},
        "training": {
            "output_dir": str(out),
            "max_steps": 2,
            "per_device_train_batch_size": 16,
            "logging_steps": 1,
            "save_steps": 1,
            "report_to": "tensorboard",
            "use_cpu": True,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(
        [
            "--config",
            str(tmp_path / "config.yaml"),
            "--push_to_hub",
            "--hub_model_id",
            "someone/tiny-tcl",
            "--hub_token",
            RUN_TOKEN,
        ]
    )

    # the run did leave checkpoints, logs and training arguments next to the model
    assert {"checkpoint-1", "checkpoint-2", "runs", "training_args.json"} <= {p.name for p in out.iterdir()}
    assert (out / "checkpoint-2" / "training_args.bin").is_file()
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 2  # the stale one and this run's

    files = hub["files"]
    assert hub["commits"] == 1 and hub["tokens"] == {RUN_TOKEN}
    expected = {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "eval_results.json",
        "training_curves.png",
        "retrieval_examples.png",
    } | CODE_FILES["tcl"]
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
    return HfHubHTTPError(
        f"{status} Server Error: Service Unavailable for url: {response.url}\n(Request ID: x)", response=response
    )


def test_failed_push_says_so_in_one_line_keeps_the_folder_and_gives_a_working_command(tmp_path, hub, monkeypatch):
    import requests
    import train
    from huggingface_hub.errors import OfflineModeIsEnabled

    from vlalign.hub import publishable_files

    monkeypatch.setenv("HF_TOKEN", PUSH_TOKEN)
    out = tmp_path / "out"
    config = {
        "model": MODELS["tcl"],
        "data": {"max_train_samples": 16, "max_eval_samples": 8},
        "training": {
            "output_dir": str(out),
            "max_steps": 1,
            "per_device_train_batch_size": 16,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def unreachable(self, *args, **kwargs):
        raise _connect_error("[Errno -3] Temporary failure in name resolution")

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", unreachable)
        with pytest.raises(SystemExit) as failed:
            train.main(
                ["--config", str(tmp_path / "config.yaml"), "--push_to_hub", "--hub_model_id", "someone/tiny-tcl"]
            )
    saved = publishable_files(out)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(saved)

    def check(exit_info, error_name):
        message = exit_info.value.code
        assert isinstance(message, str) and "\n" not in message  # non-zero exit status, one line, no traceback
        assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__
        assert message.startswith("Push to the Hub repo someone/tiny-tcl failed") and error_name in message
        assert f"saved locally at {out.resolve()};" in message and PUSH_TOKEN not in message
        return message.split(" with: ", 1)[1]

    command = check(failed, "ConnectError")
    assert publishable_files(out) == saved and not hub["files"]

    run = train.RunArguments(push_to_hub=True, hub_model_id="someone/tiny-tcl")
    for error in (
        requests.exceptions.ConnectionError("Max retries exceeded"),
        _http_error(503),
        OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
    ):

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

    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "training": {
                    "output_dir": str(tmp_path / "out"),
                    "hub_token": RUN_TOKEN,
                    "push_to_hub": True,
                    "hub_model_id": "someone/x",
                    "hub_private_repo": True,
                }
            }
        )
    )
    for argv in ([], ["--hub_token", RUN_TOKEN]):
        config = train.load_config(str(tmp_path / "config.yaml"), train.parse_overrides(argv))
        assert not set(train.HUB_SETTINGS) & set(config["training"])
        run = train.RunArguments(**config["run"])
        assert (run.hub_token, run.push_to_hub, run.hub_model_id, run.hub_private_repo) == (
            RUN_TOKEN,
            True,
            "someone/x",
            True,
        )
        assert RUN_TOKEN not in repr(run)
        training_args = train._training_arguments(config, str(tmp_path / "out"))
        assert training_args.hub_token is None and not training_args.push_to_hub
        assert RUN_TOKEN.encode() not in pickle.dumps(training_args)


@pytest.mark.parametrize("push", [False, True])
def test_a_hub_model_id_that_is_not_namespace_name_is_warned_about_before_training(push, tmp_path, caplog):
    import train

    argv = ["--output_dir", str(tmp_path / "out"), "--hub_model_id", "tcl-digits", "--positives_by", "neither"]
    caplog.set_level(logging.WARNING, logger="vlalign.train")
    with pytest.raises(ValueError, match="positives_by"):  # the data arguments, read right after: nothing trains
        train.main(argv + (["--push_to_hub"] if push else []))
    (warning,) = [r.getMessage() for r in caplog.records if "--hub_model_id" in r.getMessage()]
    assert warning.startswith("--hub_model_id 'tcl-digits' is not a Hub repo id of the form namespace/name")
    assert ("under your own namespace" in warning) is push
    caplog.clear()
    with pytest.raises(ValueError, match="positives_by"):
        train.main(
            ["--output_dir", str(tmp_path / "out"), "--hub_model_id", "someone/tcl-digits", "--positives_by", "x"]
        )
    assert "--hub_model_id" not in caplog.text

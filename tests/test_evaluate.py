"""`python -m vlalign.evaluate`: the numbers of a training run's own evaluation, plain CLIP / SigLIP / dual-encoder
checkpoints by their own embeddings, several captions per image, zero-shot with templates, the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from fixtures import TINY_TRAIN_MODEL

from vlalign.data import DIGIT_NAMES, DIGIT_ZERO_SHOT_TEMPLATES, build_digits_dataset, build_digits_tokenizer
from vlalign.evaluate import load_model_for_evaluation, main, markdown_table
from vlalign.evaluation import retrieval_metrics

REPO = Path(__file__).resolve().parent.parent
NUM_EVAL = 30


def _train(tmp_path: Path, model_type: str) -> Path:
    import train

    model = {k: v for k, v in TINY_TRAIN_MODEL.items() if not (model_type == "codis" and k == "lmi_image_grid")}
    model = {**model, "model_type": model_type, **({"codebook_size": 8} if model_type == "codis" else {})}
    out = tmp_path / model_type
    config = {
        "model": model,
        "data": {"max_train_samples": 64, "max_eval_samples": NUM_EVAL},
        "training": {
            "output_dir": str(out),
            "max_steps": 3,
            "per_device_train_batch_size": 16,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
        "run": {"cpu_threads": 1},
    }
    (tmp_path / f"{model_type}.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / f"{model_type}.yaml")])
    return out


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    return _train(root, "tcl"), _train(root, "codis")


def _run(tmp_path: Path, *argv: str) -> dict:
    output = tmp_path / "results.json"
    main([*argv, "--output", str(output), "--no_progress"])
    return json.loads(output.read_text())


def test_the_numbers_of_the_training_runs_own_evaluation_side_by_side(demo_models, tmp_path, capsys):
    """Both trained demo models in one command: each column equals its run's eval_results.json (same code path)."""
    tcl, codis = demo_models
    report = _run(tmp_path, "--model", str(tcl), str(codis), "--dataset", "digits", "--max_samples", str(NUM_EVAL))
    for folder in (tcl, codis):
        trained = json.loads((folder / "eval_results.json").read_text())
        measured = report["models"][str(folder)]
        shared = [key for key in measured if key in trained]
        assert {"i2t_recall@1", "t2i_recall@10", "zero_shot_accuracy", "num_eval_images"} <= set(shared)
        assert {key: measured[key] for key in shared} == {key: trained[key] for key in shared}
        assert 0 <= measured["zero_shot_top5_accuracy"] <= 100 and "zero_shot_mean_per_class_recall" in measured
    assert "image_code_purity" in report["models"][str(codis)] and "image_code_purity" not in report["models"][str(tcl)]
    assert report["dataset"]["zero_shot_templates"] == DIGIT_ZERO_SHOT_TEMPLATES  # the digits set
    assert report["dataset"]["class_names"] == list(DIGIT_NAMES)
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"| metric | {tcl} | {codis} |"
    tcl_r1 = report["models"][str(tcl)]["i2t_recall@1"]
    codis_r1 = report["models"][str(codis)]["i2t_recall@1"]
    assert f"| i2t_recall@1 | {tcl_r1:.2f} | {codis_r1:.2f} |" in table
    assert "| image_code_purity | – |" in table  # the TCL column has no codebook


def test_itm_rerank_changes_only_what_re_ranking_can(demo_models, tmp_path):
    """With ITM re-ranking of the top 5, recall@5 and @10 cannot change (the same candidates are re-ordered within
    the top 5) and the images are kept for the ITM head; zero-shot is unaffected."""
    tcl, _ = demo_models
    plain = _run(tmp_path, "--model", str(tcl), "--max_samples", str(NUM_EVAL))["models"][str(tcl)]
    reranked = _run(tmp_path, "--model", str(tcl), "--max_samples", str(NUM_EVAL), "--itm_rerank_k", "5")
    reranked = reranked["models"][str(tcl)]
    for key in ("i2t_recall@5", "i2t_recall@10", "t2i_recall@5", "t2i_recall@10", "zero_shot_accuracy"):
        assert reranked[key] == plain[key], key


def _tiny_dual_encoder(kind: str, folder: Path) -> None:
    """A random tiny CLIP / SigLIP / VisionTextDualEncoder checkpoint with the digits tokenizer and a 16 px image
    processor, saved as `hf download` would give it."""
    from transformers import (
        AutoConfig,
        CLIPConfig,
        CLIPModel,
        SiglipConfig,
        SiglipModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTImageProcessorPil,
    )

    tokenizer = build_digits_tokenizer(model_max_length=32)
    tokenizer.eos_token = "[SEP]"
    vision = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    vision["intermediate_size"] = 64
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    else:
        model = VisionTextDualEncoderModel(
            VisionTextDualEncoderConfig.from_vision_text_configs(
                AutoConfig.for_model("vit", **vision), AutoConfig.for_model("bert", **text), projection_dim=16
            )
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)


def _source_embeddings(folder: Path, kind: str, images, texts):
    """The checkpoint's own normalised embeddings, with its own classes (SigLIP: texts padded to max_length)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    padding = dict(padding="max_length", max_length=32) if kind == "siglip" else dict(padding=True)
    tokens = tokenizer(texts, return_tensors="pt", **padding)
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=None if kind == "siglip" else tokens["attention_mask"],
            pixel_values=pixels,
        )
    return out.image_embeds, out.text_embeds


def _caption_parquet(folder: Path) -> tuple[Path, list, list[list[str]], list[str]]:
    """Twelve digit scans, each with two or three captions (a list column), a string label column and file ids:
    the COCO layout with class labels."""
    digits = build_digits_dataset(image_size=16)["test"]
    rows, images, captions, labels = [], [], [], []
    for index in range(12):
        row = digits[index]
        name = DIGIT_NAMES[row["label"]]
        caps = [f"a handwritten digit {name}", f"the number {row['label']} written by hand"]
        caps += [f"a scan of a handwritten {name}"] if index % 3 == 0 else []
        image = row["image"].convert("RGB")
        rows.append({"image": image, "captions": caps, "kind": name, "file": f"img_{index}.png"})
        images.append(image)
        captions.append(caps)
        labels.append(name)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "kind": datasets.Value("string"),
            "file": datasets.Value("string"),
        }
    )
    path = folder / "test.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path, images, captions, labels


@pytest.mark.parametrize("kind", ["clip", "siglip", "vision-text-dual-encoder"])
def test_a_plain_dual_encoder_is_evaluated_by_its_own_embeddings(kind, tmp_path):
    """A plain transformers checkpoint on a parquet split with several captions per image (positives by image)
    and string labels: retrieval equals the recall of the checkpoint's own embeddings, and zero-shot
    equals the argmax over its own prompt-ensemble class embeddings."""
    folder = tmp_path / kind
    _tiny_dual_encoder(kind, folder)
    path, images, captions, labels = _caption_parquet(tmp_path)
    templates = ["a handwritten digit {name}", "a scan of a handwritten {name}"]
    report = _run(
        tmp_path, "--model", str(folder), "--dataset", "parquet", "--data_files", str(path), "--split", "train",
        "--caption_column", "captions", "--label_column", "kind", "--image_id_column", "file",
        "--positives_by", "image", "--templates", *templates,
    )  # fmt: skip
    metrics = report["models"][str(folder)]
    texts = [caption for caps in captions for caption in caps]
    text_ids = [i for i, caps in enumerate(captions) for _ in caps]
    image_embeds, text_embeds = _source_embeddings(folder, kind, images, texts)
    # the recall computation itself is checked against brute force in test_evaluation.py; here the embeddings
    # must be the checkpoint's (equal bit for bit: a random tiny SigLIP's captions are nearly tied)
    expected = retrieval_metrics(image_embeds, text_embeds, list(range(12)), text_ids)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["num_eval_texts"] == len(texts) and metrics["i2t_num_queries"] == 12
    names = sorted(set(labels))  # string labels become a ClassLabel of the sorted names
    assert report["dataset"]["class_names"] == names
    prompts = [t.format(name=name) for name in names for t in templates]
    _, prompt_embeds = _source_embeddings(folder, kind, images[:1], prompts)
    classes = torch.nn.functional.normalize(prompt_embeds.view(len(names), len(templates), -1).mean(1), dim=-1)
    predicted = (image_embeds @ classes.T).argmax(1)
    truth = torch.tensor([names.index(label) for label in labels])
    assert metrics["zero_shot_accuracy"] == pytest.approx(100.0 * float((predicted == truth).float().mean()))
    per_class = [float((predicted[truth == c] == c).float().mean()) for c in truth.unique()]
    assert metrics["zero_shot_mean_per_class_recall"] == pytest.approx(100.0 * sum(per_class) / len(per_class))
    # top-5 is left out with 5 classes or fewer (100 by construction)
    assert ("zero_shot_top5_accuracy" in metrics) == (len(names) > 5)


def test_imagefolder_and_webdataset_give_the_numbers_of_the_same_split_in_parquet(tmp_path):
    """The split of the parquet case written as an image folder (metadata.jsonl with caption lists) and as
    WebDataset tar shards (.png + .json): the same metrics."""
    import io
    import tarfile

    folder = tmp_path / "clip"
    _tiny_dual_encoder("clip", folder)
    path, images, captions, labels = _caption_parquet(tmp_path)
    (tmp_path / "folder" / "test").mkdir(parents=True)
    with (
        open(tmp_path / "folder" / "test" / "metadata.jsonl", "w") as metadata,
        tarfile.open(tmp_path / "shard-0.tar", "w") as shard,
    ):
        for index, (image, caps, label) in enumerate(zip(images, captions, labels)):
            image.save(tmp_path / "folder" / "test" / f"img_{index}.png")
            metadata.write(json.dumps({"file_name": f"img_{index}.png", "captions": caps, "kind": label}) + "\n")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            for suffix, data in (("png", buffer.getvalue()), ("json", json.dumps({"captions": caps, "kind": label}))):
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"img_{index}.{suffix}")
                info.size = len(data)
                shard.addfile(info, io.BytesIO(data))
    common = ["--model", str(folder), "--positives_by", "image", "--templates", "digits"]
    parquet = _run(tmp_path, *common, "--dataset", "parquet", "--data_files", str(path), "--split", "train",
                   "--caption_column", "captions", "--label_column", "kind")  # fmt: skip
    imagefolder = _run(tmp_path, *common, "--dataset", "imagefolder", "--data_dir", str(tmp_path / "folder"),
                       "--caption_column", "captions", "--label_column", "kind")  # fmt: skip
    webdataset = _run(tmp_path, *common, "--dataset", "webdataset", "--data_files", str(tmp_path / "shard-0.tar"),
                      "--split", "train", "--image_column", "png", "--caption_column", "json.captions",
                      "--label_column", "json.kind")  # fmt: skip
    expected = parquet["models"][str(folder)]
    assert expected["num_eval_texts"] == sum(len(c) for c in captions) and "zero_shot_accuracy" in expected
    assert imagefolder["models"][str(folder)] == expected
    assert webdataset["models"][str(folder)] == expected


def test_zero_shot_only_bf16_and_the_module_entry_point(tmp_path):
    """`python -m vlalign.evaluate` on a split without captions (zero-shot only, templates from a file) under bf16
    autocast: no retrieval rows, zero-shot within bf16's error of the float32 run."""
    folder = tmp_path / "clip"
    _tiny_dual_encoder("clip", folder)
    digits = build_digits_dataset(image_size=16)["test"].select(range(40)).remove_columns(["caption"])
    digits.to_parquet(str(tmp_path / "test.parquet"))
    (tmp_path / "templates.txt").write_text("a handwritten digit {name}\n\nthe number {digit} written by hand\n")
    common = [
        "--model", str(folder), "--dataset", "parquet", "--data_files", str(tmp_path / "test.parquet"),
        "--split", "train", "--templates", str(tmp_path / "templates.txt"), "--class_names", ",".join(DIGIT_NAMES),
        "--no_progress",
    ]  # fmt: skip
    env = {"PYTHONPATH": f"{REPO / 'src'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        output = tmp_path / f"{name}.json"
        done = subprocess.run(
            [sys.executable, "-m", "vlalign.evaluate", *common, *extra, "--output", str(output)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(output.read_text())["models"][str(folder)]
        assert "| zero_shot_accuracy |" in done.stdout and "recall@" not in done.stdout.replace("per_class_recall", "")
    assert json.loads((tmp_path / "fp32.json").read_text())["dataset"]["zero_shot_templates"] == [
        "a handwritten digit {name}",
        "the number {digit} written by hand",
    ]
    assert runs["fp32"]["num_eval_texts"] == 0 and "i2t_recall@1" not in runs["fp32"]
    assert abs(runs["bf16"]["zero_shot_accuracy"] - runs["fp32"]["zero_shot_accuracy"]) <= 100.0 * 4 / 40


def test_bad_requests_are_refused_naming_what_is_wrong(tmp_path):
    folder = tmp_path / "clip"
    _tiny_dual_encoder("clip", folder)
    with pytest.raises(SystemExit, match=r"--caption_column 'text' not found in split 'test'; available columns"):
        main(["--model", str(folder), "--caption_column", "text", "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match=r"split 'validation' not found in 'digits'"):
        main(["--model", str(folder), "--split", "validation", "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match=r"--templates 'imagenet_tiny' is no template set"):
        main(["--model", str(folder), "--templates", "imagenet_tiny", "--output", str(tmp_path / "x.json")])
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(tmp_path / "vit")  # fmt: skip
    with pytest.raises(ValueError, match=r"is a 'vit' model: vlalign.evaluate takes image-text dual encoders"):
        load_model_for_evaluation(str(tmp_path / "vit"))
    with pytest.raises(SystemExit, match=r"vlalign.evaluate: .*no_such_model"):  # a mistyped path: one line
        main(["--model", str(tmp_path / "no_such_model"), "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_markdown_table_one_column_per_model():
    results = {
        "a": {"i2t_recall@1": 50.0, "zero_shot_accuracy": float("nan"), "num_eval_images": 4, "eval_images_skipped": 0},
        "b": {"i2t_recall@1": 12.3456, "zero_shot_accuracy": 100.0, "num_eval_images": 4, "codebook_size": 8},
    }
    assert markdown_table(results) == "\n".join(
        [
            "| metric | a | b |",
            "|---|---:|---:|",
            "| i2t_recall@1 | 50.00 | 12.35 |",
            "| zero_shot_accuracy | n/a | 100.00 |",
            "| codebook_size | – | 8 |",
            "| num_eval_images | 4 | 4 |",
        ]
    )


def test_streamed_eval_inputs_equal_the_decoded_ones():
    """`build_eval_inputs(on_images=...)` hands the images over in batches, keeps none, and gives the same ids,
    captions and labels as decoding the whole split."""
    from vlalign.data import DataArguments
    from vlalign.evaluation import build_eval_inputs

    split = build_digits_dataset(image_size=16)["test"].select(range(23))
    args = DataArguments()
    whole = build_eval_inputs(split, args, batch_size=5)
    batches = []
    streamed = build_eval_inputs(split, args, batch_size=5, on_images=batches.append)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] and streamed.images == []
    assert [np.asarray(i).tolist() for b in batches for i in b] == [np.asarray(i).tolist() for i in whole.images]
    for name in ("image_ids", "texts", "text_ids", "labels"):
        assert getattr(streamed, name) == getattr(whole, name), name

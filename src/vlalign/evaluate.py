"""Evaluate image-text models side by side: ``python -m vlalign.evaluate`` (or ``vlalign-evaluate``).

Takes one or more models (a saved TCL / CODIS model, folder or Hub id, or a plain transformers `CLIPModel`,
`SiglipModel` or `VisionTextDualEncoderModel` checkpoint) and one split of any dataset `datasets.load_dataset`
opens (a Hub name, ``imagefolder``, ``parquet``, ``webdataset``...) or the embedded ``digits`` demo, and reports

- zero-shot classification from the class names with a prompt-template ensemble (a template set per dataset,
  averaged in embedding space as CLIP does): top-1, top-5 and mean per-class recall;
- retrieval recall@1/5/10 both ways, several captions per image allowed (a list column of captions, the
  COCO / Flickr30K layout), optionally re-ranked by a TCL / CODIS model's ITM head (``--itm_rerank_k``);

with the code that `ContrastiveTrainer.evaluate` runs during training (`vlalign.evaluation.evaluate_model`), so a
model evaluated here gives the numbers of its training run's evaluation. The split is read once, in batches: the
images of one batch are decoded, embedded by every model and dropped (without ITM re-ranking, which needs them all),
and similarities are computed in chunks, so memory holds the embeddings, not the images or the full similarity
matrix. Plain dual encoders are evaluated through `from_dual_encoder_pretrained`, whose embeddings are the
checkpoint's own (tested equal).

It writes a JSON file and prints one markdown table, one column per model::

    python -m vlalign.evaluate --model outputs/tcl_digits outputs/codis_digits --dataset digits --split test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_albef import ALBEFStackConfig
from .data.sources import (
    DataArguments,
    _encode_string_labels,
    _lift_nested_columns,
    _load_splits,
    _prepare_split,
    resolve_class_names,
)
from .evaluation import (
    ZERO_SHOT_TEMPLATE_SETS,
    build_eval_inputs,
    embed_images,
    evaluate_model,
    zero_shot_templates_for,
)
from .modeling_albef import ALBEFModel
from .modeling_tcl import TCLModel
from .processing_vlalign import VLAlignProcessor

__all__ = ["evaluate_models", "load_eval_split", "load_model_for_evaluation", "main", "markdown_table"]

logger = logging.getLogger("vlalign.evaluate")

# rows of the printed table, in this order; other numeric results (codebook usage...) follow
TABLE_ROWS = (
    "i2t_recall@1",
    "i2t_recall@5",
    "i2t_recall@10",
    "t2i_recall@1",
    "t2i_recall@5",
    "t2i_recall@10",
    "zero_shot_accuracy",
    "zero_shot_top5_accuracy",
    "zero_shot_mean_per_class_recall",
)
_NONE = ("none", "null", "")


def load_model_for_evaluation(name: str, allow_pickle: bool = False):
    """``(model, processor)`` for `name`: a TCL / CODIS model with its saved processor (or a LoRA run's adapters on
    their base), or a plain CLIP / SigLIP / VisionTextDualEncoder checkpoint through
    `TCLModel.from_dual_encoder_pretrained` (its own embeddings) with `VLAlignProcessor.from_dual_encoder_pretrained`
    (its own tokenizer and image processor)."""
    if os.path.isfile(os.path.join(name, "adapter_config.json")) and not os.path.isfile(
        os.path.join(name, "config.json")
    ):
        return _load_adapters(name, allow_pickle)
    config = AutoConfig.from_pretrained(name)
    if config.model_type in ALBEFModel._DUAL_ENCODER_TYPES:
        # as TCL without training terms: the dual encoder's embeddings, no teachers built
        model = TCLModel.from_dual_encoder_pretrained(name, allow_pickle=allow_pickle, use_momentum=False)
        return model, VLAlignProcessor.from_dual_encoder_pretrained(name)
    if isinstance(config, ALBEFStackConfig):
        return AutoModel.from_pretrained(name), AutoProcessor.from_pretrained(name)
    raise ValueError(
        f"{name!r} is a {config.model_type!r} model: vlalign.evaluate takes image-text dual encoders (a TCL or CODIS "
        "model, or a CLIPModel, SiglipModel or VisionTextDualEncoderModel checkpoint)"
        + ("; an MIVC model answers questions: its evaluation is train.py's" if config.model_type == "mivc" else "")
    )


def _load_adapters(folder: str, allow_pickle: bool):
    """A LoRA run's folder (adapters + processor, `train.py --lora_r`): its base, from adapter_config.json's
    `base_model_name_or_path`, with the adapters on top."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError:
        raise ValueError(f"{folder!r} holds LoRA adapters: pip install 'vlalign[peft]' to evaluate them") from None
    base_name = PeftConfig.from_pretrained(folder).base_model_name_or_path
    if not base_name:
        raise ValueError(f"{folder!r}: adapter_config.json names no base model (base_model_name_or_path)")
    base, _ = load_model_for_evaluation(base_name, allow_pickle)
    return PeftModel.from_pretrained(base, folder), AutoProcessor.from_pretrained(folder)


def _optional_column(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in _NONE else value


def load_eval_split(args: argparse.Namespace) -> tuple[datasets.Dataset, DataArguments, bool]:
    """The split to evaluate, prepared as training prepares its eval split (undecoded images, string labels as a
    ClassLabel, row ids), its `DataArguments`, and whether it has captions (without: zero-shot only).

    The label, image-id and caption columns default to ``label``, ``image_id`` and ``caption`` and are simply
    absent when the split has no such column; one named on the command line must exist."""
    source = dict(
        dataset_name=args.dataset,
        dataset_config_name=args.dataset_config_name,
        data_dir=args.data_dir,
        data_files=args.data_files,
        cache_dir=args.cache_dir,
        train_split=args.split,
        eval_split=None,
    )
    splits = _load_splits(DataArguments(**source), streaming=False)
    if args.split not in splits:
        raise ValueError(f"split {args.split!r} not found in {args.dataset!r}; available splits: {list(splits)}")
    dataset = splits[args.split]
    columns = {
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "label_column": args.label_column,
        "image_id_column": args.image_id_column,
    }
    defaults = {
        "image_column": "image",
        "caption_column": "caption",
        "label_column": "label",
        "image_id_column": "image_id",
    }
    chosen = {}
    for field_name, value in columns.items():
        explicit = value is not None
        column = _optional_column(value if explicit else defaults[field_name])
        if column is None and field_name == "image_column":
            raise ValueError("--image_column must name the column of images")
        chosen[field_name] = column
        if column is not None and "." in column:
            continue  # a field of a struct column, lifted below
        if column is not None and column not in dataset.column_names:
            if explicit or field_name == "image_column":
                raise ValueError(
                    f"--{field_name} {column!r} not found in split {args.split!r}; available columns: "
                    f"{dataset.column_names}"
                )
            chosen[field_name] = None
    has_captions = chosen["caption_column"] is not None
    label_column = chosen["label_column"]
    positives_by = args.positives_by or ("label" if label_column is not None else "image")
    data_args = DataArguments(
        **source,
        image_column=chosen["image_column"],
        caption_column=chosen["caption_column"] or "caption",  # not read without captions
        label_column=label_column,
        image_id_column=chosen["image_id_column"],
        positives_by=positives_by,
        class_names=args.class_names,
        zero_shot_templates=_templates(args.templates, args.dataset),
    )
    dataset = _lift_nested_columns(dataset, data_args)
    if label_column is not None:
        feature = dataset.features[label_column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = _encode_string_labels({"split": dataset}, label_column)["split"]
    return _prepare_split(dataset, data_args, args.max_samples), data_args, has_captions


def _templates(values: list[str] | None, dataset_name: str) -> list[str]:
    """``--templates``: a set name of `ZERO_SHOT_TEMPLATE_SETS`, a text file of one template per line, or the
    templates themselves; by default the dataset's set."""
    if not values:
        return zero_shot_templates_for(dataset_name)
    if len(values) == 1 and values[0] in ZERO_SHOT_TEMPLATE_SETS:
        return list(ZERO_SHOT_TEMPLATE_SETS[values[0]])
    if len(values) == 1 and os.path.isfile(values[0]):
        return [line.strip() for line in Path(values[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(values) == 1 and "{" not in values[0]:
        raise ValueError(
            f"--templates {values[0]!r} is no template set ({', '.join(sorted(ZERO_SHOT_TEMPLATE_SETS))}), no file, "
            "and no template (templates have a {name} placeholder)"
        )
    return list(values)


@torch.no_grad()
def evaluate_models(
    models: dict[str, tuple[Any, Any]],
    dataset: datasets.Dataset,
    data_args: DataArguments,
    *,
    has_captions: bool = True,
    batch_size: int = 128,
    chunk_size: int = 1024,
    itm_rerank_k: int = 0,
    bf16: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Metrics of each ``name -> (model, processor)`` on `dataset`, read once: each batch of decoded images is
    embedded by every model and dropped (kept only for ITM re-ranking). The models must already be on their
    device. ``{name: evaluate_model(...) results}``."""
    rerank = {
        name: itm_rerank_k if itm_rerank_k > 0 and getattr(model.config, "num_fusion_layers", 0) > 0 else 0
        for name, (model, _) in models.items()
    }
    keep_images = any(rerank.values())
    image_embeds: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    kept: list = []

    def embed(images: list) -> None:
        for name, (model, processor) in models.items():
            with _autocast(model, bf16):
                image_embeds[name].append(embed_images(model, processor, images, batch_size))
        if keep_images:
            kept.extend(images)

    for model, _ in models.values():
        model.eval()
    rows = range(0, len(dataset), batch_size)
    with _progress_bar(len(rows), "images", progress) as bar:

        def embed_and_count(images: list) -> None:
            embed(images)
            bar.update(1)

        eval_inputs = build_eval_inputs(
            dataset, data_args, batch_size, on_images=embed_and_count, captions=has_captions
        )
    eval_inputs.images = kept
    class_names = resolve_class_names(dataset, data_args)
    if eval_inputs.labels is not None and class_names is None:
        logger.warning(
            "labels without class names (no ClassLabel column, no --class_names): zero-shot classification skipped"
        )
    results = {}
    for name, (model, processor) in models.items():
        embeds = torch.cat(image_embeds[name]) if image_embeds[name] else torch.empty(0, 1)
        with _autocast(model, bf16):
            results[name] = evaluate_model(
                model,
                processor,
                eval_inputs,
                class_names,
                data_args.zero_shot_templates,
                batch_size=batch_size,
                itm_rerank_k=rerank[name],
                chunk_size=chunk_size,
                image_embeds=embeds,
                progress=progress,
            )
        results[name].update(eval_inputs.issues.report("eval_"))
    return results


def _autocast(model, bf16: bool):
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def _progress_bar(total: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="reading and embedding", unit=f"batch of {unit}", disable=not enabled)
    try:
        yield bar
    finally:
        bar.close()


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One markdown table: a row per metric (retrieval, zero-shot, then the other numbers), a column per model;
    percentages to 2 decimals, "–" where a model has no such metric."""
    names = list(results)
    present = {key for metrics in results.values() for key, value in metrics.items() if isinstance(value, (int, float))}
    rows = [key for key in TABLE_ROWS if key in present]
    rows += sorted(key for key in present if key not in TABLE_ROWS and not key.startswith("eval_"))
    lines = [
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in rows:
        lines.append(f"| {key} | " + " | ".join(_cell(results[name].get(key)) for name in names) + " |")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlalign.evaluate",
        description="Zero-shot classification and image-text retrieval of one or more models on one dataset split.",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME_OR_PATH",
        help="TCL / CODIS model, or CLIPModel / SiglipModel / VisionTextDualEncoderModel checkpoint (folder or Hub "
        "id); several give one column each",
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        help='load_dataset name or path (Hub name, "imagefolder", '
        '"parquet", "webdataset"...) or "digits" (the embedded demo)',
    )
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--data_files", default=None, help="a path or glob, or a JSON list / dict")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--image_column", default=None, help="default: image")
    parser.add_argument(
        "--caption_column",
        default=None,
        help="a caption or a list of captions per image; default caption when present; none: zero-shot only",
    )
    parser.add_argument(
        "--label_column", default=None, help="class labels; default label when present; none: no zero-shot"
    )
    parser.add_argument("--image_id_column", default=None, help="default image_id when present, else the row")
    parser.add_argument(
        "--positives_by",
        choices=("label", "image"),
        default=None,
        help="retrieval positives: captions of the same label or of the same image; default label "
        "when there are labels",
    )
    parser.add_argument(
        "--class_names",
        default=None,
        help="comma-separated or a JSON list; default the ClassLabel names of the label column",
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help=f"a template set ({', '.join(sorted(ZERO_SHOT_TEMPLATE_SETS))}), a file with one "
        "template per line, or templates with a {name} placeholder; default the dataset's set",
    )
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate the first N rows")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--chunk_size", type=int, default=1024, help="queries per similarity matmul")
    parser.add_argument(
        "--itm_rerank_k",
        type=int,
        default=0,
        help="re-rank the top k by ITM (TCL / CODIS with fusion layers; keeps the decoded images in memory)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="run the towers under bfloat16 autocast")
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="read a dual encoder's pytorch_model.bin (only for checkpoints you trust)",
    )
    parser.add_argument("--output", default="evaluation_results.json", help="the JSON file written")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.class_names is not None:
        text = args.class_names.strip()
        args.class_names = json.loads(text) if text.startswith("[") else [n.strip() for n in text.split(",")]
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be >= 1")
    if args.itm_rerank_k < 0:
        parser.error("--itm_rerank_k must be >= 0")
    if len(set(args.model)) != len(args.model):
        parser.error("a model is named twice")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dataset, data_args, has_captions = load_eval_split(args)
        models = {}
        for name in args.model:
            model, processor = load_model_for_evaluation(name, allow_pickle=args.allow_pickle)
            models[name] = (model.to(device), processor)
    except (ValueError, OSError) as error:  # OSError: a model or data path that does not exist or cannot be read
        sys.exit(f"vlalign.evaluate: {error}")
    results = evaluate_models(
        models,
        dataset,
        data_args,
        has_captions=has_captions,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        itm_rerank_k=args.itm_rerank_k,
        bf16=args.bf16,
        progress=not args.no_progress,
    )
    report = {
        "dataset": {
            "name": args.dataset,
            "config": args.dataset_config_name,
            "split": args.split,
            "positives_by": data_args.positives_by,
            "class_names": resolve_class_names(dataset, data_args),
            "zero_shot_templates": data_args.zero_shot_templates,
        },
        "device": str(device),
        "bf16": args.bf16,
        "models": {name: {k: _json_value(v) for k, v in metrics.items()} for name, metrics in results.items()},
    }
    output = Path(args.output)
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(results))
    logger.info("results written to %s", output)


if __name__ == "__main__":
    main()

"""Model cards and Hub uploads for vlalign models.

Design decisions
----------------
* ``library_name`` is ``"transformers"``: saved folders load with ``transformers.AutoModel`` (with our package
  installed, or with ``trust_remote_code=True`` without it), so the Hub's "Use in Transformers" snippet is
  right. The ``"vlalign"`` tag marks the training library instead.
* The YAML front matter is produced by ``huggingface_hub.ModelCardData`` (``yaml.dump``), which quotes any
  string that could break it, so user strings go into metadata unchanged and read back equal. The Markdown
  body is a Jinja template rendered *without* autoescaping (``ModelCard.from_template`` uses a bare
  ``jinja2.Template``), so every user string is escaped here before it reaches the template.
* Only ids the Hub can link go into metadata: ``datasets`` needs a ``namespace/name`` id (bare names are
  usually ``datasets`` builders such as ``"imagefolder"`` or our built-in ``"digits"``); ``base_model`` takes
  any valid repo id (legacy ``bert-base-uncased`` style included) that is not a local path. Everything else
  appears in the card body only.
* PyYAML writes NEL (U+0085) raw inside a single-quoted scalar, which reads back as a space, so the front matter
  is written by a dumper that double-quotes (and so escapes) any string holding a Unicode line separator.
* Values that a template puts at the start of a line are also escaped against opening a list, a thematic break
  (``---``) or a setext heading.
* The usage snippets load what a reader can actually load: the Hub repo id when the model has one, else its
  local folder (a relative path as given, or a ``path/to/<name>`` placeholder, never a path of the training
  machine). The pipeline snippet uses the class names and a zero-shot prompt the model was evaluated with.
* Tokens are passed straight to ``HfApi`` and never logged, printed or written.
* A push uploads an allow-list (`publishable_files`), computed from the folder and committed file by file, never
  the folder as a whole: a training run's output folder also holds checkpoints, logs and pickles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import string
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.errors
import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .evaluation import CODE_COLLAPSE_PERPLEXITY, answers_match, multi_image_examples, retrieval_examples

logger = logging.getLogger(__name__)

__all__ = [
    "PUSH_ERRORS",
    "build_model_card",
    "is_hub_id",
    "publishable_files",
    "push_command",
    "push_folder_to_hub",
    "save_model_card",
    "snippet_folder",
]

DEFAULT_TAGS = ("vlalign", "vision-language", "contrastive-learning")
# The pipeline snippet of a model card without the run's class names / prompts
GENERIC_SNIPPET_LABELS = ("cat", "dog")
GENERIC_HYPOTHESIS_TEMPLATE = "a photo of a {}."
MAX_SNIPPET_LABELS = 10  # more class names than this: the snippet shows the first ones
RETRIEVAL_TASK = ("image-text-retrieval", "Image-Text Retrieval")
ZERO_SHOT_TASK = ("zero-shot-image-classification", "Zero-Shot Image Classification")
GENERATION_TASK = ("image-text-to-text", "Image-Text-to-Text")

# CommonMark lets any ASCII punctuation be backslash-escaped; these are the ones that can start inline
# markup, HTML, table cells, headings, math or entities in the places the template puts values.
_MD_SPECIAL = set("\\`*_[]<>|#~&$")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]+")
# Text that, at the start of a line, opens a bullet ("- x", "+ x"), is a thematic break or setext underline ("---",
# "- - -", "==="), or opens an ordered list ("1. x", "2) x"). Numbers such as "-0.5" or "0.5" are left alone.
_BULLET_OR_RULE = re.compile(r"^(?:[-+](?:[ \t]|$)|=+$|(?:-[ \t]*)+$)")
_ORDERED_ITEM = re.compile(r"^(\d{1,9})([.)])(?=[ \t]|$)")
# Characters PyYAML reads as line breaks besides \n and \r; it writes them raw unless the string is double-quoted.
_YAML_LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")


def _md(value: Any) -> str:
    """Escape a value for inline Markdown: one line, no markup, safe inside a table cell or at a line start."""
    text = _LINE_BREAKS.sub(" ", str(value))
    # Other control characters (NUL, ESC, ...) have no business in a card and can confuse renderers.
    text = "".join(" " if unicodedata.category(c) == "Cc" and c != "\t" else c for c in text)
    text = "".join("\\" + c if c in _MD_SPECIAL else c for c in text).strip()
    # CommonMark allows a backslash before any ASCII punctuation: "\- x", "1\. x" are plain text
    if _BULLET_OR_RULE.match(text):
        return "\\" + text
    return _ORDERED_ITEM.sub(r"\1\\\2", text)


class _LineSafeYamlDumper(yaml.Dumper):
    """`yaml.Dumper` (what huggingface_hub uses) that double-quotes strings holding a Unicode line separator."""

    def choose_scalar_style(self):
        value = getattr(self.event, "value", None)
        if isinstance(value, str) and any(c in value for c in _YAML_LINE_SEPARATORS):
            return '"'
        return super().choose_scalar_style()


class _CardData(ModelCardData):
    """`ModelCardData` whose front matter reads back exactly (see `_LineSafeYamlDumper`)."""

    def to_yaml(self, line_break=None, original_order: list[str] | None = None) -> str:
        if original_order:  # keep a loaded card's key order, as ModelCardData.to_yaml does
            keys = dict.fromkeys([*original_order, *self.__dict__])
            self.__dict__ = {key: self.__dict__[key] for key in keys if key in self.__dict__}
        return yaml.dump(
            self.to_dict(), Dumper=_LineSafeYamlDumper, sort_keys=False, allow_unicode=True, line_break=line_break
        ).strip()


class _ModelCard(ModelCard):
    card_data_class = _CardData


def _py_literal(value: str) -> str:
    """A double-quoted Python string literal for code blocks, printable ASCII only: JSON's escapes (quotes,
    backslash, control characters) are valid Python, and every other character is written as a Python escape
    (JSON's own `ensure_ascii` would write characters beyond U+FFFF as surrogate pairs, which Python reads as two
    characters). No newline and no backtick (\\x60), so the literal cannot close the surrounding fenced block."""
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(c if " " <= c <= "~" and c != "`" else _py_escape(c) for c in text)


def _py_escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _valid_repo_id(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_id(name: Any) -> bool:
    """True for a ``namespace/name`` id that the Hub accepts (the form that links to a repo page)."""
    return isinstance(name, str) and name.count("/") == 1 and _valid_repo_id(name)


def snippet_folder(folder: str | Path) -> str | None:
    """A model folder as a card's usage snippets may name it: a relative path that stays inside the current directory,
    as ``./<path>`` (POSIX form; it loads from the directory the path was given in, and the leading ``./`` keeps it
    from reading as a Hub ``namespace/name``). None for an absolute path or one that climbs out with "..": those
    name the training machine's directories, which a card does not show."""
    path = Path(folder)
    if path.is_absolute() or ".." in path.parts or str(folder).startswith("~") or not path.parts:
        return None
    return f"./{path.as_posix()}"


def _hypothesis_template(templates: list[str] | None) -> str | None:
    """The first zero-shot prompt (`str.format` with ``{name}``, as `vlalign.data.DataArguments` takes them) that the
    zero-shot pipeline can use: its only field is ``{name}``, which becomes the pipeline's ``{}``. Prompts with a
    ``{digit}`` / ``{label}`` field need the class index, which the pipeline does not pass; they are skipped."""
    for template in templates or ():
        try:
            parts = list(string.Formatter().parse(str(template)))
        except ValueError:  # unbalanced braces
            continue
        fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
        if not fields or any(field != ("name", "", None) for field in fields):
            continue
        # literal braces come back unescaped from parse(): escape them again for the pipeline's str.format
        return "".join(
            literal.replace("{", "{{").replace("}", "}}") + ("{}" if name is not None else "")
            for literal, name, _, _ in parts
        )
    return None


def _pipeline_snippet_vars(class_names: list[str] | None, zero_shot_templates: list[str] | None) -> dict[str, str]:
    names = [str(n) for n in class_names or ()]
    template = _hypothesis_template(zero_shot_templates) if names else None
    if not names:
        labels, said = list(GENERIC_SNIPPET_LABELS), "your class names"
    elif len(names) > MAX_SNIPPET_LABELS:
        labels, said = names[:MAX_SNIPPET_LABELS], f"{MAX_SNIPPET_LABELS} of the {len(names):,} class names"
    else:
        labels, said = names, "the class names"
    if template:
        comment = f"{said} and a zero-shot prompt the model was evaluated with"
    elif names:
        comment = f"{said} the model was evaluated with, and a generic prompt: adapt it to your data"
    else:
        comment = f"{said}, and a prompt that fits your data"
    return {
        "candidate_labels_literal": "[" + ", ".join(_py_literal(label) for label in labels) + "]",
        "hypothesis_template_literal": _py_literal(template or GENERIC_HYPOTHESIS_TEMPLATE),
        "pipeline_comment": comment,
    }


def _is_hub_model_id(name: Any) -> bool:
    """A repo id that is not a local path (for `base_model`). The id check comes first: it rejects the names that
    `Path.exists` cannot even look up (too long, NUL bytes)."""
    return _valid_repo_id(name) and not Path(name).exists()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "custom"


def _scalar(value: Any) -> Any:
    """numpy / torch scalars -> Python scalars (yaml.dump would write them as unsafe python objects)."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def _as_number(value: Any) -> float | None:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _for_display(value: float) -> float:
    """A measured float rounded to 7 significant digits: float32 arithmetic leaves noise beyond them
    (85.5555534362793 for 77 of 90 in percent); eval_results.json keeps the full value."""
    return float(f"{value:.7g}")


def _format_hparam(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str, ensure_ascii=False)
    return _md(value)


def _metric_info(key: str) -> tuple[str, str, str] | None:
    """(task_type, task_name, pretty metric name) for evaluation metrics, None for bookkeeping numbers."""
    base = key.lower().removeprefix("eval_")  # Trainer-style prefixes
    if base.endswith(("num_queries", "runtime", "per_second")) or base.startswith("num_"):
        return None
    m = re.fullmatch(r"(i2t|t2i)_recall@(\d+)", base)
    if m:
        direction = "Image→text" if m.group(1) == "i2t" else "Text→image"
        return (*RETRIEVAL_TASK, f"{direction} recall@{m.group(2)}")
    if base == "zero_shot_top5_accuracy":
        return (*ZERO_SHOT_TASK, "Zero-shot top-5 accuracy")
    if base == "zero_shot_mean_per_class_recall":
        return (*ZERO_SHOT_TASK, "Zero-shot mean per-class recall")
    if "recall" in base:
        return (*RETRIEVAL_TASK, key)
    if base == "exact_match_accuracy":
        return (*GENERATION_TASK, "Exact-match accuracy")
    if base == "zero_shot_accuracy":
        return (*ZERO_SHOT_TASK, "Zero-shot top-1 accuracy")
    if "accuracy" in base:
        return (*ZERO_SHOT_TASK, key)
    return None


def _split_eval_results(
    eval_results: Mapping[str, Any] | None, default_dataset: str, default_split: str | None
) -> list[tuple[str, str | None, Mapping[str, Any]]]:
    """Flat ``{metric: value}`` (for ``default_dataset``) or ``{dataset: {metric: value}}``."""
    if not eval_results:
        return []
    nested = [isinstance(v, Mapping) for v in eval_results.values()]
    if all(nested):
        return [(str(ds), default_split, metrics) for ds, metrics in eval_results.items()]
    if any(nested):
        raise ValueError("eval_results must be either {metric: value} or {dataset_name: {metric: value}}")
    return [(default_dataset, default_split, eval_results)]


def build_model_card(
    template_path: str | Path,
    *,
    model_id: str,
    load_from: str | None = None,
    model_type_name: str = "TCL",
    base_model: str | list[str] | None = None,
    dataset_name: str,
    dataset_description: str | None = None,
    num_train_samples: int | None = None,
    hyperparameters: Mapping[str, Any],
    eval_results: Mapping[str, Any],
    license: str = "apache-2.0",
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str | None = "zero-shot-image-classification",
    extra: Mapping[str, Any] | None = None,
    dataset_split: str | None = None,
    eval_dataset_name: str | None = None,
    eval_split: str | None = None,
    code_usage: Mapping[str, Any] | None = None,
    alignment_not_started: Mapping[str, Any] | None = None,
    pictures: list[tuple[str, str]] | None = None,
    class_names: list[str] | None = None,
    zero_shot_templates: list[str] | None = None,
) -> ModelCard:
    """Render a model card from a Jinja template (e.g. ``model_cards/tcl.md``).

    Args:
        template_path: Markdown/Jinja template whose first lines are ``---``, ``{{ card_data }}``, ``---``.
        model_id: the model's name: the card's title and ``model-index`` name. A Hub repo id (``namespace/name``),
            or a run name for a model that is not on the Hub.
        load_from: what the usage snippets load (``from_pretrained``, ``pipeline``): a Hub repo id, or the model's
            folder: anything that is not a Hub repo id, such as ``./outputs/run`` from `snippet_folder` (relative to
            where the snippets are run). Default: ``model_id`` when it is a Hub repo id, else the placeholder
            ``path/to/<model_id>``. For a folder the card says what to replace it with.
        model_type_name: display name of the method; its lowercase form is added as a tag.
        base_model: backbone checkpoint id(s) the model was initialised from.
        dataset_name: training dataset (Hub id, builder name or description).
        dataset_description, num_train_samples, dataset_split: shown in the "Training data" section.
        hyperparameters: the hyperparameters actually used, rendered as a table (insertion order kept).
        eval_results: ``{metric: value}`` measured on ``eval_dataset_name`` (default: ``dataset_name``), or
            ``{eval_dataset: {metric: value}}``, shown rounded to 7 significant digits. Keys as produced by
            :mod:`vlalign.evaluation`
            (``i2t_recall@k``, ``t2i_recall@k``, ``zero_shot_accuracy``; an ``eval_`` prefix is accepted),
            values in percent. Recall and accuracy keys become ``EvalResult`` entries (``metric_type`` = the
            key, so they read back unchanged) and rows of the evaluation table; other numbers (counts,
            runtimes, losses) are only listed in the body; NaN values are shown as "n/a" and not exported.
        license, language, tags, pipeline_tag: metadata (``language``: ISO code(s) of the text the model reads,
            left out when None). Tags always include ``vlalign``, ``vision-language``,
            ``contrastive-learning`` and ``model_type_name.lower()``.
        extra: further ``{name: value}`` facts for an "Additional information" section (body only).
        eval_split: dataset split of the evaluation results (metadata and table heading).
        code_usage: for codebook models, ``codebook_size`` and per modality ``<image|text>_codes_used`` /
            ``<image|text>_code_perplexity`` (optionally ``image_code_purity``), as from
            ``evaluation.codebook_metrics``; rendered as a "Codebook usage" table, with a warning when the codebook
            collapsed (perplexity below ``evaluation.CODE_COLLAPSE_PERPLEXITY``).
        alignment_not_started: when training ended with the cross-modal losses still at the uniform value, the
            figures of that check (``step``, ``loss_i2t``, ``loss_t2i``, ``num_keys``, as the trainer's
            ``alignment_check``), rendered as a warning at the top of the evaluation section.
        pictures: ``(caption, file name)`` of PNG files saved next to README.md (e.g. by `plot_training_curves`,
            `plot_retrieval_grid`, `plot_multi_image_examples`), shown with relative links.
        class_names, zero_shot_templates: the class names and zero-shot prompts (``{name}`` placeholders, as
            `vlalign.data.DataArguments`) the model was evaluated with. The pipeline snippet of the zero-shot
            templates uses them as ``candidate_labels`` (the first `MAX_SNIPPET_LABELS`) and, as
            ``hypothesis_template``, the first prompt whose only placeholder is ``{name}``; without them (or
            without such a prompt), generic ones.

    Returns:
        ``huggingface_hub.ModelCard``; ``card.data`` holds the metadata, ``card.text`` the body.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError("model_id must be a non-empty string")
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise ValueError("dataset_name must be a non-empty string")
    if load_from is not None and (not isinstance(load_from, str) or not load_from.strip()):
        raise ValueError(f"load_from must be None or a non-empty string, got {load_from!r}")
    if load_from is None:
        load_from = model_id if is_hub_id(model_id) else f"path/to/{model_id}"
        placeholder = not is_hub_id(model_id)
    else:
        placeholder = False

    # ---- evaluation results: metadata entries + table rows + other numbers
    metadata_results: list[EvalResult] = []
    tables: list[dict[str, Any]] = []
    other_rows: list[tuple[str, str]] = []
    metric_ids: list[str] = []
    for ds, split, metrics in _split_eval_results(eval_results, eval_dataset_name or dataset_name, eval_split):
        rows = []
        for key, raw in metrics.items():
            key = str(key)
            value = _as_number(raw)
            info = _metric_info(key)
            if info is None or value is None:
                shown = _scalar(raw)
                if isinstance(shown, float) and math.isfinite(shown):
                    shown = _for_display(shown)
                other_rows.append((_md(key), _md(shown)))
                continue
            task_type, task_name, pretty = info
            finite = math.isfinite(value)
            rows.append({"task": _md(task_name), "metric": _md(pretty), "value": f"{value:.2f}" if finite else "n/a"})
            if not finite:
                continue  # the Hub's model-index has no representation for NaN/inf
            metric_ids.append(
                {ZERO_SHOT_TASK[0]: "accuracy", GENERATION_TASK[0]: "exact_match"}.get(task_type, "recall")
            )
            metadata_results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=ds if is_hub_id(ds) else _slug(ds),
                    dataset_name=ds,
                    dataset_split=split,
                    metric_type=key,
                    metric_name=pretty,
                    metric_value=_for_display(value),
                )
            )
        if rows:
            tables.append({"dataset": _md(ds), "split": _md(split) if split else None, "rows": rows})

    # ---- metadata
    base_models = [base_model] if isinstance(base_model, str) else list(base_model or [])
    hub_base = [m for m in base_models if _is_hub_model_id(m)]
    all_tags = [*DEFAULT_TAGS, model_type_name.lower(), *(tags or [])]
    card_data = _CardData(
        library_name="transformers",
        license=license,
        language=language,
        tags=all_tags,
        datasets=[dataset_name] if is_hub_id(dataset_name) else None,
        metrics=sorted(set(metric_ids)) or None,
        pipeline_tag=pipeline_tag,
        base_model=(hub_base[0] if len(hub_base) == 1 else hub_base) or None,
        model_name=model_id if metadata_results else None,
        eval_results=metadata_results or None,
    )

    # ---- body variables, all escaped. They also shadow the raw card-data keys that from_template exposes
    # to the template (license, tags, ...), so a template using those cannot inject unescaped text.
    hparams = dict(hyperparameters or {})
    embed_dim = _as_number(hparams.get("embed_dim"))
    template_vars: dict[str, Any] = {
        "model_id": _md(model_id),
        "model_id_literal": _py_literal(load_from),  # the name templates know it by: what from_pretrained loads
        # how the snippets' folder is to be read, when they load one: None when they load from the Hub
        "local_folder": None if is_hub_id(load_from) else {"name": _md(load_from), "placeholder": placeholder},
        **_pipeline_snippet_vars(class_names, zero_shot_templates),
        "model_type_name": _md(model_type_name),
        "base_models": [_md(m) for m in base_models],
        "dataset_name": _md(dataset_name),
        "dataset_split": _md(dataset_split) if dataset_split else None,
        "dataset_description": _md(dataset_description) if dataset_description else None,
        "num_train_samples": f"{int(num_train_samples):,}" if num_train_samples is not None else "not recorded",
        "embed_dim": int(embed_dim) if embed_dim is not None and embed_dim.is_integer() else None,
        "hyperparameters": [(_md(k), _format_hparam(v)) for k, v in hparams.items()],
        "eval_tables": tables,
        "other_results": other_rows,
        "extra": [(_md(k), _format_hparam(v)) for k, v in (extra or {}).items()],
        "license": _md(license),
        "language": [_md(code) for code in ([language] if isinstance(language, str) else language or [])],
        "tags": [_md(t) for t in all_tags],
        "datasets": [_md(dataset_name)],
        "base_model": ", ".join(_md(m) for m in base_models) or None,
        "pipeline_tag": _md(pipeline_tag) if pipeline_tag else None,
        "library_name": "transformers",
        "model_name": _md(model_id),
        "metrics": sorted(set(metric_ids)),
    }
    template_vars["code_usage"] = _code_usage_vars(code_usage) if code_usage else None
    template_vars["alignment_warning"] = _alignment_vars(alignment_not_started) if alignment_not_started else None
    for _, name in pictures or ():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.png", str(name)):
            raise ValueError(f"picture file names must be plain .png names next to the card, got {name!r}")
    template_vars["pictures"] = [(_md(caption), str(name)) for caption, name in pictures or ()]
    template_str = Path(template_path).read_text(encoding="utf-8")
    if not template_str.lstrip().startswith("---"):
        raise ValueError(f"{template_path}: a model card template must start with the '---' YAML front matter")
    return _ModelCard.from_template(card_data, template_str=template_str, **template_vars)


def _alignment_vars(check: Mapping[str, Any]) -> dict[str, str]:
    num_keys = int(check["num_keys"])
    return {
        "step": f"{int(check['step']):,}",
        "loss_i2t": f"{float(check['loss_i2t']):.3f}",
        "loss_t2i": f"{float(check['loss_t2i']):.3f}",
        "num_keys": f"{num_keys:,}",
        "uniform": f"{math.log(num_keys):.3f}",
    }


def _code_usage_vars(code_usage: Mapping[str, Any]) -> dict[str, Any]:
    size = _as_number(code_usage.get("codebook_size"))
    rows, collapsed = [], []
    for modality in ("image", "text"):
        used = _as_number(code_usage.get(f"{modality}_codes_used"))
        perplexity = _as_number(code_usage.get(f"{modality}_code_perplexity"))
        if used is None and perplexity is None:
            continue
        rows.append(
            {
                "modality": modality,
                "used": "n/a" if used is None else f"{int(used):,}",
                "perplexity": "n/a" if perplexity is None or not math.isfinite(perplexity) else f"{perplexity:.2f}",
            }
        )
        if perplexity is not None and math.isfinite(perplexity) and perplexity < CODE_COLLAPSE_PERPLEXITY:
            collapsed.append(modality)
    purity = _as_number(code_usage.get("image_code_purity"))
    return {
        "size": "n/a" if size is None else f"{int(size):,}",
        "rows": rows,
        "purity": None if purity is None or not math.isfinite(purity) else f"{purity:.1f}",
        "collapsed": collapsed,
        "collapse_threshold": f"{CODE_COLLAPSE_PERPLEXITY:g}",
    }


def save_model_card(output_dir: str | Path, card: ModelCard) -> Path:
    """Write ``card`` to ``output_dir/README.md`` (the file the Hub displays) and return that path."""
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


# What a published model folder may contain (`publishable_files`). Everything else a training run leaves next to the
# model stays local: checkpoint-*/ (optimizer, scheduler and RNG pickles, training_args.bin), TensorBoard runs/ (host
# name, absolute paths), training_args.json (absolute paths), files left by earlier runs, any *.bin / *.pt / *.pth.
WEIGHT_FILE = "model.safetensors"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_FILES = ("config.json", "generation_config.json", "README.md", "eval_results.json")
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
# `![caption](file)` in the card; captions are escaped by `_md`, so a `]` inside one is `\]`
_PICTURE_LINK = re.compile(r"!\[(?:\\.|[^\]\\])*\]\(<?([^()<>\s]+)>?\)")


def _inside(folder: Path, name: str) -> bool:
    path = (folder / name).resolve()
    return path.is_file() and path.is_relative_to(folder.resolve())


def _weight_files(folder: Path) -> list[str]:
    has_index = (folder / WEIGHT_INDEX_FILE).is_file()
    has_single = (folder / WEIGHT_FILE).is_file()
    if has_index and has_single:
        # save_pretrained removes stale shards but not a stale index or single file: one of them is left from an
        # earlier save, and which one cannot be told from the folder
        raise ValueError(
            f"{folder} has both {WEIGHT_FILE} and {WEIGHT_INDEX_FILE}; one is left from an earlier "
            "save: remove it, or save the model to an empty folder"
        )
    if has_single:
        return [WEIGHT_FILE]
    if not has_index:
        return []
    weight_map = json.loads((folder / WEIGHT_INDEX_FILE).read_text(encoding="utf-8")).get("weight_map") or {}
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not _inside(folder, name)]
    if not shards or missing:
        raise ValueError(f"{folder}/{WEIGHT_INDEX_FILE} names shards that are not in the folder: {missing or 'none'}")
    return [WEIGHT_INDEX_FILE, *shards]


def _code_files(folder: Path, config_files: list[str]) -> list[str]:
    """The .py files named by the `auto_map` of the given JSON configs, with their relative imports (what
    `save_pretrained` copies for `trust_remote_code`)."""
    # transformers internal (listed in vlalign/__init__.py): the same relative-import scan that save_pretrained uses
    from transformers.dynamic_module_utils import get_relative_imports

    modules: list[str] = []
    for name in config_files:
        config = json.loads((folder / name).read_text(encoding="utf-8"))
        auto_map = (config.get("auto_map") if isinstance(config, dict) else None) or {}
        for targets in auto_map.values():
            for target in targets if isinstance(targets, list) else [targets]:
                # "module.Class" (a file next to the config); "other/repo--module.Class" points at code in another
                # repo; None marks a missing slow or fast tokenizer class
                if isinstance(target, str) and "--" not in target and "." in target:
                    modules.append(target.rsplit(".", 1)[0] + ".py")
    found: list[str] = []
    while modules:
        module = modules.pop()
        if module in found:
            continue
        if not _inside(folder, module):
            raise ValueError(f"the auto_map of {folder} needs {module}, which is not in the folder")
        found.append(module)
        modules.extend(f"{imported}.py" for imported in get_relative_imports(folder / module))
    return found


def _card_pictures(folder: Path) -> list[str]:
    if not (folder / "README.md").is_file():
        return []
    links = _PICTURE_LINK.findall((folder / "README.md").read_text(encoding="utf-8"))
    return [
        link
        for link in dict.fromkeys(links)
        if "://" not in link
        and not link.startswith("/")
        and link.lower().endswith(_PICTURE_SUFFIXES)
        and _inside(folder, link)
    ]


def publishable_files(folder: str | Path) -> list[str]:
    """The files of a saved model folder that go to the Hub, as sorted relative paths: ``config.json``, the
    weights (``model.safetensors``, or ``model.safetensors.index.json`` and the shards it lists; PEFT's
    ``adapter_config.json`` / ``adapter_model.safetensors``), processor and tokenizer files (``PROCESSOR_FILES``),
    the code files that the configs' ``auto_map`` needs (with their relative imports), ``README.md`` and the
    pictures it links to, ``eval_results.json`` and ``generation_config.json``, where present.

    Nothing else: no checkpoints, TensorBoard runs, training arguments, pickles or files left by earlier runs.
    Raises ``ValueError`` when the folder holds no model weights or is inconsistent (stale weights, missing
    shards or code files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    weights = _weight_files(folder) + [name for name in ADAPTER_FILES if (folder / name).is_file()]
    if not any(name.endswith(".safetensors") for name in weights):
        raise ValueError(
            f"{folder} holds no model weights ({WEIGHT_FILE}, {WEIGHT_INDEX_FILE} or "
            f"{ADAPTER_FILES[1]}): nothing to publish"
        )
    present = [name for name in (*OTHER_FILES, *PROCESSOR_FILES) if (folder / name).is_file()]
    configs = [name for name in (*present, *weights) if name.endswith("config.json")]
    return sorted({*weights, *present, *_code_files(folder, configs), *_card_pictures(folder)})


# What a failed push raises: HfHubHTTPError and other OSErrors (no connection, offline mode, no stored login), the
# HTTP client's own errors (httpx's ConnectError is no OSError), ValueError (bad repo id or card metadata, a folder
# `publishable_files` refuses).
PUSH_ERRORS = (OSError, ValueError, getattr(huggingface_hub.errors, "HTTPError", OSError))


def push_command(folder: str | Path, repo_id: str, *, private: bool | None = None) -> str:
    """A one-line shell command that pushes ``folder`` later with `push_folder_to_hub` (the same allow-list)."""
    private_arg = "" if private is None else f", private={bool(private)}"
    code = (
        f"from vlalign.hub import push_folder_to_hub; "
        f"push_folder_to_hub({_py_literal(str(folder))}, {_py_literal(repo_id)}{private_arg})"
    )
    return f"python -c {shlex.quote(code)}"


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload vlalign model",
) -> str:
    """Create ``repo_id`` if needed and upload the model in ``folder`` in one commit; returns the commit URL.

    Only the files of `publishable_files` are uploaded (model, processor, code, card and its pictures, evaluation
    results), whatever else the folder holds. ``token=None`` uses the locally stored login / ``HF_TOKEN``.
    ``private=None`` keeps the Hub default for new repos and leaves an existing repo's visibility unchanged. The
    token is only handed to ``HfApi``. Hub and network failures propagate (``HfHubHTTPError``, ``OSError``, ...).
    """
    folder = Path(folder)
    files = publishable_files(folder)  # before any network call: a folder that cannot be published fails here
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, exist_ok=True, private=private)
    # create_repo resolves a bare "name" to "user/name"; upload to what it actually created.
    target = getattr(repo_url, "repo_id", None) or repo_id
    logger.info("Uploading %d files of %s to the Hub repo %s: %s", len(files), folder, target, ", ".join(files))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    info = api.create_commit(repo_id=target, operations=operations, commit_message=commit_message)
    return str(getattr(info, "commit_url", None) or info)


# ------------------------------------------------------------------------------------------------------------
# Pictures for the model card (PNG files next to README.md, shown with relative links)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Loss components (``loss`` and every ``loss_<name>``) over optimizer steps from a Trainer's
    ``state.log_history``; one panel for the total, one for the components. None when nothing was logged."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if step is None or not (key == "loss" or key.startswith("loss_")):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    if not series:
        return None
    plt = _pyplot()
    components = sorted(k for k in series if k != "loss")
    fig, axes = plt.subplots(1, 2 if components else 1, figsize=(11 if components else 6, 3.6), squeeze=False)
    if "loss" in series:
        axes[0][0].plot(*series["loss"], color="black")
    axes[0][0].set(title="total training loss", xlabel="step")
    if components:
        for key in components:
            axes[0][1].plot(*series[key], label=key.removeprefix("loss_"))
        axes[0][1].set(title="loss components", xlabel="step")
        axes[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_retrieval_grid(queries: list[str], images: list, top_indices, correct, path: str | Path) -> Path:
    """Text-to-image retrieval examples: one row per text query, its top-k images left to right, a green frame on
    correct matches and a red one on wrong ones."""
    plt = _pyplot()
    rows, k = len(queries), len(top_indices[0])
    fig, axes = plt.subplots(rows, k, figsize=(1.6 * k + 2.4, 1.7 * rows), squeeze=False)
    for row, query in enumerate(queries):
        for col in range(k):
            ax = axes[row][col]
            ax.imshow(images[int(top_indices[row][col])])
            ax.set_xticks([])
            ax.set_yticks([])
            color = "tab:green" if correct[row][col] else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            if col == 0:
                ax.set_ylabel(query, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
            if row == 0:
                ax.set_title(f"top {col + 1}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_multi_image_examples(items: list[dict], path: str | Path) -> Path:
    """MIVC examples: one row per item with its images, each titled with its pooling weight (and "degraded" when
    known), and the generated vs reference answer on the left. Each item: ``images``, ``weights`` (or None),
    ``degraded`` (or None), ``generated``, ``answer``."""
    plt = _pyplot()
    width = max(len(item["images"]) for item in items)
    fig, axes = plt.subplots(len(items), width, figsize=(1.7 * width + 2.6, 1.9 * len(items)), squeeze=False)
    for row, item in enumerate(items):
        for col in range(width):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(item["images"]):
                ax.axis("off")
                continue
            ax.imshow(item["images"][col])
            title = []
            if item.get("weights") is not None:
                title.append(f"w={float(item['weights'][col]):.2f}")
            if item.get("degraded") is not None and item["degraded"][col]:
                title.append("degraded")
            ax.set_title(" ".join(title), fontsize=8)
            if col == 0:
                ok = answers_match(item["generated"], item["answer"])
                ax.set_ylabel(
                    f"generated: {item['generated']}\nreference: {item['answer']}\n{'correct' if ok else 'wrong'}",
                    rotation=0,
                    ha="right",
                    va="center",
                    fontsize=8,
                    labelpad=6,
                    color="tab:green" if ok else "tab:red",
                )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def retrieval_pictures(
    model,
    processor,
    eval_inputs,
    image_embeds,
    output_dir: Path,
    log_history: list[dict],
    num_queries: int = 4,
    k: int = 5,
) -> list[tuple[str, str]]:
    """Card pictures of a contrastive model: text-to-image retrieval examples (a few test captions with their
    top-k test images, ranked against `image_embeds` of all evaluation images: `evaluation.retrieval_examples`) and
    the training curves. Returns ``(caption, file name)`` pairs."""
    pictures = []
    curves = plot_training_curves(log_history, output_dir / "training_curves.png")
    if curves is not None:
        pictures.append(("Training loss and its components over optimizer steps.", curves.name))
    if eval_inputs is None or not eval_inputs.images:
        return pictures
    queries, top, correct = retrieval_examples(model, processor, eval_inputs, image_embeds, num_queries, k)
    grid = plot_retrieval_grid(queries, eval_inputs.images, top, correct, output_dir / "retrieval_examples.png")
    pictures.insert(
        0,
        (
            f"Text-to-image retrieval on the evaluation split: {len(queries)} captions and their top-{k} "
            "images (green frame: a correct match).",
            grid.name,
        ),
    )
    return pictures


def multi_image_pictures(
    model, processor, dataset, collator, output_dir: Path, log_history: list[dict], num_items: int = 4
) -> list[tuple[str, str]]:
    """Card pictures of an MIVC model: evaluation items with their images, pooling weights and generated answers
    (`evaluation.multi_image_examples`), and the training curves."""
    pictures = []
    curves = plot_training_curves(log_history, output_dir / "training_curves.png")
    if curves is not None:
        pictures.append(("Training loss over optimizer steps.", curves.name))
    items = multi_image_examples(model, processor, dataset, collator, num_items)
    if items:
        path = plot_multi_image_examples(items, output_dir / "multi_image_examples.png")
        pictures.insert(
            0,
            (
                "Evaluation items: every image with its pooling weight w (mean over the visual tokens), "
                "and the generated answer against the reference.",
                path.name,
            ),
        )
    return pictures


# --------------------------------------------------------------------------------------------------------------
# What train.py puts into a card: the demo datasets' descriptions, public names, the hyperparameters actually used


DIGITS_DESCRIPTION = (
    "the embedded digits demo: scikit-learn's 1,797 real handwritten digit scans (8x8, upsampled), each with "
    "several template captions naming the digit; scans with index % 5 == 0 form the test split (360), the "
    "rest the training split (1,437)"
)


MULTIVIEW_DIGITS_DESCRIPTION = (
    "the embedded multi-view digits task: each item shows 2-5 different scans of one handwritten digit "
    "(scikit-learn's real digits), about half of them degraded by heavy noise or occlusion (at least one clean); "
    "the target names the digit. Items of the test split use only scans with index % 5 == 0, never seen in training"
)


def public_name(name: str | None) -> str | None:
    """A model or dataset name for the published card: a Hub id stays; a local path becomes "<last component> (local
    folder)", which names no path of the training machine and, not being a repo id, stays out of the metadata."""
    if not name:
        return name
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or (("/" in name or os.sep in name) and path.exists()):
        return f"{path.resolve().name or 'root'} (local {'file' if path.is_file() else 'folder'})"
    return name


def _resume_changes_text(changes: dict) -> str | None:
    return (
        "; ".join(
            f"{name} {c['checkpoint']} -> {c['now']} from step {c['from_step']}" for name, c in sorted(changes.items())
        )
        or None
    )


def _optimisation_hyperparameters(training_args) -> dict[str, Any]:
    return {
        **(
            {"max_steps": training_args.max_steps}
            if training_args.max_steps > 0
            else {"num_train_epochs": training_args.num_train_epochs}
        ),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "world_size": training_args.world_size,
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
        "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "seed": training_args.seed,
        **{
            name: getattr(training_args, name)
            for name in ("alpha_ramp_steps", "gradient_cache_chunk_size")
            if getattr(training_args, name, None) is not None
        },
    }


def card_hyperparameters(model, training_args, resume_changes: dict | None = None) -> dict[str, Any]:
    """The hyperparameters actually used: towers, optimisation, the stack's main fields and every field of the
    model's own config class (e.g. CODIS's codebook and OT settings); a run resumed with changed settings lists
    each change with the step it took effect."""
    from .configuration_albef import ALBEFStackConfig

    config = model.config
    vision, text = config.vision_config, config.text_config
    shared = (
        "embed_dim",
        "num_fusion_layers",
        "temperature",
        "learnable_temperature",
        "use_momentum",
        "momentum",
        "queue_size",
        "alpha",
        "cma_weight",
        "imc_weight",
        "itm_weight",
        "mlm_weight",
        "mlm_probability",
    )
    base_fields = {f.name for f in dataclasses.fields(ALBEFStackConfig)}
    own = [
        f.name for f in dataclasses.fields(type(config)) if f.name not in base_fields and f.name != "num_train_samples"
    ]
    return {
        "vision_encoder": f"{vision.model_type}, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
        f"{vision.image_size}px / patch {vision.patch_size}",
        "text_encoder": f"{text.model_type}, {config.num_text_layers} text + "
        f"{config.num_fusion_layers} fusion layers, width {text.hidden_size}",
        **_optimisation_hyperparameters(training_args),
        **({"changed_on_resume": _resume_changes_text(resume_changes)} if resume_changes else {}),
        **{k: getattr(config, k) for k in (*shared, *own)},
    }


def mivc_card_hyperparameters(model, training_args, resume_changes: dict | None = None) -> dict[str, Any]:
    """The hyperparameters of an MIVC run: towers, optimisation, the pooling and projection settings; a run resumed
    with changed settings lists each change with the step it took effect."""
    cfg = model.config
    vision, text = cfg.vision_config, cfg.text_config
    return {
        "vision_encoder": f"{vision.model_type}, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
        f"{vision.image_size}px / patch {vision.patch_size}",
        "q_former": "none"
        if cfg.qformer_config is None
        else f"{cfg.qformer_config.num_hidden_layers} layers, {cfg.num_query_tokens} queries",
        "language_model": f"{text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}",
        **_optimisation_hyperparameters(training_args),
        **({"changed_on_resume": _resume_changes_text(resume_changes)} if resume_changes else {}),
        **{
            k: getattr(cfg, k)
            for k in (
                "pooling_mode",
                "pooling_granularity",
                "pooling_attention_dim",
                "projector_type",
                "vision_feature_select_strategy",
                "freeze_vision_model",
                "freeze_qformer",
                "freeze_language_model",
            )
        },
        "visual_tokens_per_image": cfg.image_seq_length,
    }

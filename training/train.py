"""Train a vlalign model with `accelerate launch`:

    accelerate launch training/train.py --config training/configs/tcl_digits.yaml [--key value ...]

The YAML file has four sections: `model` (`model_type: tcl | codis | mivc` and that model's config fields, e.g.
TCLConfig, with `vision_config` / `text_config` dicts; default tcl), `data` (vlalign.data.DataArguments, or
MIVCDataArguments for mivc), `training` (vlalign.trainer.ContrastiveTrainingArguments, or VLAlignTrainingArguments
for mivc: transformers' TrainingArguments plus vlalign's run-time settings) and `run` (RunArguments below). Any
field of any section can be overridden on the command line as `--key value` (or `--section.key value`, and
`--model.vision_config.hidden_size 64` for nested keys); values are parsed as YAML (`--max_steps 10`,
`--report_to '[tensorboard]'`, `--label_column null`) and, like those of the file, checked once against the
field's type and against the fields of the model's task (`yes` / `no` / `on` / `off` stay text for a string field:
`--save_strategy no`).

`main` runs the same numbered steps for both tasks of the `TASKS` table (contrastive: TCL / CODIS; multi-image:
MIVC): 1. parse  2. data  3. processor  4. model  5. trainer  6. train  7. evaluate  8. save + card  9. push.
The model (safetensors + config with auto_map + code files), processor, eval_results.json and a model card are
written to `output_dir` (with `--lora_r`, LoRA on the saved model `--model_name_or_path`: the adapters only,
adapter_model.safetensors + adapter_config.json; see `_apply_lora`); the push (`--push_to_hub --hub_model_id
user/name`; token from HF_TOKEN, the stored login or `--hub_token`, which is never written to any file) uploads
only the files of vlalign.hub.publishable_files, never the checkpoints, TensorBoard runs or training_args.json next
to them.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedConfig,
    ViTImageProcessorPil,
    set_seed,
)

import vlalign  # registers the Auto classes
from vlalign import (
    MIVCConfig,
    MIVCForConditionalGeneration,
    VLAlignProcessor,
    check_tokenizer_fits_model,
    check_tokenizer_special_tokens,
)
from vlalign.data import (
    BPE_SPECIAL_TOKENS,
    MIN_TOKENIZER_VOCAB_SIZE,
    TOKENIZER_KINDS,
    WORDPIECE_SPECIAL_TOKENS,
    DataArguments,
    ImageTextCollator,
    MIVCDataArguments,
    MultiImageCollator,
    build_digits_processor,
    build_mivc_digits_processor,
    caption_sample,
    captions_of_split,
    get_data,
    load_image_text_datasets,
    measure_caption_fit,
    train_caption_tokenizer,
)
from vlalign.evaluation import build_eval_inputs, embed_images, eval_mode, evaluate_mivc, evaluate_model
from vlalign.hub import (
    DIGITS_DESCRIPTION,
    MULTIVIEW_DIGITS_DESCRIPTION,
    PUSH_ERRORS,
    build_model_card,
    card_hyperparameters,
    is_hub_id,
    mivc_card_hyperparameters,
    multi_image_pictures,
    public_name,
    push_command,
    push_folder_to_hub,
    retrieval_pictures,
    save_model_card,
    snippet_folder,
)
from vlalign.output_folder import (
    OutputFolderInUseError,
    OutputFolderLock,
    checkpoint_problems,
    explain_write_error,
    latest_complete_checkpoint,
    publish_files,
    remove_stale_staging,
    staging_folder,
)
from vlalign.processing_vlalign import check_tokenizer_files, resolve_augmentation
from vlalign.trainer import (
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    TrainingInterruptedError,
    VLAlignTrainer,
    VLAlignTrainingArguments,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("vlalign.train")


@dataclass
class RunArguments:
    """vlalign-specific run options (the `run` section)."""

    model_name_or_path: str | None = None  # continue from a saved vlalign model (folder or Hub id)
    # start from a whole CLIPModel / VisionTextDualEncoderModel checkpoint (TCL / CODIS, no fusion layers); its
    # tokenizer and image processor come with it, and the run also writes the result back as that class
    dual_encoder_name_or_path: str | None = None
    export_dual_encoder: bool = True  # with dual_encoder_name_or_path: <output_dir>/dual_encoder, plain transformers
    vision_model_name_or_path: str | None = None  # initialise towers from pretrained checkpoints
    text_model_name_or_path: str | None = None  # (MIVC: the causal LM)
    qformer_model_name_or_path: str | None = None  # MIVC: a pretrained Q-Former
    processor_name_or_path: str | None = None  # a saved VLAlignProcessor; default: built for the data
    tokenizer_name_or_path: str | None = None  # with a PIL ViT image processor when no processor is given
    eval_batch_size: int = 128
    model_card_template: str | None = None  # default: model_cards/<model_type>.md
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool | None = None
    # only handed to the final upload (default: HF_TOKEN or the stored login); kept out of TrainingArguments, which
    # the Trainer pickles into every checkpoint
    hub_token: str | None = field(default=None, repr=False)
    license: str = "apache-2.0"
    # CPU threads per process when training on CPU. `accelerate launch` exports OMP_NUM_THREADS=1 unless told
    # otherwise, which halves a 2-core machine; None: the CPUs this process may use (`available_cpus`) divided
    # among the local processes. On a machine shared with other jobs 1 is much faster (threads wait on each other).
    cpu_threads: int | None = None
    # LoRA (`pip install vlalign[peft]`): low-rank adapters on a saved vlalign model (run.model_name_or_path, the
    # base); the run trains and saves the adapters only (`_apply_lora`). lora_r None or 0: no LoRA.
    lora_r: int | None = None
    lora_alpha: float | None = None  # the update is scaled by lora_alpha / lora_r; default 2 * lora_r
    lora_dropout: float = 0.0
    # module names (a list, or "query,value"), matched as name suffixes, or one regex over the full module names;
    # default: LORA_TARGETS for the model type
    lora_target_modules: list | str | None = None
    # modules trained fully and saved with the adapters (names, as above); default: those of LORA_MODULES_TO_SAVE
    # the model has
    lora_modules_to_save: list | str | None = None
    # Locked towers (LiT; TCL / CODIS, not with LoRA): the tower is frozen for the run (`ALBEFModel.lock_image_tower`
    # / `lock_text_tower`) and runs in eval mode, its EMA teacher is the student's tensors. Run-time settings only.
    lock_image: bool = False  # freeze the vision tower and its projection
    # ... except its last N blocks (transformer layers; Swin / ConvNeXt stages) with the final norm / pooler and
    # the projection
    lock_image_unlocked_layers: int = 0
    lock_image_unlocked_projection: bool = False  # ... except the projection vision_proj (fixed features, a new head)
    lock_text: bool = False  # the same for the text encoder (with fusion layers its lower num_text_layers only)
    lock_text_unlocked_layers: int = 0
    lock_text_unlocked_projection: bool = False
    # A tokenizer learnt from the training split's captions at the start of the run (offline), saved with the
    # processor: "wordpiece" (BERT-style, uncased) or "bpe" (RoBERTa-style byte-level, cased); vlalign.data.
    # train_caption_tokenizer. A new vocabulary: not with a tokenizer, processor, model or text tower of its own.
    train_tokenizer: typing.Literal["wordpiece", "bpe"] | None = None
    tokenizer_vocab_size: int = 8000  # tokens of the trained vocabulary, at most (at least 300)
    # Caption length in tokens (longer captions are cut) of a processor built here. Default: 64 for a trained
    # tokenizer (fewer when the text tower has fewer positions), 30 with tokenizer_name_or_path, 16 for the digits
    # demo; a saved processor keeps its own.
    tokenizer_max_length: int | None = None
    # Two-view augmentation of a processor built here, over vlalign's defaults (keys of DEFAULT_AUGMENTATION, e.g.
    # {hflip_p: 0.0, color_jitter_p: 0.0} when captions name sides or colours); a saved processor keeps its own.
    augmentation: dict | None = None

    def __post_init__(self):
        if self.train_tokenizer is not None and self.train_tokenizer not in TOKENIZER_KINDS:
            raise ValueError(
                f"run.train_tokenizer must be one of {list(TOKENIZER_KINDS)} or null, got {self.train_tokenizer!r}"
            )
        size = self.tokenizer_vocab_size
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_TOKENIZER_VOCAB_SIZE:
            raise ValueError(f"run.tokenizer_vocab_size must be an integer >= {MIN_TOKENIZER_VOCAB_SIZE}, got {size!r}")
        length = self.tokenizer_max_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 3):
            raise ValueError(
                f"run.tokenizer_max_length must be an integer >= 3 (a start and an end token and one of text) or "
                f"null, got {length!r}"
            )
        if self.train_tokenizer:
            own = [
                name
                for name in (
                    "tokenizer_name_or_path",
                    "processor_name_or_path",
                    "model_name_or_path",
                    "dual_encoder_name_or_path",
                    "text_model_name_or_path",
                )
                if getattr(self, name)
            ]
            if own:
                raise ValueError(
                    f"run.train_tokenizer learns a new vocabulary, but run.{own[0]} brings the vocabulary its "
                    f"{'tokenizer' if own[0] == 'tokenizer_name_or_path' else 'model'} was made with (a model's "
                    "embeddings index its own vocabulary): set only one of them"
                )
        if self.augmentation is not None:
            try:
                resolve_augmentation(self.augmentation)
            except (TypeError, ValueError) as error:
                raise ValueError(f"run.augmentation: {error}") from None
        for tower in ("image", "text"):
            layers = getattr(self, f"lock_{tower}_unlocked_layers")
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
                raise ValueError(f"run.lock_{tower}_unlocked_layers must be an integer >= 0, got {layers!r}")
            if not getattr(self, f"lock_{tower}"):
                given = [
                    name
                    for name, default in (
                        (f"lock_{tower}_unlocked_layers", 0),
                        (f"lock_{tower}_unlocked_projection", False),
                    )
                    if getattr(self, name) != default
                ]
                if given:
                    raise ValueError(
                        f"run.{given[0]} says what stays trainable in a locked tower: set run.lock_{tower}"
                    )
        for name, what in (("tokenizer_max_length", "max_length"), ("augmentation", "augmentation")):
            if getattr(self, name) is not None and self.processor_name_or_path:
                raise ValueError(
                    f"run.{name} is for a processor built here; run.processor_name_or_path brings its own {what}: "
                    "set only one of them"
                )


SECTIONS = ("run", "data", "training", "model")
# settings an older layout kept elsewhere: each is a training argument now
# (vlalign.trainer.ContrastiveTrainingArguments)

MOVED_TO_TRAINING = {
    ("run", "alpha_ramp_steps"),
    ("run", "itm_rerank_k"),
    ("run", "stop_on_nonfinite"),
    ("run", "max_consecutive_nonfinite_steps"),
    ("model", "gradient_cache_chunk_size"),
}
# TrainingArguments fields that `run` owns: the Trainer pickles its arguments (token included) into every checkpoint
# and, with its own push_to_hub, would upload the whole output folder (checkpoints, logs) as it goes


HUB_SETTINGS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_token")

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; turn such strings into floats, recursively."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


class _YamlWord(str):
    """A plain `yes` / `no` / `on` / `off`, which YAML 1.1 reads as a boolean: kept as its text until the field's type
    is known (`_checked_section`), so that a string field gets the text (`save_strategy: no`) and a boolean one, or a
    value not checked here (`vision_config` entries), the boolean YAML 1.1 meant."""


_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}

_WORD_TAG = "tag:vlalign:bool-word"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads the YAML 1.1 boolean words as `_YamlWord`s (`true` / `false` stay booleans)."""


_ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "yYnNoO":  # ahead of the boolean resolver, which would claim these words
    _ConfigLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, (_WORD_TAG, re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"))
    )
_ConfigLoader.add_constructor(_WORD_TAG, lambda loader, node: _YamlWord(loader.construct_scalar(node)))


def _load_yaml(stream) -> Any:
    return _numbers(yaml.load(stream, Loader=_ConfigLoader))  # noqa: S506 (a SafeLoader)


def _plain(value: Any) -> Any:
    """`_YamlWord`s left in a value (nested or unchecked) -> the booleans YAML 1.1 reads them as."""
    if isinstance(value, _YamlWord):
        return _BOOL_WORDS[value.lower()]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_KIND_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def _kind_name(value: Any) -> str:
    """What a YAML value is, for messages ("an integer", "a list" ...)."""
    return next((name for kind, name in _KIND_NAMES.items() if isinstance(value, kind)), type(value).__name__)


def _kinds(hint: Any) -> tuple[type, ...] | None:
    """The YAML value types a field annotation admits; None for one not checked here (any other class)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [_kinds(arg) for arg in typing.get_args(hint)]
        return None if None in kinds else tuple(kind for group in kinds for kind in group)
    if origin is typing.Literal:
        return tuple({type(arg) for arg in typing.get_args(hint)})
    if hint is type(None):
        return (type(None),)
    if origin in (list, dict) or hint in (list, dict):
        return (origin or hint,)
    if hint is float:
        return (float, int)
    if hint in (bool, int) or (isinstance(hint, type) and issubclass(hint, str)):  # str enums: IntervalStrategy
        return (str,) if issubclass(hint, str) else (hint,)
    return None


def _field_kinds(cls) -> dict[str, tuple[type, ...] | None]:
    """`_kinds` of every field of a dataclass; a default of None admits null whatever the annotation says."""
    result = {}
    for f in dataclasses.fields(cls):
        # the annotation as declared: HfArgumentParser rewrites `field.type` in place (`str | None` becomes `str`)
        owner = next((c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {})), cls)
        hint = owner.__dict__.get("__annotations__", {}).get(f.name, f.type)
        if isinstance(hint, str):  # `from __future__ import annotations`: evaluate where the field was declared
            try:
                hint = eval(hint, vars(sys.modules[owner.__module__]))  # noqa: S307 (the library's own annotations)
            except Exception:  # names imported only for type checkers (torch.dtype ...): not checked
                hint = None
        kinds = _kinds(hint)
        if kinds is not None and f.default is None:
            kinds += (type(None),)
        result[f.name] = kinds
    return result


def _model_configs() -> dict[str, type]:
    """vlalign's ALBEF-style config classes by model_type (from the Auto registry that `import vlalign` fills)."""
    return {
        name: CONFIG_MAPPING[name]
        for name in ("tcl", "codis", "mivc")
        if issubclass(CONFIG_MAPPING[name], (vlalign.ALBEFStackConfig, vlalign.MIVCConfig))
    }


def _section_fields() -> dict[str, set[str]]:
    model_fields = set().union(*({f.name for f in dataclasses.fields(c)} for c in _model_configs().values()))
    return {
        "run": {f.name for f in dataclasses.fields(RunArguments)},
        "data": {f.name for f in dataclasses.fields(DataArguments)}
        | {f.name for f in dataclasses.fields(MIVCDataArguments)},
        "training": {f.name for f in dataclasses.fields(ContrastiveTrainingArguments)} - set(HUB_SETTINGS),
        "model": model_fields | {"model_type"},
    }


def _section_schemas(task: Task, config_class: type) -> dict[str, tuple[type, dict[str, tuple[type, ...] | None]]]:
    """Per section, the class whose fields it holds for this task and the value types each field admits
    (`_field_kinds`)."""
    model = {"model_type": (str,), **_field_kinds(config_class)}
    training = _field_kinds(task.training_arguments)
    for name in HUB_SETTINGS:  # the run section owns them
        training.pop(name, None)
    training["resume_from_checkpoint"] = (str, bool, type(None))  # `true` / the bare flag: the latest checkpoint
    data = _field_kinds(task.data_arguments)
    if "data_files" in data:
        data["data_files"] = (str, list, dict, type(None))  # typed `str | None` for HfArgumentParser only
    return {
        "run": (RunArguments, _field_kinds(RunArguments)),
        "data": (task.data_arguments, data),
        "training": (task.training_arguments, training),
        "model": (config_class, model),
    }


def _checked_section(section: str, values: dict, owner: type, kinds: dict[str, tuple[type, ...] | None]) -> dict:
    """The section's values checked against the fields of `owner` (SystemExit naming the unknown fields, or the
    field and the value of the wrong type), with the YAML 1.1 words (`no`, `on` ...) as text for string fields and
    as booleans elsewhere."""
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        what = ("settings", " (this model's trainer); remove them") if section == "training" else ("fields", "")
        raise SystemExit(f"{section} section: {unknown} are not {what[0]} of {owner.__name__}{what[1]}")
    checked = {}
    for name, value in values.items():
        admitted = kinds[name]
        if admitted is None:  # a type not checked here (a sub-config, a dtype ...): its class checks it
            checked[name] = _plain(value)
            continue
        if isinstance(value, _YamlWord):
            value = _BOOL_WORDS[value.lower()] if bool in admitted and str not in admitted else str(value)
        if not isinstance(value, admitted) or (isinstance(value, bool) and bool not in admitted):
            shown = [kind for kind in _KIND_NAMES if kind in admitted and not (kind is int and float in admitted)]
            expected = " or ".join(_KIND_NAMES[kind] for kind in shown).replace("a boolean", "true or false")
            hint = ""
            if str in admitted and isinstance(value, (int, float)):
                hint = f" (quote it to pass the text: --{name} \"'{value}'\", or {name}: '{value}' in the YAML file)"
            raise SystemExit(f"{section}.{name} = {value!r}: expected {expected}, got {_kind_name(value)}{hint}")
        checked[name] = _plain(value)
    return checked


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`--key value` pairs (values parsed as YAML); `--flag` alone means true."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: overrides are --key value")
        key = arg[2:].replace("-", "_") if "." not in arg else arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw, i = argv[i + 1], i + 2
        else:
            raw, i = "true", i + 1
        pairs.append((key, _load_yaml(raw)))
    return pairs


def apply_overrides(config: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Put each override into its section: an explicit `section.key`, else the section whose YAML already has the
    key, else the first section (run, data, training, model) whose schema has it."""
    fields = _section_fields()
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] in SECTIONS and len(parts) > 1:
            section, path = parts[0], parts[1:]
        else:
            path = parts
            in_yaml = [s for s in SECTIONS if path[0] in (config.get(s) or {})]
            in_schema = [s for s in SECTIONS if path[0] in fields[s]]
            candidates = in_yaml or in_schema
            if not candidates:
                raise SystemExit(f"unknown option --{key}: not a field of {', '.join(SECTIONS)}")
            section = candidates[0]
        target = config.setdefault(section, {}) or {}
        config[section] = target
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return config


def load_config(config_path: str | None, overrides: list[tuple[str, Any]]) -> dict:
    """The config file's sections with the overrides applied, every value checked against the fields of the model's
    task (unknown fields and values of the wrong type refused, naming them)."""
    config: dict = {}
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            config = _load_yaml(handle)
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise SystemExit(
                f"config file {config_path}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                f"found {_kind_name(config)}"
            )
        for section, values in config.items():
            if values is not None and not isinstance(values, dict):
                raise SystemExit(
                    f"config file {config_path}: section {section!r} is {_kind_name(values)}, expected "
                    "a mapping of field: value"
                )
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)} in {config_path}; expected {SECTIONS}")
    config = apply_overrides(config, overrides)
    moved = sorted(f"{section}.{key}" for section, key in MOVED_TO_TRAINING if key in (config.get(section) or {}))
    if moved:
        raise SystemExit(
            f"{', '.join(moved)}: training settings now, not part of the {moved[0].split('.')[0]} "
            f"section; write them under training: (e.g. training.{moved[0].split('.')[1]})"
        )
    training, run = config.get("training") or {}, config.get("run") or {}
    for key in HUB_SETTINGS:  # a YAML `training:` section may still name them
        if key in training:
            run.setdefault(key, training.pop(key))
    config["run"] = _checked_section("run", run, RunArguments, _field_kinds(RunArguments))
    model_type = _model_type(config)
    schemas = _section_schemas(task_of(model_type), _model_configs()[model_type])
    return {section: _checked_section(section, values or {}, *schemas[section]) for section, values in config.items()}


def _model_type(config: dict) -> str:
    """`model.model_type`, else that of the saved model `run.model_name_or_path` continues from, else tcl."""
    model_type = (config.get("model") or {}).get("model_type")
    if model_type is None:
        path = (config.get("run") or {}).get("model_name_or_path")
        model_type = AutoConfig.from_pretrained(path).model_type if path else "tcl"
    configs = _model_configs()
    if model_type not in configs:
        raise SystemExit(f"unknown model.model_type {model_type!r}: use one of {sorted(configs)}")
    return model_type


# --------------------------------------------------------------------------------------------------------------
# The two tasks: what differs between them, step by step. `main` below runs the same steps for both.


@dataclass(frozen=True)
class Task:
    """One kind of model train.py trains: its argument classes and trainer, and one function per step that differs."""

    name: str
    model_types: tuple[str, ...]
    data_arguments: type
    training_arguments: type
    trainer_class: type
    build_processor: Callable  # (run, data_args, model_section) -> processor
    build_model: Callable  # (run, model_section, processor, data) -> model
    evaluation_inputs: Callable  # (data, data_args, processor) -> Trainer keyword arguments; checks the eval split
    # (model, processor, data, data_args, run, trainer, evaluation, trained) -> (results, write_pictures)
    evaluate: Callable
    card: Callable  # (model, training_args, trainer, run, data_args, data, results) -> build_model_card kwargs


def build_processor(run: RunArguments, data_args, image_size: int, model_section: dict | None = None):
    """The run's processor: a saved one (run.processor_name_or_path, the dual encoder's, the saved model's), or one
    built here with a PIL ViT image processor of `image_size`: with a tokenizer trained on the training captions
    (run.train_tokenizer), the digits demo's, or run.tokenizer_name_or_path's (else the text tower's). The model
    section's text tower bounds a trained tokenizer's caption length."""
    if run.processor_name_or_path:
        return AutoProcessor.from_pretrained(run.processor_name_or_path)
    if run.dual_encoder_name_or_path and not run.tokenizer_name_or_path:
        return _saved_processor(run, _dual_encoder_processor(run.dual_encoder_name_or_path), "dual encoder")
    if run.model_name_or_path and os.path.exists(os.path.join(run.model_name_or_path, "processor_config.json")):
        return _saved_processor(run, AutoProcessor.from_pretrained(run.model_name_or_path), "saved model")
    if run.train_tokenizer:
        tokenizer = _trained_tokenizer(run, data_args, model_section or {})
        image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
        return VLAlignProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            augmentation=run.augmentation,
            max_length=tokenizer.model_max_length,
        )
    if data_args.dataset_name == "digits" and not run.tokenizer_name_or_path:
        processor = build_digits_processor(image_size=image_size)
        if run.augmentation is not None:  # over the demo's own (no flips: a mirrored digit is not that digit)
            processor.augmentation = resolve_augmentation({**processor.augmentation, **run.augmentation})
    else:
        if not run.tokenizer_name_or_path and not run.text_model_name_or_path:
            raise SystemExit(
                "this dataset needs a tokenizer: set run.train_tokenizer (wordpiece or bpe: one learnt from the "
                "training captions), run.tokenizer_name_or_path or run.processor_name_or_path"
            )
        source = run.tokenizer_name_or_path or run.text_model_name_or_path
        if os.path.isdir(source):  # a local folder missing its vocabulary would load as special tokens only
            check_tokenizer_files(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
        processor = VLAlignProcessor(
            image_processor=image_processor, tokenizer=tokenizer, augmentation=run.augmentation
        )
    if run.tokenizer_max_length is not None:
        if not (run.text_model_name_or_path or run.model_name_or_path or run.dual_encoder_name_or_path):
            _check_max_length(
                run.tokenizer_max_length, _caption_positions(model_section or {}, processor.tokenizer.pad_token_id)
            )
        processor.max_length = run.tokenizer_max_length
    return processor


def _saved_processor(run: RunArguments, processor, source: str):
    """A saved processor, as it is: the run's settings for a processor built here are refused."""
    for name, value in (("tokenizer_max_length", processor.max_length), ("augmentation", None)):
        if getattr(run, name) is not None:
            held = f" ({value})" if value is not None else ""
            raise SystemExit(
                f"run.{name} is for a processor built here; the {source}'s processor has its own "
                f"{name.removeprefix('tokenizer_')}{held}: drop run.{name}"
            )
    return processor


# streams are read for their first rows only: a stream may have no end, and each run start reads it again
TOKENIZER_STREAM_ROWS = 50_000
DEFAULT_TOKENIZER_MAX_LENGTH = 64
# text towers whose position ids start after the padding id (RoBERTa's numbering), so that a caption has
# max_position_embeddings - pad_token_id - 1 positions
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta")


def _caption_positions(model_section: dict, pad_token_id: int | None) -> int | None:
    """The most tokens a caption may have in a text tower built from scratch from the model section (None when its
    config says nothing about positions)."""
    text = dict(model_section.get("text_config") or {})
    model_type = text.get("model_type", "bert")
    positions = text.get("max_position_embeddings")
    if positions is None and model_type in CONFIG_MAPPING:
        positions = getattr(CONFIG_MAPPING[model_type](), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if model_type in _POSITIONS_AFTER_PADDING:
        positions -= (text.get("pad_token_id", pad_token_id) or 0) + 1
    return positions


def _check_max_length(max_length: int, positions: int | None) -> None:
    if positions is not None and max_length > positions:
        raise SystemExit(
            f"run.tokenizer_max_length={max_length}: the text tower takes captions of at most {positions} tokens "
            "(model.text_config.max_position_embeddings): lower it or raise max_position_embeddings"
        )


def _trained_tokenizer(run: RunArguments, data_args, model_section: dict):
    """run.train_tokenizer: a tokenizer learnt from the captions of the training split (all of it; the first
    TOKENIZER_STREAM_ROWS rows of a stream), the same in every process of the run and when it resumes."""
    pad = (
        WORDPIECE_SPECIAL_TOKENS.index("[PAD]")
        if run.train_tokenizer == "wordpiece"
        else BPE_SPECIAL_TOKENS.index("<pad>")
    )
    positions = _caption_positions(model_section, pad)  # a tower from scratch: train_tokenizer refuses checkpoints
    max_length = run.tokenizer_max_length
    if max_length is None:
        max_length = min(DEFAULT_TOKENIZER_MAX_LENGTH, positions or DEFAULT_TOKENIZER_MAX_LENGTH)
    _check_max_length(max_length, positions)
    # the eval split is not needed here (a stream's would be read into memory); a stream's seed only orders rows
    train, _ = load_image_text_datasets(dataclasses.replace(data_args, eval_split=None), seed=0)
    streaming = getattr(data_args, "streaming", False)
    counted = _Counted(
        captions_of_split(
            train,
            data_args.caption_column,
            data_args.max_caption_chars,
            max_rows=TOKENIZER_STREAM_ROWS if streaming else None,
        )
    )
    start = time.time()
    tokenizer = train_caption_tokenizer(counted, run.train_tokenizer, run.tokenizer_vocab_size, max_length)
    if counted.count == 0:
        raise SystemExit(
            f"run.train_tokenizer: the training split {data_args.train_split!r} has no usable caption in column "
            f"{data_args.caption_column!r} to learn a vocabulary from"
        )
    logger.info(
        "Trained a %s tokenizer of %d tokens on %d captions of the %s split%s in %.1fs; captions are cut at %d tokens",
        run.train_tokenizer,
        len(tokenizer),
        counted.count,
        data_args.train_split,
        f" (its first {TOKENIZER_STREAM_ROWS} rows)" if streaming else "",
        time.time() - start,
        max_length,
    )
    return tokenizer


class _Counted:
    """An iterator's items, counted as they pass."""

    def __init__(self, items):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


CAPTION_FIT_SAMPLE = 2000  # captions measured
CAPTION_FIT_WARNING_SHARE = 0.02  # of tokens unknown, or of captions cut, above which the run warns


def _warn_about_caption_fit(processor, train_dataset, data_args):
    """Warn when the tokenizer fits the training captions badly (measured on a sample of them): more than 2% of
    their tokens are the unknown token, or more than 2% of the captions are cut at the processor's max_length."""
    captions = caption_sample(train_dataset, data_args.caption_column, CAPTION_FIT_SAMPLE, data_args.max_caption_chars)
    fit = measure_caption_fit(processor.tokenizer, captions, processor.max_length)
    if fit.unknown_share > CAPTION_FIT_WARNING_SHARE:
        logger.warning(
            "%.1f%% of the training captions' tokens are the unknown token %r (%d of %d tokens in %d captions): the "
            "tokenizer does not know this data's characters or words. Train one on the captions "
            "(--train_tokenizer wordpiece, or bpe, which has no unknown token) or use one made for this language.",
            100 * fit.unknown_share,
            processor.tokenizer.unk_token,
            fit.num_unknown,
            fit.num_tokens,
            fit.num_captions,
        )
    if fit.truncated_share > CAPTION_FIT_WARNING_SHARE:
        logger.warning(
            "%.1f%% of the training captions (%d of %d) are longer than max_length=%d tokens and are cut. Raise "
            "it (--tokenizer_max_length, up to the text tower's max_position_embeddings), or train a tokenizer on "
            "the captions (--train_tokenizer wordpiece), in which their words take fewer tokens.",
            100 * fit.truncated_share,
            fit.num_truncated,
            fit.num_captions,
            fit.max_length,
        )
    return fit


def _dual_encoder_processor(path: str) -> VLAlignProcessor:
    """The dual encoder's own tokenizer and image processor (CLIP's resizing and normalisation), in a
    VLAlignProcessor for the collators' augmented views (SigLIP's captions padded to max_length)."""
    try:
        return VLAlignProcessor.from_dual_encoder_pretrained(path)
    except ValueError as error:
        raise SystemExit(
            f"run.dual_encoder_name_or_path: {error}; set run.processor_name_or_path (or tokenizer_name_or_path)"
        ) from None


def _export_dual_encoder(model, processor, output_dir: Path) -> Path:
    """The fine-tuned model as its source class (`save_pretrained(as_source_architecture=True)`), with the
    tokenizer and image processor, in <output_dir>/dual_encoder."""
    folder = output_dir / "dual_encoder"
    model.save_pretrained(folder, as_source_architecture=True)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    logger.info("the fine-tuned %s is in %s", model.config.dual_encoder_source, folder)
    return folder


def _check_tokenizer_fits(tokenizer, model) -> None:
    """A tokenizer with more tokens than the model's vocabulary fails at the first such token, deep in training; one
    whose mask / padding / end-of-text ids differ from the config's would train on miscomputed inputs."""
    try:
        check_tokenizer_fits_model(tokenizer, model.config)
        if not isinstance(model.config, MIVCConfig):
            check_tokenizer_special_tokens(tokenizer, model.config)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _check_processor_image_size(processor, model) -> None:
    """A saved processor that resizes to another size than the vision tower's would fail at the first forward."""
    expected = getattr(model.config.vision_config, "image_size", None)
    size = getattr(processor.image_processor, "size", None) or {}
    got = (size.get("height"), size.get("width")) if hasattr(size, "get") else (None, None)
    if isinstance(expected, int) and None not in got and got != (expected, expected):
        raise SystemExit(
            f"the processor resizes images to {got[0]}x{got[1]} but the vision tower takes "
            f"{expected}x{expected} (model.vision_config.image_size): use a processor of that size, "
            f"or set image_size to {got[0]}"
        )


def build_model(run: RunArguments, model_section: dict, tokenizer, num_train_samples: int | None = None):
    """A TCL or CODIS model from a saved model, from a whole dual encoder (CLIP), from pretrained towers, or from the
    model section's configs (its fields checked by `load_config`)."""
    model_type = model_section.get("model_type", "tcl")
    config_class = _model_configs()[model_type]
    overrides = {k: v for k, v in model_section.items() if k not in ("vision_config", "text_config", "model_type")}
    fields = {f.name for f in dataclasses.fields(config_class)}
    if num_train_samples is not None and "num_train_samples" in fields:
        overrides.setdefault("num_train_samples", num_train_samples)  # sizes per-sample statistics (running Z)
    if run.model_name_or_path:
        return AutoModel.from_pretrained(run.model_name_or_path, **overrides)
    model_class = {"tcl": vlalign.TCLModel, "codis": vlalign.CODISModel, "mivc": vlalign.MIVCForConditionalGeneration}[
        model_type
    ]
    if run.dual_encoder_name_or_path:
        if model_section.get("vision_config") or model_section.get("text_config"):
            raise SystemExit("with run.dual_encoder_name_or_path the towers are the checkpoint's: drop model.*_config")
        return model_class.from_dual_encoder_pretrained(run.dual_encoder_name_or_path, **overrides)
    if run.vision_model_name_or_path or run.text_model_name_or_path:
        if not (run.vision_model_name_or_path and run.text_model_name_or_path):
            raise SystemExit("set both run.vision_model_name_or_path and run.text_model_name_or_path")
        overrides.setdefault("mask_token_id", tokenizer.mask_token_id)
        return model_class.from_vision_text_pretrained(
            run.vision_model_name_or_path, run.text_model_name_or_path, **overrides
        )
    text_config = dict(model_section.get("text_config") or {})
    # a model trained from scratch takes its vocabulary from the tokenizer
    text_config.setdefault("vocab_size", len(tokenizer))
    if tokenizer.pad_token_id is not None:
        text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    if tokenizer.mask_token_id is not None:
        overrides.setdefault("mask_token_id", tokenizer.mask_token_id)
    config = config_class(vision_config=model_section.get("vision_config"), text_config=text_config, **overrides)
    return model_class(config)


def _contrastive_processor(run: RunArguments, data_args, model_section: dict):
    image_size = int((model_section.get("vision_config") or {}).get("image_size", 256))
    return build_processor(run, data_args, image_size, model_section)


def _contrastive_model(run: RunArguments, model_section: dict, processor, data):
    model = build_model(run, model_section, processor.tokenizer, data.num_train_samples)
    _check_processor_image_size(processor, model)
    _check_tokenizer_fits(processor.tokenizer, model)
    if (
        data.num_train_samples is None
        and getattr(model.config, "contrastive_loss", None) == "decomposable"
        and getattr(model.config, "z_estimate", None) == "running"
    ):
        raise SystemExit(
            "z_estimate='running' keeps a statistic per training row, indexed by row number: a stream has "
            "no row numbers (data.streaming); use z_estimate 'batch' or 'queue', or map-style data"
        )
    return model


def _contrastive_evaluation_inputs(data, data_args, processor) -> dict:
    eval_inputs = build_eval_inputs(data.eval_dataset, data_args) if data.eval_dataset is not None else None
    if eval_inputs is not None:
        _check_eval_inputs(eval_inputs, data.eval_dataset, data_args)
    return {
        "eval_inputs": eval_inputs,
        # Trainer refuses eval_strategy "steps" without an eval_dataset; ContrastiveTrainer.evaluate reads eval_inputs
        "eval_dataset": data.eval_dataset,
        "class_names": data.class_names,
        "zero_shot_templates": data_args.zero_shot_templates,
        "resume_fingerprint": {"positives_by": data_args.positives_by, "train_data": data.train_fingerprint},
    }


def _contrastive_evaluate(model, processor, data, data_args, run, trainer, evaluation: dict, trained: dict):
    eval_inputs, collator = evaluation["eval_inputs"], data.collator
    results: dict[str, Any] = {}
    eval_image_embeds = None
    if eval_inputs is not None:
        with eval_mode(model):  # computed once: for the metrics and for the card's retrieval picture
            eval_image_embeds = embed_images(model, processor, eval_inputs.images, run.eval_batch_size)
        results.update(
            evaluate_model(
                model,
                processor,
                eval_inputs,
                data.class_names,
                data_args.zero_shot_templates,
                batch_size=run.eval_batch_size,
                itm_rerank_k=trainer.args.itm_rerank_k,
                image_embeds=eval_image_embeds,
            )
        )
    results.update(trained)
    results["train_items_skipped"] = int(trainer.num_skipped_items)
    results["train_nonfinite_steps_skipped"] = int(trainer.nonfinite_steps_skipped)
    if trainer.alignment_not_started is not None:
        results["alignment_started"] = not trainer.alignment_not_started
    if trainer.alignment_not_started:
        check = trainer.alignment_check
        logger.warning(
            "Cross-modal alignment never started: after %d steps loss_i2t %.3f and loss_t2i %.3f are at "
            "ln(%d keys); the model card says so.",
            check["step"],
            check["loss_i2t"],
            check["loss_t2i"],
            check["num_keys"],
        )
    # hostile data, by reason; with dataloader workers the collator's own totals stay in the workers' copies
    train_counts_here = trainer.args.dataloader_num_workers == 0
    if train_counts_here:
        collator.rewind_to(trainer.micro_batches_trained)  # not the batch the data loader collated ahead
        results.update(collator.data_report("train_"))
    if trainer.resume_changes:
        results["resumed_with_changed_arguments"] = trainer.resume_changes
    if eval_inputs is not None:
        results.update(eval_inputs.issues.report("eval_"))
    logger.info(
        "Data issues: training: %s; evaluation: %s",
        collator.issues.summary() if train_counts_here else f"{trainer.num_skipped_items} rows skipped",
        eval_inputs.issues.summary() if eval_inputs is not None else "none",
    )
    return results, lambda folder: retrieval_pictures(
        model, processor, eval_inputs, eval_image_embeds, folder, trainer.state.log_history
    )


def _contrastive_card(model, training_args, trainer, run: RunArguments, data_args, data, results: dict) -> dict:
    code_keys = [k for k in results if k == "codebook_size" or "_code" in k]
    return dict(
        model_type_name=model.config.model_type.upper(),
        base_model=public_name(run.vision_model_name_or_path),
        dataset_description=DIGITS_DESCRIPTION if data_args.dataset_name == "digits" else None,
        num_train_samples=data.num_train_samples,
        hyperparameters=card_hyperparameters(model, training_args, trainer.resume_changes),
        eval_results={
            k: v
            for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in code_keys
        },
        code_usage={k: results[k] for k in code_keys} or None,
        alignment_not_started=trainer.alignment_check if trainer.alignment_not_started else None,
        class_names=data.class_names,  # for the card's pipeline snippet
        zero_shot_templates=data_args.zero_shot_templates,
    )


def _multi_image_processor(run: RunArguments, data_args, model_section: dict):
    for name in ("train_tokenizer", "tokenizer_max_length", "augmentation"):
        if getattr(run, name) is not None:
            raise SystemExit(
                f"run.{name} is for the processors of TCL / CODIS; an MIVC model's tokenizer is its language model's"
            )
    if run.processor_name_or_path or run.model_name_or_path:
        return AutoProcessor.from_pretrained(run.processor_name_or_path or run.model_name_or_path)
    if data_args.dataset_name == "multiview_digits":
        image_size = int((model_section.get("vision_config") or {}).get("image_size", data_args.image_size))
        return build_mivc_digits_processor(image_seq_length=1, image_size=image_size)
    raise SystemExit("set run.processor_name_or_path (an MIVCProcessor) for this dataset")


def _multi_image_model(run: RunArguments, model_section: dict, processor, data):
    model = build_mivc_model(run, model_section, processor.tokenizer, processor.image_token_id)
    _check_tokenizer_fits(processor.tokenizer, model)
    # the placeholder expansion follows the model
    processor.image_seq_length = model.config.image_seq_length
    processor.concatenate_images = model.config.pooling_mode == "concatenate"
    return model


def _multi_image_evaluation_inputs(data, data_args, processor) -> dict:
    if data.eval_dataset is not None:
        _check_multi_image_eval(data.eval_dataset, processor, data_args)
    return {"resume_fingerprint": {"train_data": data.train_fingerprint}}


def _multi_image_evaluate(model, processor, data, data_args, run, trainer, evaluation: dict, trained: dict):
    collator, eval_dataset = data.collator, data.eval_dataset
    collator.rewind_to(trainer.micro_batches_trained)  # not the batch the data loader collated ahead
    train_data_report = collator.take_data_report("train_")  # evaluation decodes with this collator: count apart
    results: dict[str, Any] = {}
    if eval_dataset is not None:
        results.update(evaluate_mivc(model, processor, eval_dataset, collator, batch_size=run.eval_batch_size))
    results.update(trained)
    results.update(train_data_report)
    results["train_items_skipped"] = collator.num_skipped_items
    results["train_nonfinite_steps_skipped"] = int(trainer.nonfinite_steps_skipped)
    if eval_dataset is not None:
        results.update(collator.data_report("eval_"))
    if trainer.resume_changes:
        results["resumed_with_changed_arguments"] = trainer.resume_changes
    logger.info(
        "Data issues: training: %d images skipped, %d items skipped; evaluation: %d images skipped",
        train_data_report["train_images_skipped"],
        collator.num_skipped_items,
        collator.num_skipped_images,
    )
    return results, lambda folder: multi_image_pictures(
        model, processor, eval_dataset, collator, folder, trainer.state.log_history
    )


def _multi_image_card(model, training_args, trainer, run: RunArguments, data_args, data, results: dict) -> dict:
    return dict(
        model_type_name="MIVC",
        base_model=[public_name(m) for m in (run.vision_model_name_or_path, run.text_model_name_or_path) if m] or None,
        dataset_description=(MULTIVIEW_DIGITS_DESCRIPTION if data_args.dataset_name == "multiview_digits" else None),
        num_train_samples=data.num_train_samples,
        hyperparameters=mivc_card_hyperparameters(model, training_args, trainer.resume_changes),
        eval_results={k: v for k, v in results.items() if isinstance(v, (int, float))},
        pipeline_tag="image-text-to-text",
    )


def build_mivc_model(run: RunArguments, model_section: dict, tokenizer, image_token_id: int):
    """MIVCForConditionalGeneration from a saved model, from pretrained components, or from the YAML configs."""
    overrides = {
        k: v
        for k, v in model_section.items()
        if k not in ("vision_config", "text_config", "qformer_config", "model_type")
    }
    overrides.setdefault("image_token_id", image_token_id)
    if run.model_name_or_path:
        return MIVCForConditionalGeneration.from_pretrained(run.model_name_or_path, **overrides)
    if run.vision_model_name_or_path or run.text_model_name_or_path:
        if not (run.vision_model_name_or_path and run.text_model_name_or_path):
            raise SystemExit("set both run.vision_model_name_or_path and run.text_model_name_or_path (the LM)")
        return MIVCForConditionalGeneration.from_pretrained_components(
            run.vision_model_name_or_path, run.text_model_name_or_path, run.qformer_model_name_or_path, **overrides
        )
    text_config = dict(model_section.get("text_config") or {})
    # a model trained from scratch takes its vocabulary and special tokens from the tokenizer
    text_config.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            text_config.setdefault(name, getattr(tokenizer, name))
    config = MIVCConfig(
        vision_config=model_section.get("vision_config"),
        text_config=text_config,
        qformer_config=model_section.get("qformer_config"),
        **overrides,
    )
    return MIVCForConditionalGeneration(config)


TASKS = (
    Task(
        "contrastive",
        ("tcl", "codis"),
        DataArguments,
        ContrastiveTrainingArguments,
        ContrastiveTrainer,
        _contrastive_processor,
        _contrastive_model,
        _contrastive_evaluation_inputs,
        _contrastive_evaluate,
        _contrastive_card,
    ),
    Task(
        "multi-image",
        ("mivc",),
        MIVCDataArguments,
        VLAlignTrainingArguments,
        VLAlignTrainer,
        _multi_image_processor,
        _multi_image_model,
        _multi_image_evaluation_inputs,
        _multi_image_evaluate,
        _multi_image_card,
    ),
)


def task_of(model_type: str) -> Task:
    return next(task for task in TASKS if model_type in task.model_types)


# --------------------------------------------------------------------------------------------------------------
# Steps shared by both tasks


def _training_arguments(config: dict, default_output_dir: str, arguments_class=None):
    """The `training` section (its fields checked by `load_config`) as `ContrastiveTrainingArguments` (MIVC:
    `VLAlignTrainingArguments`)."""
    arguments_class = arguments_class or ContrastiveTrainingArguments
    training_section = dict(config.get("training") or {})
    training_section.setdefault("output_dir", default_output_dir)
    training_section.setdefault("remove_unused_columns", False)  # the collators need the raw columns
    training_section.setdefault("report_to", "none")
    # pinned memory only helps copies to a GPU; without one torch warns about it at every epoch's first batch
    training_section.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    try:
        training_args = arguments_class(**training_section)
    except ValueError as error:
        raise SystemExit(f"training section: {error}") from None
    training_args.resume_from_checkpoint = _resolve_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    return training_args


def _resolve_checkpoint(value: Any, output_dir: str) -> str | None:
    """`--resume_from_checkpoint latest` (or true): the newest complete checkpoint-N folder in output_dir (newer,
    incomplete ones skipped with a warning); a path is checked to exist and to be complete, so that a typo cannot
    silently start the run from scratch and a half-written folder fails here rather than deep in transformers."""
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "latest", "last", "true", "True"):
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            raise SystemExit(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir}")
        logger.info("Resuming from %s", found)
        return found
    if not os.path.isdir(str(value)):
        raise SystemExit(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    problems = checkpoint_problems(str(value))
    if problems:
        raise SystemExit(
            f"--resume_from_checkpoint {value}: {Path(str(value)).name} is incomplete: {'; '.join(problems)}"
        )
    return str(value)


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup_dirs(cgroup_root: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """("v2" | "v1", folder) of this process's CPU cgroup and of its ancestors: a quota anywhere above applies too.
    /proc/self/cgroup names the cgroup ("0::<path>" for v2, "<id>:cpu,cpuacct:<path>" for v1); in a container the
    path may be the host's while the mount is the container's own cgroup, so the walk goes up to the mount."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    starts: list[tuple[str, Path, Path]] = []  # (version, mount, folder)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.strip().lstrip("/")
        if controllers == "":
            starts.append(("v2", cgroup_root, cgroup_root / relative))
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct")):
                starts.append(("v1", mount, mount / relative))
    if not starts:
        starts = [("v2", cgroup_root, cgroup_root), ("v1", cgroup_root / "cpu", cgroup_root / "cpu")]
    found: list[tuple[str, Path]] = []
    for version, mount, folder in starts:
        while True:
            found.append((version, folder))
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    return list(dict.fromkeys(found))


def _cgroup_quota(version: str, folder: Path) -> float | None:
    """CPUs of a cgroup's quota (quota / period), None when it has none (or the files are absent or unreadable)."""
    try:
        if version == "v2":
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, str]:
    """How many CPUs this process may use, at least 1, and how that was found: the CPUs of its affinity mask
    (`os.sched_getaffinity`; `os.cpu_count` where there is none), capped by the smallest cgroup CPU quota of its
    cgroup and its ancestors (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded down: a container
    limited to 1.5 CPUs gets 1 (a thread beyond the quota waits for it). Other jobs' load is not visible here."""
    if hasattr(os, "sched_getaffinity"):
        cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    else:
        cpus, source = os.cpu_count() or 1, "cpu_count"
    quotas = [_cgroup_quota(version, folder) for version, folder in _cgroup_dirs(cgroup_root, proc_cgroup)]
    quotas = [q for q in quotas if q is not None]
    if quotas and int(min(quotas)) < cpus:
        cpus, source = int(min(quotas)), f"cgroup CPU quota {min(quotas):g}"
    return max(1, cpus), source


# LoRA defaults per model type (the README's recommendation). TCL / CODIS: the students' attention (BERT names the
# projections query / value, ViT and CLIP q_proj / v_proj) and their linear projections into the shared space; never
# the EMA teachers `momentum_*`, which follow the students' effective (base + LoRA) weights. MIVC: the language
# model's attention (a regex: ViT also names layers q_proj).
_ALBEF_LORA_TARGETS = r"(vision_model|text_model|fusion_model)\..*\.(query|value|q_proj|v_proj)"
LORA_TARGETS = {
    "tcl": _ALBEF_LORA_TARGETS,
    "codis": _ALBEF_LORA_TARGETS,
    "mivc": r"language_model\..*\.(q_proj|v_proj)",
}
LORA_PROJECTIONS = ("vision_proj", "text_proj")  # TCL / CODIS: added to the default targets when they are nn.Linear
# trained fully and saved with the adapters: modules without an EMA teacher (the ITM head, CODIS's codebook; MIVC's
# projector and pooling, a Q-Former the config does not freeze). The temperature, a bare parameter, keeps its value.
LORA_MODULES_TO_SAVE = {
    "tcl": ("itm_head",),
    "codis": ("itm_head", "codebook"),
    "mivc": ("projector", "pooling", "qformer"),
}


def _check_lora_arguments(run: RunArguments) -> None:
    """The LoRA settings, checked before the data and the model are loaded: a positive rank, peft installed, and a
    saved vlalign model to adapt (the run saves the adapters only; they are meaningless without their base)."""
    if not run.lora_r:
        return
    if run.lora_r < 0:
        raise SystemExit(f"run.lora_r = {run.lora_r}: the adapters' rank must be positive (null or 0: no LoRA)")
    if run.lora_alpha is not None and not (math.isfinite(run.lora_alpha) and run.lora_alpha > 0):
        raise SystemExit(f"run.lora_alpha = {run.lora_alpha}: must be a positive number")
    if not 0.0 <= run.lora_dropout < 1.0:
        raise SystemExit(f"run.lora_dropout = {run.lora_dropout}: must be in [0, 1)")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SystemExit("run.lora_r: LoRA needs peft, an optional extra: pip install 'vlalign[peft]'") from None
    if not run.model_name_or_path:
        given = [
            f"run.{name}"
            for name in ("dual_encoder_name_or_path", "vision_model_name_or_path", "text_model_name_or_path")
            if getattr(run, name)
        ]
        how = (
            f"to start from {' / '.join(given)}, save the model built from them first (e.g. "
            "TCLModel.from_vision_text_pretrained(vision, text).save_pretrained('base'), or "
            "from_dual_encoder_pretrained) and pass --model_name_or_path base"
            if given
            else "LoRA on a randomly initialised model would only learn a low-rank update of random weights: train "
            "the model fully first (without lora_r), then adapt it"
        )
        raise SystemExit(
            "run.lora_r: LoRA adapts a saved vlalign model, set as run.model_name_or_path (the run saves the adapters "
            f"only, which load back onto that base); {how}"
        )


def _check_lock_arguments(run: RunArguments, model_type: str | None = None) -> None:
    """Locked towers are not for LoRA (which freezes every base weight) and, once the model type is known, for the
    contrastive models' towers only."""
    locked = [f"run.lock_{tower}" for tower in ("image", "text") if getattr(run, f"lock_{tower}")]
    if not locked:
        return
    if run.lora_r:
        raise SystemExit(
            f"{locked[0]} with run.lora_r: LoRA already freezes every base weight and trains its adapters only; keep "
            "a tower fixed by leaving it out of run.lora_target_modules (e.g. a regex over text_model only)"
        )
    if model_type == "mivc":
        raise SystemExit(
            f"{locked[0]} locks a tower of TCL / CODIS; an MIVC model freezes its parts with its config "
            "(model.freeze_vision_model, freeze_qformer, freeze_language_model)"
        )


def _apply_locks(model, run: RunArguments):
    """Lock the towers the run asks for (before the Trainer, which gives the optimizer the trainable parameters
    only) and log what trains."""
    if not (run.lock_image or run.lock_text):
        return model
    for tower in ("image", "text"):
        if getattr(run, f"lock_{tower}"):
            try:
                getattr(model, f"lock_{tower}_tower")(
                    getattr(run, f"lock_{tower}_unlocked_layers"),
                    unlocked_projection=getattr(run, f"lock_{tower}_unlocked_projection"),
                )
            except ValueError as error:
                raise SystemExit(f"run.lock_{tower}: {error}") from None
    # unique tensors: the EMA teacher of a locked part is the student's own
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    logger.info(
        "Locked towers: %s; %d parameters trainable, %d frozen (EMA teachers included)",
        ", ".join(
            f"{tower} (last {getattr(run, f'lock_{tower}_unlocked_layers')} blocks unlocked"
            + (", projection unlocked" if getattr(run, f"lock_{tower}_unlocked_projection") else "")
            + ")"
            for tower in ("image", "text")
            if getattr(run, f"lock_{tower}")
        ),
        trainable,
        sum(p.numel() for p in parameters) - trainable,
    )
    return model


def _lock_settings(run: RunArguments) -> dict:
    """Every lock_* field of the run."""
    return {f.name: getattr(run, f.name) for f in dataclasses.fields(RunArguments) if f.name.startswith("lock_")}


def _lock_card_settings(run: RunArguments) -> dict:
    """The locked towers for the card's hyperparameters."""
    settings = {}
    for tower in ("image", "text"):
        if getattr(run, f"lock_{tower}"):
            settings[f"lock_{tower}_unlocked_layers"] = getattr(run, f"lock_{tower}_unlocked_layers")
            settings[f"lock_{tower}_unlocked_projection"] = getattr(run, f"lock_{tower}_unlocked_projection")
    return settings


def _lora_names(value: list | str | None, field_name: str) -> list[str] | str | None:
    """A field of module names as peft takes it: a list (or "a,b" -> ["a", "b"]) of names, or one regex (a string
    with characters other than name characters, commas and spaces)."""
    if value is None:
        return None
    if isinstance(value, str) and not re.fullmatch(r"\s*[\w.]+(\s*,\s*[\w.]+)*\s*", value):
        try:
            re.compile(value)
        except re.error as error:
            raise SystemExit(f"run.{field_name} = {value!r}: not a valid regex ({error})") from None
        return value
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise SystemExit(f"run.{field_name} = {value!r}: expected module names, e.g. query,value")
    return names


def _apply_lora(model, run: RunArguments, model_type: str, training_args):
    """With run.lora_r: the model wrapped by peft.get_peft_model, LoRA on `lora_target_modules` (default
    LORA_TARGETS) and `lora_modules_to_save` (default LORA_MODULES_TO_SAVE) trained fully; everything else frozen.
    Module names that match nothing, or a module to save that has an EMA teacher, are refused here, before training."""
    if not run.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    albef = model_type != "mivc"
    if albef and training_args.resume_from_checkpoint:
        # the Trainer's checkpoints of a PEFT model hold the adapters only; the EMA teachers, queues and running
        # statistics change during training too and would restart from the base's
        raise SystemExit(
            f"--resume_from_checkpoint with run.lora_r: a {model_type.upper()} checkpoint under LoRA holds the "
            "adapters only, not the EMA teachers, queues and running statistics the run has changed, so the run "
            "cannot continue exactly; start it again, or train without LoRA to resume"
        )
    modules = {name: module for name, module in model.named_modules() if name}
    students = [name for name in modules if not name.startswith("momentum_")]
    targets = _lora_names(run.lora_target_modules, "lora_target_modules")
    if targets is None:
        targets = LORA_TARGETS[model_type]
        projections = [n for n in LORA_PROJECTIONS if albef and isinstance(modules.get(n), torch.nn.Linear)]
        if projections:
            targets += f"|({'|'.join(projections)})"
    elif isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in students):
            raise SystemExit(f"run.lora_target_modules = {targets!r}: the regex matches no module name of the model")
    else:
        unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in students)]
        if unknown:
            layers = sorted({n.rsplit(".", 1)[-1] for n in students if isinstance(modules[n], torch.nn.Linear)})
            raise SystemExit(
                f"run.lora_target_modules: {unknown} name no module of the {model_type.upper()} model (its linear "
                f"layers are named {', '.join(layers[:30])})"
            )
    to_save = _lora_names(run.lora_modules_to_save, "lora_modules_to_save")
    if to_save is None:
        freeze_qformer = getattr(model.config, "freeze_qformer", True)
        to_save = [
            n for n in LORA_MODULES_TO_SAVE[model_type] if n in modules and (n != "qformer" or not freeze_qformer)
        ]
    elif isinstance(to_save, str):
        raise SystemExit(f"run.lora_modules_to_save = {to_save!r}: give module names (peft takes no regex here)")
    for name in to_save:  # peft wraps every module whose name ends with one of these
        matched = [n for n in modules if n.endswith(name)]
        if not matched:
            raise SystemExit(f"run.lora_modules_to_save: {name!r} names no module of the {model_type.upper()} model")
        teachers = [n for n in matched if n.startswith("momentum_")]
        if teachers:
            raise SystemExit(
                f"run.lora_modules_to_save: {name!r} also names the EMA teacher {teachers[0]!r}, which follows its "
                "student and cannot be trained: put LoRA on that module instead (lora_target_modules)"
            )
    config = LoraConfig(
        r=run.lora_r,
        lora_alpha=run.lora_alpha if run.lora_alpha is not None else 2 * run.lora_r,
        lora_dropout=run.lora_dropout,
        target_modules=targets,
        # plain name lists match by suffix: keep the teachers out (they follow the students' effective weights)
        exclude_modules=r"momentum_.*" if any(n.startswith("momentum_") for n in modules) else None,
        modules_to_save=list(to_save) or None,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise SystemExit(f"run.lora_*: peft cannot adapt the model: {error}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA r=%d on %s, trained fully: %s; %d of %d parameters trainable",
        run.lora_r,
        targets,
        list(to_save) or "nothing",
        trainable,
        total,
    )
    return model


def _lora_card_settings(model) -> dict:
    """The LoRA settings for the card's hyperparameters."""
    config = model.peft_config["default"]
    targets = config.target_modules
    return {
        "lora_r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": targets if isinstance(targets, str) else ", ".join(sorted(targets)),
        "lora_modules_to_save": ", ".join(config.modules_to_save or []) or "none",
    }


def _set_cpu_threads(run: RunArguments, training_args) -> None:
    if training_args.device.type != "cpu":
        return
    if run.cpu_threads:
        threads, reason = run.cpu_threads, "--cpu_threads"
    else:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        cpus, source = available_cpus()
        threads = max(1, cpus // local_processes)
        reason = f"{cpus} CPUs ({source}) among {local_processes} local process{'es' if local_processes > 1 else ''}"
    torch.set_num_threads(threads)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        logger.info(
            "Training on the CPU with %d thread%s per process (%s)", threads, "s" if threads > 1 else "", reason
        )


_HELD_LOCKS: dict = {}  # output folder -> this process's lock on it, held until the process exits


def _claim_output_dir(training_args) -> None:
    """One run per output folder (each process holds its own lock; a crashed run's lock is gone with its process;
    a second `main()` in the same process, one after the other, keeps the lock it has), then remove what an
    interrupted run left half-written."""
    folder = os.path.realpath(training_args.output_dir)
    if folder not in _HELD_LOCKS:
        try:
            _HELD_LOCKS[folder] = OutputFolderLock(folder, rank=training_args.process_index).acquire()
        except OutputFolderInUseError as error:
            raise SystemExit(str(error)) from None
    if training_args.process_index == 0:
        remove_stale_staging(training_args.output_dir)


def _stop_when_launcher_dies() -> None:
    """`accelerate launch` runs a single process as its child and does not pass SIGTERM on: ask Linux to send it to
    this process when the launcher dies, so that the run checkpoints and stops instead of running on orphaned.
    (Several processes run under torchrun, which forwards the signal itself.)"""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as handle:
            launcher = b"accelerate" in handle.read()
    except OSError:
        return
    if not launcher or "LOCAL_RANK" in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _train(trainer, training_args):
    """trainer.train(), failing the run (non-zero exit, no model, no card) on SIGTERM and when nothing was trained."""
    try:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except TrainingInterruptedError as stopped:
        logger.error("%s; no final model or card written", stopped)
        raise SystemExit(128 + stopped.signal_number) from None
    if trainer.items_trained == 0:
        raise SystemExit(
            f"nothing was trained: {result.global_step} optimizer steps on 0 usable training rows (see the "
            "'Skipped' warnings and the data columns); no model or card written"
        )
    return result


def _check_training_size(trainer, training_args, train_dataset, streaming: bool) -> None:
    """Fail before training when the run has no step: no rows, fewer rows than one batch with drop_last, 0 epochs."""
    if streaming:
        return
    rows = len(train_dataset)
    batches = len(trainer.get_train_dataloader()) if rows else 0
    if batches == 0:
        batch = training_args.per_device_train_batch_size * max(training_args.world_size, 1)
        why = (
            "it is empty"
            if rows == 0
            else f"it has {rows} rows, fewer than one batch of {batch} with dataloader_drop_last"
        )
        raise SystemExit(f"the training split gives no batch: {why}; no model or card written")
    if training_args.max_steps <= 0 and trainer._planned_max_steps() == 0:
        raise SystemExit(
            f"num_train_epochs={training_args.num_train_epochs} gives 0 optimizer steps; set "
            "num_train_epochs > 0 or max_steps"
        )


def _check_eval_inputs(eval_inputs, eval_dataset, data_args) -> None:
    """An eval split that yields no image or no caption would end a whole training run in a crash: stop now."""
    if eval_inputs.images and eval_inputs.texts:
        return
    raise SystemExit(
        f"eval split {data_args.eval_split!r}: {len(eval_dataset)} rows give {len(eval_inputs.images)} "
        f"usable images and {len(eval_inputs.texts)} usable captions ({eval_inputs.issues.summary()}); "
        f"check image_column={data_args.image_column!r} / caption_column={data_args.caption_column!r}, "
        "or set data.eval_split null to train without evaluation"
    )


def _check_multi_image_eval(eval_dataset, processor, data_args) -> None:
    """The multi-image eval split must hold an item with a decodable image (checked with a collator of its own, so
    that the training counts stay the training's)."""
    checker = MultiImageCollator.from_data_args(processor, data_args)
    if any(checker.decoded_images(row) for row in eval_dataset):
        return
    raise SystemExit(
        f"eval split {data_args.eval_split!r}: none of its {len(eval_dataset)} items has a decodable "
        f"image ({checker.issues.summary()}); check images_column={data_args.images_column!r}, or set "
        "data.eval_split null to train without evaluation"
    )


def _check_streaming(training_args) -> None:
    """A stream has no length: the run is sized by max_steps. Under DDP each process reads its own shards
    (accelerate's default for an IterableDataset, rank 0 reading and dispatching batches, cannot concatenate the
    collator's counts)."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise SystemExit(
            "data.streaming: a stream has no length, so an epoch count cannot size the run: set "
            "training.max_steps (e.g. --max_steps 10000)"
        )
    if training_args.accelerator_config.dispatch_batches is None:
        training_args.accelerator_config.dispatch_batches = False
    elif training_args.accelerator_config.dispatch_batches and training_args.world_size > 1:
        raise SystemExit(
            "data.streaming with several processes: accelerator_config.dispatch_batches must be false "
            "(each process reads its own shards; dispatched batches cannot carry the collator's counts)"
        )


def _save_run(output_dir: Path, trainer, training_args, processor, results: dict, build_card, write_pictures) -> None:
    """Weights + config + code, processor, training_args.json (no pickle), pictures and card, written into a staging
    folder and moved into `output_dir` only when all of it is written (a full disk or a kill leaves the previous
    model whole); then the metrics, as eval_results.json (`Trainer.save_metrics`)."""
    staging = staging_folder(output_dir / "final")
    try:
        _drop_local_paths(trainer.model.config)
        trainer.save_model(str(staging))
        # Trainer also pickles its arguments next to the weights; a Hub folder gets them as JSON instead
        (staging / "training_args.bin").unlink(missing_ok=True)
        (staging / "training_args.json").write_text(training_args.to_json_string(), encoding="utf-8")
        processor.save_pretrained(str(staging))
        save_model_card(staging, build_card(write_pictures(staging)))
        publish_files(staging, output_dir)
        trainer.save_metrics("eval", results, combined=False)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise explain_write_error(error, output_dir, "the final model") from error
    logger.info("eval results: %s", json.dumps(results))


def push_to_hub(output_dir: Path, run: RunArguments) -> str:
    """Upload the model in `output_dir` (vlalign.hub.publishable_files: no checkpoints, logs or training arguments).
    A failed push ends the run with one line that says where the model is and how to push it later."""
    token = run.hub_token or os.environ.get("HF_TOKEN")
    try:
        url = push_folder_to_hub(output_dir, run.hub_model_id, token=token, private=run.hub_private_repo)
    except PUSH_ERRORS as error:
        reason = " ".join(str(error).split())[:300] or "no details"
        if token:
            reason = reason.replace(token, "<token>")
        command = push_command(output_dir.resolve(), run.hub_model_id, private=run.hub_private_repo)
        raise SystemExit(
            f"Push to the Hub repo {run.hub_model_id} failed ({type(error).__name__}: {reason}). The "
            f"model is saved locally at {output_dir.resolve()}; push it later (with HF_TOKEN set or "
            f"after `hf auth login`) with: {command}"
        ) from None
    logger.info("pushed to %s", url)
    return url


def _drop_local_paths(config) -> None:
    """save_pretrained leaves the top-level `_name_or_path` out of config.json but keeps the sub-configs' ones: towers
    loaded from local checkpoints would publish their folders on this machine. Hub ids stay."""
    for value in vars(config).values():
        if isinstance(value, PreTrainedConfig):
            name = getattr(value, "_name_or_path", "")
            if name and public_name(name) != name:
                value._name_or_path = ""
            _drop_local_paths(value)


def _card_template(run: RunArguments, model_type: str) -> Path:
    template = Path(run.model_card_template or f"model_cards/{model_type}.md")
    if not template.is_absolute() and not template.exists():
        template = REPO_ROOT / template
    return template


def main(argv: list[str] | None = None) -> dict:
    # 1. parse: the config file and the command line's overrides, checked against the fields of the model's task
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "training/configs/tcl_digits.yaml"))
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config, parse_overrides(rest))
    _stop_when_launcher_dies()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = RunArguments(**config["run"])
    _check_lora_arguments(run)
    _check_lock_arguments(run)
    if run.push_to_hub and not run.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id")
    if run.hub_model_id and not is_hub_id(run.hub_model_id):
        logger.warning(
            "--hub_model_id %r is not a Hub repo id of the form namespace/name: the model card's snippets load the "
            "saved folder instead%s",
            run.hub_model_id,
            " (the push creates the repo under your own namespace, if the Hub accepts the name)"
            if run.push_to_hub
            else "",
        )
    if run.hub_token:
        # never written to a file by us, but a command line is visible to the machine's other users (`ps`), and
        # `accelerate launch` repeats it when the run exits with an error
        logger.warning(
            "--hub_token: a token on the command line can be seen by other users of this machine and is "
            "repeated by `accelerate launch` if the run fails; prefer HF_TOKEN or `hf auth login`"
        )
    model_type = _model_type(config)
    task = task_of(model_type)
    model_section = {**(config.get("model") or {}), "model_type": model_type}
    data_args = task.data_arguments(**(config.get("data") or {}))
    training_args = _training_arguments(config, f"outputs/{model_type}", task.training_arguments)
    if getattr(data_args, "streaming", False):
        _check_streaming(training_args)
    _check_lock_arguments(run, model_type)
    set_seed(training_args.seed)
    _set_cpu_threads(run, training_args)

    # 2. data and 3. processor (the collator needs the processor, so it comes first)
    processor = task.build_processor(run, data_args, model_section)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    data = get_data(data_args, processor, seed=data_seed, collator_seed=training_args.seed)
    if task.name == "contrastive" and training_args.process_index == 0:
        _warn_about_caption_fit(processor, data.train_dataset, data_args)

    # 4. model
    model = task.build_model(run, model_section, processor, data)
    if isinstance(data.collator, ImageTextCollator):  # build only the augmented views the objectives use
        data.collator.two_views = model.training_views == 2
    model = _apply_locks(model, run)
    model = _apply_lora(model, run, model_type, training_args)

    # 5. trainer, once the evaluation split is known to be usable and the output folder is ours
    evaluation = task.evaluation_inputs(data, data_args, processor)
    if "resume_fingerprint" in evaluation:  # a resumed run locks as its checkpoint did (the optimizer's parameters)
        evaluation["resume_fingerprint"].update(_lock_settings(run))
    _claim_output_dir(training_args)  # before anything is written there
    trainer = task.trainer_class(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        data_collator=data.collator,
        processing_class=processor,
        **evaluation,
    )
    _check_training_size(trainer, training_args, data.train_dataset, data.num_train_samples is None)

    # 6. train
    start = time.time()
    train_result = _train(trainer, training_args)
    trained = {
        "train_runtime_seconds": round(time.time() - start, 1),
        "train_steps": int(train_result.global_step),
        "train_loss": float(trainer.run_train_loss),
    }

    # 7. evaluate on the eval split, with the data issues of both splits
    results, write_pictures = task.evaluate(model, processor, data, data_args, run, trainer, evaluation, trained)

    # 8. save the model, processor, metrics, pictures and card; 9. push them
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        card = task.card(model, training_args, trainer, run, data_args, data, results)
        if run.lora_r:  # the adapters need their base: it is the card's base model
            card["base_model"] = public_name(run.model_name_or_path)
            card["hyperparameters"].update(_lora_card_settings(model))
        card["hyperparameters"].update(_lock_card_settings(run))
        build_card = lambda pictures: build_model_card(  # noqa: E731 (the pictures are written beside the model)
            _card_template(run, model_type),
            model_id=run.hub_model_id or output_dir.name,
            # what the card's snippets load: the Hub repo, else the folder as given (absolute: a placeholder)
            load_from=run.hub_model_id if is_hub_id(run.hub_model_id) else snippet_folder(training_args.output_dir),
            dataset_name=public_name(data_args.dataset_name),
            dataset_split=data_args.train_split,
            eval_split=data_args.eval_split,
            pictures=pictures,
            license=run.license,
            **card,
        )
        _save_run(output_dir, trainer, training_args, processor, results, build_card, write_pictures)
        if run.dual_encoder_name_or_path and run.export_dual_encoder:
            _export_dual_encoder(model, processor, output_dir)
        if run.push_to_hub:
            push_to_hub(output_dir, run)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""Building the towers, and loading weights strictly and safely.

Used by every model file (the ALBEF-style models and MIVC), which import it as `from .loading import ...` so that
`save_pretrained` copies it next to them for `trust_remote_code` loading:

- strict loading: `KeepsTrainableFlagsOnLoad.from_pretrained` (keys missing, unexpected or of another shape raise
  `CheckpointMismatchError`), `load_pretrained_part` for one pretrained part of a bigger model;
- safetensors only: pickle weights are refused unless explicitly allowed (`resolve_use_safetensors`,
  `load_safely`);
- named files: a missing or damaged weights file raises `MissingCheckpointFileError` / `CorruptCheckpointError`
  naming it; a tokenizer saved without its vocabulary `MissingTokenizerFileError` (defined beside the processor,
  which checks it too: model folders therefore carry processing_vlalign.py).
"""

from __future__ import annotations

import json
import os
import struct

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM

from .processing_vlalign import MissingTokenizerFileError, check_tokenizer_files


class CheckpointMismatchError(ValueError):
    """Checkpoint weights that do not fit the model built from the config (keys missing, unexpected or of another
    shape): raised instead of keeping random initial weights where pretrained ones were expected."""


class UnsafeCheckpointError(OSError):
    """A checkpoint without safetensors weights: its pickle weights are only read with `allow_pickle=True`."""


class MissingCheckpointFileError(FileNotFoundError):
    """A local model folder without its weights file (or one of the shards its index names)."""


class CorruptCheckpointError(OSError):
    """A weights file that cannot be read as safetensors: truncated (an interrupted download, copy or save) or
    otherwise damaged."""


# errors that already name the file: passed on as they are where a part is loaded with our own from_pretrained
_OUR_FILE_ERRORS = (
    UnsafeCheckpointError,
    MissingCheckpointFileError,
    CorruptCheckpointError,
    MissingTokenizerFileError,
)


# keys of each kind that an error message lists before it only counts the rest
_KEYS_SHOWN = 10

_WHY_SAFETENSORS = (
    "vlalign only loads safetensors weights by default: pickle files (.bin / .pt) are unpickled on load, and "
    "unpickling can run code hidden in the file (torch's weights_only unpickler narrows this, but it is a filter, "
    "not a format guarantee). If you trust the source, pass allow_pickle=True; save_pretrained() of the loaded "
    "model then writes model.safetensors for next time."
)


def _key_list(label: str, keys) -> str:
    keys = sorted(str(key) for key in keys)
    shown = ", ".join(keys[:_KEYS_SHOWN])
    if len(keys) > _KEYS_SHOWN:
        shown += f", ... and {len(keys) - _KEYS_SHOWN} more ({len(keys)} in all)"
    return f"{label} [{shown}]"


def describe_key_problems(missing=(), unexpected=(), mismatched=()) -> str:
    """`missing [...]; unexpected [...]; shape mismatch [...]` for the kinds that occur, long lists truncated.
    `mismatched` holds (key, checkpoint shape, model shape) triples, as in transformers' loading report."""
    shapes = [f"{key} (checkpoint {tuple(saved)}, model {tuple(expected)})" for key, saved, expected in mismatched]
    kinds = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    return "; ".join(_key_list(label, keys) for label, keys in kinds if keys)


def _pickle_weight_files(location: str) -> list[str]:
    """The pickle weight files transformers would read at a local `location` because it has no safetensors
    weights (empty when it has some, or when `location` is not local, e.g. a Hub id)."""
    from transformers.utils import WEIGHTS_NAME

    if os.path.isfile(location):  # transformers loads a weights file given by its path, whatever its format
        return [] if location.endswith(".safetensors") else [os.path.basename(location)]
    if not os.path.isdir(location):
        return []
    names = os.listdir(location)
    if any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
        return []
    stem = WEIGHTS_NAME.split(".")[0]  # pytorch_model[-00001-of-00002][.variant].bin[.index.json]
    return sorted(name for name in names if name.startswith(stem) and name.endswith((".bin", ".bin.index.json")))


def resolve_use_safetensors(
    path, allow_pickle: bool, use_safetensors: bool | None = None, subfolder: str = ""
) -> bool | None:
    """The `use_safetensors` to hand to transformers: True unless pickle weights are explicitly allowed (then the
    caller's choice; None prefers safetensors where both exist). A local checkpoint with only pickle weights is
    refused with the reason, rather than transformers' bare "no file named model.safetensors"."""
    if allow_pickle:
        return use_safetensors
    if use_safetensors is False:
        raise UnsafeCheckpointError("use_safetensors=False asks for pickle weights. " + _WHY_SAFETENSORS)
    location = os.path.join(str(path), subfolder) if subfolder else str(path)
    pickles = _pickle_weight_files(location) if path is not None else []
    if pickles:
        raise UnsafeCheckpointError(
            f"{str(path)!r} holds pickle weights only ({', '.join(pickles)}), no safetensors file. {_WHY_SAFETENSORS}"
        )
    return True


def _with_variant(name: str, variant: str | None) -> str:
    """The file name transformers reads for a weights variant: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _local_folder(path, subfolder: str = "") -> str | None:
    location = os.path.join(str(path), subfolder) if subfolder else str(path)
    return location if os.path.isdir(location) else None


def _index_shards(index_file: str) -> list[str]:
    with open(index_file, encoding="utf-8") as handle:
        return sorted(set((json.load(handle).get("weight_map") or {}).values()))


def _missing_weights_message(folder: str, allow_pickle: bool, variant: str | None) -> str | None:
    """Which weights file the local `folder` lacks, as an error message; None when the files transformers would
    read are there (its error is then about something else)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    single, index = _with_variant(SAFE_WEIGHTS_NAME, variant), _with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    if os.path.isfile(os.path.join(folder, single)):
        return None
    if os.path.isfile(os.path.join(folder, index)):
        shards = _index_shards(os.path.join(folder, index))
        missing = [name for name in shards if not os.path.isfile(os.path.join(folder, name))]
        if not missing:
            return None
        return (
            f"{os.path.join(folder, index)} names weight shards that are not in the folder: "
            f"{', '.join(missing)} (of {len(shards)}). Was the save or download interrupted?"
        )
    expected = f"{single} (or {index} with its shards)"
    if allow_pickle:
        pickles = (_with_variant(WEIGHTS_NAME, variant), _with_variant(WEIGHTS_INDEX_NAME, variant))
        if any(os.path.isfile(os.path.join(folder, name)) for name in pickles):
            return None
        expected += f", or {pickles[0]} (or {pickles[1]})"
    return (
        f"no weights file in {folder!r}: expected {expected}. The folder's config.json only describes the model; "
        f"were the weights deleted, or the save or download interrupted?"
    )


def _safetensors_damage(file: str) -> str | None:
    """What is wrong with a safetensors file, judged from its size against its header; None if it opens."""
    try:
        with safe_open(file, framework="pt"):
            return None
    except SafetensorError as error:
        opening_error = str(error)
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        start = handle.read(8)
        if len(start) < 8:  # the header length is an 8-byte little-endian integer
            return f"it has {size} bytes, too few for the header length"
        header_length = struct.unpack("<Q", start)[0]
        if 8 + header_length > size:
            return f"its header announces {header_length} bytes of metadata, the whole file has {size} bytes"
        try:
            header = json.loads(handle.read(header_length))
            data_end = (
                8
                + header_length
                + max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"its header is unreadable: {opening_error}"
    if data_end > size:
        return f"its tensors end at byte {data_end}, the file has {size} bytes"
    return opening_error


def _local_weight_files(path, subfolder: str, variant: str | None) -> list[str]:
    """The safetensors files transformers reads for a local checkpoint (none for a Hub id)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if os.path.isfile(str(path)):
        return [str(path)]
    folder = _local_folder(path, subfolder)
    if folder is None:
        return []
    single, index = _with_variant(SAFE_WEIGHTS_NAME, variant), _with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    if os.path.isfile(os.path.join(folder, single)):
        return [os.path.join(folder, single)]
    if os.path.isfile(os.path.join(folder, index)):
        return [
            os.path.join(folder, name)
            for name in _index_shards(os.path.join(folder, index))
            if os.path.isfile(os.path.join(folder, name))
        ]
    return []


def _unreadable_weights_message(path, subfolder: str, variant: str | None, error: Exception) -> str:
    damaged = [
        (file, reason)
        for file in _local_weight_files(path, subfolder, variant)
        if (reason := _safetensors_damage(file)) is not None
    ]
    if not damaged:  # a Hub checkpoint (its files are in the cache), or a damage that only safetensors sees
        return (
            f"a safetensors weights file of {str(path)!r} is truncated or corrupt ({error}): was a download, "
            f"copy or save interrupted?"
        )
    files = "; ".join(f"{file} ({reason})" for file, reason in damaged)
    return (
        f"truncated or corrupt weights file: {files}. Was a download, copy or save interrupted? Save or "
        f"download the checkpoint again."
    )


def load_safely(load, path, *args, allow_pickle: bool = False, **kwargs):
    """`load(path, *args, **kwargs)` (a `from_pretrained`) reading safetensors weights only, unless
    `allow_pickle`. A local checkpoint without its weights file raises `MissingCheckpointFileError`, one with a
    truncated or corrupt weights file `CorruptCheckpointError`, each naming the file."""
    subfolder, variant = kwargs.get("subfolder", ""), kwargs.get("variant")
    use_safetensors = resolve_use_safetensors(path, allow_pickle, kwargs.pop("use_safetensors", None), subfolder)
    try:
        return load(path, *args, use_safetensors=use_safetensors, **kwargs)
    except SafetensorError as error:  # its message names no file
        raise CorruptCheckpointError(_unreadable_weights_message(path, subfolder, variant, error)) from error
    except OSError as error:
        if isinstance(error, _OUR_FILE_ERRORS):
            raise
        folder = _local_folder(path, subfolder)
        missing = _missing_weights_message(folder, allow_pickle, variant) if folder is not None else None
        if missing:
            raise MissingCheckpointFileError(missing) from error
        # e.g. a Hub repo without safetensors: transformers' message says neither why nor what to do
        if use_safetensors and "safetensors" in str(error):
            raise UnsafeCheckpointError(
                f"found no safetensors weights for {str(path)!r} ({error}). {_WHY_SAFETENSORS}"
            ) from error
        raise


def check_tokenizer_fits_model(tokenizer, config) -> None:
    """Raise `ValueError` when `tokenizer` has more tokens than the model's text vocabulary: its highest ids would
    have no embedding row and fail inside the embedding (an IndexError) at the first forward.

    `config` is the model's config (ALBEF-style or MIVC: its text config is read; a plain text config works too),
    or the model itself. A tokenizer smaller than the vocabulary is fine (vocabularies are often padded)."""
    config = getattr(config, "config", config)  # a model
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size, size = int(text_config.vocab_size), len(tokenizer)
    if size > vocab_size:
        raise ValueError(
            f"the tokenizer has {size} tokens but the model's text vocabulary (text_config.vocab_size) has "
            f"{vocab_size}: token ids {vocab_size}..{size - 1} have no embedding and would fail with an IndexError "
            f"in the first forward. Use the tokenizer the model was built with, or a model whose "
            f"text_config.vocab_size is at least {size} (a model built from scratch: vocab_size=len(tokenizer); "
            f"an MIVC model: model.resize_token_embeddings({size}), whose new rows start untrained)."
        )


class KeepsTrainableFlagsOnLoad:
    """`from_pretrained` of our models (the ALBEF models and MIVC), stricter than transformers':

    * strict (`strict=True`, the default): weights missing from the checkpoint, unexpected ones and ones of another
      shape raise `CheckpointMismatchError` listing the keys, instead of a warning and random initialisation. Keys
      that transformers does not save (tied weights, non-persistent buffers, `_keys_to_ignore_on_load_missing`)
      are not in its loading report, so a save / load round trip loads cleanly. `strict=False` keeps transformers'
      behaviour (which still raises on shape mismatches unless `ignore_mismatched_sizes=True`).
    * safe: only safetensors weights are read; a checkpoint with pickle weights only raises
      `UnsafeCheckpointError` unless `allow_pickle=True`.
    * named files: a local folder without its weights file (or a shard) raises `MissingCheckpointFileError`, a
      truncated or corrupt one `CorruptCheckpointError`, and tokenizer files saved beside the model without the
      vocabulary `MissingTokenizerFileError` (pipelines load that tokenizer with AutoTokenizer, which would accept
      it with its special tokens only).
    * trainable flags: transformers' loader replaces every parameter with a new, trainable one, so the model's
      `_set_trainable()` (EMA teachers, freeze flags) runs again on the loaded model.
    """

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, strict: bool = True, allow_pickle: bool = False, **kwargs
    ):
        folder = _local_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        if folder is not None:
            check_tokenizer_files(folder)
        wants_info = kwargs.pop("output_loading_info", False)
        shapes_may_differ = kwargs.get("ignore_mismatched_sizes", False)
        if strict:
            # report every shape mismatch with the other problems instead of transformers raising on its own
            kwargs["ignore_mismatched_sizes"] = True
        model, info = load_safely(
            super().from_pretrained,
            pretrained_model_name_or_path,
            *model_args,
            allow_pickle=allow_pickle,
            output_loading_info=True,
            **kwargs,
        )
        if strict:
            mismatched = () if shapes_may_differ else info["mismatched_keys"]
            problems = describe_key_problems(info["missing_keys"], info["unexpected_keys"], mismatched)
            if problems:
                raise CheckpointMismatchError(
                    f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): the weights do not "
                    f"match the model built from the config, so some would stay randomly initialised or be dropped: "
                    f"{problems}. Check that the config (and any override passed here) fits these weights; to load "
                    f"anyway as transformers does (warn, initialise the rest), pass strict=False (plus "
                    f"ignore_mismatched_sizes=True for shape mismatches)."
                )
        model._set_trainable()
        return (model, info) if wants_info else model


# top-level modules of a tower that are only built when its pooling uses them (BERT / ViT poolers, SigLIP's head)
_POOLER_MODULES = ("pooler", "head")


def _load_matching(module: nn.Module, state: dict, what: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, raising with the mismatched keys instead of silently keeping random weights."""
    own = module.state_dict()
    # a pooler the tower's pooling does not use is not built, so its weights are not a mismatch
    built = {key.split(".", 1)[0] for key in own}
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in built or k.split(".", 1)[0] not in _POOLER_MODULES}
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [
        k
        for k in own
        if k not in state
        and not any(marker in k for marker in allow_missing)
        and not k.endswith(("position_ids", "token_type_ids"))
    ]
    if shape_mismatch or unexpected or missing:
        mismatched = [(k, state[k].shape, own[k].shape) for k in shape_mismatch]
        raise CheckpointMismatchError(
            f"pretrained weights do not match the {what}: {describe_key_problems(missing, unexpected, mismatched)}"
        )
    module.load_state_dict(state, strict=False)


def load_pretrained_part(loader, path: str, what: str, allow_pickle: bool = False, uses_pooler: bool = False):
    """`loader.from_pretrained(path)` for one part of a bigger model (a tower, the LM, the Q-Former): safetensors
    only unless `allow_pickle`, and `CheckpointMismatchError` when the checkpoint does not fit its own config
    (its pooler may be missing unless `uses_pooler`)."""
    part, info = _load_with_report(loader, path, allow_pickle)
    _check_part_loading(part, info, path, what, uses_pooler)
    return part


def _load_with_report(loader, path: str, allow_pickle: bool):
    # shape mismatches go into the report (and our error) rather than raising one by one inside transformers
    return load_safely(
        loader.from_pretrained, path, allow_pickle=allow_pickle, output_loading_info=True, ignore_mismatched_sizes=True
    )


def _check_part_loading(part: nn.Module, info: dict, path: str, what: str, uses_pooler: bool = False) -> None:
    """Raise on the loading report's problems that matter for a part. Unexpected keys outside the part's own
    top-level modules are the rest of a bigger checkpoint (the text half of CLIP) and are fine; so are missing
    pooler weights when the pooler is not used (it is then not built)."""
    own_modules = {key.split(".", 1)[0] for key in part.state_dict()}
    unexpected = [k for k in info["unexpected_keys"] if k.split(".", 1)[0] in own_modules]
    missing = [k for k in info["missing_keys"] if uses_pooler or k.split(".", 1)[0] not in _POOLER_MODULES]
    problems = describe_key_problems(missing, unexpected, info["mismatched_keys"])
    if problems:
        raise CheckpointMismatchError(f"the {what} checkpoint {path!r} does not match its own config: {problems}")


def _load_text_checkpoint(
    path: str, allow_pickle: bool, uses_pooler: bool = False, encoder_class=AutoModel
) -> nn.Module:
    """The text checkpoint with its masked-LM head when it has one (and its pooler is not needed: masked-LM
    classes drop it), else the bare encoder (the MLM head then starts new instead of taking a randomly initialised
    head from transformers)."""
    if uses_pooler:
        return load_pretrained_part(encoder_class, path, "text encoder", allow_pickle, uses_pooler=True)
    try:
        text, info = _load_with_report(AutoModelForMaskedLM, path, allow_pickle)
    except _OUR_FILE_ERRORS:  # a missing or damaged file, not a model type without a masked-LM class
        raise
    except (ValueError, OSError):  # no masked-LM class for this model type
        return load_pretrained_part(encoder_class, path, "text encoder", allow_pickle)
    base_prefix = f"{text.base_model_prefix}."
    if any(not key.startswith(base_prefix) for key in info["missing_keys"]):  # an encoder saved without its head
        return load_pretrained_part(encoder_class, path, "text encoder", allow_pickle)
    _check_part_loading(text, info, path, "text encoder")
    return text


def saved_tokenizer(path):
    """The tokenizer saved with a (text) checkpoint, or None when it has none. A local folder has one when it holds
    tokenizer_config.json (AutoTokenizer would otherwise make a tokenizer of special tokens only from config.json);
    an incomplete one raises `MissingTokenizerFileError`."""
    from transformers import AutoTokenizer

    folder = _local_folder(path)
    if folder is not None:
        if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return None
        check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        if folder is not None:  # a tokenizer is saved there and does not load: say so
            raise
        return None


def check_tokenizer_special_tokens(tokenizer, config) -> None:
    """Raise `ValueError` when an ALBEF-style model's config disagrees with the tokenizer it is used with about a
    token id the model reads: the mask token (MLM writes it), the padding token (the embedding's padding row, and
    RoBERTa's position ids, which count non-padding tokens), the end-of-text token (where CLIP's text tower pools),
    or a first token to pool for `text_pooling="cls"`. Each of these would be miscomputed without an error."""
    config = getattr(config, "config", config)  # a model
    text = config.text_config
    model_type = getattr(text, "model_type", None)
    problems = []
    if config.mlm_weight > 0 and config.mask_token_id != tokenizer.mask_token_id:
        problems.append(
            f"mask_token_id is {config.mask_token_id!r}, the tokenizer's mask token {tokenizer.mask_token!r} is "
            f"{tokenizer.mask_token_id!r} (MLM replaces tokens with it)"
        )
    pad = getattr(text, "pad_token_id", None)
    if model_type != "clip_text_model" and None not in (pad, tokenizer.pad_token_id) and pad != tokenizer.pad_token_id:
        problems.append(
            f"text_config.pad_token_id is {pad}, the tokenizer pads with {tokenizer.pad_token_id} (the embedding's "
            f"padding row and, for RoBERTa / XLM-R, the position ids follow the config's)"
        )
    eos = getattr(text, "eos_token_id", None)
    # eos_token_id 2 marks CLIP configs older than transformers' fix, which pool at the highest token id instead
    if (
        model_type == "clip_text_model"
        and config.text_pooling == "pooler"
        and eos != 2
        and eos != tokenizer.eos_token_id
    ):
        problems.append(
            f"text_config.eos_token_id is {eos}, the tokenizer's end-of-text token is {tokenizer.eos_token_id} (CLIP's "
            f"text tower pools at the first end-of-text token)"
        )
    if config.text_pooling == "cls":
        first = tokenizer("a")["input_ids"][0]
        starts = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
        if first not in starts:
            problems.append(
                f"text_pooling='cls' pools the first token, but the tokenizer starts a text with token {first}, not "
                f"a [CLS] / start token ({sorted(starts) or 'it has none'}): use text_pooling='mean'"
            )
    if problems:
        raise ValueError(f"the tokenizer does not fit the model's config: {'; '.join(problems)}")

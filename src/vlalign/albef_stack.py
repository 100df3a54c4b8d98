"""The ALBEF-style image / text / fusion encoder stack shared by TCL and CODIS: building blocks and the base model.

Everything is built from transformers' own blocks: the towers are `AutoModel.from_config` models and the fusion
layers are BERT attention / feed-forward modules (`BertAttention`, `BertIntermediate`, `BertOutput`) arranged as
bidirectional self-attention -> cross-attention to the image tokens -> feed-forward. (A decoder `BertLayer` would
have cross-attention too, but its self-attention is causal, which is wrong for ITM and MLM.)

This file is imported by the model files as `from .albef_stack import ...` so that `save_pretrained` copies it
next to them for `trust_remote_code` loading.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
# transformers internals (listed in vlalign/__init__.py): the fusion layers are BERT's own blocks, masked and
# checkpointed the way transformers' encoders are
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
)
from transformers.utils import ModelOutput

from .losses import (
    FeatureQueue,
    _loss_dtype,
    contrastive_cross_entropy,
    distillation_targets,
    info_nce,
    intra_modal_info_nce,
    mask_tokens_for_mlm,
    masked_lm_distillation_loss,
    positive_targets,
    sample_hard_negatives,
    similarity_logits,
)
from .processing_vlalign import MissingTokenizerFileError, check_tokenizer_files


def build_vision_encoder(vision_config: PreTrainedConfig) -> nn.Module:
    """Any transformers vision encoder whose `last_hidden_state` is [prefix tokens] + patch tokens."""
    try:
        # ViT-like models carry a pooler we never use; leaving it out keeps DDP free of unused parameters
        return AutoModel.from_config(vision_config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(vision_config)


def build_text_encoder(text_config: PreTrainedConfig, num_layers: int) -> nn.Module:
    """The first `num_layers` layers of a BERT-like encoder (the others become fusion layers)."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class FusionLayer(GradientCheckpointingLayer):
    """Bidirectional self-attention over text tokens, cross-attention to image tokens, feed-forward.

    Submodule names mirror `BertLayer` (`attention`, `crossattention`, `intermediate`, `output`) so that the
    upper layers of a pretrained BERT load into it key for key (the cross-attention starts new).
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states, _ = self.attention(hidden_states, attention_mask)
        hidden_states, _ = self.crossattention(
            hidden_states,
            None,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )
        return self.output(self.intermediate(hidden_states), hidden_states)


class FusionEncoder(nn.Module):
    """Stack of `FusionLayer`s. Image tokens wider or narrower than the text are linearly mapped to the text
    width first (ALBEF assumes equal widths; we allow any vision/text pair)."""

    def __init__(self, text_config: PreTrainedConfig, num_layers: int, image_hidden_size: int):
        super().__init__()
        self.config = text_config
        self.layer = nn.ModuleList([FusionLayer(text_config) for _ in range(num_layers)])
        self.image_proj = (
            nn.Identity()
            if image_hidden_size == text_config.hidden_size
            else nn.Linear(image_hidden_size, text_config.hidden_size)
        )

    def forward(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_states: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_states = self.image_proj(image_states)
        self_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=text_states, attention_mask=attention_mask
        )
        cross_mask = None
        if image_mask is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=text_states,
                attention_mask=image_mask,
                encoder_hidden_states=image_states,
            )
        hidden = text_states
        for layer in self.layer:
            hidden = layer(hidden, self_mask, image_states, cross_mask)
        return hidden


class MLMHead(nn.Module):
    """BERT's masked-LM head (transform + vocabulary decoder). Names match `BertForMaskedLM.cls.predictions`."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


# ------------------------------------------------------------------------------------------------------------
# EMA teachers (the feature queues live in losses.FeatureQueue)


def _peft_classes() -> tuple[type, type, type] | None:
    """PEFT's tuner-layer, LoRA-layer and training-wrapper classes, or None if PEFT was never imported (then no
    module of the model can hold PEFT layers)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, LoraLayer, AuxiliaryTrainingWrapper


def _effective_parameters(module: nn.Module, prefix: str, out: dict[str, torch.Tensor], seen: set[int],
                          classes: tuple[type, type, type]) -> None:
    """What a plain copy of `module` needs to compute what `module` computes, keyed by that copy's parameter names:
    LoRA layers contribute base weight + the deltas of their active adapters, a `modules_to_save` wrapper its active
    trained copy (PEFT's own forward rules, e.g. a disabled adapter counts as absent)."""
    tuner_layer, lora_layer, training_wrapper = classes
    if isinstance(module, training_wrapper):
        modules_to_save = getattr(module, "modules_to_save", None)
        if modules_to_save is None:
            raise NotImplementedError(f"EMA teachers do not support PEFT's {type(module).__name__} (at {prefix!r})")
        active = module.active_adapters
        use_copy = not module.disable_adapters and active and all(a in modules_to_save for a in active)
        _effective_parameters(modules_to_save[active[0]] if use_copy else module.original_module, prefix, out, seen,
                              classes)
        return
    if isinstance(module, tuner_layer):
        if not isinstance(module, lora_layer):
            raise NotImplementedError(f"EMA teachers support LoRA adapters only, not {type(module).__name__} "
                                      f"(at {prefix!r}): use LoRA or config.use_momentum=False")
        _effective_parameters(module.get_base_layer(), prefix, out, seen, classes)
        if module.disable_adapters:  # PEFT's forward unmerges, i.e. runs the weights without any adapter
            adapters, sign = list(module.merged_adapters), -1.0
        elif module.merged:  # the merged adapters are in the base weight already; PEFT runs it as it is
            adapters, sign = [], 1.0
        else:
            adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
            sign = 1.0
        for adapter in adapters:
            if adapter in module.lora_variant or module.lora_bias.get(adapter, False):
                raise NotImplementedError(f"EMA teachers support plain LoRA only (no DoRA or other variants, no "
                                          f"lora_bias), found in adapter {adapter!r} at {prefix!r}")
            out[prefix + "weight"] = out[prefix + "weight"] + sign * module.get_delta_weight(adapter)
        return
    for name, parameter in module.named_parameters(recurse=False):
        if id(parameter) not in seen:  # shared parameters once, as `named_parameters` lists them
            seen.add(id(parameter))
            out[prefix + name] = parameter
    for name, child in module.named_children():
        _effective_parameters(child, f"{prefix}{name}.", out, seen, classes)


def _ema_pairs(students: list[nn.Module], teachers: list[nn.Module], names: list[str] | None = None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher parameters, matching student tensors), paired by parameter name.

    A student adapted with PEFT (LoRA layers, `modules_to_save` copies) is read through its effective weights, so
    the teacher stays a plain module that tracks what the student computes. A teacher that PEFT adapted itself (its
    names matched `target_modules` / `modules_to_save` by suffix) is refused: its adapter copies would count as
    trainable, never get a gradient and be saved with the adapters.
    """
    classes = _peft_classes()
    names = names or [f"#{i}" for i in range(len(students))]
    teacher_params: list[torch.Tensor] = []
    student_tensors: list[torch.Tensor] = []
    for name, student, teacher in zip(names, students, teachers, strict=True):
        if classes is None:
            sources = dict(student.named_parameters())
        else:
            adapted = [n for n, m in teacher.named_modules() if isinstance(m, (classes[0], classes[2]))]
            if adapted:
                where = f"momentum_{name}" + (f".{adapted[0]}" if adapted[0] else "")
                raise ValueError(
                    f"PEFT adapted the EMA teacher module {where!r}. LoRA `target_modules` and `modules_to_save` "
                    f"given as a list of names match by suffix, so 'query' or '{name}' also select the teachers "
                    "`momentum_*`. Adapt the students only: `target_modules` as a regex, e.g. "
                    "r'(vision_model|text_model|fusion_model)\\..*\\.(query|value|q_proj|v_proj)', or a list plus "
                    "`exclude_modules=r'momentum_.*'`; `modules_to_save` only for modules without a teacher "
                    "(itm_head, codebook; LoRA on vision_proj / text_proj instead); or config.use_momentum=False. "
                    "The teachers then follow the students' effective (base + LoRA) weights."
                )
            sources = {}
            _effective_parameters(student, "", sources, set(), classes)
        targets = dict(teacher.named_parameters())
        if sources.keys() != targets.keys():
            raise RuntimeError(
                f"student {name!r} and its teacher have different parameters: "
                f"{sorted(sources.keys() ^ targets.keys())[:10]}"
            )
        for key, target in targets.items():
            if sources[key].shape != target.shape:
                raise RuntimeError(f"{name}.{key}: student shape {tuple(sources[key].shape)} != teacher shape "
                                   f"{tuple(target.shape)}")
            teacher_params.append(target)
            student_tensors.append(sources[key])
    return teacher_params, student_tensors


@torch.no_grad()
def copy_parameters(students: list[nn.Module], teachers: list[nn.Module], names: list[str] | None = None) -> None:
    """Make each teacher an exact copy of its student (of its effective weights under PEFT) and freeze it."""
    for p_t, p_s in zip(*_ema_pairs(students, teachers, names), strict=True):
        p_t.copy_(p_s)
        p_t.requires_grad_(False)


@torch.no_grad()
def ema_update(students: list[nn.Module], teachers: list[nn.Module], momentum: float,
               names: list[str] | None = None) -> None:
    """`teacher = momentum * teacher + (1 - momentum) * student`, for every parameter, paired by name.

    Under PEFT the student's effective weights are used (base + LoRA delta, the trained `modules_to_save` copy):
    the teachers stay plain modules that track the EMA of what the student computes."""
    teacher_params, student_tensors = _ema_pairs(students, teachers, names)
    if not teacher_params:
        return
    torch._foreach_mul_(teacher_params, momentum)
    students_detached = [p.detach().to(t.dtype) for p, t in zip(student_tensors, teacher_params, strict=True)]
    torch._foreach_add_(teacher_params, students_detached, alpha=1.0 - momentum)


def pool_patch_locals(patch_features: torch.Tensor, grid_size: int, pooled_grid: int) -> torch.Tensor:
    """Average-pool (B, grid*grid, D) patch features on their spatial grid to (B, pooled_grid**2, D)."""
    batch, num_patches, dim = patch_features.shape
    if num_patches != grid_size * grid_size:
        raise ValueError(f"expected {grid_size}x{grid_size} patch tokens, got {num_patches}")
    grid = patch_features.transpose(1, 2).reshape(batch, dim, grid_size, grid_size)
    kernel = grid_size // pooled_grid
    pooled = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
    return pooled.flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------
# The base model


class _RNGState:
    """CPU (and current CUDA device) RNG state, so a chunk can be re-run with the same dropout masks."""

    def __init__(self, cpu, cuda):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, device: torch.device) -> "_RNGState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


@dataclass
class ALBEFOutput(ModelOutput):
    """Output of the ALBEF-style models; each model's output class adds its own ``loss_<name>`` fields.

    Training (``return_loss=True``): ``loss`` (the total) and each component ``loss_<name>`` (None for disabled
    terms), plus ``temperature``. Inference: ``logits_per_image`` (images x texts) / ``logits_per_text``, scaled by
    1 / temperature, and the normalised ``image_embeds`` / ``text_embeds``.
    """

    loss: torch.FloatTensor | None = None
    loss_i2t: torch.FloatTensor | None = None
    loss_t2i: torch.FloatTensor | None = None
    loss_i2i: torch.FloatTensor | None = None
    loss_t2t: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_mlm: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None

    def loss_components(self) -> dict[str, float]:
        """The non-None loss components as floats, keyed by component name (for logging). One device-to-host copy
        for all of them (a `.item()` per component would stall a GPU step once per component)."""
        items = [(key[len("loss_"):], value) for key, value in self.items() if key.startswith("loss_") and value is not None]
        if not items:
            return {}
        values = torch.stack([value.detach().float().reshape(()) for _, value in items]).tolist()
        return {name: value for (name, _), value in zip(items, values)}


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
_OUR_FILE_ERRORS = (UnsafeCheckpointError, MissingCheckpointFileError, CorruptCheckpointError,
                    MissingTokenizerFileError)


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


def resolve_use_safetensors(path, allow_pickle: bool, use_safetensors: bool | None = None,
                            subfolder: str = "") -> bool | None:
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
        raise UnsafeCheckpointError(f"{str(path)!r} holds pickle weights only ({', '.join(pickles)}), no "
                                    f"safetensors file. {_WHY_SAFETENSORS}")
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
        return (f"{os.path.join(folder, index)} names weight shards that are not in the folder: "
                f"{', '.join(missing)} (of {len(shards)}). Was the save or download interrupted?")
    expected = f"{single} (or {index} with its shards)"
    if allow_pickle:
        pickles = (_with_variant(WEIGHTS_NAME, variant), _with_variant(WEIGHTS_INDEX_NAME, variant))
        if any(os.path.isfile(os.path.join(folder, name)) for name in pickles):
            return None
        expected += f", or {pickles[0]} (or {pickles[1]})"
    return (f"no weights file in {folder!r}: expected {expected}. The folder's config.json only describes the model; "
            f"were the weights deleted, or the save or download interrupted?")


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
            data_end = 8 + header_length + max(
                (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
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
        return [os.path.join(folder, name) for name in _index_shards(os.path.join(folder, index))
                if os.path.isfile(os.path.join(folder, name))]
    return []


def _unreadable_weights_message(path, subfolder: str, variant: str | None, error: Exception) -> str:
    damaged = [(file, reason) for file in _local_weight_files(path, subfolder, variant)
               if (reason := _safetensors_damage(file)) is not None]
    if not damaged:  # a Hub checkpoint (its files are in the cache), or a damage that only safetensors sees
        return (f"a safetensors weights file of {str(path)!r} is truncated or corrupt ({error}): was a download, "
                f"copy or save interrupted?")
    files = "; ".join(f"{file} ({reason})" for file, reason in damaged)
    return (f"truncated or corrupt weights file: {files}. Was a download, copy or save interrupted? Save or "
            f"download the checkpoint again.")


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
            raise UnsafeCheckpointError(f"found no safetensors weights for {str(path)!r} ({error}). "
                                        f"{_WHY_SAFETENSORS}") from error
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
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True,
                        allow_pickle: bool = False, **kwargs):
        folder = _local_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        if folder is not None:
            check_tokenizer_files(folder)
        wants_info = kwargs.pop("output_loading_info", False)
        shapes_may_differ = kwargs.get("ignore_mismatched_sizes", False)
        if strict:
            # report every shape mismatch with the other problems instead of transformers raising on its own
            kwargs["ignore_mismatched_sizes"] = True
        model, info = load_safely(super().from_pretrained, pretrained_model_name_or_path, *model_args,
                                  allow_pickle=allow_pickle, output_loading_info=True, **kwargs)
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


class ALBEFModel(KeepsTrainableFlagsOnLoad, PreTrainedModel):
    """Base of the ALBEF-style models: towers, projections, temperature, fusion encoder with ITM and MLM heads, EMA
    teachers and feature queues, the CLIP-like inference API, and a training step split into pieces that each model
    fills in with its own objectives (and that gradient caching re-uses):

      _student_pass     (per chunk, with grad)  -> features that carry gradient into the alignment losses
      _teacher_pass     (whole batch, no grad)  -> EMA update, teacher keys + queues, distillation targets
      _alignment_losses (student, teacher)      -> contrastive terms + the model's own (`_extra_alignment_losses`)
      _fusion_losses    (per chunk, with grad)  -> ITM and MLM on the token states

    Subclasses set `config_class`, `base_model_prefix` and `output_class`, build their extra modules after
    `super().__init__(config)` and then call `self._finish_init()`.
    """

    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["FusionLayer"]
    # Our losses are per-batch means: the Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False
    output_class = ALBEFOutput
    # parameter names (suffixes) the trainer keeps out of weight decay
    _no_weight_decay_parameters = ("temp",)
    # names of the student modules that have an EMA teacher `momentum_<name>` (fusion ones only with fusion layers)
    _momentum_modules = ("vision_model", "text_model", "vision_proj", "text_proj")
    _momentum_fusion_modules = ("fusion_model", "mlm_head")

    # Auto classes written into `auto_map` on save besides the one `register_for_auto_class` records, so that a
    # saved folder also works in `pipeline("zero-shot-image-classification", ..., trust_remote_code=True)`.
    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def __init__(self, config):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        self.vision_model = build_vision_encoder(vision_config)
        self.text_model = build_text_encoder(text_config, config.num_text_layers)
        self.vision_proj = nn.Linear(vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)), requires_grad=config.learnable_temperature)
        has_fusion = config.num_fusion_layers > 0
        if has_fusion:
            # fusion layers share the text encoder's config object, so attention-implementation changes reach both
            self.fusion_model = FusionEncoder(
                self.text_model.config, config.num_fusion_layers, vision_config.hidden_size
            )
            self.itm_head = nn.Linear(text_config.hidden_size, 2)
            self.mlm_head = MLMHead(text_config)
        if config.use_momentum:
            self.momentum_vision_model = build_vision_encoder(vision_config)
            self.momentum_text_model = build_text_encoder(text_config, config.num_text_layers)
            self.momentum_vision_proj = nn.Linear(vision_config.hidden_size, config.embed_dim)
            self.momentum_text_proj = nn.Linear(text_config.hidden_size, config.embed_dim)
            if has_fusion:
                self.momentum_fusion_model = FusionEncoder(
                    self.momentum_text_model.config, config.num_fusion_layers, vision_config.hidden_size
                )
                self.momentum_mlm_head = MLMHead(text_config)
        if config.uses_queue:
            self.image_queue = FeatureQueue(config.queue_size, config.embed_dim)
            self.text_queue = FeatureQueue(config.queue_size, config.embed_dim)

    def _finish_init(self) -> None:
        """Initialise the weights, then make every teacher an exact copy of its student."""
        self.post_init()
        self.copy_params_to_momentum()
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Teachers and a fixed temperature take no gradient."""
        self.temp.requires_grad_(self.config.learnable_temperature)
        if self.config.use_momentum:
            for teacher in self._momentum_pairs()[1]:
                teacher.requires_grad_(False)

    ENCODER_NAMES = ("vision_model", "text_model", "fusion_model",
                     "momentum_vision_model", "momentum_text_model", "momentum_fusion_model")

    def compile_encoders(self, **compile_kwargs) -> list[str]:
        """`torch.compile` the transformer towers (students and momentum teachers), in place: parameter names,
        checkpoints and the EMA pairing are unchanged. The losses, queues and EMA stay eager: they are cheap and hold
        data-dependent steps that would break a whole-model graph into many pieces. Returns the compiled names."""
        names = [name for name in self.ENCODER_NAMES if getattr(self, name, None) is not None]
        for name in names:
            getattr(self, name).compile(**compile_kwargs)
        return names

    def save_pretrained(self, save_directory, *args, **kwargs):
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in self._extra_auto_classes:
                auto_map[auto_class] = f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ALBEFModel):
            init.constant_(module.temp, self.config.temperature)
        elif isinstance(module, FeatureQueue):
            init.copy_(module.features, F.normalize(torch.randn_like(module.features), dim=1))
            init.constant_(module.ids, -1)
            init.zeros_(module.ptr)

    # ------------------------------------------------------------------------------------------------------
    def _momentum_names(self) -> list[str]:
        names = list(self._momentum_modules)
        if self.config.num_fusion_layers > 0:
            names += self._momentum_fusion_modules
        return names

    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        names = self._momentum_names()
        return [getattr(self, n) for n in names], [getattr(self, f"momentum_{n}") for n in names]

    def forward_updated_tensors(self) -> list[torch.Tensor]:
        """What a training forward changes besides the gradients: the EMA teachers (updated at its start), the
        queues and running statistics (buffers). A trainer that skips a step restores these (VLAlignTrainer)."""
        tensors = list(self.buffers())
        if self.config.use_momentum:
            tensors += [p for teacher in self._momentum_pairs()[1] for p in teacher.parameters()]
        return tensors

    def momentum_update(self) -> None:
        """EMA step of every teacher towards its student (towards its effective weights under PEFT / LoRA)."""
        ema_update(*self._momentum_pairs(), momentum=self.config.momentum, names=self._momentum_names())

    def copy_params_to_momentum(self) -> None:
        """Reset every teacher to an exact copy of its student (after loading student weights, or after loading
        LoRA adapters to resume training: the teachers then start from base + LoRA)."""
        if self.config.use_momentum:
            copy_parameters(*self._momentum_pairs(), names=self._momentum_names())

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    def _image_tokens(self, pixel_values: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        model = self.momentum_vision_model if momentum else self.vision_model
        pixel_values = pixel_values.to(self.vision_proj.weight.dtype)
        return model(pixel_values=pixel_values).last_hidden_state

    def _text_tokens(self, input_ids, attention_mask, momentum: bool = False) -> torch.Tensor:
        model = self.momentum_text_model if momentum else self.text_model
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _image_feature(self, image_tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_vision_proj if momentum else self.vision_proj
        return F.normalize(proj(image_tokens[:, 0]), dim=-1)

    def _text_feature(self, text_tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_text_proj if momentum else self.text_proj
        return F.normalize(proj(text_tokens[:, 0]), dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # Inference API (CLIP-like)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (batch, embed_dim)."""
        return self._image_feature(self._image_tokens(pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None
    ) -> torch.Tensor:
        """L2-normalised text embeddings (batch, embed_dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._text_feature(self._text_tokens(input_ids, attention_mask))

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's token states (batch, tokens, hidden), as the fusion encoder consumes them."""
        return self._image_tokens(pixel_values)

    def itm_score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability that text i matches image i (row-aligned pairs), from the fusion encoder's ITM head.

        Pass ``pixel_values`` or precomputed ``image_tokens`` (from `get_image_tokens`) to re-rank many
        candidates without re-encoding the images."""
        if self.config.num_fusion_layers == 0:
            raise ValueError("itm_score needs fusion layers (config.num_fusion_layers > 0)")
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("itm_score needs pixel_values or image_tokens")
            image_tokens = self._image_tokens(pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_tokens = self._text_tokens(input_ids, attention_mask)
        fused = self.fusion_model(text_tokens, attention_mask, image_tokens)
        return F.softmax(self.itm_head(fused[:, 0]).float(), dim=-1)[:, 1]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_view2: torch.FloatTensor | None = None,
        positive_ids: torch.LongTensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        alpha: float | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
    ) -> ALBEFOutput:
        r"""
        Args:
            input_ids, attention_mask: tokenised captions (batch, length).
            pixel_values: images, or the first augmented view when training (batch, 3, H, W).
            pixel_values_view2: the second augmented view (training; defaults to `pixel_values`).
            positive_ids: optional (batch,) ids; items with equal ids are positives of each other (several
                captions of one image, or class-level positives). Without them only pair i <-> i is positive.
            sample_ids: optional (batch,) dataset indices, for losses that keep per-sample statistics (TCL's
                decomposable loss with a running-average Z estimate).
            alpha: momentum-distillation weight for this step (the trainer's ramp); defaults to `config.alpha`.
            return_loss: compute the training losses (requires images and texts). Otherwise CLIP-style logits.
            token_type_ids: accepted for tokenizer/pipeline compatibility and ignored (single segments only).
        """
        if return_loss:
            if input_ids is None or pixel_values is None:
                raise ValueError("training (return_loss=True) needs both input_ids and pixel_values")
            return self._training_forward(
                input_ids, attention_mask, pixel_values, pixel_values_view2, positive_ids, sample_ids,
                self.config.alpha if alpha is None else float(alpha),
            )

        image_embeds = self.get_image_features(pixel_values) if pixel_values is not None else None
        text_embeds = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits_per_image = logits_per_text = None
        temperature = self.temperature
        if image_embeds is not None and text_embeds is not None:
            logits_per_text = similarity_logits(text_embeds, image_embeds, temperature)
            logits_per_image = logits_per_text.t()
        return self.output_class(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            temperature=temperature.detach(),
        )

    # ------------------------------------------------------------------------------------------------------
    # Training pieces. Subclasses extend `_needs`, `_extra_student_features`, `_extra_teacher_features`,
    # `_extra_alignment_losses` and define `_alignment_total`.

    def _needs(self) -> dict[str, bool]:
        cfg = self.config
        return {
            "view2": not cfg.use_momentum and cfg.imc_weight > 0,
            "fusion": cfg.itm_weight > 0 or cfg.mlm_weight > 0,
        }

    def _student_pass(self, batch: dict, keep_tokens: bool) -> dict[str, torch.Tensor]:
        """Student features of one (chunk of a) batch. Everything returned carries gradient."""
        out: dict[str, torch.Tensor] = {}
        tokens = {"image": self._image_tokens(batch["pixel_values"]),
                  "text": self._text_tokens(batch["input_ids"], batch["attention_mask"])}
        out["image_feat"] = self._image_feature(tokens["image"])
        out["text_feat"] = self._text_feature(tokens["text"])
        if self._needs()["view2"]:
            tokens["image2"] = self._image_tokens(batch["pixel_values_view2"])
            tokens["text2"] = self._text_tokens(batch["input_ids"], batch["attention_mask"])  # dropout view
            out["image_feat2"] = self._image_feature(tokens["image2"])
            out["text_feat2"] = self._text_feature(tokens["text2"])
        self._extra_student_features(out, tokens)
        if keep_tokens:
            out["image_tokens"] = tokens["image"]
            out["text_tokens"] = tokens["text"]
        return out

    def _extra_student_features(self, out: dict, tokens: dict) -> None:
        """Add model-specific student features to `out` from the token states (`image`, `text`, and with a second
        view `image2`, `text2`)."""

    @torch.no_grad()
    def _teacher_pass(self, batch: dict, positive_ids, temp, alpha, chunk_size: int | None = None) -> dict:
        """EMA update, then the teacher's features, keys and distillation targets (no gradient)."""
        cfg = self.config
        teacher: dict = {}
        if not cfg.use_momentum:
            return teacher
        self.momentum_update()
        size = batch["input_ids"].shape[0]
        chunk_size = chunk_size or size
        parts: dict[str, list] = {}
        for start in range(0, size, chunk_size):
            piece = {k: v[start : start + chunk_size] for k, v in batch.items()}
            tokens = {"image": self._image_tokens(piece["pixel_values_view2"], momentum=True),
                      "text": self._text_tokens(piece["input_ids"], piece["attention_mask"], momentum=True)}
            features = {"image_feat_m": self._image_feature(tokens["image"], momentum=True),
                        "text_feat_m": self._text_feature(tokens["text"], momentum=True)}
            self._extra_teacher_features(features, tokens)
            if cfg.mlm_weight > 0 and alpha > 0:
                features["image_tokens_m"] = tokens["image"]
            for name, value in features.items():
                parts.setdefault(name, []).append(value)
        teacher = {k: torch.cat(v) for k, v in parts.items()}
        image_keys = self.image_queue.keys(teacher["image_feat_m"])
        text_keys = self.text_queue.keys(teacher["text_feat_m"])
        key_ids = self.image_queue.key_ids(positive_ids)
        hard = positive_targets(positive_ids, key_ids, size, image_keys.shape[0], device=image_keys.device,
                                dtype=_loss_dtype(image_keys))
        teacher["image_keys"], teacher["text_keys"] = image_keys, text_keys
        # the positives of every query among batch + queue keys (both queues hold the same ids): the hard targets of
        # the cross-modal terms and the targets of the intra-modal ones (TCL's models/model_retrieval.py)
        teacher["positive_targets"] = hard
        teacher["i2t_targets"] = distillation_targets(
            similarity_logits(teacher["image_feat_m"], text_keys, temp), hard, alpha)
        teacher["t2i_targets"] = distillation_targets(
            similarity_logits(teacher["text_feat_m"], image_keys, temp), hard, alpha)
        return teacher

    def _extra_teacher_features(self, features: dict, tokens: dict) -> None:
        """Add model-specific teacher features of one chunk to `features` from the teacher's token states."""

    def _cross_modal_losses(self, student, teacher, positive_ids, sample_ids, temp) -> dict[str, torch.Tensor]:
        """i2t and t2i: against the teacher keys + queue with distillation targets, or in-batch InfoNCE."""
        if self.config.use_momentum:
            return {
                "i2t": contrastive_cross_entropy(student["image_feat"], teacher["text_keys"], temp,
                                                 teacher["i2t_targets"]),
                "t2i": contrastive_cross_entropy(student["text_feat"], teacher["image_keys"], temp,
                                                 teacher["t2i_targets"]),
            }
        _, i2t, t2i = info_nce(student["image_feat"], student["text_feat"], temp, positive_ids,
                               return_directions=True)
        return {"i2t": i2t, "t2i": t2i}

    def _intra_modal_losses(self, student, teacher, positive_ids, temp) -> dict[str, torch.Tensor]:
        """i2i and t2t: a student view against the teacher's other view + queue, or against its own second view.
        Keys with the query's positive id are positives here too (the same targets as the cross-modal terms'), so
        that an item is never pushed away from the items it is aligned with across modalities."""
        if self.config.use_momentum:
            targets = teacher["positive_targets"]
            return {"i2i": contrastive_cross_entropy(student["image_feat"], teacher["image_keys"], temp, targets),
                    "t2t": contrastive_cross_entropy(student["text_feat"], teacher["text_keys"], temp, targets)}
        return {"i2i": intra_modal_info_nce(student["image_feat"], student["image_feat2"], temp, positive_ids),
                "t2t": intra_modal_info_nce(student["text_feat"], student["text_feat2"], temp, positive_ids)}

    def _alignment_losses(self, student: dict, teacher: dict, batch: dict, positive_ids, sample_ids, temp):
        """Every loss that depends on the student only through the features of `_student_pass`."""
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if cfg.cma_weight > 0:
            losses.update(self._cross_modal_losses(student, teacher, positive_ids, sample_ids, temp))
        if cfg.imc_weight > 0:
            losses.update(self._intra_modal_losses(student, teacher, positive_ids, temp))
        losses.update(self._extra_alignment_losses(student, teacher, batch, positive_ids, sample_ids, temp))
        return losses

    def _extra_alignment_losses(self, student, teacher, batch, positive_ids, sample_ids, temp) -> dict:
        return {}

    def _alignment_total(self, losses: dict) -> torch.Tensor | None:
        raise NotImplementedError

    def _fusion_losses(self, student: dict, batch: dict, positive_ids, temp, alpha, teacher: dict):
        """ITM and MLM of the rows of `batch`; `teacher` holds the teacher's features of the same rows (empty
        without momentum)."""
        cfg = self.config
        losses = {}
        if cfg.itm_weight > 0:
            # hard negatives are drawn from the student features against the teacher features of the other
            # modality, as ALBEF / TCL do (their sim_i2t / sim_t2i of the contrastive loss); without momentum
            # there is no teacher, and the student features stand in for it
            image_keys = teacher.get("image_feat_m", student["image_feat"])
            text_keys = teacher.get("text_feat_m", student["text_feat"])
            losses["itm"] = self._itm_loss(student["image_tokens"], student["image_feat"], student["text_tokens"],
                                           student["text_feat"], batch["attention_mask"], positive_ids, temp,
                                           image_keys, text_keys)
        if cfg.mlm_weight > 0:
            losses["mlm"] = self._mlm_loss(batch["input_ids"], batch["attention_mask"], student["image_tokens"],
                                           teacher.get("image_tokens_m"), alpha)
        return losses

    def _fusion_total(self, losses: dict) -> torch.Tensor | None:
        parts = [w * losses[n] for n, w in (("itm", self.config.itm_weight), ("mlm", self.config.mlm_weight))
                 if n in losses]
        return sum(parts) if parts else None

    def _prepare_training(self, input_ids, attention_mask, pixel_values, pixel_values_view2):
        cfg = self.config
        if cfg.learnable_temperature:
            with torch.no_grad():
                self.temp.clamp_(cfg.temperature_min, cfg.temperature_max)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                 "pixel_values_view2": pixel_values if pixel_values_view2 is None else pixel_values_view2}
        return batch, self.temperature

    def _update_queues(self, student: dict, teacher: dict, positive_ids) -> None:
        if self.config.use_momentum:
            # every process enqueues the features of all processes, in rank order
            self.image_queue.enqueue(teacher["image_feat_m"], positive_ids)
            self.text_queue.enqueue(teacher["text_feat_m"], positive_ids)

    def _training_forward(self, input_ids, attention_mask, pixel_values, pixel_values_view2, positive_ids,
                          sample_ids, alpha):
        batch, temp = self._prepare_training(input_ids, attention_mask, pixel_values, pixel_values_view2)
        student = self._student_pass(batch, keep_tokens=self._needs()["fusion"])
        teacher = self._teacher_pass(batch, positive_ids, temp, alpha)
        losses = self._alignment_losses(student, teacher, batch, positive_ids, sample_ids, temp)
        total = self._alignment_total(losses)
        fusion = self._fusion_losses(student, batch, positive_ids, temp, alpha, teacher)
        losses.update(fusion)
        fusion_total = self._fusion_total(fusion)
        if fusion_total is not None:
            total = fusion_total if total is None else total + fusion_total
        self._update_queues(student, teacher, positive_ids)
        return self.output_class(loss=total, **{f"loss_{n}": v for n, v in losses.items()},
                                 image_embeds=student["image_feat"], text_embeds=student["text_feat"],
                                 temperature=temp.detach())

    def gradient_cached_backward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.FloatTensor,
        pixel_values_view2: torch.FloatTensor | None = None,
        positive_ids: torch.LongTensor | None = None,
        sample_ids: torch.LongTensor | None = None,
        alpha: float | None = None,
        chunk_size: int | None = None,
        loss_scale: float = 1.0,
        backward_fn=None,
    ) -> ALBEFOutput:
        """One training step's forward AND backward with gradient caching (GradCache, Gao et al. 2021).

        1. The batch is embedded chunk by chunk without gradient (RNG state recorded per chunk; the last chunk
           keeps its graph for step 3);
        2. the alignment losses (CMA / IMC / LMI / decomposable / regularisers) are computed on the cached
           features and back-propagated to them (and to the temperature);
        3. every chunk is embedded again with gradient under its recorded RNG state (same dropout), and the
           cached feature gradients are back-propagated through it.
        Peak activation memory is that of one chunk, and the parameter gradients equal those of the
        full-batch loss. ITM and MLM need the token states of a pair's image and text together: they are
        computed per chunk in step 3 (ITM hard negatives are mined within the chunk) and averaged over chunks,
        i.e. their gradients are those of chunk-sized batches.

        ``loss_scale`` multiplies the loss before backward (e.g. 1 / gradient accumulation steps);
        ``backward_fn(tensor)`` replaces ``tensor.backward()`` (e.g. ``accelerator.backward``). Returns the
        detached loss and components.
        """
        cfg = self.config
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"gradient_cached_backward: chunk_size must be a positive integer, got {chunk_size!r}")
        alpha = cfg.alpha if alpha is None else float(alpha)
        backward_fn = backward_fn or (lambda tensor: tensor.backward())
        batch, temp = self._prepare_training(input_ids, attention_mask, pixel_values, pixel_values_view2)
        size = input_ids.shape[0]
        chunks = [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]
        keep_tokens = self._needs()["fusion"]

        def piece(start, stop):
            return {k: v[start:stop] for k, v in batch.items()}

        # 1. cached student features, no graph kept -- except for the last chunk, whose graph is kept and reused
        #    in step 3 instead of being recomputed (saves one chunk's forward per step)
        rng_states, cached = [], []
        for index, (start, stop) in enumerate(chunks):
            rng_states.append(_RNGState.capture(input_ids.device))
            if index < len(chunks) - 1:
                with torch.no_grad():
                    cached.append(self._student_pass(piece(start, stop), keep_tokens=False))
            else:
                last_student = self._student_pass(piece(start, stop), keep_tokens=keep_tokens)
                cached.append({k: v for k, v in last_student.items() if k not in ("image_tokens", "text_tokens")})
        leaves = {k: torch.cat([c[k].detach() for c in cached]).requires_grad_(True) for k in cached[0]}
        teacher = self._teacher_pass(batch, positive_ids, temp, alpha, chunk_size=chunk_size)

        # 2. alignment losses on the cached features -> their gradients (and the temperature's)
        losses = self._alignment_losses(leaves, teacher, batch, positive_ids, sample_ids, temp)
        total = self._alignment_total(losses)
        if total is not None:
            backward_fn(total * loss_scale)
        detached = {k: v.detach() for k, v in losses.items()}
        total_value = total.detach() if total is not None else torch.zeros((), device=input_ids.device)

        # 3. re-embed each chunk with gradient and push the cached gradients through it
        fusion_sums: dict[str, torch.Tensor] = {}
        end_state = _RNGState.capture(input_ids.device)
        # the last chunk first: its graph from step 1 is then freed before any other chunk builds one
        order = [len(chunks) - 1, *range(len(chunks) - 1)]
        for index in order:
            (start, stop), state = chunks[index], rng_states[index]
            part = piece(start, stop)
            if index < len(chunks) - 1:
                state.restore()
                student = self._student_pass(part, keep_tokens=keep_tokens)
            else:
                student = last_student
            surrogate = sum((student[k] * leaves[k].grad[start:stop]).sum() for k in leaves
                            if leaves[k].grad is not None)
            if keep_tokens:
                ids = None if positive_ids is None else positive_ids[start:stop]
                rows = {k: teacher[k][start:stop] for k in ("image_tokens_m", "image_feat_m", "text_feat_m")
                        if k in teacher}
                fusion = self._fusion_losses(student, part, ids, temp, alpha, rows)
                weight = (stop - start) / size
                fusion_total = self._fusion_total(fusion)
                surrogate = surrogate + fusion_total * weight * loss_scale
                for name, value in fusion.items():
                    fusion_sums[name] = fusion_sums.get(name, 0.0) + value.detach() * weight
            if torch.is_tensor(surrogate) and surrogate.requires_grad:
                backward_fn(surrogate)
        end_state.restore()
        for name, value in fusion_sums.items():
            detached[name] = value
            weight = cfg.itm_weight if name == "itm" else cfg.mlm_weight
            total_value = total_value + weight * value
        self._update_queues(leaves, teacher, positive_ids)
        return self.output_class(loss=total_value, **{f"loss_{n}": v for n, v in detached.items()},
                         image_embeds=leaves["image_feat"].detach(),
                                 text_embeds=leaves["text_feat"].detach(), temperature=temp.detach())

    def _itm_loss(self, image_tokens, image_feat, text_tokens, text_feat, attention_mask, positive_ids, temp,
                  image_keys, text_keys):
        """ITM over positives and one hard negative per image and per text: a text's negative image is drawn
        from softmax(text_feat . image_keys / t), an image's negative text from softmax(image_feat . text_keys / t),
        positives (same id) excluded."""
        batch = image_feat.shape[0]
        with torch.no_grad():
            positive = torch.eye(batch, dtype=torch.bool, device=image_feat.device)
            if positive_ids is not None:
                positive |= positive_ids.view(-1, 1) == positive_ids.view(1, -1)
            if self.config.itm_hard_negatives:
                sim_t2i = similarity_logits(text_feat, image_keys, temp)
                sim_i2t = similarity_logits(image_feat, text_keys, temp)
            else:
                sim_t2i = sim_i2t = torch.zeros(batch, batch, device=image_feat.device)
            negative_image_for_text = sample_hard_negatives(sim_t2i, positive)
            negative_text_for_image = sample_hard_negatives(sim_i2t, positive)
        # one batched fusion pass over the 3B pairs: positives, (text, negative image), (negative text, image)
        text_all = torch.cat([text_tokens, text_tokens, text_tokens[negative_text_for_image]], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[negative_text_for_image]], dim=0)
        image_all = torch.cat([image_tokens, image_tokens[negative_image_for_text], image_tokens], dim=0)
        fused = self.fusion_model(text_all, mask_all, image_all)
        logits = self.itm_head(fused[:, 0]).float()
        labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        return F.cross_entropy(logits, labels)

    def _mlm_loss(self, input_ids, attention_mask, image_tokens, image_tokens_m, alpha):
        cfg = self.config
        masked_ids, labels = mask_tokens_for_mlm(
            input_ids, attention_mask, cfg.mask_token_id, cfg.text_config.vocab_size, cfg.mlm_probability
        )
        selected = labels != -100
        fused = self.fusion_model(self._text_tokens(masked_ids, attention_mask), attention_mask, image_tokens)
        logits = self.mlm_head(fused[selected])
        teacher_logits = None
        if cfg.use_momentum and alpha > 0:
            with torch.no_grad():
                fused_m = self.momentum_fusion_model(
                    self._text_tokens(masked_ids, attention_mask, momentum=True), attention_mask, image_tokens_m
                )
                teacher_logits = self.momentum_mlm_head(fused_m[selected])
        return masked_lm_distillation_loss(logits, labels[selected], teacher_logits, alpha)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str, *,
                                    allow_pickle: bool = False, **config_overrides) -> "ALBEFModel":
        """Build a model whose towers start from pretrained checkpoints.

        The vision encoder loads from ``vision_model_name_or_path``; the text checkpoint (a BERT-like encoder,
        ideally with its masked-LM head) is split: its first ``num_hidden_layers - num_fusion_layers`` layers
        become the text encoder, the remaining layers the self-attention/feed-forward of the fusion layers (their
        cross-attention starts new), and its MLM head (if present) the MLM head. Teachers start as copies.
        ``config_overrides`` are fields of the model's config (e.g. ``num_fusion_layers=6, queue_size=4096``).

        Only safetensors weights are read unless ``allow_pickle=True``. A checkpoint whose weights do not fit its
        own config (keys missing, unexpected or of another shape) raises `CheckpointMismatchError` instead of
        leaving random weights in a tower.
        """
        for path in (vision_model_name_or_path, text_model_name_or_path):
            resolve_use_safetensors(path, allow_pickle)  # refuse pickle-only folders before building the model
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path)
        vision_config = getattr(vision_config, "vision_config", vision_config)  # e.g. a full CLIP checkpoint
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        config = cls.config_class(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                           **config_overrides)
        model = cls(config)

        # load with our tower's own class: e.g. CLIPVisionModel takes the vision half of a full CLIP checkpoint
        vision = load_pretrained_part(type(model.vision_model), vision_model_name_or_path, "vision tower",
                                      allow_pickle)
        _load_matching(model.vision_model, vision.state_dict(), "vision tower")

        text = _load_text_checkpoint(text_model_name_or_path, allow_pickle)
        base = getattr(text, text.base_model_prefix, text)
        text_state = base.state_dict()
        n_text = config.num_text_layers
        encoder_state, fusion_state = {}, {}
        for key, value in text_state.items():
            if ".layer." in key:
                prefix, rest = key.split(".layer.", 1)
                index, tail = rest.split(".", 1)
                if int(index) < n_text:
                    encoder_state[key] = value
                else:
                    fusion_state[f"layer.{int(index) - n_text}.{tail}"] = value
            elif not key.startswith("pooler."):
                encoder_state[key] = value
        _load_matching(model.text_model, encoder_state, "text encoder")
        if config.num_fusion_layers > 0:
            _load_matching(model.fusion_model, fusion_state, "fusion encoder", allow_missing=("crossattention",
                                                                                                "image_proj"))
            head_state = {}
            for key, value in text.state_dict().items():
                for marker in ("predictions.transform.", "predictions.decoder."):
                    if marker in key:
                        head_state[marker.split(".", 1)[1] + key.split(marker, 1)[1]] = value
            if head_state:
                _load_matching(model.mlm_head, head_state, "MLM head")
        model.copy_params_to_momentum()
        return model


def _load_matching(module: nn.Module, state: dict, what: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, raising with the mismatched keys instead of silently keeping random weights."""
    own = module.state_dict()
    # poolers are deliberately not built (we use the [CLS] token states), so theirs are not a mismatch
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not any(marker in k for marker in allow_missing)
               and not k.endswith(("position_ids", "token_type_ids"))]
    if shape_mismatch or unexpected or missing:
        mismatched = [(k, state[k].shape, own[k].shape) for k in shape_mismatch]
        raise CheckpointMismatchError(f"pretrained weights do not match the {what}: "
                                      f"{describe_key_problems(missing, unexpected, mismatched)}")
    module.load_state_dict(state, strict=False)


def load_pretrained_part(loader, path: str, what: str, allow_pickle: bool = False):
    """`loader.from_pretrained(path)` for one part of a bigger model (a tower, the LM, the Q-Former): safetensors
    only unless `allow_pickle`, and `CheckpointMismatchError` when the checkpoint does not fit its own config."""
    part, info = _load_with_report(loader, path, allow_pickle)
    _check_part_loading(part, info, path, what)
    return part


def _load_with_report(loader, path: str, allow_pickle: bool):
    # shape mismatches go into the report (and our error) rather than raising one by one inside transformers
    return load_safely(loader.from_pretrained, path, allow_pickle=allow_pickle, output_loading_info=True,
                       ignore_mismatched_sizes=True)


def _check_part_loading(part: nn.Module, info: dict, path: str, what: str) -> None:
    """Raise on the loading report's problems that matter for a part. Unexpected keys outside the part's own
    top-level modules are the rest of a bigger checkpoint (the text half of CLIP) and are fine; poolers are never
    used."""
    own_modules = {key.split(".", 1)[0] for key in part.state_dict()}
    unexpected = [k for k in info["unexpected_keys"] if k.split(".", 1)[0] in own_modules]
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    problems = describe_key_problems(missing, unexpected, info["mismatched_keys"])
    if problems:
        raise CheckpointMismatchError(f"the {what} checkpoint {path!r} does not match its own config: {problems}")


def _load_text_checkpoint(path: str, allow_pickle: bool) -> nn.Module:
    """The text checkpoint with its masked-LM head when it has one, else the bare encoder (the MLM head then
    starts new instead of taking a randomly initialised head from transformers)."""
    try:
        text, info = _load_with_report(AutoModelForMaskedLM, path, allow_pickle)
    except _OUR_FILE_ERRORS:  # a missing or damaged file, not a model type without a masked-LM class
        raise
    except (ValueError, OSError):  # no masked-LM class for this model type
        return load_pretrained_part(AutoModel, path, "text encoder", allow_pickle)
    base_prefix = f"{text.base_model_prefix}."
    if any(not key.startswith(base_prefix) for key in info["missing_keys"]):  # an encoder saved without its head
        return load_pretrained_part(AutoModel, path, "text encoder", allow_pickle)
    _check_part_loading(text, info, path, "text encoder")
    return text

"""The ALBEF-style image / text / fusion encoder stack shared by TCL and CODIS: its layers and the base model.

Everything is built from transformers' own blocks: the towers are `AutoModel.from_config` models and the fusion
layers are BERT attention / feed-forward modules (`BertAttention`, `BertIntermediate`, `BertOutput`) arranged as
bidirectional self-attention -> cross-attention to the image tokens -> feed-forward. (A decoder `BertLayer` would
have cross-attention too, but its self-attention is causal, which is wrong for ITM and MLM.)

Its neighbours: loading.py builds the towers and loads weights, momentum.py holds the EMA teachers and the feature
queue, gradient_cache.py runs a training step in chunks over this model's training hooks, losses.py the loss terms.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
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

from .gradient_cache import gradient_cached_backward
from .loading import (
    CheckpointMismatchError,
    KeepsTrainableFlagsOnLoad,
    _load_matching,
    _load_text_checkpoint,
    check_tokenizer_special_tokens,
    describe_key_problems,
    load_pretrained_part,
    resolve_use_safetensors,
    saved_tokenizer,
)
from .losses import (
    _loss_dtype,
    contrastive_cross_entropy,
    distillation_targets,
    gather_across_processes,
    info_nce,
    intra_modal_info_nce,
    mask_tokens_for_mlm,
    masked_lm_distillation_loss,
    positive_targets,
    sample_hard_negatives,
    similarity_logits,
)
from .momentum import FeatureQueue, _peft_classes, copy_parameters, ema_update, share_frozen_parameters
from .towers import (
    TEXT_MODEL_TYPES,
    VISION_MODEL_TYPES,
    build_text_encoder,
    build_vision_encoder,
    encode_image,
    encode_text,
    vision_hidden_size,
    vision_prefix_tokens,
)


def _projection(width: int, config) -> nn.Module:
    """A tower's projection into the contrastive space (`config.projection`)."""
    if config.projection == "none":
        return nn.Identity()
    return nn.Linear(width, config.embed_dim, bias=config.projection == "linear")


def sum_of_terms(terms: list[torch.Tensor]) -> torch.Tensor | None:
    """`terms[0] + terms[1] + ...`, or None when there is none (a model's `_loss_total` of a subset of its terms)."""
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


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
# Locked towers (LiT)

# Where the tower families keep their blocks (transformer layers; the stages of Swin and ConvNeXt), from the tower's
# root. transformers releases move them (ViT's `encoder.layer` became `layers`, CLIP's `vision_model.` wrapper went),
# so the first of these that the tower has is its block list.
TOWER_BLOCK_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "encoder.stages",
    "transformer.layer",
    "layers",
    "vision_model.encoder.layers",
    "text_model.encoder.layers",
)
# What a tower applies after its blocks (final norms, poolers, SigLIP's heads), by top-level name under the tower's
# root (below CLIP's and SigLIP's `vision_model.` / `text_model.` where it has one): trainable with the unlocked
# blocks. What is neither a block nor one of these (embeddings, CLIP's pre-norm, ELECTRA's embedding projection,
# BEiT's shared relative position bias) comes before the blocks and stays frozen.
AFTER_BLOCKS = ("layernorm", "post_layernorm", "final_layer_norm", "final_norm", "pooler", "head")


def tower_blocks(tower: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of a tower's blocks (see `TOWER_BLOCK_PATHS`)."""
    model_type = tower.config.model_type
    if model_type not in VISION_MODEL_TYPES + TEXT_MODEL_TYPES:
        raise ValueError(f"locking a {model_type!r} tower is not supported")
    for path in TOWER_BLOCK_PATHS:
        try:
            blocks = tower.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ValueError(
        f"the {model_type!r} tower ({type(tower).__name__}) has none of the block lists {TOWER_BLOCK_PATHS}"
    )


def _after_blocks(name: str, blocks_path: str) -> bool:
    """Whether a tower's parameter `name` (not in a block) belongs to what runs after the blocks."""
    root = blocks_path.split(".")[0] + "." if blocks_path.startswith(("vision_model.", "text_model.")) else ""
    return name.startswith(root) and name[len(root) :].split(".")[0] in AFTER_BLOCKS


def _frozen_module_names(module: nn.Module, prefix: str) -> list[str]:
    """The largest submodules of `module` that have parameters and none of them trainable (they run in eval mode)."""
    parameters = list(module.parameters())
    if not parameters:
        return []
    if not any(p.requires_grad for p in parameters):
        return [prefix]
    names = []
    for child_name, child in module.named_children():
        names += _frozen_module_names(child, f"{prefix}.{child_name}")
    return names


# ------------------------------------------------------------------------------------------------------------
# The base model


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
        items = [
            (key[len("loss_") :], value) for key, value in self.items() if key.startswith("loss_") and value is not None
        ]
        if not items:
            return {}
        values = torch.stack([value.detach().float().reshape(()) for _, value in items]).tolist()
        return {name: value for (name, _), value in zip(items, values)}


class ALBEFModel(KeepsTrainableFlagsOnLoad, PreTrainedModel):
    """Base of the ALBEF-style models: towers, projections, temperature, fusion encoder with ITM and MLM heads, EMA
    teachers and feature queues, the CLIP-like inference API, and a training step split into pieces that each model
    fills in with its own objectives (and that gradient caching re-uses):

      _student_pass     (per chunk, with grad)  -> features that carry gradient into the alignment losses
      _teacher_pass     (whole batch, no grad)  -> EMA update, teacher keys + queues, distillation targets
      _alignment_losses (student, teacher)      -> contrastive terms + the model's own (`_extra_alignment_losses`)
      _fusion_losses    (per chunk, with grad)  -> ITM and MLM on the token states
      _loss_total       (any subset of terms)   -> the model's total loss, stated in one place per model

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
    # parameter names (suffixes) the trainer keeps out of weight decay (the sigmoid loss's bias starts at -10: decay
    # would pull it toward 0)
    _no_weight_decay_parameters = ("temp", "logit_bias")
    # names of the student modules that have an EMA teacher `momentum_<name>` (fusion ones only with fusion layers)
    _momentum_modules = ("vision_model", "text_model", "vision_proj", "text_proj")
    _momentum_fusion_modules = ("fusion_model", "mlm_head")

    # Auto classes written into `auto_map` on save besides the one `register_for_auto_class` records, so that a
    # saved folder also works in `pipeline("zero-shot-image-classification", ..., trust_remote_code=True)`.
    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def __init__(self, config):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        vision_width = vision_hidden_size(vision_config)
        # patch dropout in the student only: the EMA teachers see every patch
        self.vision_model = build_vision_encoder(vision_config, config.vision_pooling, config.patch_dropout)
        self.text_model = build_text_encoder(text_config, config.num_text_layers, config.text_pooling)
        self.vision_proj = _projection(vision_width, config)
        self.text_proj = _projection(text_config.hidden_size, config)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)), requires_grad=config.learnable_temperature)
        has_fusion = config.num_fusion_layers > 0
        if has_fusion:
            # fusion layers share the text encoder's config object, so attention-implementation changes reach both
            self.fusion_model = FusionEncoder(self.text_model.config, config.num_fusion_layers, vision_width)
            self.itm_head = nn.Linear(text_config.hidden_size, 2)
            self.mlm_head = MLMHead(text_config)
        if config.use_momentum:
            self.momentum_vision_model = build_vision_encoder(vision_config, config.vision_pooling)
            self.momentum_text_model = build_text_encoder(text_config, config.num_text_layers, config.text_pooling)
            self.momentum_vision_proj = _projection(vision_width, config)
            self.momentum_text_proj = _projection(text_config.hidden_size, config)
            if has_fusion:
                self.momentum_fusion_model = FusionEncoder(
                    self.momentum_text_model.config, config.num_fusion_layers, vision_width
                )
                self.momentum_mlm_head = MLMHead(text_config)
        if getattr(config, "learns_logit_bias", False):
            # the sigmoid loss's learnable bias; named and shaped as SiglipModel's, which it is exported to
            self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init)))
        elif config.dual_encoder_source == "siglip":
            # SigLIP's sigmoid bias, kept to be written back on export (the softmax losses do not use it)
            self.register_buffer("logit_bias", torch.zeros(1))
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

    ENCODER_NAMES = (
        "vision_model",
        "text_model",
        "fusion_model",
        "momentum_vision_model",
        "momentum_text_model",
        "momentum_fusion_model",
    )

    def compile_encoders(self, **compile_kwargs) -> list[str]:
        """`torch.compile` the transformer towers (students and momentum teachers), in place: parameter names,
        checkpoints and the EMA pairing are unchanged. The losses, queues and EMA stay eager: they are cheap and hold
        data-dependent steps that would break a whole-model graph into many pieces. Returns the compiled names."""
        names = [name for name in self.ENCODER_NAMES if getattr(self, name, None) is not None]
        for name in names:
            getattr(self, name).compile(**compile_kwargs)
        return names

    def save_pretrained(self, save_directory, *args, as_source_architecture: bool = False, **kwargs):
        """transformers' `save_pretrained`; with `as_source_architecture=True`, a model built by
        `from_dual_encoder_pretrained` is written as its source class instead (`to_dual_encoder`), loadable with
        plain transformers, with a README.md that lists the parts left out."""
        if as_source_architecture:
            exported = self.to_dual_encoder()
            result = exported.save_pretrained(save_directory, *args, **kwargs)
            readme = os.path.join(save_directory, "README.md")
            if not os.path.exists(readme):
                with open(readme, "w", encoding="utf-8") as handle:
                    handle.write(self._export_note(type(exported).__name__))
            return result
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in self._extra_auto_classes:
                auto_map[auto_class] = f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        if self._shares_locked_tensors():
            kwargs["state_dict"] = self._state_dict_for_saving(kwargs.get("state_dict"))
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _shares_locked_tensors(self) -> bool:
        return self.config.use_momentum and bool(getattr(self, "_locked_eval_modules", None))

    def _state_dict_for_saving(self, state_dict: dict | None) -> dict:
        """The state dict with a copy (on the CPU) of each teacher tensor that is its locked student's: safetensors
        holds no aliases and transformers refuses shared tensors it does not know as tied, but the file keeps every
        key, so that it loads strictly into a model that does not lock (or locks otherwise)."""
        state_dict = dict(self.state_dict() if state_dict is None else state_dict)
        students = {
            id(p) for name in self._momentum_names() for p in getattr(self, name).parameters() if not p.requires_grad
        }
        for name in self._momentum_names():
            for key, parameter in getattr(self, f"momentum_{name}").named_parameters(remove_duplicate=False):
                full_key = f"momentum_{name}.{key}"
                if id(parameter) in students and full_key in state_dict:
                    state_dict[full_key] = state_dict[full_key].detach().to("cpu", copy=True)
        return state_dict

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ALBEFModel):
            init.constant_(module.temp, self.config.temperature)
            if isinstance(getattr(module, "logit_bias", None), nn.Parameter):
                init.constant_(module.logit_bias, self.config.logit_bias_init)
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
            students, teachers = self._momentum_pairs()
            # a teacher's share of a locked student's tensors is not updated
            shared = {id(p) for student in students for p in student.parameters()}
            tensors += [p for teacher in teachers for p in teacher.parameters() if id(p) not in shared]
        return tensors

    def momentum_update(self) -> None:
        """EMA step of every teacher towards its student (towards its effective weights under PEFT / LoRA)."""
        ema_update(*self._momentum_pairs(), momentum=self.config.momentum, names=self._momentum_names())

    def copy_params_to_momentum(self) -> None:
        """Reset every teacher to an exact copy of its student (after loading student weights, or after loading
        LoRA adapters to resume training: the teachers then start from base + LoRA)."""
        if self.config.use_momentum:
            copy_parameters(*self._momentum_pairs(), names=self._momentum_names())

    # ------------------------------------------------------------------------------------------------------
    # Locked towers (LiT: Zhai et al. 2022; open_clip's lock_image_tower / lock_text_tower)

    def lock_image_tower(self, unlocked_layers: int = 0, unlocked_projection: bool = False) -> None:
        """Freeze the vision tower (`vision_model`) and its projection (`vision_proj`), except its last
        `unlocked_layers` blocks (transformer layers; Swin's and ConvNeXt's stages) with what follows them (the
        final norm, pooler or attention-pooling head) and, when any block is unlocked or `unlocked_projection=True`,
        the projection. `unlocked_layers=0, unlocked_projection=True`: the tower gives fixed features and only the
        projection learns. See `_lock_tower` for eval mode and the EMA teachers. A run-time setting: nothing goes
        into the config; each call sets every flag of the tower anew."""
        self._lock_tower("vision_model", "vision_proj", unlocked_layers, unlocked_projection)

    def lock_text_tower(self, unlocked_layers: int = 0, unlocked_projection: bool = False) -> None:
        """`lock_image_tower` for the text encoder (`text_model`, `text_proj`). With fusion layers the text tower is
        the lower `num_text_layers` layers of the text model only: the fusion encoder (`fusion_model`, the upper
        layers) and the ITM / MLM heads stay trainable."""
        self._lock_tower("text_model", "text_proj", unlocked_layers, unlocked_projection)

    def _lock_tower(self, tower_name: str, projection_name: str, unlocked_layers, unlocked_projection) -> None:
        """Set the tower's trainable flags; then its frozen modules run in eval mode (no dropout: a locked tower
        gives fixed features, as in LiT) and, with EMA teachers, the teacher's frozen parameters are the student's
        own tensors (`momentum.share_frozen_parameters`: not held twice, skipped by the EMA update)."""
        tower, projection = getattr(self, tower_name), getattr(self, projection_name)
        classes = _peft_classes()
        if classes is not None and any(
            isinstance(m, (classes[0], classes[2])) for part in (tower, projection) for m in part.modules()
        ):
            raise ValueError(f"lock {tower_name} before adapting the model with PEFT, not after")
        blocks_path, blocks = tower_blocks(tower)
        if isinstance(unlocked_layers, bool) or not isinstance(unlocked_layers, int):
            raise ValueError(f"unlocked_layers of {tower_name} must be an integer, got {unlocked_layers!r}")
        if not 0 <= unlocked_layers <= len(blocks):
            raise ValueError(
                f"unlocked_layers = {unlocked_layers}: {tower_name} has {len(blocks)} blocks ({blocks_path}), "
                f"so it must be in [0, {len(blocks)}]"
            )
        first_unlocked = len(blocks) - unlocked_layers
        for name, parameter in tower.named_parameters():
            if name.startswith(blocks_path + "."):
                trainable = int(name[len(blocks_path) + 1 :].split(".")[0]) >= first_unlocked
            else:
                trainable = unlocked_layers > 0 and _after_blocks(name, blocks_path)
            parameter.requires_grad_(trainable)
        projection.requires_grad_(unlocked_layers > 0 or unlocked_projection)
        frozen = _frozen_module_names(tower, tower_name) + _frozen_module_names(projection, projection_name)
        if self.config.use_momentum:
            for student_name in (tower_name, projection_name):
                share_frozen_parameters(getattr(self, student_name), getattr(self, f"momentum_{student_name}"))
            frozen += [f"momentum_{name}" for name in frozen]
        eval_modules = dict(getattr(self, "_locked_eval_modules", {}))
        eval_modules[tower_name] = frozen
        self._locked_eval_modules = eval_modules
        self.train(self.training)

    def train(self, mode: bool = True):
        # the frozen modules of a locked tower (and of its teacher) keep eval-mode behaviour: no dropout
        super().train(mode)
        for names in getattr(self, "_locked_eval_modules", {}).values():
            for name in names:
                self.get_submodule(name).train(False)
        patch_dropout = getattr(self.vision_model, "patch_dropout", None)
        if patch_dropout is not None:  # FLIP on a locked (eval-mode) tower too: it follows the model's mode
            patch_dropout.active = mode
        return self

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    def _encode_image(self, pixel_values: torch.Tensor, momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled feature) of the vision tower (see `towers.encode_image`); in training mode the
        student's tokens are those patch dropout kept."""
        model = self.momentum_vision_model if momentum else self.vision_model
        pixel_values = pixel_values.to(self.temp.dtype)
        prefix = vision_prefix_tokens(self.config.vision_config)
        return encode_image(model, pixel_values, self.config.vision_pooling, prefix)

    def _encode_text(self, input_ids, attention_mask, momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled feature) of the text tower (see `towers.encode_text`)."""
        model = self.momentum_text_model if momentum else self.text_model
        return encode_text(model, input_ids, attention_mask, self.config.text_pooling)

    def _image_feature(self, pooled: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_vision_proj if momentum else self.vision_proj
        return F.normalize(proj(pooled), dim=-1)

    def _text_feature(self, pooled: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_text_proj if momentum else self.text_proj
        return F.normalize(proj(pooled), dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # Inference API (CLIP-like)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (batch, embed_dim)."""
        return self._image_feature(self._encode_image(pixel_values)[1])

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None
    ) -> torch.Tensor:
        """L2-normalised text embeddings (batch, embed_dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._text_feature(self._encode_text(input_ids, attention_mask)[1])

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's token states (batch, tokens, hidden), as the fusion encoder consumes them."""
        return self._encode_image(pixel_values)[0]

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
            image_tokens = self._encode_image(pixel_values)[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_tokens = self._encode_text(input_ids, attention_mask)[0]
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
            return_dict: False returns the output as a tuple of its non-None fields (transformers' convention).
        """
        if return_dict is None:
            return_dict = self.config.return_dict
        if return_loss:
            if input_ids is None or pixel_values is None:
                raise ValueError("training (return_loss=True) needs both input_ids and pixel_values")
            output = self._training_forward(
                input_ids,
                attention_mask,
                pixel_values,
                pixel_values_view2,
                positive_ids,
                sample_ids,
                self.config.alpha if alpha is None else float(alpha),
            )
            return output if return_dict else output.to_tuple()

        image_embeds = self.get_image_features(pixel_values) if pixel_values is not None else None
        text_embeds = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits_per_image = logits_per_text = None
        temperature = self.temperature
        if image_embeds is not None and text_embeds is not None:
            logits_per_text = similarity_logits(text_embeds, image_embeds, temperature)
            logits_per_image = logits_per_text.t()
        output = self.output_class(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            temperature=temperature.detach(),
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------------------------
    # Training pieces. Subclasses extend `_needs`, `_extra_student_features`, `_extra_teacher_features`,
    # `_extra_alignment_losses` and define `_loss_total`.

    @property
    def training_views(self) -> int:
        """Augmented views of each image a training step uses: 2 when the EMA teachers encode the second view or
        the students encode it (IMC without teachers, TCL's regularisers), else 1 (e.g. plain CLIP / ITC)."""
        return 2 if self.config.use_momentum or self._needs()["view2"] else 1

    def _needs(self) -> dict[str, bool]:
        cfg = self.config
        return {
            "view2": not cfg.use_momentum and cfg.imc_weight > 0,
            "fusion": cfg.itm_weight > 0 or cfg.mlm_weight > 0,
        }

    def _student_pass(self, batch: dict, keep_tokens: bool) -> dict[str, torch.Tensor]:
        """Student features of one (chunk of a) batch. Everything returned carries gradient."""
        out: dict[str, torch.Tensor] = {}
        tokens, pooled = {}, {}
        tokens["image"], pooled["image"] = self._encode_image(batch["pixel_values"])
        tokens["text"], pooled["text"] = self._encode_text(batch["input_ids"], batch["attention_mask"])
        out["image_feat"] = self._image_feature(pooled["image"])
        out["text_feat"] = self._text_feature(pooled["text"])
        if self._needs()["view2"]:
            tokens["image2"], pooled["image2"] = self._encode_image(batch["pixel_values_view2"])
            # the dropout view
            tokens["text2"], pooled["text2"] = self._encode_text(batch["input_ids"], batch["attention_mask"])
            out["image_feat2"] = self._image_feature(pooled["image2"])
            out["text_feat2"] = self._text_feature(pooled["text2"])
        self._extra_student_features(out, tokens, pooled)
        if keep_tokens:
            out["image_tokens"] = tokens["image"]
            out["text_tokens"] = tokens["text"]
        return out

    def _extra_student_features(self, out: dict, tokens: dict, pooled: dict) -> None:
        """Add model-specific student features to `out` from the token states and pooled features (keys `image`,
        `text`, and with a second view `image2`, `text2`)."""

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
            tokens, pooled = {}, {}
            tokens["image"], pooled["image"] = self._encode_image(piece["pixel_values_view2"], momentum=True)
            tokens["text"], pooled["text"] = self._encode_text(
                piece["input_ids"], piece["attention_mask"], momentum=True
            )
            features = {
                "image_feat_m": self._image_feature(pooled["image"], momentum=True),
                "text_feat_m": self._text_feature(pooled["text"], momentum=True),
            }
            self._extra_teacher_features(features, tokens)
            if cfg.mlm_weight > 0 and alpha > 0:
                features["image_tokens_m"] = tokens["image"]
            for name, value in features.items():
                parts.setdefault(name, []).append(value)
        teacher = {k: torch.cat(v) for k, v in parts.items()}
        image_keys = self.image_queue.keys(teacher["image_feat_m"])
        text_keys = self.text_queue.keys(teacher["text_feat_m"])
        key_ids = self.image_queue.key_ids(positive_ids)
        hard = positive_targets(
            positive_ids, key_ids, size, image_keys.shape[0], device=image_keys.device, dtype=_loss_dtype(image_keys)
        )
        teacher["image_keys"], teacher["text_keys"] = image_keys, text_keys
        # the positives of every query among batch + queue keys (both queues hold the same ids): the hard targets of
        # the cross-modal terms and the targets of the intra-modal ones (TCL's models/model_retrieval.py)
        teacher["positive_targets"] = hard
        teacher["i2t_targets"] = distillation_targets(
            similarity_logits(teacher["image_feat_m"], text_keys, temp), hard, alpha
        )
        teacher["t2i_targets"] = distillation_targets(
            similarity_logits(teacher["text_feat_m"], image_keys, temp), hard, alpha
        )
        return teacher

    def _extra_teacher_features(self, features: dict, tokens: dict) -> None:
        """Add model-specific teacher features of one chunk to `features` from the teacher's token states."""

    def _cross_modal_losses(self, student, teacher, positive_ids, sample_ids, temp) -> dict[str, torch.Tensor]:
        """i2t and t2i: against the teacher keys + queue with distillation targets, or in-batch InfoNCE."""
        if self.config.use_momentum:
            return {
                "i2t": contrastive_cross_entropy(
                    student["image_feat"], teacher["text_keys"], temp, teacher["i2t_targets"]
                ),
                "t2i": contrastive_cross_entropy(
                    student["text_feat"], teacher["image_keys"], temp, teacher["t2i_targets"]
                ),
            }
        _, i2t, t2i = info_nce(
            student["image_feat"],
            student["text_feat"],
            temp,
            positive_ids,
            return_directions=True,
            gather=gather_across_processes(),
        )
        return {"i2t": i2t, "t2i": t2i}

    def _intra_modal_losses(self, student, teacher, positive_ids, temp) -> dict[str, torch.Tensor]:
        """i2i and t2t: a student view against the teacher's other view + queue, or against its own second view.
        Keys with the query's positive id are positives here too (the same targets as the cross-modal terms'), so
        that an item is never pushed away from the items it is aligned with across modalities."""
        if self.config.use_momentum:
            targets = teacher["positive_targets"]
            return {
                "i2i": contrastive_cross_entropy(student["image_feat"], teacher["image_keys"], temp, targets),
                "t2t": contrastive_cross_entropy(student["text_feat"], teacher["text_keys"], temp, targets),
            }
        gather = gather_across_processes()
        return {
            "i2i": intra_modal_info_nce(student["image_feat"], student["image_feat2"], temp, positive_ids, gather),
            "t2t": intra_modal_info_nce(student["text_feat"], student["text_feat2"], temp, positive_ids, gather),
        }

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

    def _loss_total(self, losses: dict) -> torch.Tensor | None:
        """The model's training loss from its components `losses` (name -> value), or None when none is given.

        Each model states its whole total here. Any subset of the components must give its own share of the total
        (gradient caching adds the alignment part and each chunk's ITM / MLM part separately), so ITM and MLM enter
        as weighted terms added to the rest."""
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
            losses["itm"] = self._itm_loss(
                student["image_tokens"],
                student["image_feat"],
                student["text_tokens"],
                student["text_feat"],
                batch["attention_mask"],
                positive_ids,
                temp,
                image_keys,
                text_keys,
            )
        if cfg.mlm_weight > 0:
            losses["mlm"] = self._mlm_loss(
                batch["input_ids"],
                batch["attention_mask"],
                student["image_tokens"],
                teacher.get("image_tokens_m"),
                alpha,
            )
        return losses

    def _prepare_training(self, input_ids, attention_mask, pixel_values, pixel_values_view2):
        cfg = self.config
        if cfg.learnable_temperature:
            with torch.no_grad():
                self.temp.clamp_(cfg.temperature_min, cfg.temperature_max)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "pixel_values_view2": pixel_values if pixel_values_view2 is None else pixel_values_view2,
        }
        return batch, self.temperature

    def _update_queues(self, student: dict, teacher: dict, positive_ids) -> None:
        if self.config.use_momentum:
            # every process enqueues the features of all processes, in rank order
            gather = gather_across_processes()
            self.image_queue.enqueue(teacher["image_feat_m"], positive_ids, gather)
            self.text_queue.enqueue(teacher["text_feat_m"], positive_ids, gather)

    def _training_forward(
        self, input_ids, attention_mask, pixel_values, pixel_values_view2, positive_ids, sample_ids, alpha
    ):
        batch, temp = self._prepare_training(input_ids, attention_mask, pixel_values, pixel_values_view2)
        student = self._student_pass(batch, keep_tokens=self._needs()["fusion"])
        teacher = self._teacher_pass(batch, positive_ids, temp, alpha)
        losses = self._alignment_losses(student, teacher, batch, positive_ids, sample_ids, temp)
        losses.update(self._fusion_losses(student, batch, positive_ids, temp, alpha, teacher))
        total = self._loss_total(losses)
        self._update_queues(student, teacher, positive_ids)
        return self.output_class(
            loss=total,
            **{f"loss_{n}": v for n, v in losses.items()},
            image_embeds=student["image_feat"],
            text_embeds=student["text_feat"],
            temperature=temp.detach(),
        )

    def gradient_cached_backward(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        pixel_values_view2=None,
        positive_ids=None,
        sample_ids=None,
        alpha=None,
        chunk_size: int | None = None,
        loss_scale: float = 1.0,
        backward_fn=None,
    ) -> ALBEFOutput:
        """One training step's forward and backward in chunks of `chunk_size` rows, with the full-batch gradients:
        see `gradient_cache.gradient_cached_backward`."""
        return gradient_cached_backward(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            pixel_values_view2,
            positive_ids,
            sample_ids,
            alpha,
            chunk_size,
            loss_scale,
            backward_fn,
        )

    def _itm_loss(
        self,
        image_tokens,
        image_feat,
        text_tokens,
        text_feat,
        attention_mask,
        positive_ids,
        temp,
        image_keys,
        text_keys,
    ):
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
        fused = self.fusion_model(self._encode_text(masked_ids, attention_mask)[0], attention_mask, image_tokens)
        logits = self.mlm_head(fused[selected])
        teacher_logits = None
        if cfg.use_momentum and alpha > 0:
            with torch.no_grad():
                fused_m = self.momentum_fusion_model(
                    self._encode_text(masked_ids, attention_mask, momentum=True)[0], attention_mask, image_tokens_m
                )
                teacher_logits = self.momentum_mlm_head(fused_m[selected])
        return masked_lm_distillation_loss(logits, labels[selected], teacher_logits, alpha)

    # ------------------------------------------------------------------------------------------------------
    # transformers dual encoders in and out

    # the transformers dual encoders taken in, and their towers (`vision_model`, `text_model`: our towers' classes)
    _DUAL_ENCODER_TYPES = ("clip", "siglip", "vision-text-dual-encoder")
    _DUAL_ENCODER_PROJECTIONS = (("vision_proj", "visual_projection"), ("text_proj", "text_projection"))
    # structure a dual encoder fixes (the rest of the config is the caller's)
    _DUAL_ENCODER_FIELDS = ("num_fusion_layers", "vision_pooling", "text_pooling", "projection", "embed_dim")

    @classmethod
    def from_dual_encoder_pretrained(
        cls, pretrained_model_name_or_path: str, *, allow_pickle: bool = False, **config_overrides
    ) -> ALBEFModel:
        """Build the dual-encoder configuration (no fusion layers, no ITM / MLM) from a whole transformers dual
        encoder: a `CLIPModel`, `SiglipModel` or `VisionTextDualEncoderModel` checkpoint. Its towers, projections
        (SigLIP has none: its pooling heads end in the shared space) and temperature (1 / exp(logit_scale)) are
        taken over and it pools as the source pools (CLIP's post-layer-normed [CLS] and end-of-text token, SigLIP's
        attention-pooling head and last text position, the towers' poolers of a VisionTextDualEncoderModel), so
        before any training step the image and text embeddings are the source model's. SigLIP's sigmoid bias
        (`logit_bias`) is written back on export: kept as it is by the softmax objectives, trained from the
        checkpoint's value by ``contrastive_loss="sigmoid"``.
        ``config_overrides`` set the objectives (e.g. ``imc_weight=1.0, lmi_weight=1.0, use_momentum=False``); the
        clamp range of the temperature is widened to the checkpoint's unless given.
        `save_pretrained(..., as_source_architecture=True)` writes the fine-tuned model back as the source class.

        Only safetensors weights are read unless ``allow_pickle=True``; weights that do not fit the checkpoint's
        config raise `CheckpointMismatchError`."""
        resolve_use_safetensors(pretrained_model_name_or_path, allow_pickle)
        source_config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        source_type = source_config.model_type
        if source_type not in cls._DUAL_ENCODER_TYPES:
            raise ValueError(
                f"from_dual_encoder_pretrained takes a CLIPModel, SiglipModel or VisionTextDualEncoderModel "
                f"checkpoint; {pretrained_model_name_or_path!r} is a {source_type!r} model"
                + (
                    " (SigLIP2's NaFlex vision tower is not supported; a SigLIP2 checkpoint saved as 'siglip' is)"
                    if source_type == "siglip2"
                    else ""
                )
            )
        fixed = [key for key in cls._DUAL_ENCODER_FIELDS + ("dual_encoder_source",) if key in config_overrides]
        if fixed:
            raise ValueError(f"from_dual_encoder_pretrained takes {fixed} from the checkpoint: do not pass them")
        source = load_pretrained_part(AutoModel, pretrained_model_name_or_path, "dual encoder", allow_pickle)
        siglip = source_type == "siglip"
        settings = dict(
            num_fusion_layers=0,
            itm_weight=0.0,
            mlm_weight=0.0,
            embed_dim=source_config.vision_config.hidden_size if siglip else source_config.projection_dim,
            temperature=float(torch.exp(-source.logit_scale.detach().float())),
            vision_pooling="pooler",
            text_pooling="pooler",
            projection="none" if siglip else "linear_no_bias",
            dual_encoder_source=source_type,
        )
        settings.update(config_overrides)
        # the checkpoint's temperature is where training starts: the clamp range is widened to it unless set
        defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        for bound, widen in (("temperature_min", min), ("temperature_max", max)):
            settings.setdefault(bound, widen(defaults[bound], settings["temperature"]))
        config = cls.config_class(
            vision_config=source_config.vision_config.to_dict(),
            text_config=source_config.text_config.to_dict(),
            **settings,
        )
        model = cls(config)
        for tower in ("vision_model", "text_model"):
            _load_matching(getattr(model, tower), getattr(source, tower).state_dict(), f"{source_type} {tower}")
        with torch.no_grad():
            if siglip:
                model.logit_bias.copy_(source.logit_bias.reshape(1))
            else:
                for ours, theirs in cls._DUAL_ENCODER_PROJECTIONS:
                    getattr(model, ours).weight.copy_(getattr(source, theirs).weight)
        model.copy_params_to_momentum()
        return model

    def to_dual_encoder(self) -> PreTrainedModel:
        """The model as the transformers dual encoder it was built from (`config.dual_encoder_source`): towers,
        projections and logit_scale = log(1 / temperature). Parts that class has no place for (EMA teachers,
        queues, a CODIS codebook, separation heads) are left out."""
        from transformers import (
            CLIPConfig,
            CLIPModel,
            SiglipConfig,
            SiglipModel,
            VisionTextDualEncoderConfig,
            VisionTextDualEncoderModel,
        )

        cfg = self.config
        if cfg.dual_encoder_source is None:
            raise ValueError(
                "as_source_architecture / to_dual_encoder need a model built by from_dual_encoder_pretrained "
                "(config.dual_encoder_source is None)"
            )
        vision, text = cfg.vision_config.to_dict(), cfg.text_config.to_dict()
        if cfg.dual_encoder_source == "clip":
            target = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=cfg.embed_dim))
        elif cfg.dual_encoder_source == "siglip":
            target = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
        else:
            target = VisionTextDualEncoderModel(
                VisionTextDualEncoderConfig(vision_config=vision, text_config=text, projection_dim=cfg.embed_dim)
            )
        target = target.to(self.temp.dtype)
        state = {}
        for tower in ("vision_model", "text_model"):
            state.update({f"{tower}.{k}": v for k, v in getattr(self, tower).state_dict().items()})
        if cfg.dual_encoder_source == "siglip":
            state["logit_bias"] = self.logit_bias.reshape(target.logit_bias.shape)
        else:
            for ours, theirs in self._DUAL_ENCODER_PROJECTIONS:
                state[f"{theirs}.weight"] = getattr(self, ours).weight
        state["logit_scale"] = -torch.log(self.temperature.detach()).reshape(target.logit_scale.shape)
        missing, unexpected = target.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"export to {type(target).__name__}: {describe_key_problems(missing, unexpected)}"
            )
        return target.eval()

    def _export_note(self, class_name: str) -> str:
        kept = {"vision_model", "text_model", "vision_proj", "text_proj"}
        dropped = sorted(name for name, _ in self.named_children() if name not in kept)
        return (
            f"---\nlibrary_name: transformers\n---\n\n# {class_name} exported from a vlalign "
            f"{self.config.model_type.upper()} model\n\nThis folder is a plain transformers `{class_name}` "
            f"(`{class_name}.from_pretrained`): the towers, the projections and the temperature (as logit_scale) of "
            f"a {self.config.model_type.upper()} model fine-tuned with vlalign. Left out, because `{class_name}` has "
            f"no place for them: {', '.join(f'`{name}`' for name in dropped) or 'nothing'}.\n"
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        *,
        allow_pickle: bool = False,
        **config_overrides,
    ) -> ALBEFModel:
        """Build a model whose towers start from pretrained checkpoints.

        The vision encoder loads from ``vision_model_name_or_path`` (with its pooler when ``vision_pooling`` is
        ``pooler``); the text checkpoint (a BERT-architecture encoder when there are fusion layers, ideally with its
        masked-LM head) is split: its first ``num_hidden_layers - num_fusion_layers`` layers become the text
        encoder, the remaining layers the self-attention/feed-forward of the fusion layers (their cross-attention
        starts new), and its MLM head (if present) the MLM head. Teachers start as copies. ``config_overrides`` are
        fields of the model's config (e.g. ``num_fusion_layers=6, queue_size=4096``).

        A tokenizer saved with the text checkpoint sets ``mask_token_id``; a config that disagrees with it (the
        mask, padding or end-of-text id) raises `ValueError` (see `loading.check_tokenizer_special_tokens`).

        Only safetensors weights are read unless ``allow_pickle=True``. A checkpoint whose weights do not fit its
        own config (keys missing, unexpected or of another shape) raises `CheckpointMismatchError` instead of
        leaving random weights in a tower.
        """
        for path in (vision_model_name_or_path, text_model_name_or_path):
            resolve_use_safetensors(path, allow_pickle)  # refuse pickle-only folders before building the model
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path)
        vision_config = getattr(vision_config, "vision_config", vision_config)  # e.g. a full CLIP checkpoint
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        tokenizer = saved_tokenizer(text_model_name_or_path)
        if tokenizer is not None and tokenizer.mask_token_id is not None:
            config_overrides.setdefault("mask_token_id", tokenizer.mask_token_id)
        config = cls.config_class(
            vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **config_overrides
        )
        if tokenizer is not None:
            check_tokenizer_special_tokens(tokenizer, config)
        model = cls(config)

        # load with our tower's own class: e.g. CLIPVisionModel takes the vision half of a full CLIP checkpoint
        vision = load_pretrained_part(
            type(model.vision_model),
            vision_model_name_or_path,
            "vision tower",
            allow_pickle,
            uses_pooler=config.vision_pooling == "pooler",
        )
        _load_matching(model.vision_model, vision.state_dict(), "vision tower")

        text = _load_text_checkpoint(
            text_model_name_or_path,
            allow_pickle,
            uses_pooler=config.text_pooling == "pooler",
            encoder_class=type(model.text_model),
        )
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
            else:  # embeddings, final norms, the pooler (dropped by `_load_matching` when not built)
                encoder_state[key] = value
        _load_matching(model.text_model, encoder_state, "text encoder")
        if config.num_fusion_layers > 0:
            _load_matching(
                model.fusion_model, fusion_state, "fusion encoder", allow_missing=("crossattention", "image_proj")
            )
            head_state = {}
            for key, value in text.state_dict().items():
                for marker in ("predictions.transform.", "predictions.decoder."):
                    if marker in key:
                        head_state[marker.split(".", 1)[1] + key.split(marker, 1)[1]] = value
            if head_state:
                _load_matching(model.mlm_head, head_state, "MLM head")
        model.copy_params_to_momentum()
        return model


__all__ = ["ALBEFModel", "ALBEFOutput", "FusionEncoder", "FusionLayer", "MLMHead"]

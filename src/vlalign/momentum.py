"""The momentum side of the ALBEF-style models: EMA teachers and the feature queue.

- `ema_update` / `copy_parameters`: teacher parameters follow their students, paired by name. A student adapted
  with PEFT (LoRA, `modules_to_save`) is read through its effective weights, so the teachers stay plain modules.
- `share_frozen_parameters`: the teacher of a frozen (locked) student parameter would equal it forever, so it is
  the student's own tensor instead of a copy; the EMA skips such pairs.
- `FeatureQueue`: the memory bank of MoCo / ALBEF / TCL / CODIS. A stateful module: its buffers change in place on
  every `enqueue`, and with `gather=True` it takes the features of every process.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .losses import all_gather_no_grad


def _peft_classes() -> tuple[type, type, type] | None:
    """PEFT's tuner-layer, LoRA-layer and training-wrapper classes, or None if PEFT was never imported (then no
    module of the model can hold PEFT layers)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, LoraLayer, AuxiliaryTrainingWrapper


def _effective_parameters(
    module: nn.Module, prefix: str, out: dict[str, torch.Tensor], seen: set[int], classes: tuple[type, type, type]
) -> None:
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
        _effective_parameters(
            modules_to_save[active[0]] if use_copy else module.original_module, prefix, out, seen, classes
        )
        return
    if isinstance(module, tuner_layer):
        if not isinstance(module, lora_layer):
            raise NotImplementedError(
                f"EMA teachers support LoRA adapters only, not {type(module).__name__} "
                f"(at {prefix!r}): use LoRA or config.use_momentum=False"
            )
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
                raise NotImplementedError(
                    f"EMA teachers support plain LoRA only (no DoRA or other variants, no "
                    f"lora_bias), found in adapter {adapter!r} at {prefix!r}"
                )
            out[prefix + "weight"] = out[prefix + "weight"] + sign * module.get_delta_weight(adapter)
        return
    for name, parameter in module.named_parameters(recurse=False):
        if id(parameter) not in seen:  # shared parameters once, as `named_parameters` lists them
            seen.add(id(parameter))
            out[prefix + name] = parameter
    for name, child in module.named_children():
        _effective_parameters(child, f"{prefix}{name}.", out, seen, classes)


def _ema_pairs(
    students: list[nn.Module], teachers: list[nn.Module], names: list[str] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher parameters, matching student tensors), paired by parameter name. A teacher parameter that is its
    student's own (frozen) tensor is left out: it has nothing to follow.

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
        shared = {id(p) for p in student.parameters()}
        if sources.keys() != targets.keys():
            raise RuntimeError(
                f"student {name!r} and its teacher have different parameters: "
                f"{sorted(sources.keys() ^ targets.keys())[:10]}"
            )
        for key, target in targets.items():
            if target is sources[key]:  # a frozen student tensor the teacher shares (`share_frozen_parameters`)
                continue
            if id(target) in shared:
                raise RuntimeError(
                    f"momentum_{name}.{key} is the student's frozen (locked) tensor, but the student now computes "
                    "with another weight there (a PEFT adapter on a locked layer): adapt only unlocked layers, or "
                    "lock the towers after removing the adapters"
                )
            if sources[key].shape != target.shape:
                raise RuntimeError(
                    f"{name}.{key}: student shape {tuple(sources[key].shape)} != teacher shape {tuple(target.shape)}"
                )
            teacher_params.append(target)
            student_tensors.append(sources[key])
    return teacher_params, student_tensors


@torch.no_grad()
def share_frozen_parameters(student: nn.Module, teacher: nn.Module) -> None:
    """Make each teacher parameter whose student parameter is frozen that very tensor, and give each one whose
    student is trainable again a copy of its own: an EMA teacher of a frozen parameter would equal it forever, so
    a locked tower is held once. `state_dict` still lists both names (`ALBEFModel.save_pretrained` writes both)."""
    for name, parameter in student.named_parameters(remove_duplicate=False):
        owner_name, _, attribute = name.rpartition(".")
        owner = teacher.get_submodule(owner_name)
        current = owner._parameters[attribute]
        if current.shape != parameter.shape:
            raise RuntimeError(
                f"{name}: student shape {tuple(parameter.shape)} != teacher shape {tuple(current.shape)}"
            )
        if not parameter.requires_grad:
            if current is not parameter:
                setattr(owner, attribute, parameter)
        elif current is parameter:
            setattr(owner, attribute, nn.Parameter(parameter.detach().clone(), requires_grad=False))


@torch.no_grad()
def copy_parameters(students: list[nn.Module], teachers: list[nn.Module], names: list[str] | None = None) -> None:
    """Make each teacher an exact copy of its student (of its effective weights under PEFT) and freeze it."""
    for p_t, p_s in zip(*_ema_pairs(students, teachers, names), strict=True):
        p_t.copy_(p_s)
        p_t.requires_grad_(False)


@torch.no_grad()
def ema_update(
    students: list[nn.Module], teachers: list[nn.Module], momentum: float, names: list[str] | None = None
) -> None:
    """`teacher = momentum * teacher + (1 - momentum) * student`, for every parameter, paired by name.

    Under PEFT the student's effective weights are used (base + LoRA delta, the trained `modules_to_save` copy):
    the teachers stay plain modules that track the EMA of what the student computes."""
    teacher_params, student_tensors = _ema_pairs(students, teachers, names)
    if not teacher_params:
        return
    torch._foreach_mul_(teacher_params, momentum)
    students_detached = [p.detach().to(t.dtype) for p, t in zip(student_tensors, teacher_params, strict=True)]
    torch._foreach_add_(teacher_params, students_detached, alpha=1.0 - momentum)


class FeatureQueue(torch.nn.Module):
    """A ring buffer of past (teacher) features and their ids: the memory bank of MoCo / ALBEF / TCL / CODIS. A
    stateful module: every `enqueue` changes its buffers in place.

    `keys(batch_features)` gives ``[batch_features; queue]`` (the in-batch keys first, so key i is query i's
    positive), `ids(batch_ids)` the matching ids, and `enqueue(features, ids, gather)` writes the features (with
    `gather=True` those of all processes, in rank order) over the oldest entries, wrapping around, so that every
    process holds the same queue. Buffers are persistent: they are saved with the model (exact resume).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"FeatureQueue needs a positive size and dim, got size={size}, dim={dim}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def keys(self, batch_features: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch_features, self.features.clone().detach().to(batch_features.dtype)], dim=0)

    def key_ids(self, batch_ids: torch.Tensor | None) -> torch.Tensor | None:
        return None if batch_ids is None else torch.cat([batch_ids, self.ids.clone()])

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor | None = None, gather: bool = False) -> None:
        """Write `features` (and their `ids`) over the oldest entries; with `gather=True` those of every process,
        in rank order, so that all processes keep the same queue."""
        if gather:
            features = all_gather_no_grad(features)
            ids = None if ids is None else all_gather_no_grad(ids)
        if ids is None:
            ids = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        count = min(features.shape[0], self.size)
        # all on-device (no host sync per step). A batch with a non-finite feature (a bad step the trainer skips)
        # leaves the queue and its pointer unchanged instead of poisoning the next `size` steps' negatives.
        features = features[-count:].to(self.features.dtype)
        finite = torch.isfinite(features).all()
        index = (self.ptr + torch.arange(count, device=self.features.device)) % self.size
        self.features[index] = torch.where(finite, features, self.features[index])
        self.ids[index] = torch.where(finite, ids[-count:].to(self.ids.dtype), self.ids[index])
        self.ptr.copy_((self.ptr + count * finite.long()) % self.size)

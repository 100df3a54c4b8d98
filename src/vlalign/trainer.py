"""`ContrastiveTrainer`: transformers' Trainer for vlalign's contrastive models.

What it adds to `transformers.Trainer`:
- the momentum-distillation ramp: alpha grows linearly from 0 to `config.alpha` over `alpha_ramp_steps`
  optimizer steps (default: one epoch), and is passed to the model every step;
- per-component loss logging (i2t, t2i, i2i, t2t, lmi_image, lmi_text, itm, mlm), temperature and alpha, and the
  number of training items skipped by the collator (unreadable images, empty captions);
- training throughput: `throughput_samples_per_second`, the samples of all processes trained on since the previous
  training log divided by the wall time since then (with `report_to=["tensorboard"]`: `train/...` scalars);
- correct gradient-accumulation scaling for per-batch-mean losses (`loss_is_scaled_for_ga = False`: the
  Trainer divides by the accumulation steps, see HF5.md);
- no weight decay on the temperature;
- `evaluate()` computes retrieval recall@k both ways and zero-shot accuracy (`vlalign.evaluation.evaluate_model`).

The run-time settings live in `ContrastiveTrainingArguments` (`VLAlignTrainingArguments` for every model), never in
the model config, so that they are saved with a run's checkpoints and not pushed with the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState, TrainingArguments

# transformers internals (listed in vlalign/__init__.py)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_NAME

from .data import ResumableCollator
from .evaluation import alignment_not_started, evaluate_model
from .output_folder import (
    STAGING_PREFIX,
    explain_write_error,
    latest_complete_checkpoint,
    publish_folder,
    staging_folder,
)

logger = logging.getLogger("vlalign.trainer")


def _positive_int(name: str, value, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an integer >= {minimum}, got {value!r}")


@dataclass
class VLAlignTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the run-time settings of `VLAlignTrainer` (every vlalign model): they belong to a
    run, so they are saved with its checkpoints and training_args.json, never into the model's config.json."""

    stop_on_nonfinite: bool = field(
        default=False,
        metadata={
            "help": "Stop at the first optimizer step with a non-finite loss or gradient (default: skip and count it)."
        },
    )
    max_consecutive_nonfinite_steps: int = field(
        default=20,
        metadata={"help": "Stop when this many optimizer steps in a row were non-finite (the run is diverging)."},
    )
    resume_with_changed_arguments: bool = field(
        default=False,
        metadata={
            "help": "Allow resuming a checkpoint with other training settings or data; the card lists each change."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _positive_int("max_consecutive_nonfinite_steps", self.max_consecutive_nonfinite_steps)


@dataclass
class ContrastiveTrainingArguments(VLAlignTrainingArguments):
    """`VLAlignTrainingArguments` plus the run-time settings of `ContrastiveTrainer` (TCL, CODIS)."""

    alpha_ramp_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps over which the distillation weight ramps from 0 to config.alpha (None: one epoch; "
            "0: no ramp)."
        },
    )
    itm_rerank_k: int = field(
        default=0,
        metadata={"help": "Re-rank the top-k retrieval candidates with the ITM head during evaluation (0: off)."},
    )
    gradient_cache_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Gradient caching: embed each batch in chunks of this size (memory of one chunk, gradients of the "
            "whole batch; None: off)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _positive_int("alpha_ramp_steps", self.alpha_ramp_steps, allow_none=True, minimum=0)
        _positive_int("itm_rerank_k", self.itm_rerank_k, minimum=0)
        _positive_int("gradient_cache_chunk_size", self.gradient_cache_chunk_size, allow_none=True)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped on non-finite losses, gradients or parameters (see `VLAlignTrainer`)."""


class TrainingInterruptedError(RuntimeError):
    """Training stopped early on SIGTERM; `checkpoint` is where it was saved."""

    def __init__(self, message: str, signal_number: int, checkpoint: str | None):
        super().__init__(message)
        self.signal_number, self.checkpoint = signal_number, checkpoint


class ResumeArgumentsError(ValueError):
    """A run resumed with training arguments or data other than those its checkpoint was trained with."""


class _TrainerGuard(TrainerCallback):
    """Runs the trainer's checks at their place in the step: before the optimizer step (non-finite losses or
    gradients), after it (non-finite parameters) and at the end of a step (a stop requested by SIGTERM)."""

    def __init__(self, trainer: VLAlignTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_parameters_finite()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._stop_requested:
            control.should_save = True
            control.should_training_stop = True


def _batch_rows(inputs) -> int:
    """Rows of a micro-batch: the leading size of its first batched tensor (input ids or pixels first)."""
    for value in (inputs.get("input_ids"), inputs.get("pixel_values"), *inputs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _json_value(value):
    value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _load_checkpoint_weights(model: PreTrainedModel, checkpoint_dir: str) -> None:
    """Load a checkpoint's model.safetensors into `model`, every key, or raise listing the mismatches.

    transformers' Trainer resumes with `load_state_dict(..., strict=False)` on the file as saved; but
    `save_pretrained` writes some towers under their original checkpoint names (transformers 5 converts e.g. ViT's
    `encoder.layer.N.attention.attention.query` <-> `layers.N.attention.q_proj` on save/load), so those weights were
    silently not restored (a warning, then training on from the step-0 initialisation). `from_pretrained` applies
    the conversion; its tensors are then copied in strictly."""
    loaded = type(model).from_pretrained(checkpoint_dir, config=model.config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not match the model: missing {result.missing_keys[:20]}, "
            f"unexpected {result.unexpected_keys[:20]}"
        )


class VLAlignTrainer(Trainer):
    """`transformers.Trainer` plus what long runs on preemptible machines and messy data need (every vlalign model;
    `ContrastiveTrainer` builds on it):

    - Non-finite guard: an optimizer step whose loss (any micro-batch) or gradients are not finite is skipped (its
      gradients are dropped, so the optimizer changes nothing), counted (`nonfinite_steps_skipped`, in the training
      logs) and warned about, naming the loss components that were not finite (or the first parameters with
      non-finite gradients). What the step's forwards changed besides gradients (EMA teachers, queues, running
      statistics: the model's `forward_updated_tensors`) is put back as it was, so a skipped step changes nothing.
      `stop_on_nonfinite=True` raises `NonFiniteTrainingError` at the first such step instead;
      `max_consecutive_nonfinite_steps` in a row always raise (a run that keeps diverging is stopped, not silently
      frozen). An optimizer step that leaves a parameter non-finite (an overflowing learning rate) always raises.
      Non-finite training arguments (`learning_rate=inf`) are refused at construction. Under DDP every process takes
      the same decision (the flags are summed over processes).
    - Exact resume: each checkpoint also holds `vlalign_trainer_state.json` (per process): the micro-batches
      trained, the items trained, the summed loss, the skip counters, the collator's state as of the last batch
      trained on (its data-issue counts, and its batch index, from which caption choice and augmentation are drawn,
      so that a resumed run collates the same batches as an uninterrupted one) and the arguments that shape the
      run (`resume_arguments`). Resuming with other arguments raises `ResumeArgumentsError` naming each change,
      unless `resume_with_changed_arguments=True` (the changes are then kept in `resume_changes`). A checkpoint that
      already reached the run's last step is a no-op (`train` loads it and returns).
      Weights incl. EMA teachers, queues and their pointers, temperature and running statistics are model
      buffers/parameters (model.safetensors); optimizer, scheduler, RNG states, the step (hence the alpha ramp)
      and the data order are restored by transformers.
    - Checkpoints appear only complete: each is written into a hidden staging folder and renamed into place; a
      full disk is reported as such (`output_folder.DiskFullError`).
    - SIGTERM (a preempted machine) during `train` saves a checkpoint at the end of the current step and raises
      `TrainingInterruptedError`, so that no caller mistakes the stopped run for a finished one.
    """

    RESUME_STATE_NAME = "vlalign_trainer_state.json"
    # TrainingArguments fields a resumed run must share with its checkpoint (plus the caller's `resume_fingerprint`)
    RESUME_ARGUMENTS = (
        "per_device_train_batch_size",
        "world_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "lr_scheduler_type",
        "warmup_steps",
        "max_grad_norm",
        "optim",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "seed",
        "data_seed",
    )
    # a run whose batches come out empty (no usable row) this many times in a row is stopped: its data are broken
    MAX_CONSECUTIVE_EMPTY_BATCHES = 20

    def __init__(self, *args, resume_fingerprint: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        _check_finite_arguments(self.args, self.model)
        self.resume_fingerprint = dict(resume_fingerprint or {})
        self.resume_changes: dict[str, dict] = {}
        self.nonfinite_steps_skipped = 0
        self.micro_batches_trained = 0
        self.items_trained = 0  # rows of the micro-batches trained on (empty batches count none)
        self.loss_sum = 0.0  # finite micro-batch losses (each already divided by the accumulation steps)
        self.received_signal: int | None = None
        self._stop_requested = False
        self._consecutive_nonfinite = 0
        self._consecutive_empty = 0
        self._step_nonfinite: list[str] = []  # what was not finite in the micro-batches of the current step
        self._step_snapshot: list[torch.Tensor] | None = None  # forward-updated tensors as the step found them
        self.add_callback(_TrainerGuard(self))

    def _setting(self, name: str):
        """A run-time setting of `VLAlignTrainingArguments` / `ContrastiveTrainingArguments`, or its default when
        the trainer was given plain `TrainingArguments`."""
        if hasattr(self.args, name):
            return getattr(self.args, name)
        return ContrastiveTrainingArguments.__dataclass_fields__[name].default

    @property
    def stop_on_nonfinite(self) -> bool:
        return bool(self._setting("stop_on_nonfinite"))

    @property
    def max_consecutive_nonfinite_steps(self) -> int:
        return self._setting("max_consecutive_nonfinite_steps")

    @property
    def resume_with_changed_arguments(self) -> bool:
        return bool(self._setting("resume_with_changed_arguments"))

    @property
    def run_train_loss(self) -> float:
        """The mean training loss per optimizer step over the whole run, resumed parts included (transformers'
        `train_loss` covers only the steps of the latest `train()` call)."""
        return self.loss_sum / max(self.state.global_step, 1)

    # ---- one micro-batch --------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self._begin_micro_batch(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._after_micro_batch(loss)
        return loss

    def _begin_micro_batch(self, inputs) -> None:
        """Count the batch's rows; before the first micro-batch of a step, keep what the forwards will change."""
        if inputs.get("empty_batch", False):
            self._consecutive_empty += 1
            if self._consecutive_empty >= self.MAX_CONSECUTIVE_EMPTY_BATCHES:
                raise RuntimeError(
                    f"{self._consecutive_empty} training batches in a row had no usable row (every image unreadable "
                    "or every caption empty; see the 'Skipped' warnings): check image_column, caption_column and "
                    "the data files"
                )
        else:
            self._consecutive_empty = 0
            self.items_trained += _batch_rows(inputs)
        if self._step_snapshot is None and not self.stop_on_nonfinite:
            unwrapped = self.accelerator.unwrap_model(self.model)
            base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            tensors = (
                base.forward_updated_tensors() if hasattr(base, "forward_updated_tensors") else list(base.buffers())
            )
            self._step_snapshot = [t.detach().clone() for t in tensors]
            self._snapshot_targets = tensors

    def _note_nonfinite(self, names) -> None:
        self._step_nonfinite.extend(n for n in names if n not in self._step_nonfinite)

    def _after_micro_batch(self, loss: torch.Tensor) -> None:
        self.micro_batches_trained += 1
        # one host sync, as transformers' own logging_nan_inf_filter does every step
        value = loss.detach()
        if bool(torch.isfinite(value).all()):
            self.loss_sum += float(value)
        elif not self._step_nonfinite:
            self._note_nonfinite(["loss"])

    # ---- non-finite guard -------------------------------------------------------------------------------------
    def _nonfinite_gradients(self) -> list[str]:
        return [
            name
            for name, p in self.model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]

    def _guard_optimizer_step(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flags = torch.tensor(
            [1.0 if self._step_nonfinite else 0.0, 1.0 if self.received_signal else 0.0], device=self.args.device
        )
        if grads:  # one fused pass over the gradients, one host sync
            total = torch.stack([n.float().to(flags.device) for n in torch._foreach_norm(grads)]).sum()
            flags[0] = torch.where(torch.isfinite(total), flags[0], torch.ones_like(flags[0]))
        if self.args.world_size > 1:  # a NaN loss on one process, or a SIGTERM to one, concerns all of them
            flags = self.accelerator.reduce(flags, reduction="sum")
        nonfinite, stop = (float(f) for f in flags.cpu())
        self._stop_requested = self._stop_requested or stop > 0
        reasons, self._step_nonfinite = self._step_nonfinite, []
        snapshot, self._step_snapshot = self._step_snapshot, None
        if nonfinite == 0.0:
            self._consecutive_nonfinite = 0
            return
        if not reasons:
            bad = self._nonfinite_gradients()
            reasons = (
                [f"gradients of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"]
                if bad
                else ["loss or gradients on another process"]
            )
        self.model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter unchanged
        if snapshot:  # nor do the forwards of the skipped step (EMA teachers, queues, statistics)
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot_targets, snapshot)
        self.nonfinite_steps_skipped += 1
        self._consecutive_nonfinite += 1
        what = f"step {self.state.global_step + 1}: non-finite {'; '.join(reasons)}"
        if self.stop_on_nonfinite:
            raise NonFiniteTrainingError(f"{what}; stopping because stop_on_nonfinite is set")
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{what}; {self._consecutive_nonfinite} optimizer steps in a row were non-finite "
                f"(max_consecutive_nonfinite_steps={self.max_consecutive_nonfinite_steps}): the run is diverging or "
                f"the data is broken. Lower the learning rate, check the inputs, or resume from an earlier checkpoint"
            )
        logger.warning("%s -> optimizer step skipped (%d skipped so far)", what, self.nonfinite_steps_skipped)

    def _check_parameters_finite(self) -> None:
        """After the optimizer step: finite gradients can still give non-finite weights (an overflowing learning
        rate); such a model is never trained on or saved."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        total = torch.stack([n.float() for n in torch._foreach_norm([p.detach() for p in params])]).sum()
        if bool(torch.isfinite(total)):
            return
        bad = [
            name for name, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        raise NonFiniteTrainingError(
            f"step {self.state.global_step + 1}: the optimizer step made {len(bad)} parameter tensor(s) non-finite "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) with learning rate "
            f"{self._get_learning_rate() if self.lr_scheduler is not None else self.args.learning_rate}: stopping; "
            "nothing of this step is saved. Lower the learning rate (or max_grad_norm) and resume from the last "
            "checkpoint"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["nonfinite_steps_skipped"] = self.nonfinite_steps_skipped
        super().log(logs, start_time)

    # ---- train: finished checkpoints, SIGTERM -----------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint is True:  # as transformers' own True, but never a half-written checkpoint
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output_dir ({self.args.output_dir})")
        if resume_from_checkpoint and self._checkpoint_step(resume_from_checkpoint) >= self._planned_max_steps():
            return self._resume_finished(resume_from_checkpoint)
        with self._stopping_on_sigterm():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self.received_signal is not None:
            raise self._interrupted()
        return output

    def _steps_per_epoch(self) -> int:
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:  # iterable datasets have no length
            return 0
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def _planned_max_steps(self) -> float:
        """The run's last optimizer step, as transformers computes it (inf for a stream sized by epochs)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = self._steps_per_epoch()
        return math.ceil(self.args.num_train_epochs * per_epoch) if per_epoch else math.inf

    @staticmethod
    def _checkpoint_step(checkpoint: str) -> int:
        path = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(path):
            return -1
        with open(path, encoding="utf-8") as handle:
            return int(json.load(handle).get("global_step", -1))

    def _resume_finished(self, checkpoint: str) -> TrainOutput:
        """Resuming a checkpoint of the run's last step: load it and train nothing (transformers would run one
        more forward, moving EMA teachers and queues)."""
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self._load_from_checkpoint(checkpoint)
        logger.warning(
            "%s is at step %d, the last step of this run: nothing left to train (the model is the checkpoint's)",
            checkpoint,
            self.state.global_step,
        )
        metrics = {"train_runtime": 0.0, "train_loss": self.run_train_loss, "train_steps_this_call": 0}
        return TrainOutput(self.state.global_step, self.run_train_loss, metrics)

    @contextlib.contextmanager
    def _stopping_on_sigterm(self):
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        manager = getattr(previous, "__self__", None)
        if type(manager).__name__ == "CheckpointManager":  # transformers' enable_jit_checkpoint: ours replaces it
            previous = manager._original_sigterm_handler or signal.SIG_DFL

        def request_stop(signal_number, frame):
            self.received_signal = signal_number
            logger.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping",
                signal.Signals(signal_number).name,
            )

        signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _interrupted(self) -> TrainingInterruptedError:
        name = signal.Signals(self.received_signal).name
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.state.global_step > 0 and not os.path.isdir(folder):  # the signal came after the last step
            self._save_checkpoint(self.model, trial=None)
        checkpoint = folder if os.path.isdir(folder) else None
        where = (
            f"checkpoint saved at {checkpoint}; resume with --resume_from_checkpoint latest"
            if checkpoint
            else "no step was trained, nothing saved"
        )
        return TrainingInterruptedError(
            f"training stopped by {name} after step {self.state.global_step}: {where}", self.received_signal, checkpoint
        )

    # ---- exact resume -----------------------------------------------------------------------------------------
    def _resume_state_path(self, checkpoint_dir: str) -> str:
        name = self.RESUME_STATE_NAME
        if self.args.world_size > 1:
            name = name.replace(".json", f"-rank{self.args.process_index}.json")
        return os.path.join(checkpoint_dir, name)

    def resume_arguments(self) -> dict:
        """What a resumed run must share with its checkpoint: the `RESUME_ARGUMENTS` of the training arguments and
        the caller's `resume_fingerprint` (e.g. the training data's fingerprint, `positives_by`)."""
        arguments = {name: _json_value(getattr(self.args, name, None)) for name in self.RESUME_ARGUMENTS}
        return {**arguments, **{k: _json_value(v) for k, v in self.resume_fingerprint.items()}}

    def _resume_state(self) -> dict:
        state = {
            "micro_batches_trained": self.micro_batches_trained,
            "items_trained": self.items_trained,
            "loss_sum": self.loss_sum,
            "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
            "consecutive_nonfinite": self._consecutive_nonfinite,
            "arguments": self.resume_arguments(),
            "resume_changes": self.resume_changes,
        }
        if isinstance(self.data_collator, ResumableCollator):
            state["collator"] = self.data_collator.state_dict(batches_trained=self.micro_batches_trained)
        return state

    def _restore_resume_state(self, state: dict) -> None:
        self.micro_batches_trained = int(state["micro_batches_trained"])
        self.items_trained = int(state.get("items_trained", 0))
        self.loss_sum = float(state.get("loss_sum", 0.0))
        self.nonfinite_steps_skipped = int(state.get("nonfinite_steps_skipped", 0))
        self._consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        # the changes of earlier resumes, then this resume's (`_check_resume_arguments` ran first)
        self.resume_changes = {**(state.get("resume_changes") or {}), **self.resume_changes}
        if "collator" in state and isinstance(self.data_collator, ResumableCollator):
            self.data_collator.load_state_dict(state["collator"])

    def _check_resume_arguments(self, saved: dict, checkpoint: str) -> None:
        now = self.resume_arguments()
        changed = {
            name: {"checkpoint": saved[name], "now": now[name]}
            for name in sorted(saved.keys() & now.keys())
            if saved[name] != now[name]
        }
        if not changed:
            return
        listing = "; ".join(
            f"{name}: {c['checkpoint']!r} in the checkpoint, {c['now']!r} now" for name, c in changed.items()
        )
        if not self.resume_with_changed_arguments:
            raise ResumeArgumentsError(
                f"{checkpoint} was trained with other settings than this run: {listing}. Resume with the "
                "checkpoint's settings, or pass resume_with_changed_arguments=True (--resume_with_changed_arguments "
                "true) to continue with the new ones; the model card then lists each change"
            )
        step = self._checkpoint_step(checkpoint)
        logger.warning("Resuming %s with changed settings (resume_with_changed_arguments): %s", checkpoint, listing)
        for name, change in changed.items():
            self.resume_changes[name] = {**change, "from_step": step + 1}

    def _load_optimizer_and_scheduler(self, checkpoint):  # transformers internal (listed in vlalign/__init__.py)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as error:  # torch: "... parameter group that doesn't match the size of optimizer's group"
            if checkpoint is None or "parameter group" not in str(error):
                raise
            changed = ", ".join(sorted(self.resume_changes)) or "none recorded"
            raise ResumeArgumentsError(
                f"{checkpoint}'s optimizer state does not fit this run's trainable parameters ({error}): which "
                f"parameters train has changed (e.g. a tower locked or unlocked; changed settings: "
                f"{changed}). An optimizer's moments cannot carry over to other parameters: resume with the "
                "checkpoint's settings, or start a new run from the checkpoint's weights"
            ) from None
        if checkpoint is not None and self.resume_changes:
            self._apply_changed_optimizer_settings()

    def _apply_changed_optimizer_settings(self) -> None:
        """The restored optimizer and scheduler carry the checkpoint's learning rate, weight decay and Adam settings
        in their state; a resume allowed to change them continues with the new values."""
        changes = {
            name: c for name, c in self.resume_changes.items() if c["from_step"] == self.state.global_step + 1
        }  # this resume's, not an earlier one's
        if "learning_rate" in changes and changes["learning_rate"]["checkpoint"]:
            ratio = float(changes["learning_rate"]["now"]) / float(changes["learning_rate"]["checkpoint"])
            for group in self.optimizer.param_groups:
                group["lr"] *= ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= ratio
            scheduler = self.lr_scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
                scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if "weight_decay" in changes and group.get("weight_decay", 0.0) > 0.0:  # no-decay groups stay at 0
                group["weight_decay"] = self.args.weight_decay
            if "betas" in group and ("adam_beta1" in changes or "adam_beta2" in changes):
                group["betas"] = (self.args.adam_beta1, self.args.adam_beta2)
            if "eps" in group and "adam_epsilon" in changes:
                group["eps"] = self.args.adam_epsilon

    # transformers internals (listed in vlalign/__init__.py): Trainer's private checkpoint hooks, the one place where
    # a checkpoint is written and read whole
    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a hidden staging folder, then rename it into place: `checkpoint-N` never
        exists half-written (a kill or a full disk during the save leaves only the staging folder)."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        # every process writes its own files (RNG, resume state) into the same staging folder
        staging_parent = str(Path(run_dir) / f"{STAGING_PREFIX}{name}")
        staged = os.path.join(staging_parent, name)
        try:
            if self.args.should_save:
                staging_folder(Path(run_dir) / name, per_process=False)
            self.accelerator.wait_for_everyone()
            os.makedirs(staged, exist_ok=True)
            with open(self._resume_state_path(staged), "w", encoding="utf-8") as handle:
                json.dump(self._resume_state(), handle, indent=2)
            self._get_output_dir = lambda trial: staging_parent  # transformers writes `<output dir>/checkpoint-N`
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._retarget_best_checkpoint(staged, run_dir)
                publish_folder(staged, final)
                os.rmdir(staging_parent)
                self._rotate_checkpoints_in(run_dir)
            self.accelerator.wait_for_everyone()
        except (OSError, RuntimeError) as error:
            if self.args.should_save:
                import shutil

                shutil.rmtree(staging_parent, ignore_errors=True)
            raise explain_write_error(error, run_dir, name) from error

    def _retarget_best_checkpoint(self, staged: str, run_dir: str) -> None:
        """transformers looked for the best checkpoint beside the staged one; point it at the real folder."""
        best = self.state.best_global_step
        if not best:
            return
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
        if best == self.state.global_step or os.path.isdir(folder):
            self.state.best_model_checkpoint = folder
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))

    def _rotate_checkpoints_in(self, run_dir: str) -> None:
        """save_total_limit among the real checkpoints (transformers rotated the staging folder's only one)."""
        if self.args.save_total_limit:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )

    def _load_best_model(self) -> None:  # transformers internal (listed in vlalign/__init__.py)
        """`load_best_model_at_end`: transformers loads the best checkpoint with `load_state_dict(strict=False)` on
        the file as saved, which silently leaves out the weights saved under converted names (the EMA teachers'
        towers, see `_load_checkpoint_weights`): the model would end with the last step's teachers. Load it whole."""
        best = self.state.best_model_checkpoint
        target = self.model
        if (
            isinstance(target, PreTrainedModel)
            and os.path.isfile(os.path.join(best, SAFE_WEIGHTS_NAME))
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
        ):
            logger.info("Loading the best model from %s (score: %s)", best, self.state.best_metric)
            _load_checkpoint_weights(target, best)
        else:
            super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        path = self._resume_state_path(resume_from_checkpoint)
        state = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
            if "arguments" in state:  # checked before anything is loaded
                self._check_resume_arguments(state["arguments"], resume_from_checkpoint)
        weights = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if (
            isinstance(target, PreTrainedModel)
            and os.path.isfile(weights)
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
        ):
            _load_checkpoint_weights(target, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if state is None:
            logger.warning(
                "%s has no %s (saved by another trainer?): the data-issue counts restart from 0 and "
                "caption choices / augmentations may differ from an uninterrupted run",
                resume_from_checkpoint,
                os.path.basename(path),
            )
            return
        self._restore_resume_state(state)


def _check_finite_arguments(args, model) -> None:
    """Non-finite numbers in the training arguments or the model config would train a NaN model: refuse them."""
    import dataclasses

    bad = [
        f"TrainingArguments.{f.name}={getattr(args, f.name)}"
        for f in dataclasses.fields(args)
        if isinstance(getattr(args, f.name, None), float) and not math.isfinite(getattr(args, f.name))
    ]
    config = getattr(model, "config", None)
    if config is not None:

        def walk(values: dict, prefix: str) -> None:
            for key, value in values.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                elif isinstance(value, float) and not math.isfinite(value):
                    bad.append(f"config.{prefix}{key}={value}")

        walk(config.to_dict(), "")
    if bad:
        raise ValueError(f"non-finite values would train a non-finite model: {', '.join(bad)}")


class ContrastiveTrainer(VLAlignTrainer):
    """`transformers.Trainer` for vlalign models (see module docstring).

    Its run-time settings (the alpha ramp, ITM re-ranking, gradient caching, the non-finite guard) are fields of
    `ContrastiveTrainingArguments`; with plain `TrainingArguments` they keep their defaults. Extra arguments:
        eval_inputs: `evaluation.EvalInputs` for `evaluate()`; class_names / zero_shot_templates for zero-shot accuracy.
        vlalign_processor: the `VLAlignProcessor` used to embed evaluation images and texts.
    """

    # our losses are per-batch means: let the Trainer divide them by the gradient-accumulation steps
    loss_is_scaled_for_ga = False

    # throughput logging (see `log`): samples trained on since the previous training log, the time of that log (or of
    # the first training step), and the clock (a class attribute so a test can control it)
    _throughput_samples: int = 0
    _throughput_since: float | None = None
    _clock = staticmethod(time.perf_counter)
    # data-loading time (see `get_batch_samples`), on a clock of its own: the seconds spent waiting for the batches
    # of the optimizer steps since the previous training log, those steps, and when the first of them was asked for
    _data_wait: float = 0.0
    _data_steps: int = 0
    _data_since: float | None = None
    _data_clock = staticmethod(time.perf_counter)

    def __init__(
        self, *args, eval_inputs=None, class_names=None, zero_shot_templates=None, vlalign_processor=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eval_inputs = eval_inputs
        self.class_names = class_names
        self.zero_shot_templates = zero_shot_templates
        self.vlalign_processor = vlalign_processor or self.processing_class
        self._component_sums: dict[str, float] = defaultdict(float)
        self._component_counts: dict[str, int] = defaultdict(int)
        self.num_skipped_items = 0
        self.alignment_check: dict | None = None  # the figures of the latest check (`_check_alignment`)
        self._alignment_warned = False
        if self._compiles_encoders_only():
            self.model.compile_encoders(backend=self.args.torch_compile_backend, mode=self.args.torch_compile_mode)

    @property
    def alpha_ramp_steps(self) -> int | None:
        return self._setting("alpha_ramp_steps")

    @property
    def itm_rerank_k(self) -> int:
        return self._setting("itm_rerank_k")

    @property
    def gradient_cache_chunk_size(self) -> int | None:
        return self._setting("gradient_cache_chunk_size")

    def _compiles_encoders_only(self) -> bool:
        """`torch_compile=True` on a model with `compile_encoders` (TCL, CODIS): compile its towers in place instead
        of the Trainer's whole-model `torch.compile` (see ALBEFModel.compile_encoders)."""
        return bool(self.args.torch_compile) and hasattr(self.model, "compile_encoders")

    def _build_accelerator_args(self, **kwargs):  # transformers internal (listed in vlalign/__init__.py)
        args = super()._build_accelerator_args(**kwargs)
        if self._compiles_encoders_only() and "dynamo_plugin" in args:
            from accelerate.utils import TorchDynamoPlugin

            args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    # ------------------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        """Distillation weight for the current optimizer step (linear ramp from 0)."""
        target = float(getattr(self.model.config, "alpha", 0.0))
        ramp = self.alpha_ramp_steps
        if ramp is None:
            ramp = self._steps_per_epoch()
        if not ramp:
            return target
        return target * min(1.0, self.state.global_step / ramp)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With `gradient_cache_chunk_size` set (ContrastiveTrainingArguments), run the model's gradient-cached
        forward/backward (memory of one chunk, gradients of the whole batch); otherwise the standard Trainer step."""
        self._count_samples(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        chunk_size = self.gradient_cache_chunk_size
        if not chunk_size or not hasattr(unwrapped, "gradient_cached_backward"):
            return super().training_step(model, inputs, num_items_in_batch)
        self._begin_micro_batch(inputs)
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        inputs.pop("return_loss", None)
        scale = 1.0 / self.current_gradient_accumulation_steps
        if self._pop_bookkeeping(inputs):
            self._after_micro_batch(torch.zeros(()))
            return torch.zeros((), device=self.args.device)
        inputs.setdefault("alpha", self.current_alpha())
        is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        # The chunks run several backward passes per step: DDP's per-backward all-reduce is switched off and
        # the gradients are averaged once at the end (exact, also under gradient accumulation).
        sync_context = model.no_sync() if is_ddp else contextlib.nullcontext()
        with sync_context, self.accelerator.autocast():
            outputs = unwrapped.gradient_cached_backward(
                **inputs, chunk_size=chunk_size, loss_scale=scale, backward_fn=self.accelerator.backward
            )
        if is_ddp:
            world = dist.get_world_size()
            for parameter in unwrapped.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad.div_(world)
        self._record_components(outputs)
        loss = outputs.loss.detach() * scale
        self._after_micro_batch(loss)
        return loss

    def _pop_bookkeeping(self, inputs: dict) -> bool:
        """Take the collator's skip count out of `inputs` (into the run total) and say whether the batch is empty."""
        self.num_skipped_items += int(inputs.pop("num_skipped", 0))
        if not inputs.pop("empty_batch", False):
            return False
        # The collator refills dropped rows with copies of the batch's good items, so an empty batch only happens
        # when every row of the batch was unusable. Alone, the step is skipped; with several processes the others
        # would wait forever in the loss's collectives, so stop with the reason instead.
        if self.args.world_size > 1:
            raise RuntimeError(
                "every row of one of this process's batches was unusable (see the 'Skipped an undecodable image' / "
                "'Skipped a row without a usable caption' warnings): check image_column, caption_column and the "
                "data files before distributed training"
            )
        return True

    def _record_components(self, outputs) -> None:
        if not hasattr(outputs, "loss_components"):
            return
        for name, value in outputs.loss_components().items():
            if math.isfinite(value):
                self._component_sums[name] += value
                self._component_counts[name] += 1
            else:  # named in the non-finite guard's warning
                self._note_nonfinite([f"loss_{name}"])
        if outputs.temperature is not None:
            self._component_sums["temperature"] += float(outputs.temperature)
            self._component_counts["temperature"] += 1

    def _resume_state(self) -> dict:
        return {**super()._resume_state(), "num_skipped_items": self.num_skipped_items}

    def _restore_resume_state(self, state: dict) -> None:
        super()._restore_resume_state(state)
        self.num_skipped_items = int(state.get("num_skipped_items", 0))

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        unwrapped = self.accelerator.unwrap_model(model)
        # a PEFT model wraps ours (get_base_model) and renames a `modules_to_save` copy
        # "<name>.modules_to_save.<adapter>"
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        exempt = getattr(base, "_no_weight_decay_parameters", ("temp",))

        def plain(name: str) -> str:
            return re.sub(r"\.(modules_to_save\.[^.]+|original_module)(?=\.)", "", name)

        return [n for n in names if not any(plain(n) == e or plain(n).endswith("." + e) for e in exempt)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if self._pop_bookkeeping(inputs):
            # every item of this batch was unreadable: a zero loss that touches every parameter
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, None) if return_outputs else loss
        if "alpha" not in inputs and model.training:
            inputs["alpha"] = self.current_alpha()
        outputs = model(**inputs)
        if model.training:
            self._record_components(outputs)
        loss = outputs.loss
        return (loss, outputs) if return_outputs else loss

    def _count_samples(self, inputs) -> None:
        """Throughput bookkeeping: add the rows of this micro-batch (none for the collator's empty batch)."""
        if self._throughput_since is None:
            self._throughput_since = self._clock()
        if not inputs.get("empty_batch", False):
            self._throughput_samples += _batch_rows(inputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's fetch of one optimizer step's micro-batches, timed: with the collation in this process
        (no dataloader workers) the wait is the decoding and augmentation, with workers what they did not prefetch
        in time. Logged as `data_time_per_step` and `data_wait_fraction` (open_clip's data_time), so that an
        input-bound run is visible."""
        start = self._data_clock()
        if self._data_since is None:
            self._data_since = start
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._data_wait += self._data_clock() - start
        self._data_steps += 1
        return batches

    def _log_data_time(self, logs: dict[str, float]) -> None:
        """`data_time_per_step` (seconds waiting for data per optimizer step) and `data_wait_fraction` (that wait
        / the wall time since the first of those steps asked for its batches), since the previous training log."""
        if self._data_steps and self._data_since is not None:
            elapsed = self._data_clock() - self._data_since
            logs["data_time_per_step"] = round(self._data_wait / self._data_steps, 4)
            if elapsed > 0:
                logs["data_wait_fraction"] = round(min(self._data_wait / elapsed, 1.0), 4)
        self._data_wait, self._data_steps, self._data_since = 0.0, 0, None

    def _log_throughput(self, logs: dict[str, float]) -> None:
        """`throughput_samples_per_second`: samples (summed over processes) since the previous training log / the wall
        time since then (since the first training step for the first log). Evaluation and checkpointing between two
        logs count as time."""
        now = self._clock()
        samples = self._throughput_samples
        if self.args.world_size > 1:
            # `log` runs on every process right after the Trainer's own loss gather, so this collective is matched
            total = torch.tensor(float(samples), device=self.args.device)
            samples = int(self.accelerator.reduce(total, reduction="sum").item())
        if self._throughput_since is not None and now > self._throughput_since:
            logs["throughput_samples_per_second"] = round(samples / (now - self._throughput_since), 3)
        self._throughput_samples = 0
        self._throughput_since = now

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs have eval_* keys)
            self._log_throughput(logs)
            self._log_data_time(logs)
        if "train_runtime" in logs:  # the end of `train()`: a later `train()` starts a new throughput interval
            self._throughput_samples, self._throughput_since = 0, None
            self._data_wait, self._data_steps, self._data_since = 0.0, 0, None
        if "loss" in logs and self._component_counts:
            for name, total in self._component_sums.items():
                key = name if name == "temperature" else f"loss_{name}"
                logs[key] = round(total / self._component_counts[name], 4)
            logs["alpha"] = round(self.current_alpha(), 4)
            logs["skipped_items"] = self.num_skipped_items
            self._component_sums.clear()
            self._component_counts.clear()
            self._check_alignment(logs)
        super().log(logs, start_time)

    @property
    def alignment_not_started(self) -> bool | None:
        """None until checked (after the warm-up), then whether the latest check found the cross-modal losses still
        at ln(number of keys)."""
        check = self.alignment_check
        return None if check is None else alignment_not_started(check["loss_i2t"], check["loss_t2i"], check["num_keys"])

    def contrastive_num_keys(self) -> int | None:
        """Keys each cross-modal query is scored against: the local batch + the queue with momentum (ALBEF), the
        global batch for in-batch InfoNCE (gathered across processes); None for the decomposable and sigmoid
        losses, whose values at chance are not ln(keys) (they are not checked)."""
        config = self.model.config
        if getattr(config, "contrastive_loss", "info_nce") != "info_nce":
            return None
        batch = self.args.per_device_train_batch_size
        if getattr(config, "use_momentum", False):
            return batch + int(config.queue_size)
        return batch * max(self.args.world_size, 1)

    def alignment_check_step(self) -> int:
        """The first optimizer step at which stuck cross-modal losses count: the end of the learning-rate warm-up,
        and at least a quarter of the run. (A tenth was too early: the TCL digits demo, 95% zero-shot at the end,
        leaves ln(keys) only after about 200 of its 1,000 steps, and warned on every run.)"""
        max_steps = max(self.state.max_steps, 1)
        return max(self.args.get_warmup_steps(max_steps), max_steps // 4, 1)

    def _check_alignment(self, logs: dict) -> None:
        num_keys = self.contrastive_num_keys()
        if (
            num_keys is None
            or num_keys < 2
            or "loss_i2t" not in logs
            or "loss_t2i" not in logs
            or self.state.global_step < self.alignment_check_step()
        ):
            return
        self.alignment_check = {
            "step": self.state.global_step,
            "loss_i2t": float(logs["loss_i2t"]),
            "loss_t2i": float(logs["loss_t2i"]),
            "num_keys": num_keys,
        }
        if self.alignment_not_started and not self._alignment_warned:
            self._alignment_warned = True
            logger.warning(
                "Cross-modal alignment has not started after %d steps: loss_i2t %.3f and loss_t2i %.3f are still at "
                "the uniform value ln(%d keys) = %.3f (the model cannot yet tell a paired caption from any other). "
                "Try a higher learning rate, a longer warm-up of the extra terms (or weights 0 for IMC/LMI/ITM/MLM "
                "at first), or check that captions describe their images.",
                self.state.global_step,
                logs["loss_i2t"],
                logs["loss_t2i"],
                num_keys,
                math.log(num_keys),
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.eval_inputs is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = evaluate_model(
            self.model,
            self.vlalign_processor,
            self.eval_inputs,
            self.class_names,
            self.zero_shot_templates,
            batch_size=self.args.per_device_eval_batch_size,
            itm_rerank_k=self.itm_rerank_k,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

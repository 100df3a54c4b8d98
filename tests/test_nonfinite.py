"""Non-finite guard: a step whose loss or gradients are not finite is skipped (no parameter changes), counted and
warned about naming the loss components; `stop_on_nonfinite` stops at the first one; N in a row always stop. The
feature queues and the running log-Z estimate keep non-finite batches out."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from fixtures import tiny_batch, tiny_tcl_config
from transformers import TrainerCallback, TrainingArguments

from vlalign import TCLModel
from vlalign.losses import RunningLogZ
from vlalign.momentum import FeatureQueue
from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments, NonFiniteTrainingError, VLAlignTrainer

BATCH = 4


class InjectingCollator:
    """A fixed tiny batch per call (a new seed each); calls listed in `inf_pixels` get an infinite pixel (a broken
    input that makes every loss component NaN)."""

    def __init__(self, inf_pixels=()):
        self.calls = 0
        self.inf_pixels = set(inf_pixels)

    def __call__(self, rows):
        batch = dict(tiny_batch(batch=BATCH, seed=self.calls), return_loss=True)
        if self.calls in self.inf_pixels:
            batch["pixel_values"] = batch["pixel_values"].clone()
            batch["pixel_values"][0, 0, 0, 0] = math.inf
        self.calls += 1
        return batch


class ParameterSnapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.after_step = model, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.after_step[0] = self._snapshot()

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = self._snapshot()

    def _snapshot(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def _model():
    torch.manual_seed(0)
    return TCLModel(tiny_tcl_config(queue_size=2 * BATCH))


def _trainer(tmp_path, model, collator, trainer_class=ContrastiveTrainer, max_steps=6, **settings):
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", remove_unused_columns=False, use_cpu=True,
        save_strategy="no", disable_tqdm=True, **settings)
    return trainer_class(model=model, args=args, train_dataset=list(range(BATCH * max_steps)), data_collator=collator)


def _poison_gradient(model, backward_index):
    """An infinite gradient for one parameter in the `backward_index`-th backward pass (0-based), loss finite."""
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * math.inf if len(calls) - 1 == backward_index else grad

    model.vision_proj.weight.register_hook(hook)


def _changed(before, after):
    return [n for n in before if not torch.equal(before[n], after[n])]


def test_nonfinite_loss_step_is_skipped_counted_and_named(tmp_path, caplog):
    model = _model()
    collator = InjectingCollator(inf_pixels={2, 3})  # steps 3 and 4 (1-based)
    trainer = _trainer(tmp_path, model, collator)
    snapshots = ParameterSnapshots(model)
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="vlalign.trainer"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 2
    after = snapshots.after_step
    for step in (3, 4):  # skipped: not one parameter moved (no Adam moment, no weight decay)
        assert _changed(after[step - 1], after[step]) == [], step
    for step in (1, 2, 5, 6):  # the good steps around them did train
        assert len(_changed(after[step - 1], after[step])) > 10, step
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2
    assert "step 3: non-finite loss_i2t" in warnings[0] and "loss_itm" in warnings[0]
    assert "optimizer step skipped (2 skipped so far)" in warnings[1]
    # the broken batches never reached the queues: all finite, and the pointer moved for the 4 good steps only
    for queue in (model.image_queue, model.text_queue):
        assert torch.isfinite(queue.features).all()
        assert int(queue.ptr) == (4 * BATCH) % queue.size
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["nonfinite_steps_skipped"] for h in logged] == [0, 0, 1, 2, 2, 2]
    assert math.isfinite(logged[-1]["loss"])


def test_nonfinite_gradient_with_finite_loss_names_the_parameter(tmp_path, caplog):
    model = _model()
    _poison_gradient(model, backward_index=1)
    trainer = _trainer(tmp_path, model, InjectingCollator(), max_steps=3)
    snapshots = ParameterSnapshots(model)
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="vlalign.trainer"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert _changed(snapshots.after_step[1], snapshots.after_step[2]) == []
    assert "step 2: non-finite gradients of vision_proj.weight" in caplog.text


def test_stop_on_nonfinite_raises_at_the_first_bad_step(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, InjectingCollator(inf_pixels={1}), stop_on_nonfinite=True)
    with pytest.raises(NonFiniteTrainingError, match=r"step 2: non-finite loss_i2t.*stop_on_nonfinite"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    trainer = _trainer(tmp_path, _model(), InjectingCollator(inf_pixels={1, 2, 3, 5, 6, 7}), max_steps=8,
                       max_consecutive_nonfinite_steps=3)
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row were non-finite"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 3 and trainer.state.global_step == 3


def test_a_good_step_resets_the_consecutive_count(tmp_path):
    trainer = _trainer(tmp_path, _model(), InjectingCollator(inf_pixels={0, 1, 3, 4}), max_steps=6,
                       max_consecutive_nonfinite_steps=3)
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 4


def test_generic_trainer_guards_the_plain_loss(tmp_path, caplog):
    """VLAlignTrainer (MIVC's trainer) names the total loss when the model has no components."""

    class NaNAtCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.calls = 0

        def forward(self, x, labels=None):
            self.calls += 1
            loss = (self.weight * x).sum() * (math.nan if self.calls == 2 else 1.0)
            return {"loss": loss}

    class Rows:
        def __call__(self, rows):
            return {"x": torch.ones(3)}

    model = NaNAtCall()
    trainer = _trainer(tmp_path, model, Rows(), trainer_class=VLAlignTrainer, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="vlalign.trainer"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert "step 2: non-finite loss -> optimizer step skipped" in caplog.text


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_consecutive_nonfinite_steps_is_validated(tmp_path, value):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps"):
        _trainer(tmp_path, _model(), InjectingCollator(), max_consecutive_nonfinite_steps=value)


def test_queue_ignores_a_nonfinite_batch():
    torch.manual_seed(0)
    queue = FeatureQueue(size=6, dim=3)
    queue.enqueue(torch.ones(2, 3), torch.tensor([1, 2]))
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    bad = torch.ones(2, 3)
    bad[1, 2] = math.nan
    queue.enqueue(bad, torch.tensor([3, 4]))
    for key, value in queue.state_dict().items():
        assert torch.equal(value, before[key]), key
    queue.enqueue(2 * torch.ones(2, 3), torch.tensor([5, 6]))
    assert int(queue.ptr) == 4 and queue.ids[2:4].tolist() == [5, 6]
    assert torch.equal(queue.features[2:4], 2 * torch.ones(2, 3))


def test_running_log_z_keeps_nonfinite_estimates_out():
    state = RunningLogZ(num_samples=4, momentum=0.5)
    state.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    out = state.update(torch.tensor([1, 2]), torch.tensor([math.inf, math.nan]))
    assert not torch.isfinite(out).any()  # this step's loss sees it (and the trainer skips the step)
    assert state.log_z.tolist()[:3] == [1.0, 2.0, 0.0] and state.seen.tolist() == [True, True, False, False]


def _forward_state(model):
    """Everything but the trained parameters: EMA teachers, queues (features, ids, pointers), running statistics."""
    teachers = [p for name, p in model.named_parameters() if name.startswith("momentum_")]
    return [t.detach().clone() for t in (*teachers, *model.buffers())]


def test_a_skipped_step_moves_no_teacher_queue_or_statistic(tmp_path):
    model = _model()
    assert model.config.use_momentum

    class ForwardState(TrainerCallback):
        after_step = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.after_step[state.global_step] = _forward_state(model)

    recorder = ForwardState()
    trainer = _trainer(tmp_path, model, InjectingCollator(inf_pixels={2}), max_steps=4)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    after = recorder.after_step
    skipped = [i for i, (a, b) in enumerate(zip(after[2], after[3], strict=True)) if not torch.equal(a, b)]
    assert skipped == []  # the EMA update at the forward's start and the teacher pass are undone
    moved = sum(not torch.equal(a, b) for a, b in zip(after[3], after[4], strict=True))
    assert moved > 10  # a good step does move the teachers and the queues


@pytest.mark.parametrize("field, value", [("learning_rate", math.inf), ("weight_decay", math.nan),
                                          ("adam_epsilon", -math.inf)])
def test_nonfinite_training_arguments_are_refused_at_construction(tmp_path, field, value):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})
    with pytest.raises(ValueError, match=rf"TrainingArguments\.{field}=(inf|nan|-inf)"):
        VLAlignTrainer(model=_model(), args=args, train_dataset=list(range(8)), data_collator=InjectingCollator())


def test_an_optimizer_step_that_leaves_nonfinite_weights_stops_the_run(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, InjectingCollator(), max_steps=3)
    trainer.args.learning_rate = 1e300  # finite, but the first update overflows float32
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 1
    with pytest.raises(NonFiniteTrainingError, match=r"step 1: the optimizer step made \d+ parameter tensor"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))  # raised before the step's checkpoint


def test_a_run_of_empty_batches_stops_with_the_reason(tmp_path):
    class Unusable:
        def __call__(self, rows):  # what ImageTextCollator returns when no row of a batch is usable
            return {"num_skipped": BATCH, "empty_batch": True}

    trainer = _trainer(tmp_path, _model(), Unusable(), max_steps=25)
    with pytest.raises(RuntimeError, match=r"20 training batches in a row had no usable row"):
        trainer.train()
    assert trainer.items_trained == 0 and trainer.state.global_step == 19

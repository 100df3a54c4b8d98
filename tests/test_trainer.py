"""vlalign.trainer: the ContrastiveTrainer / VLAlignTrainer (the evaluation functions themselves:
test_evaluation.py; train.py's runs: test_train_script.py).

* GA scaling, alpha ramp, weight decay, component logging, evaluate(), the alignment check, the training settings;
* logging: throughput (samples/s) and `report_to=["tensorboard"]` event files;
* the non-finite guard: a step whose loss or gradients are not finite is skipped (no parameter, teacher, queue or
  statistic changes), counted and warned about naming the loss components; `stop_on_nonfinite` stops at the first
  one; N in a row always stop;
* resuming in process: a finished run trains nothing, changed settings are refused naming each (or allowed and
  recorded), a checkpoint appears only complete, `latest` skips an incomplete one, checkpoints rotate.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from fixtures import TINY_VISION, tiny_batch, tiny_tcl_config
from transformers import TrainerCallback, TrainingArguments

from vlalign import TCLModel
from vlalign.data import ImageTextCollator
from vlalign.evaluation import build_eval_inputs, evaluate_model
from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments, NonFiniteTrainingError, VLAlignTrainer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))  # train.py's checkpoint resolution


def _deterministic_model(**overrides):
    torch.manual_seed(0)
    config = tiny_tcl_config(
        use_momentum=False,
        imc_weight=0.0,
        lmi_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        num_fusion_layers=0,
        **overrides,
    )
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = 0.0
        sub.attention_probs_dropout_prob = 0.0
    return TCLModel(config)


def _trainer(model, tmp_path, **kwargs):
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        **kwargs,
    )
    return ContrastiveTrainer(model=model, args=args, train_dataset=[0] * 16)


def test_gradient_accumulation_divides_per_batch_mean_loss(tmp_path):
    """With GA=2, each micro-batch's gradient must be half of its plain gradient (HF5.md pitfall)."""
    batch = dict(tiny_batch(), return_loss=True)
    model = _deterministic_model()
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    trainer = _trainer(model, tmp_path, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2
    reported = trainer.training_step(model, dict(batch))
    for name, grad in plain.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad / 2, atol=1e-6), name
    assert reported.item() == pytest.approx(model(**batch).loss.item() / 2, rel=1e-5)


def test_alpha_ramps_linearly(tmp_path):
    model = _deterministic_model(alpha=0.4)
    trainer = _trainer(model, tmp_path)
    trainer.args.alpha_ramp_steps = 100
    for step, expected in ((0, 0.0), (25, 0.1), (50, 0.2), (100, 0.4), (300, 0.4)):
        trainer.state.global_step = step
        assert trainer.current_alpha() == pytest.approx(expected)
    trainer.args.alpha_ramp_steps = 0
    assert trainer.current_alpha() == pytest.approx(0.4)


def test_temperature_gets_no_weight_decay(tmp_path):
    trainer = _trainer(_deterministic_model(), tmp_path)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "temp" not in names and "vision_proj.weight" in names


def test_codebook_gets_no_weight_decay(tmp_path):
    from fixtures import tiny_codis_config

    from vlalign import CODISModel

    trainer = _trainer(CODISModel(tiny_codis_config()), tmp_path)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "codebook.weight" not in names and "temp" not in names and "text_proj.weight" in names


def test_a_queue_the_batch_does_not_divide_trains_and_wraps(tmp_path):
    """No divisibility rule between queue_size and the global batch (the queue is a ring buffer): a 30-entry queue
    with batches of 4 is accepted, and after 9 steps it holds the newest 30 keys with the pointer at 36 % 30."""
    model = TCLModel(tiny_tcl_config(queue_size=30))
    _trainer(model, tmp_path)  # accepted (it used to refuse the pair)
    model.train()
    initial = model.image_queue.features.clone()
    for step in range(9):
        model(**tiny_batch(seed=step), return_loss=True).loss.backward()
    for queue in (model.image_queue, model.text_queue):
        assert int(queue.ptr) == 36 % 30
        assert torch.isfinite(queue.features).all()
    assert not (model.image_queue.features == initial).all(dim=1).any()  # every slot was written


def test_few_steps_on_digits_lower_the_loss_and_log_components(tmp_path, digits_processor_16, digits_small):
    data_args, train, evaluation = digits_small
    torch.manual_seed(0)
    model = TCLModel(
        tiny_tcl_config(
            queue_size=64,
            vision_config=dict(TINY_VISION, initializer_range=0.1),
        )
    )
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        max_steps=40,
        learning_rate=1e-3,
        logging_steps=10,
        report_to="none",
        remove_unused_columns=False,
        alpha_ramp_steps=20,
        use_cpu=True,
        dataloader_drop_last=True,
        save_strategy="no",
        seed=0,
    )
    eval_inputs = build_eval_inputs(evaluation, data_args)
    class_names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=digits_processor_16,
        data_collator=ImageTextCollator.from_data_args(digits_processor_16, data_args),
        eval_inputs=eval_inputs,
        class_names=class_names,
        zero_shot_templates=data_args.zero_shot_templates,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for key in (
        "loss_i2t",
        "loss_t2i",
        "loss_i2i",
        "loss_t2t",
        "loss_lmi_image",
        "loss_lmi_text",
        "loss_itm",
        "loss_mlm",
        "temperature",
        "alpha",
    ):
        assert key in logs[0], key
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["loss_mlm"] < logs[0]["loss_mlm"]
    assert logs[0]["alpha"] < logs[-1]["alpha"] == pytest.approx(0.4)
    metrics = trainer.evaluate()
    for key in ("eval_i2t_recall@1", "eval_t2i_recall@10", "eval_zero_shot_accuracy"):
        assert 0.0 <= metrics[key] <= 100.0
    # evaluate() reports evaluate_model's numbers for the trained model (whose own recalls against hand-computed
    # values: tests/test_evaluation.py), with the eval_ prefix
    expected = evaluate_model(model, digits_processor_16, eval_inputs, class_names, data_args.zero_shot_templates)
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value), key


# ----------------------------------------------------------------------------- alignment that never started
def test_alignment_check_compares_cross_modal_losses_with_ln_keys_after_the_warm_up(tmp_path, caplog):
    import math

    from vlalign.evaluation import ALIGNMENT_STUCK_FRACTION, alignment_not_started

    uniform = math.log(1056)
    assert alignment_not_started(uniform, uniform + 0.2, 1056)
    assert alignment_not_started(ALIGNMENT_STUCK_FRACTION * uniform, uniform, 1056)
    assert not alignment_not_started(0.9 * uniform, uniform, 1056)  # one direction learning is a start
    with pytest.raises(ValueError, match="num_keys"):
        alignment_not_started(1.0, 1.0, 1)

    model = TCLModel(tiny_tcl_config(queue_size=64))  # momentum: keys = batch 4 + queue 64
    trainer = _trainer(model, tmp_path, max_steps=100, warmup_steps=20)
    assert trainer.contrastive_num_keys() == 68
    trainer.state.max_steps = 100
    assert trainer.alignment_check_step() == 25  # a quarter of the run, after the 20 warm-up steps
    stuck = {"loss_i2t": math.log(68), "loss_t2i": math.log(68) + 0.01}
    trainer.state.global_step = 24  # before a quarter of the run: no verdict
    trainer._check_alignment(dict(stuck))
    assert trainer.alignment_not_started is None
    trainer.state.global_step = 25
    with caplog.at_level("WARNING", logger="vlalign.trainer"):
        trainer._check_alignment(dict(stuck))
        trainer._check_alignment(dict(stuck))
    assert trainer.alignment_not_started is True
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1  # warned once
    assert "ln(68 keys) = 4.220" in caplog.records[0].getMessage()
    assert trainer.alignment_check == {
        "step": 25,
        "loss_i2t": stuck["loss_i2t"],
        "loss_t2i": stuck["loss_t2i"],
        "num_keys": 68,
    }
    trainer._check_alignment({"loss_i2t": 2.0, "loss_t2i": 2.5})  # learning later clears the verdict
    assert trainer.alignment_not_started is False

    in_batch = _trainer(_deterministic_model(), tmp_path)  # in-batch InfoNCE: keys = the global batch
    assert in_batch.contrastive_num_keys() == 4
    decomposable = _trainer(_deterministic_model(contrastive_loss="decomposable"), tmp_path)
    assert decomposable.contrastive_num_keys() is None  # no uniform value ln(keys): never judged


@pytest.mark.parametrize(
    "field, value",
    [
        ("gradient_cache_chunk_size", 0),
        ("gradient_cache_chunk_size", 2.5),
        ("alpha_ramp_steps", -1),
        ("itm_rerank_k", -1),
        ("itm_rerank_k", True),
        ("max_consecutive_nonfinite_steps", 0),
    ],
)
def test_training_settings_are_validated_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_training_settings_stay_out_of_the_saved_model(tmp_path):
    model = _deterministic_model()
    trainer = _trainer(model, tmp_path, gradient_cache_chunk_size=2, alpha_ramp_steps=5)
    assert trainer.gradient_cache_chunk_size == 2 and trainer.alpha_ramp_steps == 5
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not {"gradient_cache_chunk_size", "train_batch_size", "alpha_ramp_steps"} & set(saved)
    assert json.loads(trainer.args.to_json_string())["gradient_cache_chunk_size"] == 2  # saved with the run instead


# ---------------------------------------------------------------------------------------------------------------------
# Logging: throughput and tensorboard
# ---------------------------------------------------------------------------------------------------------------------


class FakeClock:
    """A controlled `time.perf_counter`: returns `now`; with `step`, each call also advances it by `step`."""

    def __init__(self, now=100.0, step=0.0):
        self.now, self.step, self.calls = now, step, 0

    def __call__(self):
        value = self.now
        self.now += self.step
        self.calls += 1
        return value


def _collate(rows):
    # `rows` are ints (the dataset is a list of ints): a tiny random batch with one row per item
    return dict(tiny_batch(batch=len(rows), seed=int(rows[0])), return_loss=True)


def _logging_trainer(tmp_path, report_to="none", **kwargs):
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=report_to,
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        dataloader_drop_last=True,
        **kwargs,
    )
    return ContrastiveTrainer(model=model, args=args, train_dataset=list(range(32)), data_collator=_collate)


def test_throughput_is_samples_over_elapsed_time(tmp_path, monkeypatch):
    clock = FakeClock(now=100.0)
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(clock))
    trainer = _logging_trainer(tmp_path)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`; steps are called directly here
    model = trainer.model

    # three real training steps (4, 4 and 6 rows) in 3.5 s
    for rows, seed in ((4, 0), (4, 1), (6, 2)):
        trainer.training_step(model, dict(tiny_batch(batch=rows, seed=seed), return_loss=True))
    clock.now = 103.5
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["throughput_samples_per_second"] == pytest.approx(14 / 3.5)

    # an evaluation log neither reports nor resets the interval
    trainer.training_step(model, dict(tiny_batch(batch=5, seed=3), return_loss=True))
    clock.now = 104.5
    trainer.log({"eval_i2t_recall@1": 50.0})
    assert "throughput_samples_per_second" not in trainer.state.log_history[-1]
    # the collator's empty batch (all images unreadable) counts no sample
    trainer.training_step(model, {"num_skipped": 4, "empty_batch": True})
    clock.now = 105.5
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["throughput_samples_per_second"] == pytest.approx(5 / 2.0)

    # nothing trained since the last log: 0 samples/s
    clock.now = 107.5
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["throughput_samples_per_second"] == 0.0

    # the end-of-training log starts a fresh interval: the next one is timed from its first step
    trainer.log({"train_runtime": 1.0})
    clock.now = 200.0
    trainer.training_step(model, dict(tiny_batch(batch=4, seed=4), return_loss=True))
    clock.now = 202.0
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["throughput_samples_per_second"] == pytest.approx(4 / 2.0)


def test_data_loading_time_is_logged_apart_from_the_step(tmp_path, monkeypatch):
    """Each optimizer step's fetch of its batches is timed: with a data clock that advances 0.5 s per reading, a
    fetch waits 0.5 s and a logging interval of two steps spans 2 s (the log reads it once): 0.5 s per step, a
    quarter of the wall time each, half of it in all."""
    monkeypatch.setattr(ContrastiveTrainer, "_data_clock", staticmethod(FakeClock(now=0.0, step=0.5)))
    trainer = _logging_trainer(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["data_time_per_step"] for entry in logs] == [0.5, 0.5]
    assert [entry["data_wait_fraction"] for entry in logs] == [0.5, 0.5]


def test_throughput_counts_every_micro_batch_with_gradient_accumulation(tmp_path, monkeypatch):
    # the clock advances 1 s per call: 1 call at the first step, then 1 per log -> 1 s per logging interval
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(FakeClock(now=0.0, step=1.0)))
    trainer = _logging_trainer(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # 2 optimizer steps x 2 micro-batches x 4 rows per interval
    assert [entry["throughput_samples_per_second"] for entry in logs] == [16.0, 16.0]


def test_tensorboard_event_files_have_loss_components_and_throughput(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(FakeClock(now=0.0, step=0.5)))
    trainer = _logging_trainer(tmp_path, report_to=["tensorboard"], max_steps=6, logging_steps=2)
    trainer.train()

    # transformers 5 has no `logging_dir`: the TensorBoard callback writes to output_dir/runs/<date>_<host>
    event_files = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_i2t",
        "train/loss_t2i",
        "train/loss_itm",
        "train/loss_mlm",
        "train/temperature",
        "train/alpha",
        "train/throughput_samples_per_second",
    ):
        assert tag in scalars, (tag, sorted(scalars))
        assert [event.step for event in events.Scalars(tag)] == [2, 4, 6], tag
    # 2 steps x 4 rows per 0.5 s interval
    assert [event.value for event in events.Scalars("train/throughput_samples_per_second")] == [16.0] * 3
    losses = [event.value for event in events.Scalars("train/loss_i2t")]
    history = [entry["loss_i2t"] for entry in trainer.state.log_history if "loss_i2t" in entry]
    assert losses == pytest.approx(history)
    # end-of-training summary (the Trainer's own train_samples_per_second) is there too
    assert "train/train_samples_per_second" in scalars


# ---------------------------------------------------------------------------------------------------------------------
# The non-finite guard
# ---------------------------------------------------------------------------------------------------------------------


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


def _guarded_model():
    torch.manual_seed(0)
    return TCLModel(tiny_tcl_config(queue_size=2 * BATCH))


def _guarded_trainer(tmp_path, model, collator, trainer_class=ContrastiveTrainer, max_steps=6, **settings):
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **settings,
    )
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
    model = _guarded_model()
    collator = InjectingCollator(inf_pixels={2, 3})  # steps 3 and 4 (1-based)
    trainer = _guarded_trainer(tmp_path, model, collator)
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
    model = _guarded_model()
    _poison_gradient(model, backward_index=1)
    trainer = _guarded_trainer(tmp_path, model, InjectingCollator(), max_steps=3)
    snapshots = ParameterSnapshots(model)
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="vlalign.trainer"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert _changed(snapshots.after_step[1], snapshots.after_step[2]) == []
    assert "step 2: non-finite gradients of vision_proj.weight" in caplog.text


def test_stop_on_nonfinite_raises_at_the_first_bad_step(tmp_path):
    model = _guarded_model()
    trainer = _guarded_trainer(tmp_path, model, InjectingCollator(inf_pixels={1}), stop_on_nonfinite=True)
    with pytest.raises(NonFiniteTrainingError, match=r"step 2: non-finite loss_i2t.*stop_on_nonfinite"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    trainer = _guarded_trainer(
        tmp_path,
        _guarded_model(),
        InjectingCollator(inf_pixels={1, 2, 3, 5, 6, 7}),
        max_steps=8,
        max_consecutive_nonfinite_steps=3,
    )
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row were non-finite"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 3 and trainer.state.global_step == 3


def test_a_good_step_resets_the_consecutive_count(tmp_path):
    trainer = _guarded_trainer(
        tmp_path,
        _guarded_model(),
        InjectingCollator(inf_pixels={0, 1, 3, 4}),
        max_steps=6,
        max_consecutive_nonfinite_steps=3,
    )
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
    trainer = _guarded_trainer(tmp_path, model, Rows(), trainer_class=VLAlignTrainer, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="vlalign.trainer"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert "step 2: non-finite loss -> optimizer step skipped" in caplog.text


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_consecutive_nonfinite_steps_is_validated(tmp_path, value):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps"):
        _guarded_trainer(tmp_path, _guarded_model(), InjectingCollator(), max_consecutive_nonfinite_steps=value)


def _forward_state(model):
    """Everything but the trained parameters: EMA teachers, queues (features, ids, pointers), running statistics."""
    teachers = [p for name, p in model.named_parameters() if name.startswith("momentum_")]
    return [t.detach().clone() for t in (*teachers, *model.buffers())]


def test_a_skipped_step_moves_no_teacher_queue_or_statistic(tmp_path):
    model = _guarded_model()
    assert model.config.use_momentum

    class ForwardState(TrainerCallback):
        after_step = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.after_step[state.global_step] = _forward_state(model)

    recorder = ForwardState()
    trainer = _guarded_trainer(tmp_path, model, InjectingCollator(inf_pixels={2}), max_steps=4)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    after = recorder.after_step
    skipped = [i for i, (a, b) in enumerate(zip(after[2], after[3], strict=True)) if not torch.equal(a, b)]
    assert skipped == []  # the EMA update at the forward's start and the teacher pass are undone
    moved = sum(not torch.equal(a, b) for a, b in zip(after[3], after[4], strict=True))
    assert moved > 10  # a good step does move the teachers and the queues


@pytest.mark.parametrize(
    "field, value", [("learning_rate", math.inf), ("weight_decay", math.nan), ("adam_epsilon", -math.inf)]
)
def test_nonfinite_training_arguments_are_refused_at_construction(tmp_path, field, value):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})
    with pytest.raises(ValueError, match=rf"TrainingArguments\.{field}=(inf|nan|-inf)"):
        VLAlignTrainer(
            model=_guarded_model(), args=args, train_dataset=list(range(8)), data_collator=InjectingCollator()
        )


def test_an_optimizer_step_that_leaves_nonfinite_weights_stops_the_run(tmp_path):
    model = _guarded_model()
    trainer = _guarded_trainer(tmp_path, model, InjectingCollator(), max_steps=3)
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

    trainer = _guarded_trainer(tmp_path, _guarded_model(), Unusable(), max_steps=25)
    with pytest.raises(RuntimeError, match=r"20 training batches in a row had no usable row"):
        trainer.train()
    assert trainer.items_trained == 0 and trainer.state.global_step == 19


# ---------------------------------------------------------------------------------------------------------------------
# Resuming in process: finished runs, changed settings, staged checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _in_process_trainer(output_dir, max_steps=4, rows=40, seed=3, **kwargs):
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config(queue_size=8))
    training = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": max_steps,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "remove_unused_columns": False,
        "use_cpu": True,
        "save_strategy": "steps",
        "save_steps": 2,
        "disable_tqdm": True,
        "seed": seed,
    }
    training.update(kwargs.pop("training", {}))
    if "resume_with_changed_arguments" in kwargs:
        training["resume_with_changed_arguments"] = kwargs.pop("resume_with_changed_arguments")
    args = ContrastiveTrainingArguments(**training)
    return ContrastiveTrainer(
        model=model, args=args, train_dataset=list(range(rows)), data_collator=InjectingCollator(), **kwargs
    )


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    first = _in_process_trainer(tmp_path)  # 10 steps per epoch: step 4 is inside the first epoch
    first_result = first.train()
    finished = _state(first.model)
    resumed = _in_process_trainer(tmp_path)
    result = resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    after = _state(resumed.model)
    changed = [k for k in finished if not torch.equal(finished[k], after[k])]
    assert changed == []  # no phantom step: teachers, queues and pointers as the checkpoint left them
    assert result.global_step == 4
    assert result.training_loss == pytest.approx(first.run_train_loss, abs=1e-9)
    assert first.run_train_loss == pytest.approx(first_result.training_loss, rel=1e-6)


def test_resume_with_changed_settings_is_refused_naming_each(tmp_path):
    from vlalign.trainer import ResumeArgumentsError

    _in_process_trainer(tmp_path, resume_fingerprint={"positives_by": "label"}).train()
    changed = _in_process_trainer(
        tmp_path,
        max_steps=6,
        seed=4,
        resume_fingerprint={"positives_by": "image"},
        training={"learning_rate": 2e-3, "per_device_train_batch_size": 2},
    )
    with pytest.raises(ResumeArgumentsError) as caught:
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    message = str(caught.value)
    for expected in (
        "learning_rate: 0.001 in the checkpoint, 0.002 now",
        "seed: 3 in the checkpoint, 4 now",
        "per_device_train_batch_size: 4",
        "positives_by: 'label' in the checkpoint, 'image' now",
        "resume_with_changed_arguments",
    ):
        assert expected in message
    assert "max_steps" not in message  # training longer is what resuming is for


def test_resume_with_changed_settings_allowed_records_the_changes(tmp_path):
    _in_process_trainer(tmp_path).train()
    allowed = _in_process_trainer(
        tmp_path, max_steps=6, training={"per_device_train_batch_size": 2}, resume_with_changed_arguments=True
    )
    allowed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert allowed.state.global_step == 6
    assert allowed.resume_changes == {"per_device_train_batch_size": {"checkpoint": 4, "now": 2, "from_step": 5}}
    # and every later checkpoint carries them, so a second resume still reports the whole history
    state = json.loads((tmp_path / "checkpoint-6" / "vlalign_trainer_state.json").read_text())
    assert state["resume_changes"] == allowed.resume_changes


def test_resuming_with_other_trainable_parameters_names_the_cause(tmp_path):
    """A resume allowed to change settings cannot change which parameters train (here the vision tower locked):
    the checkpoint's optimizer moments belong to other parameters. It is refused with the reason and the changed
    setting, not torch's bare parameter-group error."""
    from vlalign.trainer import ResumeArgumentsError

    _in_process_trainer(tmp_path, resume_fingerprint={"lock_image": False}).train()
    locked = _in_process_trainer(
        tmp_path, max_steps=6, resume_with_changed_arguments=True, resume_fingerprint={"lock_image": True}
    )
    locked.model.lock_image_tower()
    with pytest.raises(ResumeArgumentsError, match=r"optimizer state does not fit .*changed settings: lock_image"):
        locked.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_checkpoint_appears_only_complete(tmp_path, monkeypatch):
    """A save that dies half-way (here: the optimizer file cannot be written) leaves no checkpoint-N folder, only a
    hidden staging folder that `latest` ignores and the next run removes."""
    from vlalign.output_folder import DiskFullError, latest_complete_checkpoint

    trainer = _in_process_trainer(tmp_path, max_steps=4)
    original = trainer._save_optimizer_and_scheduler

    def fail_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; basic_ios::clear: iostream error"
            )
        original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", fail_at_step_4)
    monkeypatch.setattr("vlalign.output_folder._free_bytes", lambda path: 0)
    with pytest.raises(
        DiskFullError, match=r"the disk is full: checkpoint-4 could not be written to .* \(0 MiB free\)"
    ):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    assert not list(tmp_path.glob(".incomplete-*"))  # cleaned up on the failure


def test_latest_skips_an_incomplete_checkpoint_with_a_warning(tmp_path, caplog):
    import logging

    import train

    _in_process_trainer(tmp_path, max_steps=4).train()
    # as a kill during a save by an older version (or another trainer) leaves it: the folder, no trainer state
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-6").mkdir()
    truncated = tmp_path / "checkpoint-6" / "model.safetensors"
    data = (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    with caplog.at_level(logging.WARNING, logger="vlalign.output_folder"):
        assert train._resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-6 (model.safetensors is truncated or damaged)" in caplog.text
    assert "checkpoint-4 (no trainer_state.json)" in caplog.text
    with pytest.raises(SystemExit, match=r"checkpoint-4 is incomplete: no trainer_state.json"):
        train._resolve_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))


def test_an_allowed_learning_rate_change_is_the_one_used(tmp_path):
    """The restored optimizer and scheduler state would keep the checkpoint's rate while the card showed the new one."""
    _in_process_trainer(tmp_path, training={"lr_scheduler_type": "constant"}).train()
    allowed = _in_process_trainer(
        tmp_path,
        max_steps=6,
        resume_with_changed_arguments=True,
        training={"lr_scheduler_type": "constant", "learning_rate": 5e-3},
    )
    allowed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    logged = [h["learning_rate"] for h in allowed.state.log_history if "loss" in h]
    assert logged[-2:] == [pytest.approx(5e-3), pytest.approx(5e-3)]
    assert [g["lr"] for g in allowed.optimizer.param_groups] == [pytest.approx(5e-3)] * 2
    assert allowed.resume_changes["learning_rate"] == {"checkpoint": 1e-3, "now": 5e-3, "from_step": 5}


def test_save_total_limit_rotates_the_published_checkpoints(tmp_path):
    trainer = _in_process_trainer(tmp_path, max_steps=4, training={"save_steps": 1, "save_total_limit": 2})
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert not list(tmp_path.glob(".incomplete-*"))

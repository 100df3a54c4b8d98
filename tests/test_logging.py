"""ContrastiveTrainer logging: throughput (samples/s) and `report_to=["tensorboard"]` event files."""

import pytest
import torch
from fixtures import tiny_batch, tiny_tcl_config
from transformers import TrainingArguments

from vlalign import TCLModel
from vlalign.trainer import ContrastiveTrainer


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


def _trainer(tmp_path, report_to="none", **kwargs):
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=report_to,
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", seed=0,
                             dataloader_drop_last=True, **kwargs)
    return ContrastiveTrainer(model=model, args=args, train_dataset=list(range(32)), data_collator=_collate)


def test_throughput_is_samples_over_elapsed_time(tmp_path, monkeypatch):
    clock = FakeClock(now=100.0)
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(clock))
    trainer = _trainer(tmp_path)
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


def test_throughput_counts_every_micro_batch_with_gradient_accumulation(tmp_path, monkeypatch):
    # the clock advances 1 s per call: 1 call at the first step, then 1 per log -> 1 s per logging interval
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(FakeClock(now=0.0, step=1.0)))
    trainer = _trainer(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # 2 optimizer steps x 2 micro-batches x 4 rows per interval
    assert [entry["throughput_samples_per_second"] for entry in logs] == [16.0, 16.0]


def test_tensorboard_event_files_have_loss_components_and_throughput(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(ContrastiveTrainer, "_clock", staticmethod(FakeClock(now=0.0, step=0.5)))
    trainer = _trainer(tmp_path, report_to=["tensorboard"], max_steps=6, logging_steps=2)
    trainer.train()

    # transformers 5 has no `logging_dir`: the TensorBoard callback writes to output_dir/runs/<date>_<host>
    event_files = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_i2t", "train/loss_t2i", "train/loss_itm", "train/loss_mlm",
                "train/temperature", "train/alpha", "train/throughput_samples_per_second"):
        assert tag in scalars, (tag, sorted(scalars))
        assert [event.step for event in events.Scalars(tag)] == [2, 4, 6], tag
    # 2 steps x 4 rows per 0.5 s interval
    assert [event.value for event in events.Scalars("train/throughput_samples_per_second")] == [16.0] * 3
    losses = [event.value for event in events.Scalars("train/loss_i2t")]
    history = [entry["loss_i2t"] for entry in trainer.state.log_history if "loss_i2t" in entry]
    assert losses == pytest.approx(history)
    # end-of-training summary (the Trainer's own train_samples_per_second) is there too
    assert "train/train_samples_per_second" in scalars

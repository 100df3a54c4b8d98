"""Exact resume after a crash: a training run killed with SIGKILL after a checkpoint and resumed with
`--resume_from_checkpoint latest` ends with the same weights as an uninterrupted run (tolerance 1e-6), for TCL, CODIS
and MIVC.

The runs are real `training/train.py` processes. The killed one gets a callback that sends itself SIGKILL at the end
of a step after the last checkpoint (no clean-up runs, as on a pre-empted machine). The set-up makes every piece of
state matter: the resumed checkpoint is in the second epoch (data order, skipped batches), queues wrap around
(pointers), the alpha ramp is still rising, EMA teachers move every step, BERT dropout and MLM masking draw from the
RNG, captions are drawn at random per batch, and TCL uses gradient accumulation. A fourth run trains TCL on data
with every kind of hostile image and caption (rows skipped, refilled with copies, sanitised): same weights, and
every data-issue count covers the whole run exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures import TINY_TRAIN_MODEL
from test_hostile_data import DIGIT_NAMES, hostile_rows, write_split
from test_train_script import TINY_MIVC

from vlalign.data import build_digits_processor

REPO_ROOT = Path(__file__).resolve().parent.parent
# (max_steps, save_steps, kill after step): 40 rows at batch 8 are 5 steps per epoch, so checkpoint-6 is one step
# into the second epoch; killed after step 7
SCHEDULE = (9, 3, 7)

KILLING_LAUNCHER = textwrap.dedent("""
    import os, runpy, signal, sys
    from transformers import TrainerCallback
    import vlalign.trainer

    class KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    original_init = vlalign.trainer.VLAlignTrainer.__init__

    def init_with_kill(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(KillAfterStep())

    vlalign.trainer.VLAlignTrainer.__init__ = init_with_kill
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
""")

TRAINING = {"max_steps": SCHEDULE[0], "save_strategy": "steps", "save_steps": SCHEDULE[1], "logging_steps": 1,
            "report_to": "none", "use_cpu": True, "seed": 5, "dataloader_drop_last": True, "learning_rate": 1e-3}

CASES = {
    "tcl": {"model": {**TINY_TRAIN_MODEL, "queue_size": 16},
            "data": {"max_train_samples": 40, "max_eval_samples": 20},
            "training": {**TRAINING, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                         "alpha_ramp_steps": 20},
            "run": {"cpu_threads": 1}},
    "codis": {"model": {**{k: v for k, v in TINY_TRAIN_MODEL.items() if k != "lmi_image_grid"},
                        "model_type": "codis", "codebook_size": 8, "queue_size": 16},
              "data": {"max_train_samples": 40, "max_eval_samples": 20},
              "training": {**TRAINING, "per_device_train_batch_size": 8, "alpha_ramp_steps": 20},
              "run": {"cpu_threads": 1}},
    "mivc": {"model": TINY_MIVC,
             "data": {"num_train_items": 40, "num_test_items": 8, "image_size": 16},
             "training": {**TRAINING, "per_device_train_batch_size": 8},
             "run": {"cpu_threads": 1}},
}


def hostile_case(tmp_path: Path) -> tuple[dict, tuple[int, int, int]]:
    """TCL on 48 rows of which 18 hold every kind of hostile image or caption (skipped, refilled, sanitised), 6 steps
    per epoch; checkpoint-8 is two steps into the second epoch, killed after step 9."""
    (tmp_path / "files").mkdir()
    rows, _ = hostile_rows(tmp_path / "files")
    write_split(tmp_path / "train.parquet", rows, num_good=48 - len(rows), first_digit=0)
    write_split(tmp_path / "test.parquet", [], num_good=10, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {"model": {**TINY_TRAIN_MODEL, "queue_size": 16},
              "data": {"dataset_name": "parquet", "cache_dir": str(tmp_path / "cache"), "image_id_column": None,
                       "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
                       "class_names": DIGIT_NAMES, "zero_shot_templates": ["a handwritten digit {name}"]},
              "training": {**TRAINING, "per_device_train_batch_size": 8, "max_steps": 10, "save_steps": 4,
                           "alpha_ramp_steps": 20},
              "run": {"processor_name_or_path": str(tmp_path / "processor"), "cpu_threads": 1}}
    return config, (10, 4, 9)


def _case(model_type: str, tmp_path: Path) -> tuple[dict, tuple[int, int, int]]:
    return hostile_case(tmp_path) if model_type == "tcl_hostile_data" else (CASES[model_type], SCHEDULE)


def _run(script: list[str], config: Path, output_dir: Path, *extra: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "REPO_ROOT": str(REPO_ROOT), "KILL_AT_STEP": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *script, "--config", str(config), "--output_dir", str(output_dir), *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model_type", [*sorted(CASES), "tcl_hostile_data"])
def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(model_type, tmp_path):
    case, (max_steps, save_steps, kill_at) = _case(model_type, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(case))
    train_py = [str(REPO_ROOT / "training" / "train.py")]

    uninterrupted = _run(train_py, config, tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    launcher = tmp_path / "killing_launcher.py"
    launcher.write_text(KILLING_LAUNCHER)
    killed_dir = tmp_path / "killed"
    killed = _run([str(launcher)], config, killed_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = f"checkpoint-{2 * save_steps}"
    checkpoints = sorted(p.name for p in killed_dir.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{save_steps}", last]  # killed mid-run, after the second checkpoint
    assert not (killed_dir / "model.safetensors").exists()
    assert (killed_dir / last / "vlalign_trainer_state.json").exists()

    resumed = _run(train_py, config, killed_dir, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last in resumed.stderr  # resumed from the newest checkpoint

    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    actual = load_file(killed_dir / "model.safetensors")
    assert sorted(actual) == sorted(expected)
    before = load_file(killed_dir / last / "model.safetensors")
    moved = max((expected[k].double() - before[k].double()).abs().max().item() for k in expected
                if expected[k].is_floating_point())
    assert moved > 1e-4  # the three steps after the checkpoint changed the weights far beyond the tolerance
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)
    if model_type != "mivc":  # the queues wrapped around: their pointers and contents are part of the state
        assert int(expected["image_queue.ptr"]) == (max_steps * 8) % 16
    results = {name: json.loads((d / "eval_results.json").read_text())
               for name, d in (("uninterrupted", tmp_path / "uninterrupted"), ("resumed", killed_dir))}
    assert results["resumed"]["train_steps"] == results["uninterrupted"]["train_steps"] == max_steps
    # every data-issue count covers the whole run once, as in the uninterrupted run
    counts = {name: {k: v for k, v in r.items() if k.startswith("train_") and ("skipped" in k or "sanitised" in k)}
              for name, r in results.items()}
    assert counts["resumed"] == counts["uninterrupted"]
    assert counts["resumed"]["train_nonfinite_steps_skipped"] == 0
    if model_type == "tcl_hostile_data":  # 10 steps x 8 rows over 48 rows of which 18 are hostile
        assert counts["resumed"]["train_items_skipped"] > 10 and counts["resumed"]["train_images_skipped"] > 5
        assert counts["resumed"]["train_captions_sanitised"] > 0
    else:
        assert counts["resumed"]["train_items_skipped"] == 0


def test_resume_latest_without_a_checkpoint_says_so(tmp_path):
    import train

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CASES["tcl"]))
    with pytest.raises(SystemExit, match="no complete checkpoint-N folder"):
        train.main(["--config", str(config), "--output_dir", str(tmp_path / "empty"),
                    "--resume_from_checkpoint", "latest"])
    with pytest.raises(SystemExit, match="no such checkpoint folder"):
        train.main(["--config", str(config), "--output_dir", str(tmp_path / "empty"),
                    "--resume_from_checkpoint", str(tmp_path / "typo")])


# ---- in-process: finished runs, changed settings, staged checkpoints ---------------------------------------------
def _in_process_trainer(output_dir, max_steps=4, rows=40, seed=3, **kwargs):
    from fixtures import tiny_tcl_config
    from test_nonfinite import InjectingCollator
    from vlalign import TCLModel
    from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments

    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config(queue_size=8))
    training = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "max_steps": max_steps,
                "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "remove_unused_columns": False,
                "use_cpu": True, "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True, "seed": seed}
    training.update(kwargs.pop("training", {}))
    if "resume_with_changed_arguments" in kwargs:
        training["resume_with_changed_arguments"] = kwargs.pop("resume_with_changed_arguments")
    args = ContrastiveTrainingArguments(**training)
    return ContrastiveTrainer(model=model, args=args, train_dataset=list(range(rows)),
                              data_collator=InjectingCollator(), **kwargs)


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
    changed = _in_process_trainer(tmp_path, max_steps=6, seed=4, resume_fingerprint={"positives_by": "image"},
                                  training={"learning_rate": 2e-3, "per_device_train_batch_size": 2})
    with pytest.raises(ResumeArgumentsError) as caught:
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    message = str(caught.value)
    for expected in ("learning_rate: 0.001 in the checkpoint, 0.002 now", "seed: 3 in the checkpoint, 4 now",
                     "per_device_train_batch_size: 4", "positives_by: 'label' in the checkpoint, 'image' now",
                     "resume_with_changed_arguments"):
        assert expected in message
    assert "max_steps" not in message  # training longer is what resuming is for


def test_resume_with_changed_settings_allowed_records_the_changes(tmp_path):
    _in_process_trainer(tmp_path).train()
    allowed = _in_process_trainer(tmp_path, max_steps=6, training={"per_device_train_batch_size": 2},
                                  resume_with_changed_arguments=True)
    allowed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert allowed.state.global_step == 6
    assert allowed.resume_changes == {"per_device_train_batch_size": {"checkpoint": 4, "now": 2, "from_step": 5}}
    # and every later checkpoint carries them, so a second resume still reports the whole history
    state = json.loads((tmp_path / "checkpoint-6" / "vlalign_trainer_state.json").read_text())
    assert state["resume_changes"] == allowed.resume_changes


def test_a_checkpoint_appears_only_complete(tmp_path, monkeypatch):
    """A save that dies half-way (here: the optimizer file cannot be written) leaves no checkpoint-N folder, only a
    hidden staging folder that `latest` ignores and the next run removes."""
    from vlalign.output_folder import DiskFullError, latest_complete_checkpoint

    trainer = _in_process_trainer(tmp_path, max_steps=4)
    original = trainer._save_optimizer_and_scheduler

    def fail_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; "
                               "basic_ios::clear: iostream error")
        original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", fail_at_step_4)
    monkeypatch.setattr("vlalign.output_folder._free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError, match=r"the disk is full: checkpoint-4 could not be written to .* \(0 MiB free\)"):
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
    allowed = _in_process_trainer(tmp_path, max_steps=6, resume_with_changed_arguments=True,
                                  training={"lr_scheduler_type": "constant", "learning_rate": 5e-3})
    allowed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    logged = [h["learning_rate"] for h in allowed.state.log_history if "loss" in h]
    assert logged[-2:] == [pytest.approx(5e-3), pytest.approx(5e-3)]
    assert [g["lr"] for g in allowed.optimizer.param_groups] == [pytest.approx(5e-3)] * 2
    assert allowed.resume_changes["learning_rate"] == {"checkpoint": 1e-3, "now": 5e-3, "from_step": 5}


KILL_DURING_SAVE = textwrap.dedent("""
    import os, runpy, signal, sys
    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):  # the weights of this checkpoint are written, the rest never is
        if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save_then_die
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
""")


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_to_resume_from(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CASES["tcl"]))
    launcher = tmp_path / "kill_during_save.py"
    launcher.write_text(KILL_DURING_SAVE)
    killed = _run([str(launcher)], config, tmp_path / "out", kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = _run([str(REPO_ROOT / "training" / "train.py")], config, tmp_path / "out",
                   "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from " in resumed.stderr and "checkpoint-3" in resumed.stderr
    assert "Removed 1 incomplete save(s) left by an interrupted run" in resumed.stderr
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["train_steps"] == SCHEDULE[0]


def test_save_total_limit_rotates_the_published_checkpoints(tmp_path):
    trainer = _in_process_trainer(tmp_path, max_steps=4, training={"save_steps": 1, "save_total_limit": 2})
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3", "checkpoint-4"]
    assert not list(tmp_path.glob(".incomplete-*"))

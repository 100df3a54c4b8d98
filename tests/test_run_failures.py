"""training/train.py when a run goes wrong: a second run on a folder in use, a final save that fails half-way,
an eval split or a training split with nothing usable, a SIGTERM (directly, or to the `accelerate launch` parent),
and data-issue counts that must cover only the batches trained on. Each case failed before it was handled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures import TINY_TRAIN_MODEL
from test_hostile_data import DIGIT_NAMES, write_split

from vlalign.data import build_digits_processor
from vlalign.output_folder import DiskFullError, OutputFolderLock

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING = {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "report_to": "none",
            "use_cpu": True, "save_strategy": "no", "dataloader_drop_last": True, "learning_rate": 1e-3}
BROKEN_IMAGE = {"bytes": b"\x89PNG\r\n\x1a\n but not really", "path": None}


def _parquet_case(tmp_path: Path, train_rows: list[dict], num_good: int, eval_rows=(), num_eval_good=8,
                  **training) -> Path:
    write_split(tmp_path / "train.parquet", list(train_rows), num_good=num_good, first_digit=0)
    write_split(tmp_path / "test.parquet", list(eval_rows), num_good=num_eval_good, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {"model": {**TINY_TRAIN_MODEL, "queue_size": 16},
              "data": {"dataset_name": "parquet", "cache_dir": str(tmp_path / "cache"), "image_id_column": None,
                       "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
                       "class_names": DIGIT_NAMES, "zero_shot_templates": ["a handwritten digit {name}"]},
              "training": {**TRAINING, "output_dir": str(tmp_path / "out"), **training},
              "run": {"processor_name_or_path": str(tmp_path / "processor"), "cpu_threads": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _digits_config(tmp_path: Path, **training) -> Path:
    config = {"model": TINY_TRAIN_MODEL, "data": {"max_train_samples": 64, "max_eval_samples": 16},
              "training": {**TRAINING, "output_dir": str(tmp_path / "out"), **training}, "run": {"cpu_threads": 1}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    import train

    config = _digits_config(tmp_path)
    holder = OutputFolderLock(tmp_path / "out").acquire()  # the first run, alive
    try:
        with pytest.raises(SystemExit, match=r"output_dir .*out is in use by another run \(pid \d+ on .*\)"):
            train.main(["--config", str(config)])
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        holder.release()
    # a run that ended (or crashed: the kernel drops its lock) leaves the lock file, which blocks nothing
    assert (tmp_path / "out" / ".vlalign-run.lock").is_file()
    OutputFolderLock(tmp_path / "out").acquire().release()


def test_a_final_save_that_fails_half_way_keeps_the_previous_model_whole(tmp_path, monkeypatch):
    import train

    config = _digits_config(tmp_path)
    train.main(["--config", str(config)])
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json", "README.md")}
    def full_disk(*args, **kwargs):  # the card is written after the weights, config and processor
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_model_card", full_disk)
    with pytest.raises(DiskFullError, match=r"the disk is full: the final model could not be written to .*out"):
        train.main(["--config", str(config), "--seed", "7", "--model.embed_dim", "24"])
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before  # weights, config and card all still the first run's
    assert not [p.name for p in out.iterdir() if p.name.startswith(".incomplete-")]


def test_an_eval_split_with_nothing_usable_stops_before_training(tmp_path):
    import train

    config = _parquet_case(tmp_path, [], num_good=32, eval_rows=[{"image": BROKEN_IMAGE, "caption": "a digit"}] * 3,
                           num_eval_good=0)
    start = time.time()
    with pytest.raises(SystemExit, match=r"eval split 'test': 3 rows give 0 usable images and 0 usable captions "
                                         r"\(3 images skipped \(corrupt 3\)"):
        train.main(["--config", str(config), "--max_steps", "200"])
    assert time.time() - start < 60  # not after 200 steps
    assert not (tmp_path / "out").exists()


def test_training_on_nothing_exits_non_zero_without_a_card(tmp_path):
    import train

    broken = [{"image": BROKEN_IMAGE, "caption": "a handwritten digit one"}] * 16
    config = _parquet_case(tmp_path, broken, num_good=0)
    with pytest.raises(SystemExit, match=r"nothing was trained: 2 optimizer steps on 0 usable training rows"):
        train.main(["--config", str(config)])
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out" / "model.safetensors").exists()
    # fewer rows than one batch with drop_last, and zero epochs: refused before training
    (tmp_path / "small").mkdir()
    with pytest.raises(SystemExit, match=r"it has 5 rows, fewer than one batch of 8 with dataloader_drop_last"):
        train.main(["--config", str(_parquet_case(tmp_path / "small", [], num_good=5))])
    with pytest.raises(SystemExit, match=r"num_train_epochs=0 gives 0 optimizer steps"):
        train.main(["--config", str(_digits_config(tmp_path / "zero")), "--max_steps", "-1", "--num_train_epochs", "0"])


def test_skip_counts_cover_only_the_batches_trained_on(tmp_path):
    """The data loader collates one batch ahead; its broken rows were never trained on."""
    import train

    rows = [{"image": BROKEN_IMAGE, "caption": "a handwritten digit one"}] * 32
    config = _parquet_case(tmp_path, rows, num_good=32)  # half of every batch broken, on average
    results = train.main(["--config", str(config), "--max_steps", "2"])
    assert results["train_steps"] == 2
    # only broken images here, so the images skipped are exactly the rows dropped from the trained batches
    assert results["train_images_skipped"] == results["train_items_skipped"] > 0
    assert results["train_images_skipped"] < 16 + 1  # of 2 batches of 8; the look-ahead batch's are not counted


# ---- SIGTERM ------------------------------------------------------------------------------------------------------
SIGNAL_LAUNCHER = """
import os, runpy, signal, sys, time
from transformers import TrainerCallback
import vlalign.trainer

class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == int(os.environ["SIGNAL_AT_STEP"]):
            target = os.getppid() if os.environ.get("SIGNAL_PARENT") else os.getpid()
            os.kill(target, signal.SIGTERM)
            time.sleep(1)  # the signal arrives during the step, as on a preempted machine

original_init = vlalign.trainer.VLAlignTrainer.__init__

def init_with_signal(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(SignalAtStep())

vlalign.trainer.VLAlignTrainer.__init__ = init_with_signal
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["REPO_ROOT"], "training", "train.py"), run_name="__main__")
"""


def _signal_run(tmp_path: Path, *extra: str, parent: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "signal_launcher.py"
    script.write_text(SIGNAL_LAUNCHER)
    env = {**os.environ, "REPO_ROOT": str(REPO_ROOT), "SIGNAL_AT_STEP": "3", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT / "training")])}
    if parent:
        env["SIGNAL_PARENT"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(script)]
    else:
        command = [sys.executable, str(script)]
    config = _digits_config(tmp_path, max_steps=40, save_strategy="steps", save_steps=100)
    return subprocess.run([*command, "--config", str(config), *extra], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("jit", [False, True], ids=["plain", "enable_jit_checkpoint"])
def test_sigterm_saves_a_checkpoint_and_exits_non_zero_without_a_final_model(tmp_path, jit):
    extra = ["--enable_jit_checkpoint", "true"] if jit else []
    done = _signal_run(tmp_path, *extra)
    out = tmp_path / "out"
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "training stopped by SIGTERM after step 3" in done.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


def test_sigterm_to_the_accelerate_launcher_stops_the_trainer_too(tmp_path):
    pytest.importorskip("accelerate")
    done = _signal_run(tmp_path, parent=True)
    out = tmp_path / "out"
    assert done.returncode != 0
    # the trainer, orphaned before, got SIGTERM when its launcher died: it saved and exited
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-3" / "trainer_state.json").is_file():
        time.sleep(1)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    deadline = time.time() + 60
    lock_free = False
    while time.time() < deadline and not lock_free:  # the trainer process has ended: its lock is free
        try:
            OutputFolderLock(out).acquire().release()
            lock_free = True
        except Exception:
            time.sleep(1)
    assert lock_free
    assert not (out / "model.safetensors").exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_before_training(tmp_path):
    import train

    from vlalign.data import build_digits_tokenizer

    config = _digits_config(tmp_path)
    processor = build_digits_processor(image_size=16)
    processor.tokenizer = build_digits_tokenizer(extra_words=[f"word{i}" for i in range(300)])
    processor.save_pretrained(tmp_path / "big_processor")
    with pytest.raises(SystemExit, match=r"tokenizer.*\d+.*vocab"):
        train.main(["--config", str(config), "--processor_name_or_path", str(tmp_path / "big_processor"),
                    "--model.text_config.vocab_size", "200"])
    assert not (tmp_path / "out").exists()


def test_resuming_on_other_training_data_is_refused_and_an_allowed_change_reaches_the_card(tmp_path):
    import train

    config = _digits_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    train.main(["--config", str(config)])
    with pytest.raises(Exception, match=r"train_data: '[0-9a-f]{16}' in the checkpoint, '[0-9a-f]{16}' now"):
        train.main(["--config", str(config), "--max_steps", "6", "--max_train_samples", "48",
                    "--resume_from_checkpoint", "latest"])
    results = train.main(["--config", str(config), "--max_steps", "6", "--learning_rate", "2e-3",
                          "--resume_from_checkpoint", "latest", "--resume_with_changed_arguments", "true"])
    assert results["resumed_with_changed_arguments"] == {
        "learning_rate": {"checkpoint": 1e-3, "now": 2e-3, "from_step": 5}}
    card = (tmp_path / "out" / "README.md").read_text()
    assert r"| changed\_on\_resume | learning\_rate 0.001 -\> 0.002 from step 5 |" in card  # Markdown-escaped


def test_a_multi_image_eval_split_without_a_decodable_image_is_refused():
    import train

    from vlalign.data import MIVCDataArguments
    from vlalign.data.multiview_digits import build_mivc_digits_processor

    rows = [{"images": [BROKEN_IMAGE, BROKEN_IMAGE], "prompt": "<image> which digit?", "answer": "one"}] * 3
    with pytest.raises(SystemExit, match=r"eval split 'test': none of its 3 items has a decodable image "
                                         r"\(6 images skipped \(corrupt 6\)"):
        train._check_multi_image_eval(rows, build_mivc_digits_processor(image_seq_length=1, image_size=16),
                                      MIVCDataArguments())

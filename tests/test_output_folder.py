"""vlalign.output_folder: the lock that keeps a second run out, staged publishing that never mixes two saves, the
checks that tell a complete checkpoint from a half-written one, and write errors that say the disk is full."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import save_file

from vlalign.output_folder import (
    DiskFullError,
    OutputFolderInUseError,
    OutputFolderLock,
    checkpoint_problems,
    explain_write_error,
    publish_files,
    remove_stale_staging,
    staging_folder,
)


def test_the_lock_refuses_a_second_holder_and_frees_with_its_holder(tmp_path):
    first = OutputFolderLock(tmp_path / "out").acquire()
    with pytest.raises(OutputFolderInUseError, match=r"is in use by another run \(pid \d+ on "):
        OutputFolderLock(tmp_path / "out").acquire()
    OutputFolderLock(tmp_path / "out", rank=1).acquire().release()  # each process rank has its own lock
    first.release()
    OutputFolderLock(tmp_path / "out").acquire().release()


def test_publishing_replaces_the_old_save_and_its_stale_shards_only(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ):
        (target / name).write_text("old")
    (target / "checkpoint-4").mkdir()
    staging = staging_folder(target / "final")
    (staging / "model.safetensors").write_text("new")
    (staging / "config.json").write_text("new")
    assert publish_files(staging, target) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-4", "config.json", "model.safetensors"]
    assert (target / "config.json").read_text() == (target / "model.safetensors").read_text() == "new"
    assert not staging.exists()


def test_stale_staging_folders_are_removed(tmp_path):
    (tmp_path / ".incomplete-checkpoint-6").mkdir()
    (tmp_path / "checkpoint-4").mkdir()
    assert remove_stale_staging(tmp_path) == [".incomplete-checkpoint-6"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def test_checkpoint_problems_name_what_is_missing_or_damaged(tmp_path):
    save_file({"w": torch.zeros(64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert checkpoint_problems(tmp_path) == []
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])
    (tmp_path / "trainer_state.json").write_text("{")
    assert checkpoint_problems(tmp_path) == [
        "trainer_state.json is unreadable",
        "model.safetensors is truncated or damaged",
    ]
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    assert "missing shard model-00001-of-00001.safetensors" in checkpoint_problems(tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
)
def test_disk_full_errors_say_so(tmp_path, error):
    explained = explain_write_error(error, tmp_path, "checkpoint-40")
    assert isinstance(explained, DiskFullError) and explained.errno == errno.ENOSPC
    assert str(explained).startswith(f"[Errno 28] the disk is full: checkpoint-40 could not be written to {tmp_path}")


def test_torchs_iostream_error_means_a_full_disk_only_when_little_is_free(tmp_path, monkeypatch):
    error = RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; basic_ios::clear: iostream error"
    )
    monkeypatch.setattr("vlalign.output_folder._free_bytes", lambda path: 10 * 2**30)
    plain = explain_write_error(error, tmp_path, "checkpoint-40")
    assert not isinstance(plain, DiskFullError) and "checkpoint-40 could not be written to" in str(plain)
    monkeypatch.setattr("vlalign.output_folder._free_bytes", lambda path: 2**20)
    assert "the disk is full" in str(explain_write_error(error, tmp_path, "checkpoint-40"))


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from vlalign.output_folder import OutputFolderLock; "
                f"lock = OutputFolderLock({str(tmp_path / 'out')!r}).acquire(); "
                "print('held', flush=True); time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputFolderInUseError, match=rf"pid {holder.pid} on "):
        OutputFolderLock(tmp_path / "out").acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    time.sleep(0.1)
    OutputFolderLock(tmp_path / "out").acquire().release()  # no clean-up ran, and the folder is free

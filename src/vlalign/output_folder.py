"""What a training run may and may not do to its output folder (training-only; does not travel with the model).

- `OutputFolderLock`: one run per output folder. The lock is an advisory `flock` on a file in the folder, held for the
  life of the process: the kernel drops it when the process ends, however it ends, so a crashed run never leaves the
  folder locked (the file it leaves behind is reused).
- Checkpoints and the final model appear only complete: they are written into a hidden staging folder beside their
  place (`staging_folder`) and then renamed into it (`publish_folder`, `publish_files`). A staging folder left by a
  crash does not match `checkpoint-N` and is removed by the next run on the folder (`remove_stale_staging`).
- `checkpoint_problems` / `latest_complete_checkpoint`: what makes a `checkpoint-N` folder unusable (one written
  before these rules, by another trainer, or damaged afterwards) and the newest one without problems.
- `explain_write_error`: a failed write says which file and, when the disk is full, that the disk is full (torch's
  writer says `basic_ios::clear: iostream error`, safetensors `IoError(... StorageFull ...)`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

logger = logging.getLogger("vlalign.output_folder")

STAGING_PREFIX = ".incomplete-"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# the file names a saved model's weights may have (transformers' sharded and PEFT adapter layouts included)
WEIGHT_FILES = re.compile(r"^(model|adapter_model)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_DISK_FULL_TEXT = ("no space left", "storagefull", "storage full", "disk quota", "iostream error", "file write failed")


class OutputFolderInUseError(RuntimeError):
    """Another live process holds the output folder's lock."""


class DiskFullError(OSError):
    """A checkpoint or the final model could not be written because its disk is full."""


# ---- one run per folder -------------------------------------------------------------------------------------------
class OutputFolderLock:
    """Exclusive lock on `folder` for this process (one lock file per process rank, so that every process of a
    distributed run holds its own and a second run's processes are all refused). `acquire` raises
    `OutputFolderInUseError` naming the holder when a live process holds it. Keep the object: the lock lasts as long
    as its open file, which closes when the object is released or garbage-collected."""

    def __init__(self, folder: str | os.PathLike, rank: int = 0):
        self.folder = Path(folder)
        self.path = self.folder / (".vlalign-run.lock" if rank == 0 else f".vlalign-run-rank{rank}.lock")
        self._handle = None

    def acquire(self) -> OutputFolderLock:
        import fcntl  # POSIX; the training entry point runs on Linux / macOS

        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the life of the run)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputFolderInUseError(
                f"output_dir {self.folder} is in use by another run ({holder}). Two runs on one folder would mix their "
                "checkpoints and overwrite each other's model: wait for that run to end, or set another --output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> OutputFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- staged writes ------------------------------------------------------------------------------------------------
def staging_folder(target: str | os.PathLike, per_process: bool = True) -> Path:
    """A fresh, empty hidden folder beside `target` on the same file system (so that the final rename is atomic).
    Its name carries the process id unless the processes of a distributed run must all find it (`per_process`)."""
    target = Path(target)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}{f'-{os.getpid()}' if per_process else ''}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _fsync_tree(folder: Path) -> None:
    """Flush the files of `folder` to disk, so that a rename never publishes data still only in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make the complete folder `staging` appear as `target` in one rename (an older `target` is replaced)."""
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    old = None
    if target.exists():
        old = target.parent / f"{STAGING_PREFIX}{target.name}-replaced-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_files(staging: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Move every file of the complete folder `staging` into `target` (which may hold other things, e.g. checkpoints),
    each by an atomic rename; weight files of an older save that the new one does not have (other shards) are
    removed first, so that the two saves never mix. Returns the published names."""
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for stale in target.iterdir():
        if stale.is_file() and WEIGHT_FILES.match(stale.name) and stale.name not in names:
            stale.unlink()
    # weights last: until they land, the folder still pairs the old weights with files that describe them
    for name in sorted(names, key=lambda n: bool(WEIGHT_FILES.match(n))):
        destination = target / name
        if destination.is_dir() and not (staging / name).is_dir():
            shutil.rmtree(destination)
        elif (staging / name).is_dir() and destination.exists():
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        os.replace(staging / name, destination)
    staging.rmdir()
    return names


def remove_stale_staging(folder: str | os.PathLike) -> list[str]:
    """Delete the staging folders that a killed run left in `folder` (call while holding its lock)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and path.name.startswith(STAGING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    if removed:
        logger.warning(
            "Removed %d incomplete save(s) left by an interrupted run in %s: %s",
            len(removed),
            folder,
            ", ".join(sorted(removed)),
        )
    return removed


# ---- checkpoints --------------------------------------------------------------------------------------------------
def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """Why `folder` cannot be resumed from (empty: it can): a missing or unreadable trainer state, no weights, a
    weights file whose header or length does not hold, a missing shard."""
    from safetensors import safe_open

    folder = Path(folder)
    problems = []
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        problems.append("no trainer_state.json")
    except (OSError, ValueError, KeyError, TypeError):
        problems.append("trainer_state.json is unreadable")
    weights = sorted(p.name for p in folder.glob("*.safetensors*") if WEIGHT_FILES.match(p.name))
    files = [name for name in weights if not name.endswith(".index.json")]
    for index in (name for name in weights if name.endswith(".index.json")):
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            problems.append(f"{index} is unreadable")
            continue
        problems += [f"missing shard {shard}" for shard in sorted(shards) if not (folder / shard).is_file()]
    if not weights:
        problems.append("no model.safetensors")
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
        except Exception:  # safetensors raises its own error type for a short or damaged file
            problems.append(f"{name} is truncated or damaged")
    return problems


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that has no `checkpoint_problems`; each newer one
    that has problems is skipped with a warning naming it and what is wrong."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        logger.warning("Skipping incomplete checkpoint %s (%s); trying an older one", path, "; ".join(problems))
    return None


# ---- write errors -------------------------------------------------------------------------------------------------
def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def explain_write_error(error: BaseException, path: str | os.PathLike, what: str) -> OSError:
    """The error to raise for a failed write of `what` (e.g. "checkpoint-40") into `path`: a `DiskFullError` that
    says so when the disk is full (or the quota is reached), else an OSError naming the path."""
    path = Path(path)
    text = str(error).lower()
    code = getattr(error, "errno", None)
    free = _free_bytes(path)
    # torch's writer reports any failed write as an iostream error: it means a full disk only when little is free
    disk_code = code in (errno.ENOSPC, errno.EDQUOT)
    full = disk_code or any(t in text for t in _DISK_FULL_TEXT)
    if full and (
        disk_code or "space" in text or "storage" in text or "quota" in text or free is None or free < 256 * 2**20
    ):
        where = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        return DiskFullError(
            errno.ENOSPC,
            f"the disk is full: {what} could not be written to {path} ({where}). "
            "Nothing that was saved before was replaced. Free some space (or lower "
            "save_total_limit) and resume",
        )
    return OSError(code or errno.EIO, f"{what} could not be written to {path}: {error}")

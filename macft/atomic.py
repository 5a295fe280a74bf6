"""Write files and directories so that a reader never sees a torn one.

Everything is written under a temporary name beside its target and renamed into place:
a run killed mid-write leaves the previous version (or nothing), never half a file.
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target, if_exists: str = "replace"):
    """Yield a fresh temp directory beside ``target``; on success it becomes ``target`` as a whole.

    if_exists: "replace" swaps out an existing ``target`` (checkpoints, merged models);
    "error" refuses one up front (FileExistsError); "keep" leaves a ``target`` that another
    process finished first and drops ours (caches that two processes may fill at once).
    """
    if if_exists not in ("replace", "error", "keep"):
        raise ValueError(f"if_exists={if_exists!r}: expected replace, error or keep")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if if_exists == "error" and target.exists():
        raise FileExistsError(f"{target} already exists; delete it or choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like a mkdir
        yield tmp
        # Data and directory entries reach the disk before the rename publishes them, so a power cut
        # or kill right after the rename never shows a directory whose files are empty.
        _fsync_dir_files(tmp)
        if if_exists == "replace" and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError as e:
                # rename(2) will not replace a non-empty directory: another process won the race.
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not (if_exists == "keep" and target.is_dir()):
                    raise FileExistsError(f"{target} appeared while it was being written") from None
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(directory):
    """Yield a temp directory; on success each file in it replaces its namesake in ``directory``.

    For directories that hold other things too (a run directory keeps its metrics and
    checkpoints beside the adapter): each file is swapped in whole, the rest is left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=directory))
    try:
        yield tmp
        _fsync_dir_files(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                destination = directory / path.relative_to(tmp)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the result should look like an open()
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _fsync_dir_files(folder: Path):
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path):
    """fsync a directory's entries (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)

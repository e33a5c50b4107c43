"""Writing a run's output directory (`--out`) without ever losing what is already there.

Three rules keep earlier results and the user's own files safe:

* Only a deltatune run directory is ever replaced: one that holds nothing but the files a run
  writes (the caller names them). `--overwrite` on anything else, on the current directory or
  one of its ancestors, on the home directory or on `/` is refused, naming the first foreign file.
* One process at a time writes a target: a lock file `.NAME.lock` beside it (flock, released by
  the OS even after kill -9) is taken before any work starts; a second process fails at once,
  naming the holder.
* A run is written into a staging directory `.NAME.partial-*` beside the target and renamed into
  place only when complete. An existing run is first moved aside (`.NAME.replaced-*`) and deleted
  only after the new one is in place, so if anything fails the old run is still there. Whatever
  a killed process left behind for the same target is cleaned (or restored) by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from deltatune.errors import DeltatuneError

LOCK_SUFFIX = ".lock"
PARTIAL_MARK = ".partial-"
REPLACED_MARK = ".replaced-"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# What may be replaced


def protected_reason(out: Path) -> str | None:
    """Why `out` must never be replaced as a run directory, or None."""
    resolved = out.resolve()
    if resolved == Path(resolved.anchor):
        return "the root of the file system"
    with contextlib.suppress(RuntimeError, KeyError):
        if resolved == Path.home().resolve():
            return "your home directory"
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "the current directory"
    if resolved in cwd.parents:
        return "an ancestor of the current directory"
    return None


COMMON_NAMES = frozenset({"README.md"})
"""Run files whose names are common outside deltatune: a directory holding only these is not a run."""


def first_foreign_entry(directory: Path, allowed: frozenset[str]) -> str | None:
    """The first entry (sorted) of `directory` that is not one of the `allowed` plain files, or None."""
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name not in allowed or entry.is_symlink() or not entry.is_file():
            return entry.name
    return None


def check_output_directory(out: Path, overwrite: bool, run_files: frozenset[str]) -> None:
    """Refuse an --out that is not a directory, would replace what a run did not write, or needs --overwrite."""
    if out.is_symlink():
        raise DeltatuneError(
            f"--out {out} is a symbolic link (to {os.readlink(out)}). Give the directory itself, "
            "or a new path for the run."
        )
    if out.exists() and not out.is_dir():
        raise DeltatuneError(
            f"--out {out} is a file, not a directory. Give a directory for the run "
            f"(e.g. --out {out.with_suffix('')}-run)."
        )
    protected = protected_reason(out)
    if protected is not None:
        raise DeltatuneError(
            f"--out {out} is {protected}: a run is written into a directory of its own and "
            f"replaces it, so deltatune never writes a run there. Give a new directory, "
            f"e.g. --out runs/NAME."
        )
    if not out.is_dir():
        return
    try:
        foreign = first_foreign_entry(out, run_files)
        empty = not any(out.iterdir())
    except PermissionError:
        raise DeltatuneError(
            f"--out {out} cannot be read (permission denied). Give a directory you can write to."
        ) from None
    if foreign is None and not empty and all(entry.name in COMMON_NAMES for entry in out.iterdir()):
        foreign = sorted(entry.name for entry in out.iterdir())[0]  # a README.md alone is the user's, not a run
    if foreign is not None:
        raise DeltatuneError(
            f"--out {out} holds {foreign!r}, which a deltatune run does not write: deltatune replaces only its "
            "own run directories (--overwrite included). Choose another --out, or move that file away."
        )
    if not empty and not overwrite:
        raise DeltatuneError(
            f"--out {out} already holds a finished run. Choose another directory, or pass "
            "--overwrite to replace it (the old run is deleted only after the new one is in "
            "place)."
        )


# --------------------------------------------------------------------------------------------
# One writer per target


def lock_or_holder(handle) -> str | None:
    """flock the open lock file without waiting: None once it is ours; if another process holds it, close
    `handle` and return what that process wrote about itself."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder


def write_holder(handle) -> None:
    """Say in the held lock file who holds it, for the message another process shows."""
    handle.seek(0)
    handle.truncate()
    command = " ".join(["deltatune", *sys.argv[1:]])[:200] if sys.argv else "python"
    handle.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}: {command}")
    handle.flush()


class TargetLock:
    """An exclusive flock on `.NAME.lock` beside `out`, naming its holder; `release()` removes the file."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}{LOCK_SUFFIX}"
        self.handle: TextIO | None = None

    def acquire(self) -> TargetLock:
        try:
            import fcntl  # noqa: F401  (what lock_or_holder uses)
        except ImportError:  # no flock (Windows): the staging rename still keeps each run whole
            return self
        for _ in range(20):  # the file can be removed by its last holder between open and flock: try again
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")
            except OSError as error:
                if is_disk_full(error):
                    raise disk_full_error(self.out, "its lock file") from None
                raise DeltatuneError(
                    f"Cannot write beside --out {self.out} ({error.strerror or error}: "
                    f"{self.path}). Give an --out in a directory you can write to."
                ) from None
            holder = lock_or_holder(handle)
            if holder is not None:
                raise DeltatuneError(
                    f"--out {self.out} is being written by another deltatune process ({holder}). Wait for it to "
                    "finish, stop it, or choose another --out."
                )
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                write_holder(handle)
                self.handle = handle
                return self
            handle.close()
        raise DeltatuneError(f"Could not take the lock {self.path}: it keeps being replaced. Try again.")

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.handle.close()
            self.handle = None


# --------------------------------------------------------------------------------------------
# Leftovers of killed runs


def _siblings(out: Path, mark: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out.parent / f".{glob.escape(out.name)}{mark}*")))


def clean_leftovers(out: Path, run_files: frozenset[str]) -> list[str]:
    """Delete staging directories a killed run of `out` left, restore a run a killed replace moved aside.

    Call with the target's lock held (no other process is writing these). Only directories that
    hold nothing but run files (and their half-written temporaries) are touched. Returns what was done.
    """
    done = []
    temporaries = frozenset(f".{name}.partial" for name in run_files)
    for leftover in _siblings(out, PARTIAL_MARK):
        ours = leftover.is_dir() and not leftover.is_symlink()
        if ours and first_foreign_entry(leftover, run_files | temporaries) is None:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name} (left by a run that was killed while saving)")
    for aside in _siblings(out, REPLACED_MARK):
        if not aside.is_dir() or aside.is_symlink() or first_foreign_entry(aside, run_files) is not None:
            continue
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
            done.append(f"removed {aside.name} (a run already replaced)")
        else:
            os.replace(aside, out)
            done.append(f"restored {out.name} (a replacement of it was killed half-way)")
    return done


# --------------------------------------------------------------------------------------------
# Writing


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, or the messages safetensors and sqlite turn them into."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left" in text or "disk is full" in text or "disk quota exceeded" in text


class DiskFullError(DeltatuneError):
    """The disk filled up while deltatune was writing; nothing half-written was kept."""


def free_space(where: Path) -> str:
    """' (12.3 MB free there now)', or '' when that cannot be told."""
    with contextlib.suppress(OSError):
        existing = next(p for p in (where, *where.parents) if p.exists())
        return f" ({shutil.disk_usage(existing).free / 1e6:.1f} MB free there now)"
    return ""


def disk_full_error(where: Path, what: str) -> DiskFullError:
    return DiskFullError(
        f"No space left on the device holding {where}{free_space(where)} while writing {what}. "
        "Nothing half-written was kept and earlier results are untouched; free some space and run "
        "again."
    )


@contextlib.contextmanager
def staging_directory(out: Path, what: str = "the run") -> Iterator[Path]:
    """Yield a fresh, private staging directory `.NAME.partial-*` beside `out`; it is gone when the block ends.

    Whatever the block does not rename away is deleted, on success and on failure alike. A full disk
    while creating or filling it becomes one clear `DiskFullError` naming `what` was being written.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}", dir=out.parent))
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(out, what) from None
        raise DeltatuneError(
            f"Cannot create a directory beside {out} for {what}: {error.strerror or error}. "
            "Give a path in a directory you can write to."
        ) from None
    try:
        try:
            yield staging
        except Exception as error:  # OSError, and safetensors' own error type for a full disk
            if is_disk_full(error):
                raise disk_full_error(out, what) from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(
    out: Path,
    run_files: frozenset[str],
    overwrite: bool,
    what: str = "the run",
    check: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out`; when the block finishes, publish it as `out`.

    Publishing re-checks `out` (a file may have appeared there meanwhile) with `check`, by default
    `check_output_directory(out, overwrite, run_files)`, moves an existing `out` aside, renames the
    staging directory into place and only then deletes the old one. On any failure the staging
    directory goes and `out` is as it was. A full disk becomes one clear error.
    """
    with staging_directory(out, what) as staging:
        yield staging
        _use_default_permissions(staging)
        if check is None:
            check_output_directory(out, overwrite, run_files)
        else:
            check()
        replace_directory(staging, out)


@contextlib.contextmanager
def locked_target(out: Path, run_files: frozenset[str], overwrite: bool) -> Iterator[Path]:
    """Hold `out` for one writer while the block runs: check it, lock it, clean what killed writers left.

    `out` is checked before the lock is taken (a refused --out gets no lock file) and again once it is
    held, since nothing else can write it then. The lock goes when the block ends, however it ends.
    """
    check_output_directory(out, overwrite, run_files)
    lock = TargetLock(out).acquire()
    try:
        for what in clean_leftovers(out, run_files):
            logger.warning("%s: %s", out, what)
        check_output_directory(out, overwrite, run_files)
        yield out
    finally:
        lock.release()


def publish_first(new: Path, out: Path) -> None:
    """Rename `new` to `out` unless another process published `out` first (its copy is as good: keep it).

    For caches, where every writer builds the same content and the first one to finish wins.
    """
    try:
        os.replace(new, out)
    except OSError:
        if not out.exists():
            raise


def replace_directory(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and deleted only once `new` is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{REPLACED_MARK}", dir=out.parent))
    os.replace(out, aside)  # an empty directory may be replaced by a rename
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _use_default_permissions(directory: Path) -> None:
    """Temporary directories and files are private (0700/0600); a finished run gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():  # a merge of several tasks writes one directory per task
            _use_default_permissions(path)
        else:
            os.chmod(path, 0o666 & ~umask)


__all__ = [
    "check_output_directory",
    "clean_leftovers",
    "staged_directory",
    "staging_directory",
    "locked_target",
    "publish_first",
    "replace_directory",
    "TargetLock",
    "lock_or_holder",
    "write_holder",
    "DiskFullError",
    "is_disk_full",
    "disk_full_error",
    "free_space",
    "first_foreign_entry",
]

"""Output folders: one writer at a time, and never over a user's files or a command's own input.

`lock` holds an exclusive `fcntl.flock` on `folder/.vitcompact.lock` for as long as a command
writes there. The kernel drops the lock when its process dies, so a killed run never leaves the
folder locked; the file keeps the holder's PID so that a second writer can be told who holds it.
`lock_file` is the same lock for a command that writes files, not a folder (an ONNX file and its
variants), on `.{name}.lock` beside the file.
`claim` is the check a command makes before its first byte: the folder is empty, new, or
`--overwrite` was given, and it is not (and does not hold) one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ConfigError
from .io import ensure_dir

LOCK_FILE = ".vitcompact.lock"
# Lock files this process holds: resolved path -> [file descriptor, depth]. Re-entrant: the CLI holds
# a run folder while the library's `prune` (which takes it too) writes into it.
_held: dict[Path, list[int]] = {}


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return f"PID {int(text)}"
    return "PID unknown"


@contextlib.contextmanager
def _flock(lock_file: Path, busy: Callable[[str], str]) -> Iterator[bool]:
    """Hold an exclusive `flock` on `lock_file` (created if needed, holding this PID) for the block;
    ConfigError `busy(holder)` when another process holds it. Re-entrant in this process: yields
    whether this block took the lock (False: an outer block holds it)."""
    import fcntl  # POSIX only; imported here so that the rest of the package imports anywhere

    key = lock_file.resolve()
    if key in _held:
        _held[key][1] += 1
        try:
            yield False
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(busy(holder)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]
        yield True
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the lock, after the caller's cleanup inside the block


@contextlib.contextmanager
def lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[Path]:
    """Hold `folder` (created if needed) as its only writer for the block; ConfigError naming the
    holder's PID when another process holds it. A block that wrote nothing leaves no lock file
    (nor the folder, if it made it). `enabled=False` (a torchrun rank other than 0,
    which writes nothing) holds nothing."""
    if not enabled:
        yield Path(folder)
        return
    created = not Path(folder).exists()
    folder = ensure_dir(folder)
    def busy(holder: str) -> str:
        return (f"{folder} is in use by another vitcompact process ({holder}); "
                "wait for it to end or choose another --out")
    with _flock(folder / LOCK_FILE, busy) as took:
        try:
            yield folder
        finally:
            if took and not contents(folder):  # nothing written (a refusal): leave nothing behind either
                with contextlib.suppress(OSError):
                    (folder / LOCK_FILE).unlink()
                    if created:
                        folder.rmdir()


@contextlib.contextmanager
def lock_file(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the output file `path` (with the files written beside it under its name: an ONNX file's
    variants and data files) as its only writer for the block, by the same lock as a folder's, on
    `.{name}.lock` beside it; removed with the block."""
    path = Path(path)
    ensure_dir(path.parent)
    lock_path = path.with_name(f".{path.name}.lock")
    def busy(holder: str) -> str:
        return (f"{path} is being written by another vitcompact process ({holder}); "
                "wait for it to end or choose another file")
    with _flock(lock_path, busy) as took:
        try:
            yield path
        finally:
            if took:
                with contextlib.suppress(OSError):
                    lock_path.unlink()


def contents(folder: Path) -> list[Path]:
    """What `folder` holds besides its lock file ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name != LOCK_FILE)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check that a command may write the artifact folder `out`, before it writes anything.

    Refused: `out` is a file; `out` is, or holds, one of `inputs` (existing paths the command
    reads: never written over, `--overwrite` or not); `out` is not empty and `overwrite` is false.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if _inside(source, target):
            raise ConfigError(f"--out {out} would write over the input {given}; choose another folder")
    if contents(out) and not overwrite:
        raise ConfigError(f"--out {out} already exists and is not empty; pass --overwrite to replace "
                          "the artifact there, or choose a new folder")
    return out

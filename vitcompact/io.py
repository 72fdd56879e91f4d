"""Atomic file writes: every file vitcompact writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, VitCompactError

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def regular_file(path: str | os.PathLike, error: type[VitCompactError] = ArtifactError) -> Path:
    """`path` if it is a regular file (or a link to one); otherwise `error` saying what it is.

    Checked before opening: reading a FIFO or a device would block or never end.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"{path} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path} is a folder, not a file")
    kind = next((name for test, name in _KINDS if test(mode)), None)
    if kind is not None:
        raise error(f"{path} is {kind}, not a regular file")
    return path


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents); a clear error when it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise ArtifactError(f"output folder {path} is not writable")
    return path


def current_umask() -> int:
    """The process umask: from /proc where it can be read, else set and restored at once (the only
    portable way, during which another thread creating a file gets the stricter 0o077)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> Path:
    """Give `path` the mode open() or mkdir() would: mkstemp and mkdtemp make it private."""
    # Some mounts without Unix modes refuse chmod; their files keep the mount's mode.
    with contextlib.suppress(PermissionError, NotImplementedError):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())
    return path


def _pid_prefix(prefix: str) -> str:
    """`prefix` tagged with this process's PID, so a later run can tell whether its writer is gone."""
    return f"{prefix}{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid <= 0 or os.name != "posix":  # no safe probe: os.kill(pid, 0) signals on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, another user's; overflow: not a PID we made
        pass
    return True


def sweep_stale(parent: str | os.PathLike, prefix: str, suffix: str = "") -> list[Path]:
    """Remove `parent/{prefix}{pid}-XXXX{suffix}` temporaries whose process no longer exists.

    A writer killed before its cleanup (SIGKILL, power loss) leaves them behind; a temporary whose
    PID is alive may still be in use and is kept.
    """
    return _sweep(parent, re.compile(re.escape(prefix) + r"(\d+)-[A-Za-z0-9_]+" + re.escape(suffix)))


def sweep_stale_any(parent: str | os.PathLike, infix: str) -> list[Path]:
    """`sweep_stale` of `parent/.{name}{infix}{pid}-XXXX` temporaries made for any name: a killed
    run's partial folder goes at the start of the next run in that folder, whatever its own name."""
    return _sweep(parent, re.compile(r"\..+" + re.escape(infix) + r"(\d+)-[A-Za-z0-9_]+"))


def _sweep(parent: str | os.PathLike, pattern: re.Pattern) -> list[Path]:
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder `parent/{prefix}{pid}-XXXX` with the mode mkdir() would give it, after removing
    those that dead processes left with the same prefix."""
    sweep_stale(parent, prefix)
    return honour_umask(Path(tempfile.mkdtemp(prefix=_pid_prefix(prefix), dir=parent)))


@contextlib.contextmanager
def scratch(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A `temp_dir` (in the system's temporary folder by default) removed when the block ends;
    one left by a killed process goes on the next use of the same prefix."""
    folder = temp_dir(parent or tempfile.gettempdir(), prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `paths`; rename them all over `paths` only if the
    block succeeds, so that files which belong together (an artifact's weights and config) are
    replaced together. A write that fails for want of space or permission is an ArtifactError
    naming the file; the targets keep their previous content and no temporary is left."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for path in targets:
            ensure_dir(path.parent)
            prefix = f".{path.name}.tmp-"
            sweep_stale(path.parent, prefix, ".tmp")
            fd, tmp = tempfile.mkstemp(prefix=_pid_prefix(prefix), suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp in temps:
            honour_umask(tmp)  # after the block: some writers (safetensors) recreate the file 0600
        for tmp, path in zip(temps, targets):
            os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"cannot write {_failed(e, temps, targets)}: {e.strerror or e}") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _failed(error: OSError, temps: list[Path], targets: list[Path]) -> Path:
    """The target whose write failed: the one whose temporary `error` names; else the one whose
    temporary could not be made, if that is where it stopped; else the first."""
    named = {str(t): target for t, target in zip(temps, targets)}
    return named.get(str(error.filename), targets[len(temps)] if len(temps) < len(targets) else targets[0])


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def save_safetensors(tmp: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None,
                     target: Path | None = None) -> None:
    """safetensors' `save_file` of `tensors` (moved to contiguous CPU memory) into `tmp`, with an
    I/O failure (a full disk) turned into an ArtifactError naming `target`, the file being written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:
        cause = str(e).rpartition("I/O error: ")[2] or str(e)
        raise ArtifactError(f"cannot write {target or tmp}: {cause}") from None


def write_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to the safetensors file `path`, atomically."""
    with atomic_path(path) as tmp:
        save_safetensors(tmp, tensors, metadata, target=Path(path))
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_text(obj: Any) -> str:
    """How vitcompact writes JSON: indented, keys in their order, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json_text(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = regular_file(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror or e}") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)

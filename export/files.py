"""Writing exported files atomically, with the file that goes beside each (an ONNX file's external
data, an OpenVINO IR's `.bin`, a TensorRT engine's `.json`).

Work happens in a hidden staging folder beside the destination; only a finished, verified file is
moved into place (its `.data` file first, so the `.onnx` never points at missing weights). `claimed`
is what every exporter holds while it writes: one writer per file, and no file replaced unless asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import onnx

from vitcompact import output_folder
from vitcompact.errors import ArtifactError, ConfigError
from vitcompact.io import ensure_dir, temp_dir

# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1 << 30


def data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def weight_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for init in proto.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            total += 4 * max(len(init.float_data), len(init.int64_data) * 2, len(init.int32_data))
    return total


def save_onnx(proto: onnx.ModelProto, path: Path, external_data: bool | None = None) -> Path:
    """Write `proto` to `path`; weights go to `path.data` when asked or (None) when too large."""
    if external_data is None:
        external_data = weight_bytes(proto) > EXTERNAL_DATA_BYTES
    data_file(path).unlink(missing_ok=True)
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(path).name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


@contextlib.contextmanager
def staging(path: str | os.PathLike, suffix: str = ".onnx") -> Iterator[Path]:
    """A private folder beside `path` (a file name ending in `suffix`) for intermediate files;
    removed afterwards, whatever happens."""
    path = Path(path)
    if path.suffix != suffix:
        raise ArtifactError(f"{path}: the output file name must end in {suffix}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; give the path of the {suffix} file to write")
    ensure_dir(path.parent)
    stage = temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        yield stage
    except OSError as e:  # a full disk while the exporter or onnx writes
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def claim_outputs(paths: Sequence[Path], overwrite: bool = True,
                  beside: Callable[[Path], Path] = data_file) -> None:
    """Refuse, before any work, output files that cannot be written: a folder where a file or the
    file written beside it (`beside(path)`: by default an ONNX file's data file) goes, or (unless
    `overwrite`) either of them already there."""
    for path in paths:
        companion = beside(path)
        if path.is_dir():
            raise ArtifactError(f"{path} is a folder; give the path of the {path.suffix} file to write")
        if companion.is_dir():
            raise ArtifactError(f"{companion} is a folder, where {path.name} writes its {companion.suffix} "
                                "file; move it")
        existing = next((p for p in (path, companion) if p.exists()), None)
        if existing is not None and not overwrite:
            raise ConfigError(f"{existing} already exists; pass --overwrite to replace it, or choose another "
                              "file name")


@contextlib.contextmanager
def claimed(path: Path, outputs: Sequence[Path] | None = None, overwrite: bool = True,
            beside: Callable[[Path], Path] = data_file) -> Iterator[Path]:
    """Hold `path` as its only writer (`output_folder.lock_file`) for the block, once `outputs`
    (default: `path` alone) and the files beside them are claimed (`claim_outputs`). Every exporter
    writes inside one, before it checks its runtime is installed, so a refusal does not depend on
    the machine."""
    with output_folder.lock_file(path):
        claim_outputs([path] if outputs is None else outputs, overwrite, beside)
        yield path


def publish_all(pairs: Sequence[tuple[Path, Path]], spare: Path) -> list[Path]:
    """Move staged ONNX files (with their data files) to their destinations, all or none: what is
    there is moved into `spare` (a new folder beside them) first, and put back if any move fails,
    which raises an ArtifactError naming the destination that failed."""
    moves = [(data_file(staged), data_file(path)) for staged, path in pairs if data_file(staged).exists()]
    moves += list(pairs)
    # A destination's old data file goes too when its new file keeps its weights inside.
    stale = [data_file(path) for staged, path in pairs if not data_file(staged).exists()]
    aside: list[tuple[Path, Path]] = []
    done: list[Path] = []
    current = pairs[0][1]
    try:
        ensure_dir(spare)
        for i, target in enumerate([dst for _, dst in moves] + stale):
            current = target
            if target.exists() or target.is_symlink():
                keep = spare / f"{i}-{target.name}"
                os.replace(target, keep)
                aside.append((target, keep))
        for staged, path in moves:
            current = path
            os.replace(staged, path)
            done.append(path)
    except OSError as e:
        for path in done:
            with contextlib.suppress(OSError):
                path.unlink()
        for target, keep in reversed(aside):
            with contextlib.suppress(OSError):
                os.replace(keep, target)
        raise ArtifactError(f"cannot write {current}: {e.strerror or e}") from None
    return [path for _, path in pairs]


def publish(staged: Path, path: Path) -> Path:
    """Move a staged ONNX file (and its data file, if any) to `path`, replacing what is there."""
    path = Path(path)
    if data_file(staged).exists():
        os.replace(data_file(staged), data_file(path))
    else:
        data_file(path).unlink(missing_ok=True)
    os.replace(staged, path)
    return path

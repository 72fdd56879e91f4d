"""Proof that an exported file computes what the PyTorch model computes.

The ONNX checker's full check (types and shapes included), then onnxruntime against PyTorch on the
same random inputs at several batch sizes: batch 1 and batch 3 differ from the batch used for export
(2), so a graph that silently fixed its batch size fails here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from vitcompact.errors import ArtifactError

DEFAULT_BATCHES = (1, 3)
DEFAULT_ATOL = 1e-4


class ParityError(ArtifactError):
    """An exported model's outputs differ from the reference by more than the tolerance."""


@dataclass
class ParityReport:
    """Max abs difference of the outputs per batch size, against a reference, and the verdict."""

    path: Path
    reference: str
    atol: float
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    top1_agreement: dict[int, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(d <= self.atol for d in self.max_abs_diff.values())

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def raise_if_failed(self) -> "ParityReport":
        if not self.passed:
            batch = max(self.max_abs_diff, key=self.max_abs_diff.get)
            raise ParityError(
                f"{self.path.name} differs from {self.reference} by {self.worst:.3g} at batch {batch} "
                f"(tolerance {self.atol:g}); try another --opset, or export with --no-verify to keep it anyway")
        return self

    def to_dict(self) -> dict:
        return {"reference": self.reference, "atol": self.atol, "passed": self.passed,
                "max_abs_diff": {str(b): d for b, d in self.max_abs_diff.items()},
                "top1_agreement": {str(b): a for b, a in self.top1_agreement.items()}}


def ort_threads() -> int:
    # onnxruntime ignores OMP_NUM_THREADS; honour it so a pinned run stays pinned (0 = ORT's default).
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "0")), 0)
    except ValueError:
        return 0


def ort_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session; an unloadable file is an ArtifactError, not a traceback."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = ort_threads() if threads is None else threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"onnxruntime cannot load {path}: {first}") from None


def check_onnx(path: str | os.PathLike) -> None:
    """The ONNX checker's full check (by path, so models with external data work too)."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        raise ArtifactError(f"{path} fails the ONNX checker: {first}") from None


def input_shape(session: ort.InferenceSession) -> tuple[str, list[int]]:
    """The name and per-image shape [C, H, W] of the session's single input."""
    (inp,) = session.get_inputs()
    chw = inp.shape[1:]
    if not all(isinstance(d, int) for d in chw):
        raise ArtifactError(f"input {inp.name!r} has a non-fixed image shape {inp.shape}; "
                            "vitcompact exports a dynamic batch axis only")
    return inp.name, list(chw)


def sample_inputs(chw: Sequence[int], batch: int, seed: int = 0) -> np.ndarray:
    """Normalised-image-like inputs: standard normal, fixed seed per batch size."""
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, *chw, generator=g).numpy()


def compare(path: Path, reference: str, run: Callable[[np.ndarray], np.ndarray],
            expected: Callable[[np.ndarray], np.ndarray], chw: Sequence[int],
            batch_sizes: Sequence[int], atol: float, images: np.ndarray | None = None) -> ParityReport:
    """Run `run` and `expected` on the same inputs per batch size and record the differences:
    the first images of `images` where given, normal noise otherwise."""
    report = ParityReport(Path(path), reference, atol)
    for batch in batch_sizes:
        x = images[:batch] if images is not None and len(images) >= batch else sample_inputs(chw, batch)
        got, want = np.asarray(run(x), dtype=np.float32), np.asarray(expected(x), dtype=np.float32)
        if got.shape != want.shape:
            raise ParityError(f"{Path(path).name} returns shape {got.shape} at batch {batch} but "
                              f"{reference} returns {want.shape}")
        report.max_abs_diff[batch] = float(np.abs(got - want).max())
        report.top1_agreement[batch] = float((got.argmax(-1) == want.argmax(-1)).mean())
    return report


def loader_top1(predict: Callable[[np.ndarray], np.ndarray], loader) -> float:
    """Top-1 accuracy of a numpy-in, logits-out runner over (images, labels) batches."""
    correct = total = 0
    for images, labels in loader:
        logits = np.asarray(predict(images.numpy().astype(np.float32)))
        correct += int((logits.argmax(-1) == labels.numpy()).sum())
        total += len(labels)
    return correct / max(total, 1)


def onnx_runner(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
    return run


def verify_onnx(path: str | os.PathLike, model: nn.Module, batch_sizes: Sequence[int] = DEFAULT_BATCHES,
                atol: float = DEFAULT_ATOL, check: bool = True) -> ParityReport:
    """Full ONNX check, then onnxruntime (CPU) against `model` in eval mode at each batch size.

    Returns the report; call `raise_if_failed()` on it to turn a mismatch into a ParityError.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    if check:
        check_onnx(path)
    session = ort_session(path)
    _, chw = input_shape(session)
    return compare(path, "PyTorch", onnx_runner(session), torch_runner(model.eval()), chw, batch_sizes, atol)


def verify_against_onnx(path: str | os.PathLike, reference: str | os.PathLike,
                        batch_sizes: Sequence[int] = DEFAULT_BATCHES, atol: float = DEFAULT_ATOL,
                        images: np.ndarray | None = None) -> ParityReport:
    """onnxruntime on `path` against onnxruntime on the `reference` ONNX file (variants, fusions),
    on `images` where given (real inputs: a statically quantised file is calibrated for them)."""
    session, ref_session = ort_session(path), ort_session(reference)
    _, chw = input_shape(ref_session)
    label = Path(reference).name + (" on validation images" if images is not None else "")
    return compare(Path(path), label, onnx_runner(session), onnx_runner(ref_session), chw, batch_sizes, atol,
                   images)

"""Graph optimisation with onnxruntime's transformer optimiser, kept only where it pays.

The optimiser fuses LayerNorm+residual (SkipLayerNormalization) and bias+GELU (BiasGelu). Its
attention fusion needs one head count for the whole model, which a compact model does not have;
with `num_heads=0` it detects heads per node and leaves attention unfused where it cannot. Fusion is
therefore not trusted blindly: the optimised graph must match the plain one and be measurably
faster on this machine, or the plain graph ships.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from vitcompact.errors import ArtifactError
from vitcompact.latency.timing import Timing, median_pair

from .files import save_onnx
from .verify import ParityReport, input_shape, ort_session, sample_inputs, verify_against_onnx

OPTIMIZE_MODES = ("auto", "on", "off")
# Below this the two medians are within run-to-run noise; keep the plain graph.
MIN_SPEEDUP = 1.02


@dataclass
class OptimizeReport:
    """What the optimiser did and whether its graph ships. Truthy when the optimised graph ships."""

    mode: str
    applied: bool = False
    reason: str = ""
    fusions: dict[str, int] = field(default_factory=dict)
    plain_ms: float | None = None
    optimized_ms: float | None = None
    timing_batch: int | None = None
    parity: ParityReport | None = None

    def __bool__(self) -> bool:
        return self.applied

    @property
    def speedup(self) -> float | None:
        if self.plain_ms and self.optimized_ms:
            return self.plain_ms / self.optimized_ms
        return None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "parity"}
        d["speedup"] = self.speedup
        d["parity"] = self.parity.to_dict() if self.parity is not None else None
        return d


def run_optimizer(src: Path, dst: Path, external_data: bool | None) -> dict[str, int]:
    """Write the transformer-optimised graph of `src` to `dst`; returns the fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimiser logs a warning when it has to detect head counts itself; that is intended here.
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0)
    except Exception as e:  # the optimiser raises bare exceptions on graphs it cannot fuse
        raise ArtifactError(f"onnxruntime's transformer optimiser failed: {type(e).__name__}: {e}") from None
    finally:
        logger.setLevel(level)
    fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    save_onnx(optimized.model, dst, external_data)
    return fusions


def time_interleaved(paths: tuple[Path, Path], batch: int, rounds: int = 15, warmup: int = 3,
                     budget_s: float = 10.0) -> tuple[float, float]:
    """Median ms per run of two ONNX files, timed by the core's timing loop (alternating rounds, so
    drift hits both alike), stopping early (after at least 5 rounds) once `budget_s` is spent, so
    large models export in time."""
    sessions = [ort_session(p) for p in paths]
    name, chw = input_shape(sessions[0])
    x = sample_inputs(chw, batch)
    plain, optimized = (lambda s=s: s.run(None, {name: x}) for s in sessions)
    return median_pair(plain, optimized, Timing(warmup=warmup, rounds=rounds, runs_per_round=1, min_rounds=5,
                                                time_budget_s=budget_s))


def optimize(plain: Path, dst: Path, mode: str, external_data: bool | None, atol: float,
             batch_sizes: tuple[int, ...], timing_batch: int = 8) -> OptimizeReport:
    """Try the optimiser on `plain`, writing to `dst`; the report says whether `dst` should ship.

    `on` ships the optimised graph whenever parity holds; `auto` also requires it to be faster.
    """
    if mode not in OPTIMIZE_MODES:
        raise ArtifactError(f"optimize must be one of {', '.join(OPTIMIZE_MODES)}, not {mode!r}")
    report = OptimizeReport(mode)
    if mode == "off":
        report.reason = "optimisation off"
        return report
    try:
        report.fusions = run_optimizer(plain, dst, external_data)
    except ArtifactError as e:
        report.reason = str(e)
        return report
    if not report.fusions:
        report.reason = "the optimiser fused nothing"
        return report
    report.parity = verify_against_onnx(dst, plain, batch_sizes, atol)
    if not report.parity.passed:
        report.reason = f"fused graph differs by {report.parity.worst:.3g} (> {atol:g})"
        return report
    if mode == "on":
        report.applied, report.reason = True, "optimisation on and parity holds"
        return report
    report.timing_batch = timing_batch
    report.plain_ms, report.optimized_ms = time_interleaved((plain, dst), timing_batch)
    report.applied = report.plain_ms >= MIN_SPEEDUP * report.optimized_ms
    report.reason = (f"{report.speedup:.3f}x at batch {timing_batch} on onnxruntime CPU "
                     f"({'kept' if report.applied else f'below {MIN_SPEEDUP}x, plain graph kept'})")
    return report


def has_contrib_ops(path: Path) -> bool:
    """Whether a graph uses onnxruntime-only operators (fused ones live in com.microsoft)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(n.domain == "com.microsoft" for n in proto.graph.node)


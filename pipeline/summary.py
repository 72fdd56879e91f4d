"""`PipelineSummary`: what a pipeline run measured, typed. summary.json is its `to_dict()`;
`from_dict` reads such a file back, older ones too (a part they lack is None, a key it does not
know is left out)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from vitcompact.errors import ArtifactError, ConfigError
from vitcompact.export.deployment import table_of
from vitcompact.export.int8 import SplitAccuracy
from vitcompact.models.token_merge import TokenMergeConfig


@dataclass
class Accuracy:
    """Test top-1 of the dense model, the compact one (PyTorch) and its ONNX file (onnxruntime)."""

    dense_test_top1: float
    compact_test_top1: float
    compact_onnx_test_top1: float


@dataclass
class DenseCompact:
    """One count (params, MACs per image) of the dense and of the compact model."""

    dense: int
    compact: int


@dataclass
class LatencyRow:
    """One batch size of the bench: dense vs compact FP32, and the compact INT8 file where there is one."""

    batch: int
    dense_p50_ms: float
    compact_p50_ms: float
    speedup: float
    speedup_ci: tuple[float, float]
    ideal: float
    int8_p50_ms: float | None = None
    int8_speedup: float | None = None
    int8_speedup_ci: tuple[float, float] | None = None

    @property
    def stacked(self) -> bool:
        return self.int8_p50_ms is not None

    def to_dict(self) -> dict[str, Any]:
        row = {"batch": self.batch, "dense_p50_ms": self.dense_p50_ms, "compact_p50_ms": self.compact_p50_ms,
               "speedup": self.speedup, "speedup_ci": list(self.speedup_ci), "ideal": self.ideal}
        if self.stacked:  # a run without an INT8 file writes no INT8 keys
            row.update(int8_p50_ms=self.int8_p50_ms, int8_speedup=self.int8_speedup,
                       int8_speedup_ci=list(self.int8_speedup_ci))
        return row

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LatencyRow":
        stacked_ci = values.get("int8_speedup_ci")
        return cls(values["batch"], values["dense_p50_ms"], values["compact_p50_ms"], values["speedup"],
                   tuple(values["speedup_ci"]), values["ideal"], values.get("int8_p50_ms"),
                   values.get("int8_speedup"), tuple(stacked_ci) if stacked_ci is not None else None)


@dataclass
class Int8Summary:
    """The stacked INT8 file (`file`, its calibration and accuracy per split), or why it was refused."""

    mode: str
    file: str | None = None
    refused: str | None = None
    calibration: str | None = None         # static INT8: the calibration method
    calibration_images: int | None = None
    accuracy: dict[str, SplitAccuracy] = field(default_factory=dict)  # split -> FP32 and INT8 top-1
    settings: dict[str, Any] = field(default_factory=dict)             # the rest of the INT8 record

    def to_dict(self) -> dict[str, Any]:
        if self.refused is not None:
            return {"mode": self.mode, "refused": self.refused}
        typed = {"calibration": self.calibration, "calibration_images": self.calibration_images}
        accuracy = {split: {**asdict(a), "drop_points": round(a.drop_points, 4)} for split, a in self.accuracy.items()}
        return {"mode": self.mode, **{k: v for k, v in typed.items() if v is not None}, **self.settings,
                **({"accuracy": accuracy} if accuracy else {}), "file": self.file}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Int8Summary":
        rest = dict(values)
        mode, file, refused = rest.pop("mode"), rest.pop("file", None), rest.pop("refused", None)
        calibration, images = rest.pop("calibration", None), rest.pop("calibration_images", None)
        accuracy = {split: SplitAccuracy(a["images"], a["fp32"], a["int8"])
                    for split, a in (rest.pop("accuracy", None) or {}).items()}
        return cls(mode, file, refused, calibration, images, accuracy, rest)


@dataclass
class TokenMergeSummary:
    """The compact model's token merging and what it changed: test top-1 and MACs without and with it."""

    config: TokenMergeConfig
    test_top1_without: float
    test_top1_with: float
    macs_without: int
    macs_with: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "test_top1": {"without": self.test_top1_without, "with": self.test_top1_with},
                "macs": {"without": self.macs_without, "with": self.macs_with}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TokenMergeSummary":
        rest = dict(values)
        top1, macs = rest.pop("test_top1"), rest.pop("macs")
        return cls(TokenMergeConfig.from_dict(rest), top1["without"], top1["with"], macs["without"], macs["with"])


@dataclass
class DeploySummary:
    """The measured choice of runtime and precision for the compact model (`report`: its deploy.json,
    the chosen files in the run's deploy/ folder), or why the stage did not run (`skipped`)."""

    report: dict[str, Any] | None = None
    skipped: str | None = None

    @property
    def chosen(self) -> str | None:
        return self.report["chosen"] if self.report else None

    def table(self) -> str:
        """The candidates' table, as deploy.md shows it."""
        return table_of(self.report) if self.report else ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report) if self.report else {"skipped": self.skipped}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DeploySummary":
        return cls(skipped=values["skipped"]) if "skipped" in values else cls(report=dict(values))


@dataclass
class PipelineSummary:
    """Everything report.md says, typed; `to_dict()` is summary.json."""

    config: dict[str, Any]                 # the run's PipelineConfig, as JSON data
    accuracy: Accuracy
    structure: str                         # e.g. "8/16 heads, 256/512 neurons kept"
    params: DenseCompact
    macs: DenseCompact
    ideal_speedup: float                   # dense MACs / compact MACs
    compact_vs_masked_max_abs_diff: float
    latency: list[LatencyRow]
    seconds: float
    token_merge: TokenMergeSummary | None = None
    onnx_graph_optimised: bool | None = None
    onnx_parity: dict[str, Any] = field(default_factory=dict)  # dense / compact: ParityReport.to_dict()
    int8: Int8Summary | None = None
    latency_budget: dict[str, Any] | None = None  # the prune stage's budget report
    deploy: DeploySummary | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "accuracy": asdict(self.accuracy), "structure": self.structure,
            "params": asdict(self.params), "macs": asdict(self.macs), "ideal_speedup": self.ideal_speedup,
            "compact_vs_masked_max_abs_diff": self.compact_vs_masked_max_abs_diff,
            "token_merge": _dict_or_none(self.token_merge), "onnx_graph_optimised": self.onnx_graph_optimised,
            "onnx_parity": self.onnx_parity, "int8": _dict_or_none(self.int8),
            "latency": [row.to_dict() for row in self.latency], "latency_budget": self.latency_budget,
            "deploy": _dict_or_none(self.deploy), "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PipelineSummary":
        """A summary.json's content; raises ArtifactError naming a part it lacks or cannot read."""
        try:
            return cls(
                config=dict(values["config"]), accuracy=_known(Accuracy, values["accuracy"]),
                structure=values["structure"], params=_known(DenseCompact, values["params"]),
                macs=_known(DenseCompact, values["macs"]), ideal_speedup=values["ideal_speedup"],
                compact_vs_masked_max_abs_diff=values["compact_vs_masked_max_abs_diff"],
                latency=[LatencyRow.from_dict(row) for row in values["latency"]], seconds=values["seconds"],
                token_merge=_from_dict_or_none(TokenMergeSummary, values.get("token_merge")),
                onnx_graph_optimised=values.get("onnx_graph_optimised"),
                onnx_parity=dict(values.get("onnx_parity") or {}),
                int8=_from_dict_or_none(Int8Summary, values.get("int8")),
                latency_budget=values.get("latency_budget"),
                deploy=_from_dict_or_none(DeploySummary, values.get("deploy")))
        except KeyError as e:
            raise ArtifactError(f"not a pipeline summary: it lacks {e}") from None
        except (TypeError, AttributeError, ConfigError) as e:
            raise ArtifactError(f"not a pipeline summary: {e}") from None

    @classmethod
    def read(cls, path: str | Path) -> "PipelineSummary":
        """A run's summary.json."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"cannot read the pipeline summary {path}: {e}") from None
        if not isinstance(values, dict):
            raise ArtifactError(f"{path} is not a pipeline summary (not a JSON object)")
        try:
            return cls.from_dict(values)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None


def _dict_or_none(part: Any) -> dict[str, Any] | None:
    return part.to_dict() if part is not None else None


def _known(kind: type, values: Mapping[str, Any]) -> Any:
    """`kind` from the keys of `values` that are its fields (a later version may write more)."""
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in values.items() if k in names})


def _from_dict_or_none(kind: type, values: Mapping[str, Any] | None) -> Any:
    return kind.from_dict(values) if values else None

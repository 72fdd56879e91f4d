"""`PipelineConfig`: one run of data -> train -> prune -> compact -> export -> INT8 -> bench.

It nests the stages' own configs (`TrainConfig`, `PruneConfig`, `ExportConfig`, `Int8Config`,
`BenchConfig`), so every setting a stage has can be set here, and in a TOML file whose sections
are those configs:

    model = "vit-digits"
    [data]    source = "digits"
    [train]   epochs = 30
    [prune]   method = "rsst", states = 1, lambda_schedule = "x^2", round_to = 16, ...
    [prune.train]  label_smoothing = 0.0
    [export]  opset = 20
    [int8]    mode = "static"          # or "none": no INT8 file
    [bench]   batch_sizes = [1, 32], time_budget_s = 10.0
    [budget]  target_speedup = 2.0, deploy_batch = 8   # optional: prune to a latency budget
              block_removal = "last-resort"           # or "free", "never": when whole blocks may go
    [token_merge]  r = 8, schedule = "constant"       # optional: the compact model merges tokens
    [deploy]  enabled = true, batch_sizes = [1, 8]    # the measured choice of runtime and precision

One top-level `seed` drives the data split, the initial weights, training, pruning and the
bench's inputs; the pipeline sets the prune stage's output folder itself.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcompact.bench import BenchConfig
from vitcompact.latency import BudgetRequest, check_backend
from vitcompact.data import AUGMENTATIONS, DATA_SOURCES
from vitcompact.errors import ConfigError
from vitcompact.export import DeployConfig, ExportConfig, Int8Config
from vitcompact.knobs import knob
from vitcompact.models.token_merge import TokenMergeConfig
from vitcompact.pruning.configs import OneShotConfig, PruneConfig, foreign_setting, with_method
from vitcompact.training import TrainConfig
from vitcompact.validate import field_types, flag, integer, one_of, seed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    """Which built-in source the run trains, prunes and measures on (at the model's input and
    preprocessing), its training augmentation (`AUGMENTATIONS`) and loader workers (None: as
    `load_data` chooses). `reset_classifier` lets an artifact trained on other classes start here."""

    source: str = knob("digits", f"Data source: {', '.join(DATA_SOURCES.names())}.")
    root: str | None = knob(None, "Folder of the data source's files.")
    batch_size: int = knob(64, "Batch size.")
    aug: str = knob("light", f"Training augmentation: {', '.join(AUGMENTATIONS)}.")
    workers: int | None = knob(None, "DataLoader worker processes (default: one per core but one).")
    reset_classifier: bool = knob(False, "Give an artifact a new classifier when the data has another class count.")

    def __post_init__(self) -> None:
        DATA_SOURCES.get(self.source)
        integer("batch_size", self.batch_size, 1)
        one_of("aug", self.aug, AUGMENTATIONS)
        if self.workers is not None:
            integer("workers", self.workers, 0, 64)
        flag("reset_classifier", self.reset_classifier)


def _train() -> TrainConfig:
    return TrainConfig(epochs=30, lr=3e-3)


def _prune() -> PruneConfig:
    # The demo's budget: one-shot at half the heads and neurons, then 18 epochs of fine-tuning.
    return OneShotConfig(head_ratio=0.5, mlp_ratio=0.5, finetune_epochs=18, lr=3e-3)


def _bench() -> BenchConfig:
    # One pinned thread: steadier ratios than sharing the cores.
    return BenchConfig(batch_sizes=(1, 32, 256), threads=1, time_budget_s=10.0)


def _deploy() -> DeployConfig:
    # A quick look (half a second per candidate, batch size and timing); `vitcompact deploy` takes longer.
    return DeployConfig(batch_sizes=(1, 8), time_budget_s=0.5)


# Set by the pipeline itself; a config file that sets them is refused, naming the reason.
PIPELINE_SETS = {"seed": "set `seed` at the top level: one seed drives every stage",
                 "out_dir": "the pipeline prunes into <out>/prune",
                 "resume": "a pipeline run starts afresh (use `vitcompact prune --resume`)",
                 "inputs": "the pipeline records its inputs itself",
                 "budget": "set a latency budget in the [budget] section",
                 "token_merge": "set token merging in the [token_merge] section ([prune] finetune_token_merge = "
                                "true fine-tunes with it)",
                 "progress": "progress display follows the command (off under --json)"}
# Flat keys of the pipeline's first TOML format, and where they live now.
MOVED = {"train_epochs": "[train] epochs", "lr": "[train] lr and [prune] lr", "data": "[data] source",
         "data_root": "[data] root", "batch_size": "[data] batch_size", "bench_seconds": "[bench] time_budget_s",
         "backend": "[bench] backend", "batch_sizes": "[bench] batch_sizes", "threads": "[bench] threads",
         "opset": "[export] opset", "optimize": "[export] optimize", "calib_method": "[int8] calibration",
         "calib_batches": "[int8] calib_batches", "max_accuracy_drop": "[int8] max_accuracy_drop",
         **{k: f"[prune] {k}" for k in ("method", "target", "head_ratio", "mlp_ratio", "criteria", "mode",
                                        "states", "epochs_per_state", "finetune_epochs")}}


@dataclass
class PipelineConfig:
    """Every setting of a pipeline run; `from_toml` reads the same from a file."""

    model: str = knob("vit-digits", "Preset, timm name or artifact directory.")
    checkpoint: str | None = knob(None, "Dense weights for MODEL (.safetensors/.pth).")
    pretrained: bool = knob(False, "Start a timm model from its hub weights (needs the internet; offline, "
                                   "pass --checkpoint FILE).")
    out: str = knob("runs/pipeline", "Run folder.")
    overwrite: bool = knob(False, "Replace an existing run folder.")
    seed: int = knob(0, "One seed for every stage (data split, weights, training, pruning, bench inputs).")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_train)          # the dense model's training
    prune: PruneConfig = field(default_factory=_prune)
    export: ExportConfig = field(default_factory=ExportConfig)
    int8: Int8Config | None = field(default_factory=lambda: Int8Config(mode="static"))  # None: no INT8
    bench: BenchConfig = field(default_factory=_bench)
    budget: BudgetRequest | None = None  # prune to a latency budget instead of the prune ratios
    token_merge: TokenMergeConfig | None = None  # the compact model merges tokens, in its artifact and exports
    # The measured choice of runtime and precision for the compact model, run where OpenVINO is
    # installed (skipped with a note elsewhere); None (`[deploy] enabled = false`): off.
    deploy: DeployConfig | None = field(default_factory=_deploy)

    def __post_init__(self) -> None:
        seed("seed", self.seed)
        flag("overwrite", self.overwrite)
        flag("pretrained", self.pretrained)
        check_backend(self.bench.backend)
        if self.budget is not None and self.budget.merges_tokens and self.token_merge is not None \
                and self.token_merge.enabled:
            raise ConfigError("a [budget] with axes heads,mlp,tokens chooses the token merging r itself; drop "
                              "[token_merge] (--token-merge), or use budget axes heads,mlp")
        if self.prune.token_merge is not None:
            raise ConfigError(f"[prune] token_merge cannot be set here: {PIPELINE_SETS['token_merge']}")
        budget_merges = self.budget is not None and self.budget.merges_tokens
        if self.prune.finetune_token_merge and not budget_merges and \
                (self.token_merge is None or not self.token_merge.enabled):
            raise ConfigError("[prune] finetune_token_merge needs token merging: [token_merge] r >= 1 "
                              "(--token-merge R), or a [budget] with axes heads,mlp,tokens")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        """Read a TOML file; `overrides` (flag values, None for unset) replace what it says, by
        dotted name: `{"prune.method": "oneshot", "train.epochs": 2}`."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            # utf-8-sig: a byte-order mark (as some Windows editors write) is not a TOML statement.
            raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path} nests arrays or tables too deeply to be a pipeline config") from None
        try:
            return with_overrides(build(cls, raw), **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except RecursionError:  # a deeply nested value where a setting goes, shown in a message
            raise ConfigError(f"{path} nests arrays or tables too deeply to be a pipeline config") from None


def build(cls: type, values: dict[str, Any], section: str = "", base: Any = None) -> Any:
    """The dataclass `cls` from a TOML table, on top of `base` (default: the pipeline's own
    defaults): nested tables build nested configs, every key is checked against its field's type,
    and a key the pipeline sets itself is refused."""
    where = f"[{section}] " if section else ""
    for key in values:
        if section and key in PIPELINE_SETS:
            raise ConfigError(f"{where}{key} cannot be set here: {PIPELINE_SETS[key]}")
        if not section and key in MOVED and not isinstance(values[key], dict):
            raise ConfigError(f"{key} is not a top-level key; it is now {MOVED[key]}")
    hints = typing.get_type_hints(cls)
    nested, plain = {}, {}
    for key, value in values.items():
        kind = _dataclass_of(hints.get(key))
        if kind is not None and isinstance(value, dict):
            if kind is Int8Config and value.get("mode") == "none":
                nested[key] = None
                continue
            inner = getattr(base if base is not None else cls(), key, None)
            if kind is DeployConfig:  # [deploy] enabled = false turns the stage off
                value = dict(value)
                if not flag("[deploy] enabled", value.pop("enabled", True)):
                    nested[key] = None
                    continue
                inner = inner if inner is not None else _deploy()
            if isinstance(inner, PruneConfig):  # [prune] method = "..." chooses the method's config
                value = dict(value)
                inner = with_method(inner, value.pop("method", inner.method))
                _refuse_foreign(inner.method, value, f"{section}.{key}" if section else key)
                kind = type(inner)
            nested[key] = build(kind, value, f"{section}.{key}" if section else key, inner)
        else:
            plain[key] = value
    try:
        if base is None and not _has_defaults(cls):  # e.g. [budget]: built from its own keys alone
            return cls(**field_types(cls, plain), **nested)
        return dataclasses.replace(base if base is not None else cls(), **field_types(cls, plain), **nested)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def _refuse_foreign(method: str, values: dict[str, Any], section: str) -> None:
    foreign = foreign_setting(method, [k for k in values if k not in PIPELINE_SETS])
    if foreign is not None and foreign[1]:
        name, owners = foreign
        raise ConfigError(f"[{section}] {name} is a setting of {' and '.join(owners)}, not of {method} "
                          "(set method first)")


def _has_defaults(cls: type) -> bool:
    """Whether `cls()` is a valid config (a section whose defaults make sense alone)."""
    try:
        cls()
    except ConfigError:
        return False
    return True


def _dataclass_of(kind: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), if it holds one."""
    for candidate in (kind, *typing.get_args(kind)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def with_overrides(config: PipelineConfig, **overrides: Any) -> PipelineConfig:
    """`config` with dotted-name overrides applied (None values skipped); `int8.mode="none"` drops INT8,
    `deploy.enabled=False` the deploy stage."""
    config = dataclasses.replace(config)
    if overrides.get("prune.method") is not None:  # first: the other prune overrides go to its config
        config.prune = with_method(config.prune, overrides["prune.method"])
    for name, value in overrides.items():
        if name == "prune.method":
            continue
        if value is None:
            continue
        if name == "int8.mode" and value == "none":
            config.int8 = None
            continue
        section, _, key = name.rpartition(".")
        if section == "int8" and config.int8 is None:
            config.int8 = Int8Config(mode="static")
        if name == "deploy.enabled":
            config.deploy = (config.deploy or _deploy()) if value else None
            continue
        if section == "deploy" and config.deploy is None:
            config.deploy = _deploy()
        if section == "token_merge" and config.token_merge is None:
            config.token_merge = TokenMergeConfig()
        if section:
            setattr(config, section, dataclasses.replace(getattr(config, section), **{key: value}))
        else:
            setattr(config, key, value)
    config.__post_init__()
    return config


def config_dict(config: Any) -> Any:
    """A config as JSON-ready data: nested dataclasses as dicts, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(config):
        method = {"method": config.method} if isinstance(config, PruneConfig) else {}  # the config's type
        return {**method, **{f.name: config_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}}
    if isinstance(config, (list, tuple)):
        return [config_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_dict(v) for k, v in config.items()}
    return str(config) if isinstance(config, Path) else config

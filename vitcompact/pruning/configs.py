"""One config per pruning method, torchao-style: the config's type chooses the method.

Every method shares `PruneConfig`'s fields (what to keep, how to select it, the training of its
passes, a latency budget); each subclass adds its own knobs:

    prune(model, data, OneShotConfig(head_ratio=0.3, finetune_epochs=8))
    prune(model, data, RSSTConfig(states=1, epochs_per_state=1, finetune_epochs=7, penalty="fade"))
    prune(model, data, RefillConfig(rewind="init", dense_epochs=2))
    prune(model, data, RefitConfig(head_ratio=0.3, calib_images=512))   # no training at all

Where a run keeps its checkpoints (and whether it resumes one) is not a pruning setting: that is
`RunFolder`'s. Every field carries its help text (`knob`), from which the CLI makes its options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from ..knobs import knob
from ..latency.budget import BudgetRequest
from ..models.merge_config import TokenMergeConfig
from ..registry import Registry
from ..training.trainer import TrainConfig
from ..validate import MAX_EPOCHS, flag, in_range, integer, one_of, ratio, seed
from .criteria import CRITERIA
from .penalty import PENALTIES
from .refit import TARGETS as REFIT_TARGETS, RefitSettings
from .regroup import TARGETS, RegroupConfig
from .schedules import LambdaSchedule
from .selection import SELECTION_MODES

REWINDS = ("none", "init", "epoch")


@dataclass
class PruneConfig:
    """What every method shares: which units to remove and how to choose them, the peak learning
    rate of the pruning passes (which follow one warm-up + cosine schedule and carry the optimiser's
    moments from pass to pass), the trainer's other settings, an optional latency budget, and the
    token merging of the pruned model (`token_merge`; with `finetune_token_merge` its fine-tuning
    merges tokens too)."""

    method: ClassVar[str] = ""
    head_ratio: float = knob(0.3, "Fraction of heads to remove, [0, 1).")
    mlp_ratio: float = knob(0.3, "Fraction of MLP neurons to remove, [0, 1).")
    target: str = knob("both", f"What to prune: {', '.join(TARGETS)}.")
    criteria: str = knob("magnitude", "Unit importance criterion (see `vitcompact.CRITERIA`).")
    mode: str = knob("layer-wise", f"Selection: {', '.join(SELECTION_MODES)}.")
    min_keep: int = knob(1, "Units every block keeps at least (0: a block may lose a branch, global mode).")
    round_to: int = knob(1, "Round kept MLP widths up to a multiple of this.")
    num_batches: int = knob(8, "Calibration batches of the data-driven criteria.")
    lr: float = knob(1e-3, "Peak learning rate: all passes share one warm-up + cosine schedule.")
    distill: bool = knob(False, "Distil from the model as it enters pruning while training.")
    seed: int = knob(0, "Seed of the pruning passes (data order, augmentation).")
    train: TrainConfig = knob(help="The trainer's other settings (epochs, lr and seed are set per pass).",
                              default_factory=TrainConfig)
    budget: BudgetRequest | None = knob(None, "Prune to a measured latency budget instead of the ratios.")
    token_merge: TokenMergeConfig | None = knob(None, "Token merging (ToMe) of the pruned model: recorded in its "
                                                      "artifact, its accuracy reported without and with it.")
    finetune_token_merge: bool = knob(False, "Fine-tune with the token merging on (needs one: --token-merge R), so "
                                             "the pruned model learns on merged tokens.")

    def __post_init__(self) -> None:
        one_of("target", self.target, TARGETS)
        one_of("mode", self.mode, SELECTION_MODES)
        CRITERIA.get(self.criteria)
        ratio("head_ratio", self.head_ratio)
        ratio("mlp_ratio", self.mlp_ratio)
        integer("min_keep", self.min_keep, 0)
        integer("round_to", self.round_to, 1)
        integer("num_batches", self.num_batches, 1)
        seed("seed", self.seed)
        flag("distill", self.distill)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if self.budget is not None and not isinstance(self.budget, BudgetRequest):
            raise ConfigError(f"budget must be a BudgetRequest, got {type(self.budget).__name__}")
        self._check_token_merge()
        if self.budget is not None and self.budget.merges_tokens and self.merging is not None:
            raise ConfigError("a latency budget with axes heads,mlp,tokens chooses the token merging r itself; drop "
                              "token_merge (--token-merge), or use budget axes heads,mlp")
        dataclasses.replace(self.train, lr=self.lr)  # the pruning lr must suit the trainer too

    def _check_token_merge(self) -> None:
        if self.token_merge is not None and not isinstance(self.token_merge, TokenMergeConfig):
            raise ConfigError(f"token_merge must be a TokenMergeConfig, got {type(self.token_merge).__name__}")
        flag("finetune_token_merge", self.finetune_token_merge)
        # Whether a merge is there to fine-tune with is checked by `prune` (`check_merge_to_finetune`):
        # the pipeline gives its [token_merge] to the prune config only when it runs it.
        if self.finetune_token_merge and not getattr(self, "finetune_epochs", 0):
            raise ConfigError("finetune_token_merge needs fine-tuning: finetune_epochs >= 1")

    def check_merge_to_finetune(self) -> None:
        budget_merges = self.budget is not None and self.budget.merges_tokens
        if self.finetune_token_merge and self.merging is None and not budget_merges:
            raise ConfigError("finetune_token_merge needs token merging: token_merge with r >= 1 (--token-merge R), "
                              "or a latency budget with axes heads,mlp,tokens")

    @property
    def merging(self) -> TokenMergeConfig | None:
        """The token merging of the pruned model; None when it merges no tokens (unset, or r=0)."""
        return self.token_merge if self.token_merge is not None and self.token_merge.enabled else None

    def regroup_config(self, head_ratio: float, mlp_ratio: float, budget: Any = None,
                       budget_ms: float | None = None, num_batches: int | None = None) -> RegroupConfig:
        """How a state at these ratios (or, under a latency budget, this state's budget) regroups
        its element masks; `num_batches` of calibration data (default: the config's)."""
        return RegroupConfig(target=self.target, head_ratio=head_ratio, mlp_ratio=mlp_ratio, criteria=self.criteria,
                             mode=self.mode, min_keep=self.min_keep, round_to=self.round_to,
                             num_batches=num_batches or self.num_batches, budget=budget,
                             budget_ms=budget_ms if budget is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class OneShotConfig(PruneConfig):
    """Score once, remove the units at the final ratios, fine-tune: the default method (it led
    RSST on the converged Fashion-MNIST reference over 3 seeds, docs/results/full-data.md)."""

    method: ClassVar[str] = "oneshot"
    finetune_epochs: int = knob(8, "Fine-tuning epochs at the final structure.")
    prune_rate: float | None = knob(None, "Magnitude rate before regrouping (default: the structural target).")

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("finetune_epochs", self.finetune_epochs, 0, MAX_EPOCHS)
        if self.prune_rate is not None:
            ratio("prune_rate", self.prune_rate)


@dataclass
class IterativeConfig(PruneConfig):
    """States whose ratios grow to the final ones, each trained `epochs_per_state`, then
    `finetune_epochs` at the final structure; each state magnitude-prunes `prune_rate` of what
    survives (default: the rate that makes element sparsity track the structural target).
    `dense_epochs` of dense training inside the loop come first (what a rewind goes back to)."""

    states: int = knob(2, "Pruning states.")
    epochs_per_state: int = knob(2, "Training epochs per state.")
    finetune_epochs: int = knob(4, "Fine-tuning epochs at the final structure.")
    prune_rate: float | None = knob(None, "Magnitude rate per state (default: tracks the structural target).")
    dense_epochs: int = knob(0, "Dense epochs inside the loop (what a rewind goes back to).")

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("states", self.states, 1, MAX_EPOCHS)
        for name in ("epochs_per_state", "finetune_epochs", "dense_epochs"):
            integer(name, getattr(self, name), 0, MAX_EPOCHS)
        if self.prune_rate is not None:
            ratio("prune_rate", self.prune_rate)


@dataclass
class RefillConfig(IterativeConfig):
    """Refill: each state cuts its structure at once, optionally rewinds the survivors (to `init`
    or to dense epoch `rewind_epoch`, which needs `dense_epochs`), and retrains."""

    method: ClassVar[str] = "refill"
    rewind: str = knob("none", f"Rewind the survivors after each cut: {', '.join(REWINDS)}.")
    rewind_epoch: int = knob(1, "The dense epoch `rewind epoch` goes back to.")

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("rewind", self.rewind, REWINDS)
        integer("rewind_epoch", self.rewind_epoch, 0, MAX_EPOCHS)
        if self.rewind != "none" and self.dense_epochs < 1:
            raise ConfigError(f"rewind={self.rewind!r} needs dense_epochs >= 1 (the weights to rewind "
                              "to come from dense training inside the loop); or use rewind='none'")
        if self.rewind == "epoch" and not 0 <= self.rewind_epoch <= self.dense_epochs:
            raise ConfigError(f"rewind_epoch must be in [0, dense_epochs={self.dense_epochs}], got {self.rewind_epoch}")


@dataclass
class RSSTConfig(IterativeConfig):
    """RSST: each state keeps training densely while `penalty` fades the units it will drop
    (`fade`: decoupled, to `fade_to` of their size by the state's end along `lambda_schedule`'s
    shape; `gradient`: the research code's λ·W gradient term, with `lambda_max`/`lambda_base`),
    then cuts them. Its best split on Fashion-MNIST was 1 state of 1 epoch, then 7 of fine-tuning."""

    method: ClassVar[str] = "rsst"
    penalty: str = knob("fade", "How the dropped units fade (see `vitcompact.pruning.penalty`).")
    fade_to: float = knob(0.01, "What the fade penalty leaves of the faded weights, (0, 1).")
    lambda_schedule: str = knob("x", "Shape of the penalty's growth over a state.")
    lambda_max: float = knob(1.0, "The gradient penalty's λ cap.")
    lambda_base: float | None = knob(None, "The gradient penalty's λ scale (default: the cap half-way).")
    lambda_exponent: float = knob(4.0, "k of the exp_custom_exponents schedule.")

    def __post_init__(self) -> None:
        super().__post_init__()
        PENALTIES.get(self.penalty)
        in_range("fade_to", self.fade_to, 0.0, 1.0, low_open=True, high_open=True)
        self.schedule()

    def schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.lambda_schedule, self.lambda_max, self.lambda_base, self.lambda_exponent)


@dataclass
class RefitConfig(PruneConfig):
    """Compaction without training: score units on `calib_images` training images (labels unused;
    `fisher`: the squared gradient of each unit's mask against the model's own prediction), choose
    them across blocks (`mode` global), remove them, then refit every block's `attn.proj` and
    `mlp.fc2` (and, `refit_inputs`, the kept rows of `attn.qkv` and `mlp.fc1`) by ridge least
    squares so the pruned stream reproduces the dense one
    (`refit_target`: `global`, the dense model's stream; `local`, the dense block on the pruned
    input; `mix`, `alpha` parts global). `finetune_epochs` (default 0) trains the refit model
    afterwards. Defaults chosen on digits and Fashion-MNIST validation
    (docs/results/refit.md, refit-fashion.md)."""

    method: ClassVar[str] = "refit"
    # Fisher scores selected globally won on both data sets' validation: Fashion-MNIST 0.3/0.3 89.30 %
    # against 87.67 % for activation scores layer-wise (the same 9 of 27 heads removed: globally the
    # first blocks keep all three), digits +0.55 / +0.47 points at 0.5 / 0.7, where the sizes are
    # equal (docs/results/refit-fashion.md, refit.md).
    criteria: str = knob("fisher", "Unit importance criterion (activation, fisher and reconstruction need no "
                                   "labels).")
    mode: str = knob("global", f"Selection: {', '.join(SELECTION_MODES)} (global: blocks lose different numbers "
                               "of units, as their scores say).")
    # More images help on both data sets, most at high ratios (Fashion-MNIST 512 -> 4,000: +1.0 / +3.5 /
    # +3.4 test points at 0.3 / 0.5 / 0.7; docs/results/refit-calibration.md); 512 keeps vit_small under
    # 5 minutes on 2 cores.
    calib_images: int = knob(512, "Calibration images that score the units and feed the refit (more are better: "
                                  "the refit's time grows with them).")
    calib_data: str | None = knob(None, "Calibration images from this data source, or from a folder of images "
                                        "without labels (default: the training images; labels are never used).")
    refit_target: str = knob("global", f"What each block's refit reproduces: {', '.join(REFIT_TARGETS)}.")
    alpha: float = knob(0.5, "The global target's share in a mix.")
    ridge: float | None = knob(None, "Ridge penalty, relative to the Gram matrix's mean diagonal (default: each "
                                     "layer's own, chosen by 4-fold cross-validation on the calibration images).")
    # Correcting the drift before the nonlinearity won at every ratio on both data sets (test top-1 on
    # Fashion-MNIST +0.02 / +0.48 / +1.24 points at 0.3 / 0.5 / 0.7, digits validation +0.46 / +0.65
    # / +3.15; docs/results/refit-fashion.md).
    refit_inputs: bool = knob(True, "Also refit qkv and fc1 (kept rows) so each branch's pre-activations on the "
                                    "pruned stream track the dense model's (global and mix targets).")
    finetune_epochs: int = knob(0, "Training epochs after the refit (0: none, no labels needed).")
    # A refit model is already close: one epoch at the dense lr (1e-3) undid the refit on both data
    # sets' validation (Fashion-MNIST 0.3/0.3: 86.28 -> 83.83 %; 1e-4: 86.62 %, 3e-5: 86.67 %).
    lr: float = knob(1e-4, "Peak learning rate of the fine-tune after the refit.")
    # The fine-tune learns the dense model's soft targets alone (train.distill_alpha 1, temperature
    # 4): no labels, and better than labels at every ratio on both data sets' validation
    # (docs/results/refit-fashion.md: Fashion-MNIST +0.6 to +1.2 points, digits +0.3 and +0.7).
    distill: bool = knob(True, "Distil from the dense model in the fine-tune after the refit.")
    train: TrainConfig = knob(help="The trainer's other settings (epochs, lr and seed are set per pass); "
                                   "refit's distils on soft targets alone (distill_alpha 1, temperature 4).",
                              default_factory=lambda: TrainConfig(distill_alpha=1.0, distill_temperature=4.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("calib_images", self.calib_images, 1)
        integer("finetune_epochs", self.finetune_epochs, 0, MAX_EPOCHS)
        self.settings()

    def settings(self, batch_size: int = 32) -> RefitSettings:
        return RefitSettings(target=self.refit_target, alpha=self.alpha, ridge=self.ridge, batch_size=batch_size,
                             num_images=self.calib_images, inputs=self.refit_inputs)


CONFIGS: Registry[type[PruneConfig]] = Registry("method", ordered=True)
for _config in (OneShotConfig, RSSTConfig, RefillConfig, RefitConfig):
    CONFIGS.register(_config.method)(_config)


def method_fields(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIGS.get(method))}


def foreign_setting(method: str, names: Any) -> tuple[str, list[str]] | None:
    """The first of `names` that `method`'s config lacks, with the methods whose config has it."""
    own = method_fields(method)
    for name in names:
        if name not in own:
            return name, [m for m in CONFIGS.names() if name in method_fields(m)]
    return None


def prune_config(method: str = "oneshot", **fields: Any) -> PruneConfig:
    """The config of `method` with `fields`; a field of another method is refused, naming whose."""
    foreign = foreign_setting(method, fields)
    if foreign is not None:
        name, owners = foreign
        if not owners:
            raise ConfigError(f"unknown pruning setting {name!r}")
        raise ConfigError(f"{name} is a setting of {' and '.join(owners)}, not of {method}")
    return CONFIGS.get(method)(**fields)


def same_budget(method: str, states: int | None = None, epochs_per_state: int | None = None,
                finetune_epochs: int | None = None, **fields: Any) -> PruneConfig:
    """`method`'s config with the epoch budget `states * epochs_per_state + finetune_epochs` (each
    defaulting to `IterativeConfig`'s) split as the iterative methods split it; one-shot spends it
    all fine-tuning. Studies compare methods at one budget through it."""
    split = {"states": IterativeConfig.states if states is None else states,
             "epochs_per_state": IterativeConfig.epochs_per_state if epochs_per_state is None else epochs_per_state,
             "finetune_epochs": IterativeConfig.finetune_epochs if finetune_epochs is None else finetune_epochs}
    if method == OneShotConfig.method:
        return prune_config(method, finetune_epochs=split["states"] * split["epochs_per_state"]
                            + split["finetune_epochs"], **fields)
    return prune_config(method, **split, **fields)


def with_method(config: PruneConfig, method: str) -> PruneConfig:
    """`config` as `method`'s config: the settings the two methods share and default alike carried
    over (in `train` too); where their defaults differ (e.g. refit's criterion, lr, fine-tune
    epochs and distillation, tuned for it), and for the rest, `method`'s defaults."""
    if method == config.method:
        return config
    target = CONFIGS.get(method)
    return target(**_carried(config, type(config)(), target(), method_fields(method)))


def _carried(config: Any, source: Any, target: Any, names: set[str]) -> dict[str, Any]:
    """The fields of `config` in `names` whose default is the same in `source` and `target` (a
    nested config of the same type field by field), as `config` has them."""
    carried = {}
    for name in names & {f.name for f in dataclasses.fields(config)}:
        value, mine, theirs = getattr(config, name), getattr(source, name), getattr(target, name)
        if mine == theirs:
            carried[name] = value
        elif dataclasses.is_dataclass(value) and type(value) is type(mine) is type(theirs):
            fields = {f.name for f in dataclasses.fields(value)}
            carried[name] = dataclasses.replace(theirs, **_carried(value, mine, theirs, fields))
    return carried


@dataclass
class RunFolder:
    """Where a pruning run keeps its per-state checkpoints, masks, metrics and result; `resume`
    goes on from the last finished state. `inputs` names what the run prunes (model, data,
    batch size, as its caller names them): kept in run.json beside the settings, so that resuming
    with other inputs is refused."""

    out_dir: Path
    resume: bool = False
    wandb_project: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        flag("resume", self.resume)
        if not isinstance(self.inputs, dict):
            raise ConfigError(f"inputs must be a dict of what the run prunes, got {type(self.inputs).__name__}")

"""`train` and `evaluate`: AdamW (or SGD), warm-up + cosine, label smoothing, clipping, mixed precision.

Masks, when given, hold pruned weights at exactly zero: they are applied before the first step
and again after every optimiser step (AdamW's momentum and weight decay would otherwise move them).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader

from ..errors import ConfigError, TrainingError
from ..knobs import knob
from ..validate import MAX_EPOCHS, in_range, integer, one_of, seed
from . import distributed
from .seeding import seed_everything

OPTIMIZERS = ("adamw", "sgd")
# Autocast dtype of each explicit precision (None: plain fp32); "auto" picks one of them.
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)
BF16_MIN_WIDTH = 128


class WeightMasks(Protocol):
    """What training needs of pruning masks (`vitcompact.pruning.PruneMasks`): zeroing the pruned
    weights in place. Declared here so that training does not import pruning."""

    def apply_(self, model: nn.Module) -> Any: ...


@dataclass
class TrainConfig:
    """How to train. `warmup_epochs` may be fractional and takes at most half the run (the rest
    decays to `min_lr` on a cosine); `clip_grad=None` disables clipping.
    `distill_alpha` weighs the teacher's soft targets when a teacher is passed to `train`;
    `distill_blocks` times the mean squared error of each block's output against the teacher's,
    relative to the teacher's mean square and averaged over blocks, joins that soft-target term
    (the student's blocks must give the teacher's shapes: a pruned model does, token merging
    does not).
    `precision` is the autocast type of the forward pass: `auto` takes bf16 where the hardware
    computes it natively (CUDA with bf16, or a CPU with AVX-512 BF16 / AMX; fp16 with loss
    scaling on older GPUs) and fp32 elsewhere (emulated bf16 is many times slower than fp32); on
    a CPU only for models at least `BF16_MIN_WIDTH` wide, below which the casts cost more than
    the faster matmuls save (measured: 0.44x at width 64, 1.37x at width 192).
    `compile` runs the forward pass through `torch.compile` (a fixed cost of tens of seconds,
    worth it for long runs; `bench/train_speed.py` measures both on this machine).
    `mixup` / `cutmix` are the Beta-distribution alphas of timm's `Mixup` (0: off; with both on,
    each batch takes one of them at random); the mixed targets carry `label_smoothing`. A batch of
    odd size (an epoch's last) is not mixed."""

    epochs: int = knob(10, "Training epochs.")
    lr: float = knob(3e-3, "Peak learning rate (warm-up, then cosine).")
    min_lr: float = knob(1e-5, "Learning rate at the end of the cosine.")
    weight_decay: float = knob(0.05, "Weight decay.")
    optimizer: str = knob("adamw", f"Optimiser: {', '.join(OPTIMIZERS)}.")
    momentum: float = knob(0.9, "SGD momentum.")
    warmup_epochs: float = knob(1.0, "Warm-up epochs (may be fractional; at most half the run).")
    label_smoothing: float = knob(0.1, "Label smoothing.")
    mixup: float = knob(0.0, "Mixup alpha (0: off).")
    cutmix: float = knob(0.0, "CutMix alpha (0: off).")
    clip_grad: float | None = knob(1.0, "Gradient-norm clipping (none: off).")
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 (auto: bf16 where the hardware has it natively).")
    compile: bool = knob(False, "Train through torch.compile (worth it for long runs).")
    device: str | None = knob(None, "Device (default: CUDA when available, else CPU).")
    seed: int = knob(0, "Seed (data order, augmentation).")
    deterministic: bool = knob(True, "Deterministic algorithms where torch has them.")
    distill_alpha: float = knob(0.5, "Weight of the teacher's soft targets when distilling.")
    distill_temperature: float = knob(2.0, "Distillation temperature.")
    distill_blocks: float = knob(0.0, "Weight of the block outputs' distillation (relative mean squared error "
                                      "against the teacher's, each block; 0: off).")
    progress: bool = knob(True, "Show progress bars.")

    def __post_init__(self) -> None:
        integer("epochs", self.epochs, 0, MAX_EPOCHS)
        in_range("lr", self.lr, 0.0, low_open=True)
        in_range("min_lr", self.min_lr, 0.0)
        in_range("weight_decay", self.weight_decay, 0.0)
        in_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        in_range("warmup_epochs", self.warmup_epochs, 0.0)
        if self.clip_grad is not None:
            in_range("clip_grad", self.clip_grad, 0.0, low_open=True)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("precision", self.precision, PRECISIONS)
        in_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        in_range("mixup", self.mixup, 0.0)
        in_range("cutmix", self.cutmix, 0.0)
        in_range("distill_alpha", self.distill_alpha, 0.0, 1.0)
        in_range("distill_temperature", self.distill_temperature, 0.0, low_open=True)
        in_range("distill_blocks", self.distill_blocks, 0.0)
        seed("seed", self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GradientPenalty(Protocol):
    """RSST's penalty. Called after backward, unscaling and clipping, with the step in this run:
    edits gradients in place and returns the value to log (λ). `after_step`, when the penalty has
    one, runs after each optimiser step and may edit the weights (a decoupled fade)."""

    def __call__(self, model: nn.Module, step: int, total_steps: int) -> float: ...


@dataclass
class TrainResult:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    optimizer_state: dict[str, Any] | None = None
    precision: str = "fp32"  # what `TrainConfig.precision` resolved to on this device


@dataclass(frozen=True)
class ScheduleWindow:
    """A run that is one stretch of a longer learning-rate schedule: its first step is step
    `start` of a warm-up + cosine schedule `total` steps long (the pruning loop's passes share one)."""

    start: int
    total: int


def steps_per_epoch(bundle) -> int:
    """Optimiser steps in one epoch of `bundle.train` on this process (the data is sharded by rank)."""
    return math.ceil(len(bundle.train.dataset) / (bundle.train.batch_size * distributed.world_size()))


def resolve_device(config: TrainConfig) -> torch.device:
    return torch.device(config.device) if config.device else distributed.default_device()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (not by emulation, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Private probes of torch.cpu (present since torch 2.3); missing ones count as "no".
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def autocast_dtype(precision: str, device: torch.device, width: int) -> torch.dtype | None:
    """The autocast dtype that `precision` means on `device` for a model `width` wide (None: fp32)."""
    if precision == "auto":
        if native_bf16(device) and (device.type == "cuda" or width >= BF16_MIN_WIDTH):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return DTYPES[precision]


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target KL, scaled by T^2 so its gradient size does not depend on T."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


@contextmanager
def block_outputs(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """The outputs of `model.blocks`, in order, of the forward passes run inside the context
    (nothing is recorded when not `enabled`)."""
    outputs: list[torch.Tensor] = []
    if not enabled:
        yield outputs
        return
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise ConfigError(f"distill_blocks needs a ViT with a `blocks` sequence; {type(model).__name__} has none")
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in blocks]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def block_distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||s - t||² / ||t||² (per element means): each block counts alike
    whatever the scale of its stream."""
    if len(student) != len(teacher):
        raise ConfigError(f"distill_blocks: the student ran {len(student)} blocks, the teacher {len(teacher)}")
    losses = []
    for k, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ConfigError(f"distill_blocks: block {k} gives {tuple(s.shape)} in the student and "
                              f"{tuple(t.shape)} in the teacher (token merging changes the shapes; turn one off)")
        t = t.float()
        losses.append(F.mse_loss(s.float(), t) / t.square().mean().clamp_min(1e-12))
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1, top-5 (only with more than 5 classes) and mean cross-entropy over `loader`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    num_classes = None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        num_classes = logits.shape[-1]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, num_classes), dim=-1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(-1).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ConfigError("evaluation loader is empty")
    out = {"top1": correct1 / total}
    if num_classes is not None and num_classes > 5:
        out["top5"] = correct5 / total
    out["loss"] = loss_sum / total
    return out


def _mixer(config: TrainConfig, num_classes: int) -> Mixup | None:
    if not (config.mixup or config.cutmix):
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


def _loss(logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against the labels, or against mixed soft targets (timm's SoftTargetCrossEntropy)."""
    if soft is not None:
        return SoftTargetCrossEntropy()(logits.float(), soft)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


@dataclass
class _Session:
    """What one `train` call sets up once and every step uses."""

    device: torch.device
    net: nn.Module                   # the model as trained: wrapped for DDP, compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    mixer: Any
    total: int                       # steps of this run


def _session(model: nn.Module, bundle, config: TrainConfig, masks: WeightMasks | None, teacher: nn.Module | None,
             window: ScheduleWindow | None, optimizer_state: dict[str, Any] | None) -> _Session:
    device = resolve_device(config)
    distributed.setup(device)
    seed_everything(config.seed, config.deterministic)
    model.to(device).train()
    if masks is not None:
        masks.apply_(model)
    if teacher is not None:
        teacher.to(device).eval()
    net = distributed.wrap(model, device)
    if config.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = config.lr
    epoch_steps = steps_per_epoch(bundle)
    total = epoch_steps * config.epochs
    window = window or ScheduleWindow(0, total)
    # At most half the schedule: a short run still decays to min_lr.
    warmup = min(window.total // 2, int(round(config.warmup_epochs * epoch_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(window.start + s, warmup, window.total, config.min_lr / config.lr))
    amp_dtype = autocast_dtype(config.precision, device, getattr(model, "embed_dim", 0))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return _Session(device, net, optimizer, scheduler, scaler, amp_dtype, _mixer(config, model.num_classes), total)


def _step(model: nn.Module, run: _Session, config: TrainConfig, x: torch.Tensor, y: torch.Tensor, step: int,
          masks: WeightMasks | None, penalty: GradientPenalty | None, teacher: nn.Module | None) -> tuple[float, float]:
    """One optimiser step on a batch; its loss and the penalty's value (0 without one)."""
    soft, value = None, 0.0
    if run.mixer is not None and len(y) % 2 == 0:
        x, soft = run.mixer(x, y)
    blocks = teacher is not None and config.distill_blocks > 0
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        with block_outputs(model, blocks) as student_blocks:
            logits = run.net(x)
        loss = _loss(logits, y, soft, config.label_smoothing)
        if teacher is not None:
            with torch.no_grad(), block_outputs(teacher, blocks) as teacher_blocks:
                t_logits = teacher(x).float()
            kd = distill_loss(logits.float(), t_logits, config.distill_temperature)
            if blocks:
                kd = kd + config.distill_blocks * block_distill_loss(student_blocks, teacher_blocks)
            loss = (1 - config.distill_alpha) * loss + config.distill_alpha * kd
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if config.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    if penalty is not None:
        # After clipping: a large penalty must not scale down the loss gradients.
        value = penalty(model, step, run.total)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if penalty is not None and hasattr(penalty, "after_step"):
        penalty.after_step(model, step, run.total)
        value = penalty.value
    if masks is not None:
        masks.apply_(model)
    return float(loss.detach()), value


def train(model: nn.Module, bundle, config: TrainConfig | None = None, masks: WeightMasks | None = None, *,
          penalty: GradientPenalty | None = None, teacher: nn.Module | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None, description: str = "train",
          window: ScheduleWindow | None = None, optimizer_state: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` on `bundle.train` for `config.epochs`, validating on `bundle.val` each epoch.

    `masks` keeps pruned weights at exactly zero. `penalty` edits gradients before each step
    (RSST). `teacher` adds knowledge distillation. `on_epoch` receives each epoch's metrics.
    `window` places this run inside a longer learning-rate schedule and `optimizer_state`
    continues an earlier run's optimiser (its moments), so consecutive runs train as one.
    Under torchrun the model is wrapped in DistributedDataParallel and the data sharded by rank.
    """
    config = config or TrainConfig()
    run = _session(model, bundle, config, masks, teacher, window, optimizer_state)
    device, result = run.device, TrainResult()
    step, last_penalty = 0, 0.0
    with _progress(config.progress and distributed.is_main()) as bar:
        task = bar.add_task(description, total=run.total)
        for epoch in range(config.epochs):
            loss_sum, seen = 0.0, 0
            for x, y in distributed.epoch_loader(bundle.train, config.seed, epoch):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss, value = _step(model, run, config, x, y, step, masks, penalty, teacher)
                last_penalty = value if penalty is not None else last_penalty
                loss_sum += loss * len(y)
                seen += len(y)
                step += 1
                bar.update(task, advance=1)
            record = _epoch_record(model, bundle, run, description, epoch, step, loss_sum / max(1, seen))
            if penalty is not None:
                record["lambda"] = last_penalty
            bar.update(task, description=f"{description} epoch {epoch + 1}/{config.epochs} "
                                         f"loss {record['train_loss']:.3f} val top1 {record['val_top1']:.3f}")
            result.epochs.append(record)
            if on_epoch is not None:
                on_epoch(record)
    result.val = evaluate(model, bundle.val, device) if not result.epochs else {
        k.removeprefix("val_"): v for k, v in result.epochs[-1].items() if k.startswith("val_")}
    result.steps = step
    result.precision = next(name for name, dtype in DTYPES.items() if dtype == run.amp_dtype)
    result.optimizer_state = run.optimizer.state_dict()
    model.eval()
    return result


def _epoch_record(model: nn.Module, bundle, run: _Session, description: str, epoch: int, step: int,
                  mean_loss: float) -> dict[str, Any]:
    """The epoch's metrics (loss averaged over ranks, validation); a non-finite loss stops the run."""
    train_loss = distributed.mean_across_ranks(mean_loss, run.device)
    if not math.isfinite(train_loss):  # the same on every rank: all stop together
        raise TrainingError(f"{description}: the training loss became {train_loss} in epoch "
                            f"{epoch + 1}; lower the learning rate (or the RSST penalty) and run again")
    val = evaluate(model, bundle.val, run.device)
    return {"epoch": epoch + 1, "step": step, "lr": run.scheduler.get_last_lr()[0],
            "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}

"""Compaction without training: refit what the kept heads and neurons leave, by least squares.

The dense model and the pruned one run side by side over calibration images (labels unused), one
block at a time. In each branch (attention, then MLP) the output layer, `attn.proj` or
`mlp.fc2`, is solved on the kept heads' attention outputs / kept neurons' activations for the
weights and bias that best reproduce a target stream:
- `local`: the dense block run from the pruned model's input to the block;
- `global`: the dense model's own stream, so that the block also absorbs earlier blocks' drift;
- `mix`: `alpha` parts global, the rest local.
Before that (`inputs`, with a global share) the branch's input layer, `attn.qkv` / `mlp.fc1`, is
solved on its kept rows so that, from the pruned stream, its pre-activations reproduce the dense
branch's on the dense stream: earlier blocks' drift is corrected before the nonlinearity
(attention, GELU), which the output layer, linear in what comes out of it, cannot do.
The normal equations are summed in float64 over batches (memory does not grow with the image
count; `Gram` says in what precision each batch's products are taken) and solved with a ridge
penalty towards the current weights, each layer's own ridge chosen by cross-validation on the
calibration images (`cross_validated_ridge`). Removed units keep exactly zero weights: the result
is the masked model with its dense shapes, for `compact` to shrink.

Cost: each block's streams are carried from the last one (no model prefix is re-run); the dense
branch runs once per target stream, the pruned one twice (to gather the equations, then to move
its stream past the refit layer) but on its kept units alone, the second time from the first
pass's stored inputs where these are no larger than a stream.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError, MaskError
from ..masks import PruneMasks, head_view
from ..models.adapter import BlockLayout
from ..structure import BlockStructure, Structure
from ..validate import in_range, integer, one_of
from .refit_scores import (UNITS, embed_calibration, has_units, layer_scale, output_layer, read_tokens,
                           rows_of)

TARGETS = ("local", "global", "mix")
# Ridges cross-validation chooses from. Larger ones (up to 3) won more held-out reconstruction in
# the later MLPs but lost accuracy on Fashion-MNIST validation (docs/results/refit-fashion.md).
RIDGE_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FALLBACK_RIDGE = 1e-3  # where there are too few images to cross-validate
# Output columns the cross-validation scores (evenly spaced): each column is its own least-squares
# problem on the same inputs, so a sample of them ranks the ridges at a fraction of the solves'
# cost (vit_base's fc2: 768 outputs).
VALIDATION_OUTPUTS = 128
FLOAT32_ROWS_PER_COLUMN = 16  # see _products
BRANCHES = {"head": "attention", "neuron": "mlp"}


@dataclass
class RefitSettings:
    """How `refit` solves each block's output layers.

    `target` is what each branch reproduces (module docstring); `mix` takes `alpha` parts of the
    global target and the rest of the local one. `ridge` is the penalty pulling the solution
    towards the current weights, relative to the mean diagonal of the Gram matrix (so it does not
    depend on the image count); the bias is not penalised. None (the default) chooses each
    layer's own from `RIDGE_GRID` by `folds`-fold cross-validation over the calibration images
    (`FALLBACK_RIDGE` where there are fewer images than folds). A system whose condition number
    exceeds `max_condition`, or with a non-finite value, falls back to bias compensation: the
    weights are kept and the bias absorbs the mean of what the removed units added.
    `batch_size` images go through each forward pass; `num_images` caps the images read from the
    calibration data (None: all of them). `inputs` also refits each branch's input layer (module
    docstring; nothing to do for the local target)."""

    target: str = "global"
    alpha: float = 0.5
    ridge: float | None = None
    folds: int = 4
    max_condition: float = 1e10
    batch_size: int = 32
    num_images: int | None = None
    inputs: bool = True

    def __post_init__(self) -> None:
        one_of("refit target", self.target, TARGETS)
        self.alpha = in_range("alpha", self.alpha, 0.0, 1.0)
        if self.ridge is not None:
            self.ridge = in_range("ridge", self.ridge, 0.0)
        integer("folds", self.folds, 2)
        self.max_condition = in_range("max_condition", self.max_condition, 1.0, low_open=True)
        integer("batch_size", self.batch_size, 1)
        if self.num_images is not None:
            integer("num_images", self.num_images, 1)

    def fold_count(self, images: int) -> int:
        """Cross-validation folds over `images` (1 where the ridge is fixed: nothing to choose)."""
        return 1 if self.ridge is not None else min(self.folds, images)

    @property
    def global_share(self) -> float:
        """Weight of the global target (the rest goes to the local one)."""
        return {"local": 0.0, "global": 1.0}.get(self.target, self.alpha)


@dataclass
class BranchFit:
    """One refit output layer: relative residual ||Y - XW - b|| / ||Y|| of its target with the
    weights as pruned (`before`) and as refit (`after`), solved with `ridge`; `fell_back` when the
    solve was ill-conditioned and only the bias was adjusted."""

    block: int
    branch: str
    kept: int
    before: float
    after: float
    fell_back: bool
    ridge: float


@dataclass
class RefitReport:
    """What `refit` did: the number of calibration images, one `BranchFit` per refit output layer
    (`branches`) and one per refit input layer (`inputs`)."""

    images: int
    branches: list[BranchFit] = field(default_factory=list)
    inputs: list[BranchFit] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[str]:
        return [f"block {f.block} {f.branch}" for f in self.branches if f.fell_back] + \
            [f"block {f.block} {f.branch} input" for f in self.inputs if f.fell_back]

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "branches": [asdict(f) for f in self.branches],
                "inputs": [asdict(f) for f in self.inputs]}


class Gram:
    """Normal equations of Y ≈ X Wᵀ + b over rows added batch by batch, summed in float64.

    Within a batch the products are taken in `products` precision. The refit asks for float32
    where a system has many rows per column (`_products`): about twice as fast as float64 and no
    float64 copy of the activations, at a relative error of about 1e-7 to 1e-6 in each batch's
    contribution. Each batch is first centred on its own mean, so that this rounding is
    relative to the spread of the activations and not to their mean (the bias column's Schur
    complement, the covariance, would otherwise lose its digits); the means, the corrections and
    the sums across batches are float64, exact up to float64 rounding whatever the shift."""

    def __init__(self, inputs: int, outputs: int, bias: bool, device: torch.device | str | None = None,
                 products: torch.dtype = torch.float64):
        width = inputs + int(bias)
        self.bias = bias
        self.products = products
        self.xx = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.xy = torch.zeros(width, outputs, dtype=torch.float64, device=device)
        self.yy = torch.zeros(outputs, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n = x.shape[0]
        if not n:
            return
        x, y = x.to(self.products), y.to(self.products)
        x_shift, y_shift = x.mean(dim=0), y.mean(dim=0)
        x, y = x - x_shift, y - y_shift
        # With X = Xc + 1sᵀ: XᵀX = XcᵀXc + cₓsᵀ + scₓᵀ + n ssᵀ, where cₓ = Xcᵀ1 (zero up to rounding).
        s, t = x_shift.double(), y_shift.double()
        cx, cy = x.sum(dim=0).double(), y.sum(dim=0).double()
        k = x.shape[1]
        xx = (x.T @ x).double() + torch.outer(cx, s) + torch.outer(s, cx) + n * torch.outer(s, s)
        self.xx[:k, :k] += xx
        self.xy[:k] += (x.T @ y).double() + torch.outer(cx, t) + torch.outer(s, cy) + n * torch.outer(s, t)
        self.yy += y.square().sum(dim=0).double() + 2 * t * cy + n * t.square()
        if self.bias:
            x_sum = cx + n * s
            self.xx[k, :k] += x_sum
            self.xx[:k, k] += x_sum
            self.xx[k, k] += n
            self.xy[k] += cy + n * t
        self.rows += n

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.xx, self.xy, self.yy))

    def stack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[Wᵀ; b]: the (inputs (+1), outputs) coefficients the equations are written in."""
        w = weight.double().T
        return torch.cat([w, bias.double()[None]]) if self.bias else w

    @classmethod
    def total(cls, parts: list[Gram]) -> Gram:
        """The equations of all `parts`' rows together."""
        first = parts[0]
        gram = cls(first.xy.shape[0] - int(first.bias), first.xy.shape[1], first.bias, first.xx.device, first.products)
        for part in parts:
            gram.xx += part.xx
            gram.xy += part.xy
            gram.yy += part.yy
            gram.rows += part.rows
        return gram

    def outputs(self, columns: torch.Tensor) -> Gram:
        """The equations of the output `columns` alone."""
        gram = copy.copy(self)
        gram.xy, gram.yy = self.xy[:, columns], self.yy[columns]
        return gram

    def without(self, part: Gram) -> Gram:
        """The equations of this Gram's rows but those of `part` (which must be among them)."""
        gram = copy.copy(self)
        gram.xx, gram.xy, gram.yy, gram.rows = self.xx - part.xx, self.xy - part.xy, self.yy - part.yy, \
            self.rows - part.rows
        return gram

    def residual(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """||y - X w - b||² per output column, from the accumulated sums alone."""
        w = self.stack(weight, bias)
        return (self.yy - 2 * (w * self.xy).sum(dim=0) + (w * (self.xx @ w)).sum(dim=0)).clamp_min(0)


def compensated_bias(gram: Gram, weight: torch.Tensor) -> torch.Tensor:
    """The bias that, with `weight` kept, makes the mean residual zero (bias compensation)."""
    k = weight.shape[1]
    return (gram.xy[k] - gram.xx[k, :k] @ weight.double().T) / gram.rows


def ridge_solve(gram: Gram, weight: torch.Tensor, bias: torch.Tensor | None, ridge: float,
                max_condition: float) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias, fell_back) minimising ||Y - X Wᵀ - b||² + λ||W - weight||², λ = `ridge` ×
    the mean diagonal of XᵀX. A system that is not positive definite, not finite, or whose
    condition number (estimated from the Cholesky factor of its unit-diagonal scaling) exceeds
    `max_condition` keeps `weight` and compensates the bias instead (fell_back True)."""
    k = weight.shape[1]
    width = gram.xx.shape[0]
    if width == 0:
        return weight.double(), None, False
    penalty = torch.zeros(width, dtype=torch.float64, device=gram.xx.device)
    if k:
        penalty[:k] = ridge * gram.xx.diagonal()[:k].mean()
    system = gram.xx + torch.diag(penalty)
    scale = system.diagonal().rsqrt()  # unit diagonal: the estimate ignores the columns' scale
    factor, info = torch.linalg.cholesky_ex(scale[:, None] * system * scale[None, :])
    pivots = factor.diagonal()
    if int(info) == 0 and bool(torch.isfinite(factor).all()) and (pivots.max() / pivots.min()) ** 2 <= max_condition:
        rhs = gram.xy + penalty[:, None] * gram.stack(weight, bias)
        solution = scale[:, None] * torch.cholesky_solve(scale[:, None] * rhs, factor)
        if bool(torch.isfinite(solution).all()):
            return solution[:k].T, solution[k] if gram.bias else None, False
    return weight.double(), compensated_bias(gram, weight) if gram.bias else None, True


def held_out_errors(folds: list[Gram], weight: torch.Tensor, bias: torch.Tensor | None, max_condition: float,
                    emphasis: torch.Tensor | None = None, grid: tuple[float, ...] = RIDGE_GRID) -> list[float]:
    """For each ridge of `grid`: each fold's squared residual under the solve on the other folds
    (towards `weight`, `bias`), summed over folds and output columns (each times `emphasis`)."""
    total = Gram.total(folds)
    errors = []
    for ridge in grid:
        error = 0.0
        for fold in folds:
            w, b, _ = ridge_solve(total.without(fold), weight, bias, ridge, max_condition)
            residual = fold.residual(w, b)
            error += float((residual if emphasis is None else residual * emphasis).sum())
        errors.append(error)
    return errors


def cross_validated_ridge(folds: list[Gram], weight: torch.Tensor, bias: torch.Tensor | None,
                          max_condition: float, emphasis: torch.Tensor | None = None,
                          grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The ridge of the ascending `grid` with the least `held_out_errors` on `VALIDATION_OUTPUTS`
    evenly spaced output columns (ties: the smaller); fewer than two folds: `FALLBACK_RIDGE`."""
    if len(folds) < 2:
        return FALLBACK_RIDGE
    outputs = folds[0].yy.numel()
    picked = torch.arange(0, outputs, -(-outputs // VALIDATION_OUTPUTS), device=weight.device)
    errors = held_out_errors([fold.outputs(picked) for fold in folds], weight[picked],
                             None if bias is None else bias[picked], max_condition,
                             None if emphasis is None else emphasis[picked], grid)
    return grid[errors.index(min(errors))]


def structure_masks(model: nn.Module, structure: Structure) -> PruneMasks:
    """Quasi-structured masks of `model` that keep exactly the heads and neurons of `structure`."""
    masks = PruneMasks.ones(model)
    if len(structure.blocks) != len(masks.layout.blocks):
        raise MaskError(f"structure has {len(structure.blocks)} blocks, the model {len(masks.layout.blocks)}")
    for block, kept in zip(masks.layout.blocks, structure.blocks):
        heads = torch.zeros(block.num_heads, dtype=torch.bool)
        heads[kept.heads] = True
        neurons = torch.zeros(block.hidden, dtype=torch.bool)
        neurons[kept.neurons] = True
        for name, m in masks.block_masks(block).items():
            if name.endswith("qkv.weight"):
                head_view(name, m, block).mul_(heads.view(1, -1, 1, 1))
            elif name.endswith("proj.weight"):
                head_view(name, m, block).mul_(heads.view(1, -1, 1))
            else:
                m.mul_(neurons.view(-1, 1) if name.endswith("fc1.weight") else neurons.view(1, -1))
    return masks


def kept_columns(block: BlockLayout, kept: BlockStructure, unit: str) -> torch.Tensor:
    """Input columns of the output layer that carry kept units (a head has head_dim of them)."""
    if unit == "neuron":
        return torch.tensor(kept.neurons, dtype=torch.long)
    heads = torch.tensor(kept.heads, dtype=torch.long)
    return (heads[:, None] * block.head_dim + torch.arange(block.head_dim)).flatten()


def input_rows(block: BlockLayout, unit: str, columns: torch.Tensor) -> torch.Tensor:
    """The input layer's rows that feed the output layer's kept input `columns`: fc1's same rows,
    or qkv's query, key and value rows of the kept heads (q | k | v)."""
    if unit == "neuron":
        return columns
    return (torch.arange(3, device=columns.device)[:, None] * block.attn_dim + columns).flatten()


def input_layer(block: nn.Module, unit: str) -> tuple[nn.Module, nn.Linear]:
    """The branch's norm and input layer: (norm1, attn.qkv) or (norm2, mlp.fc1)."""
    return (block.norm1, block.attn.qkv) if unit == "head" else (block.norm2, block.mlp.fc1)


@dataclass
class _Streams:
    """Residual streams over all calibration images: the pruned model's, the dense model's
    (global target) and the dense block run from the pruned stream (local target)."""

    pruned: torch.Tensor
    dense: torch.Tensor | None
    local: torch.Tensor | None
    batch_size: int

    def parts(self) -> Iterator[slice]:
        for start in range(0, self.pruned.shape[0], self.batch_size):
            yield slice(start, start + self.batch_size)

    def keep_tokens(self, tokens: list[int] | slice) -> None:
        """Drop every token but `tokens`: past the last attention nothing mixes tokens, so the last
        MLP needs only those the classifier reads."""
        self.pruned = self.pruned[:, tokens]
        self.dense = None if self.dense is None else self.dense[:, tokens]
        self.local = None if self.local is None else self.local[:, tokens]


class _Linear(nn.Module):
    """A linear layer on given (sliced) weights, without nn.Linear's initialisation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _kept_inputs(block: nn.Module, layout: BlockLayout, unit: str,
                 columns: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pruned block's branch on its kept units alone, up to its output layer: the residual
    stream in, the output layer's kept input `columns` out. The removed units add nothing there
    (their outgoing columns are zero), so this is the masked branch at the kept units' cost,
    which the dense shapes would pay in full."""
    if not columns.numel():
        return lambda h: h.new_zeros(*h.shape[:-1], 0)
    if unit == "neuron":
        mlp = copy.deepcopy(block.mlp)
        fc1 = mlp.fc1
        mlp.fc1 = _Linear(fc1.weight[columns], None if fc1.bias is None else fc1.bias[columns])
        mlp.fc2 = nn.Identity()
        return nn.Sequential(block.norm2, mlp)
    attn = copy.deepcopy(block.attn)
    qkv, heads = attn.qkv, columns.numel() // layout.head_dim
    rows = input_rows(layout, unit, columns)
    attn.qkv = _Linear(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
    attn.num_heads, attn.attn_dim = heads, columns.numel()
    attn.proj = nn.Identity()
    return nn.Sequential(block.norm1, attn)


def _branch(block: nn.Module, unit: str, h: torch.Tensor) -> torch.Tensor:
    """What the branch adds to the residual stream `h` (pre-norm, LayerScale, drop path)."""
    if unit == "head":
        return block.drop_path1(block.ls1(block.attn(block.norm1(h))))
    return block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def _branch_from_inputs(block: nn.Module, unit: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the branch adds to the stream, from its output layer's kept input columns `x` and their
    `weight` columns."""
    out = F.linear(x, weight, output_layer(block, unit).bias)
    if unit == "head":
        return block.drop_path1(block.ls1(block.attn.proj_drop(out)))
    return block.drop_path2(block.ls2(block.mlp.drop2(out)))


def _products(dtype: torch.dtype, rows: int, columns: int) -> torch.dtype:
    """The precision of a Gram's per-batch products. Float32 where the rows outnumber the columns
    `FLOAT32_ROWS_PER_COLUMN` times: there the data, not the ridge, fix the solution, and float32
    products move it by about 1e-6 relative (vit_small's MLPs, 64 images). With fewer rows (the
    last block's class tokens, a few images) the ridge holds the directions the data leave free,
    where rounding is amplified up to 1/ridge times: float64 there, as for float64 activations."""
    if dtype == torch.float64 or rows < FLOAT32_ROWS_PER_COLUMN * columns:
        return torch.float64
    return torch.float32


def _add_by_fold(grams: list[Gram], part: slice, x: torch.Tensor, y: torch.Tensor,
                 tokens: list[int] | slice | None) -> None:
    """Add the images `part` of the calibration set (inputs `x`, targets `y`) to the fold Grams:
    image i to fold i mod len(grams)."""
    folds = len(grams)
    for k, gram in enumerate(grams):
        first = (k - part.start) % folds
        gram.add(rows_of(x[first::folds], tokens), rows_of(y[first::folds], tokens))


def _accumulate(dense: nn.Module, pruned: nn.Module, unit: str, inputs: Callable[[torch.Tensor], torch.Tensor],
                kept: int, streams: _Streams, share: float, tokens: list[int] | slice | None,
                stored: torch.Tensor | None, folds: int) -> list[Gram]:
    """Advance the target streams through the dense branch and gather the normal equations of the
    pruned branch's output layer against them (keeping its inputs in `stored` where given), one
    Gram per fold: image i goes to fold i mod `folds`."""
    layer = output_layer(pruned, unit)
    gamma = layer_scale(pruned, unit)
    rows = streams.pruned.shape[0] * rows_of(streams.pruned[:1], tokens).shape[0]
    grams = [Gram(kept, layer.out_features, layer.bias is not None, layer.weight.device,
                  _products(streams.pruned.dtype, rows // folds, kept + 1)) for _ in range(folds)]
    for part in streams.parts():
        x = inputs(streams.pruned[part])
        if stored is not None:
            stored[part] = x
        target = -streams.pruned[part]
        for stream, weight in ((streams.dense, share), (streams.local, 1.0 - share)):
            if stream is not None:
                stream[part] += _branch(dense, unit, stream[part])
                target += weight * stream[part]
        if gamma is not None:  # fit proj / fc2 before the LayerScale that follows them
            target /= torch.where(gamma == 0, torch.ones_like(gamma), gamma)
        _add_by_fold(grams, part, x, target, tokens)
    return grams


@dataclass
class _Solution:
    weight: torch.Tensor
    bias: torch.Tensor | None
    before: float  # relative residuals, see BranchFit
    after: float
    fell_back: bool
    ridge: float


def _solve(folds: list[Gram], old_weight: torch.Tensor, old_bias: torch.Tensor | None,
           gamma: torch.Tensor | None, settings: RefitSettings) -> _Solution:
    """The ridge solution of the `folds`' equations towards the current weights, its ridge
    cross-validated unless `settings` fixes one; residuals weighted by `gamma`² (LayerScale)."""
    old_weight = old_weight.detach().double()
    old_bias = None if old_bias is None else old_bias.detach().double()
    gram = Gram.total(folds)
    emphasis = torch.ones_like(gram.yy) if gamma is None else gamma.double().square()
    ridge = settings.ridge if settings.ridge is not None else \
        cross_validated_ridge(folds, old_weight, old_bias, settings.max_condition, emphasis)
    weight, bias, fell_back = ridge_solve(gram, old_weight, old_bias, ridge, settings.max_condition)
    total = float((gram.yy * emphasis).sum())

    def relative(w: torch.Tensor, b: torch.Tensor | None) -> float:
        return (float((gram.residual(w, b) * emphasis).sum()) / total) ** 0.5 if total > 0 else 0.0

    return _Solution(weight, bias, relative(old_weight, old_bias), relative(weight, bias), fell_back, ridge)


def _solve_into(layer: nn.Linear, columns: torch.Tensor, folds: list[Gram], gamma: torch.Tensor | None,
                settings: RefitSettings) -> _Solution:
    """Solve the output layer's kept input `columns` (the others zero) and its bias, and write them."""
    solution = _solve(folds, layer.weight[:, columns], layer.bias, gamma, settings)
    new = torch.zeros_like(layer.weight)
    new[:, columns] = solution.weight.to(new.dtype)
    layer.weight.copy_(new)
    if solution.bias is not None:
        layer.bias.copy_(solution.bias.to(layer.bias.dtype))
    return solution


def _check_finite(grams: list[Gram], block: BlockLayout, unit: str) -> None:
    if not all(gram.finite() for gram in grams):
        raise DataError(f"non-finite activations in block {block.index} ({BRANCHES[unit]}); check "
                        "the calibration images for NaN or inf values")


def _refit_input_layer(dense: nn.Module, pruned: nn.Module, block: BlockLayout, kept: int, unit: str,
                       rows: torch.Tensor, streams: _Streams, settings: RefitSettings) -> BranchFit:
    """Solve the input layer's kept `rows` (and their bias) so that, on the pruned stream, they
    reproduce the dense input layer's pre-activations on the global target's stream (the local
    target's share: on the pruned stream itself), and write them."""
    norm, layer = input_layer(pruned, unit)
    dense_norm, dense_layer = input_layer(dense, unit)
    weight, bias = dense_layer.weight[rows], None if dense_layer.bias is None else dense_layer.bias[rows]
    images, length, width = streams.pruned.shape
    folds = settings.fold_count(images)
    grams = [Gram(width, rows.numel(), bias is not None, weight.device,
                  _products(streams.pruned.dtype, images * length // folds, width + 1)) for _ in range(folds)]
    share = settings.global_share
    for part in streams.parts():
        x = norm(streams.pruned[part])
        target = share * F.linear(dense_norm(streams.dense[part]), weight, bias)
        if share < 1:
            target += (1 - share) * F.linear(dense_norm(streams.pruned[part]), weight, bias)
        _add_by_fold(grams, part, x, target, None)
    _check_finite(grams, block, unit)
    solution = _solve(grams, layer.weight[rows], None if layer.bias is None else layer.bias[rows], None, settings)
    layer.weight[rows] = solution.weight.to(layer.weight.dtype)
    if solution.bias is not None:
        layer.bias[rows] = solution.bias.to(layer.bias.dtype)
    return BranchFit(block.index, BRANCHES[unit], kept, solution.before, solution.after, solution.fell_back,
                     solution.ridge)


def _refit_branch(dense: nn.Module, pruned: nn.Module, block: BlockLayout, kept: BlockStructure, unit: str,
                  streams: _Streams, settings: RefitSettings, tokens: list[int] | slice | None,
                  report: RefitReport) -> None:
    """Refit one branch's input layer (`settings.inputs`, with a global target) and output layer,
    then move the pruned stream past the refit branch."""
    columns = kept_columns(block, kept, unit).to(streams.pruned.device)
    count = len(kept.heads if unit == "head" else kept.neurons)
    if settings.inputs and streams.dense is not None and columns.numel():
        report.inputs.append(_refit_input_layer(dense, pruned, block, count, unit, input_rows(block, unit, columns),
                                                streams, settings))
    inputs = _kept_inputs(pruned, block, unit, columns)
    images, length, width = streams.pruned.shape
    # The output layer's inputs are kept for the second pass when they take no more memory than a
    # residual stream (a head branch, or an MLP pruned to a quarter); wider ones are recomputed.
    stored = streams.pruned.new_empty(images, length, columns.numel()) if columns.numel() <= width else None
    folds = settings.fold_count(images)
    grams = _accumulate(dense, pruned, unit, inputs, columns.numel(), streams, settings.global_share, tokens, stored,
                        folds)
    _check_finite(grams, block, unit)
    layer = output_layer(pruned, unit)
    solution = _solve_into(layer, columns, grams, layer_scale(pruned, unit), settings)
    weight = layer.weight[:, columns]
    for part in streams.parts():
        x = stored[part] if stored is not None else inputs(streams.pruned[part])
        streams.pruned[part] += _branch_from_inputs(pruned, unit, x, weight)
    report.branches.append(BranchFit(block.index, BRANCHES[unit], count, solution.before, solution.after,
                                     solution.fell_back, solution.ridge))


def _refit_block(dense: nn.Module, pruned: nn.Module, block: BlockLayout, kept: BlockStructure,
                 streams: _Streams, settings: RefitSettings, tokens: list[int] | slice | None,
                 report: RefitReport) -> None:
    """Refit both branches of one block, then move the pruned stream past it. In the last block
    (`tokens`: those the classifier reads) the MLP runs on those tokens alone."""
    if streams.local is not None:
        streams.local.copy_(streams.pruned)
    for unit in UNITS:
        if unit == "neuron" and tokens is not None:
            streams.keep_tokens(tokens)
            tokens = None
        if not has_units(block, unit):  # a branch removed earlier: a constant, or nothing
            for stream, owner in ((streams.pruned, pruned), (streams.dense, dense), (streams.local, dense)):
                if stream is not None:
                    stream += _branch(owner, unit, stream)
            continue
        _refit_branch(dense, pruned, block, kept, unit, streams, settings, tokens, report)


def refit(model: nn.Module, masks: PruneMasks | Structure, calibration: Iterable[Any],
          settings: RefitSettings | None = None) -> RefitReport:
    """Mask `model` in place to the quasi-structured `masks` (or `structure`) and refit every
    block's proj and fc2 (and qkv and fc1, `settings.inputs`) on `calibration` (an iterable of
    image batches, or (images, labels) pairs; labels unused), on the model's device. On an error
    the model is left as it came."""
    settings = settings or RefitSettings()
    if isinstance(masks, Structure):
        masks = structure_masks(model, masks)
    masks.check_model(model)
    structure = masks.structure()
    was_training = model.training
    model.eval()
    dense = copy.deepcopy(model)
    try:
        with torch.no_grad():
            masks.apply_(model)
            start = embed_calibration(dense, calibration, settings.num_images)
            share = settings.global_share
            streams = _Streams(start, start.clone() if share > 0 else None,
                               start.clone() if share < 1 else None, settings.batch_size)
            last = masks.layout.blocks[-1].index
            report = RefitReport(streams.pruned.shape[0])
            for block, kept in zip(masks.layout.blocks, structure.blocks):
                tokens = read_tokens(model) if block.index == last else None
                _refit_block(dense.blocks[block.index], model.blocks[block.index], block, kept, streams, settings,
                             tokens, report)
    except BaseException:
        model.load_state_dict(dense.state_dict())
        raise
    finally:
        model.train(was_training)
    return report

"""Calibration images and what a head or neuron contributes on them: the pieces refit shares
with the `activation` and `fisher` criteria.

A unit's contribution reaches the residual stream through the input columns of its branch's
output layer (`attn.proj` for a head, `mlp.fc2` for a neuron). Both scores and the refit read or
edit that layer's input with one hook, `unit_inputs`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError
from ..models.adapter import BlockLayout, ViTLayout, input_size

UNITS = ("head", "neuron")
BlockScores = tuple["torch.Tensor | None", "torch.Tensor | None"]
# Called with (block layout, unit kind, the output layer's input); a returned tensor replaces it.
InputEdit = Callable[[BlockLayout, str, torch.Tensor], "torch.Tensor | None"]


def output_layer(block: nn.Module, unit: str) -> nn.Linear:
    """The layer whose input columns carry the units' outputs: attn.proj or mlp.fc2."""
    return block.attn.proj if unit == "head" else block.mlp.fc2


def layer_scale(block: nn.Module, unit: str) -> torch.Tensor | None:
    """The branch's LayerScale gamma (DeiT-III), or None without one."""
    gamma = getattr(block.ls1 if unit == "head" else block.ls2, "gamma", None)
    return None if gamma is None else gamma.detach()


def has_units(block: BlockLayout, unit: str) -> bool:
    return bool(block.num_heads if unit == "head" else block.hidden)


@contextmanager
def unit_inputs(model: nn.Module, layout: ViTLayout, edit: InputEdit) -> Iterator[None]:
    """Inside the `with`, `edit` sees (and may replace) the input of every block's output layers."""
    hooks = []
    for block in layout.blocks:
        for unit in UNITS:
            if has_units(block, unit):
                def hook(module, args, block=block, unit=unit):
                    new = edit(block, unit, args[0])
                    return None if new is None else (new, *args[1:])
                hooks.append(output_layer(model.blocks[block.index], unit).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def calibration_images(batch: Any, model: nn.Module) -> torch.Tensor:
    """The images of a calibration batch (an image tensor, or an (images, labels) pair), checked
    against what the model takes."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise DataError("calibration batches must be float image tensors (N, C, H, W), got "
                        f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    expected = input_size(model)
    if tuple(x.shape[1:]) != expected and not (getattr(model, "dynamic_img_size", False)
                                               and x.shape[1] == expected[0]):
        raise DataError(f"calibration images are {'x'.join(map(str, x.shape[1:]))} (C x H x W) but the "
                        f"model takes {'x'.join(map(str, expected))}; use the model's preprocessing")
    return x


def embed_calibration(model: nn.Module, calibration: Iterable[Any], num_images: int | None = None) -> torch.Tensor:
    """The token stream entering block 0 for the calibration images: (images, tokens, width).
    Batches may be image tensors or (images, labels) pairs; labels are ignored."""
    device = next(model.parameters()).device
    parts, count = [], 0
    for batch in calibration:
        x = calibration_images(batch, model)
        if num_images is not None:
            x = x[:num_images - count]
        if x.shape[0]:
            count += x.shape[0]
            tokens = model._pos_embed(model.patch_embed(x.to(device)))
            parts.append(model.norm_pre(model.patch_drop(tokens)))
        if num_images is not None and count >= num_images:
            break
    if not count:
        raise DataError("the calibration data has no images; refit needs a few hundred images (labels unused)")
    return torch.cat(parts)


def read_tokens(model: nn.Module) -> list[int] | slice | None:
    """The tokens of the last block's output that the classifier reads (None: all of them)."""
    if getattr(model, "attn_pool", None) is not None:
        return None
    if model.global_pool == "token":
        return [0, 1] if getattr(model, "head_dist", None) is not None else [0]
    if model.global_pool in ("avg", "max", "avgmax") and not getattr(model, "pool_include_prefix", False):
        return slice(model.num_prefix_tokens, None)
    return None


def rows_of(x: torch.Tensor, tokens: list[int] | slice | None) -> torch.Tensor:
    """(images, tokens, features) as (rows, features), keeping only `tokens`."""
    x = x if tokens is None else x[:, tokens]
    return x.flatten(0, -2)  # also with no features: a branch with every unit removed


def scaled_output_weight(block: nn.Module, unit: str) -> torch.Tensor:
    """The output layer's weight in float64, LayerScale included: what each unit's output adds to
    the residual stream."""
    w = output_layer(block, unit).weight.detach().double()
    gamma = layer_scale(block, unit)
    return w if gamma is None else w * gamma.double()[:, None]


def column_energy(block: nn.Module, unit: str) -> torch.Tensor:
    """Squared norm of each input column of the output layer, LayerScale included: how strongly a
    unit's output reaches the residual stream, so that scores compare across blocks."""
    return scaled_output_weight(block, unit).square().sum(dim=0)


def per_unit_columns(values: torch.Tensor, block: BlockLayout, unit: str) -> torch.Tensor:
    """Per-column values summed over each head's head_dim columns (neurons: unchanged)."""
    return values.reshape(block.num_heads, block.head_dim).sum(dim=1) if unit == "head" else values


def _finite_scores(scores: list[BlockScores], name: str) -> list[BlockScores]:
    for index, pair in enumerate(scores):
        if any(s is not None and not bool(torch.isfinite(s).all()) for s in pair):
            raise DataError(f"criterion {name!r}: non-finite activations in block {index}; check the "
                            "calibration images for NaN or inf values")
    return scores


Moments = tuple[int, torch.Tensor, torch.Tensor]  # rows, mean, summed squared deviations from it


def batch_moments(rows: torch.Tensor) -> Moments:
    """Moments of one batch of rows, per column: taken in the rows' precision (at least float32)
    about the batch's own mean, so that rounding is relative to the spread and not to the mean,
    and returned in float64 for `merged_moments`."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    mean = rows.mean(dim=0)
    return rows.shape[0], mean.double(), (rows - mean).square().sum(dim=0).double()


def merged_moments(a: Moments | None, b: Moments) -> Moments:
    """The moments of two groups of rows together (Chan, Golub and LeVeque's pairwise update)."""
    if a is None:
        return b
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta.square() * (na * nb / n)


def _scores_from_rows(model: nn.Module, layout: ViTLayout, images: Sequence[torch.Tensor],
                      add: Callable[[tuple[int, str], torch.Tensor], None],
                      score: Callable[[BlockLayout, str], torch.Tensor], name: str) -> list[BlockScores]:
    """Run the calibration images with `add((block, unit), rows)` seeing the rows of every output
    layer's input (in the last block only the tokens the classifier reads), then `score` each
    block's heads and neurons."""
    device = next(model.parameters()).device
    tokens = read_tokens(model)
    last = layout.blocks[-1].index

    def record(block: BlockLayout, unit: str, x: torch.Tensor) -> None:
        add((block.index, unit), rows_of(x.detach(), tokens if block.index == last else None))

    with torch.no_grad(), unit_inputs(model, layout, record):
        for x in images:
            model(calibration_images(x, model).to(device))
    scores = [tuple(score(block, unit).float().cpu() if has_units(block, unit) else None for unit in UNITS)
              for block in layout.blocks]
    return _finite_scores(scores, name)


def contribution_scores(model: nn.Module, layout: ViTLayout, images: Sequence[torch.Tensor],
                        centered: bool = True) -> list[BlockScores]:
    """Per head and neuron: the variance (`centered`) or mean square of its output over the
    calibration tokens times the squared norm of its output-layer columns."""
    moments: dict[tuple[int, str], Moments] = {}

    def add(key: tuple[int, str], rows: torch.Tensor) -> None:
        moments[key] = merged_moments(moments.get(key), batch_moments(rows))

    def score(block: BlockLayout, unit: str) -> torch.Tensor:
        count, mean, deviations = moments[(block.index, unit)]
        spread = deviations / count if centered else deviations / count + mean.square()
        return per_unit_columns(spread.clamp_min(0) * column_energy(model.blocks[block.index], unit), block, unit)
    return _scores_from_rows(model, layout, images, add, score, "activation")


FISHER_IMAGES_PER_PASS = 8


def fisher_scores(model: nn.Module, layout: ViTLayout, images: Sequence[torch.Tensor]) -> list[BlockScores]:
    """Per head and neuron: the squared gradient of the loss against the model's own top-1
    prediction with respect to a mask variable on the unit's output (one per image, so the squares
    sum per-image gradients: the empirical Fisher's diagonal), summed over the images."""
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # only the mask variables need gradients
    totals: dict[tuple[int, str], torch.Tensor] = {}
    gates: dict[tuple[int, str], torch.Tensor] = {}

    def gate(block: BlockLayout, unit: str, x: torch.Tensor) -> torch.Tensor:
        count = block.num_heads if unit == "head" else block.hidden
        g = torch.ones(x.shape[0], count, device=x.device, dtype=x.dtype, requires_grad=True)
        gates[(block.index, unit)] = g
        if unit == "head":
            return (x.unflatten(-1, (block.num_heads, block.head_dim)) * g[:, None, :, None]).flatten(-2)
        return x * g[:, None, :]

    with unit_inputs(model, layout, gate):
        for x in images:
            # A few images per backward pass: each image's gradient is its own, so the scores do not
            # depend on the split, and the activations kept for it stay small (vit_base at 32 images
            # a pass went past 6.5 GB).
            for part in calibration_images(x, model).split(FISHER_IMAGES_PER_PASS):
                logits = model(part.to(device)).float()
                F.cross_entropy(logits, logits.argmax(dim=-1).detach(), reduction="sum").backward()
                for key, g in gates.items():
                    totals[key] = totals.get(key, 0) + g.grad.double().square().sum(dim=0)
                gates.clear()
    for p in trainable:
        p.requires_grad_(True)
    scores = [tuple(totals[(b.index, u)].float().cpu() if has_units(b, u) else None for u in UNITS)
              for b in layout.blocks]
    return _finite_scores(scores, "fisher")


def reconstruction_scores(model: nn.Module, layout: ViTLayout, images: Sequence[torch.Tensor],
                          ridge: float = 1e-3) -> list[BlockScores]:
    """Per head and neuron: how much the output layer's least-squares error grows when the unit's
    columns are removed and the rest refit (optimal brain surgeon, by groups): for columns S of
    W (LayerScale included) and the inputs' covariance C (plus `ridge` times its mean diagonal),
    tr(W_S [(C⁻¹)_SS]⁻¹ W_Sᵀ). A unit that the others can stand in for scores low, however
    large its own output."""
    sums: dict[tuple[int, str], tuple[int, Any, Any]] = {}

    def add(key: tuple[int, str], rows: torch.Tensor) -> None:
        rows = rows.double()
        n, total, outer = sums.get(key, (0, 0.0, 0.0))
        sums[key] = (n + rows.shape[0], total + rows.sum(dim=0), outer + rows.T @ rows)

    def score(block: BlockLayout, unit: str) -> torch.Tensor:
        n, total, outer = sums[(block.index, unit)]
        mean = total / n
        cov = outer / n - torch.outer(mean, mean)
        cov += ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        inverse = torch.linalg.inv(cov)
        w = scaled_output_weight(model.blocks[block.index], unit)
        if unit == "neuron":
            return w.square().sum(dim=0) / inverse.diagonal()
        groups = torch.arange(w.shape[1], device=w.device).reshape(block.num_heads, block.head_dim)
        return torch.stack([torch.trace(w[:, g] @ torch.linalg.solve(inverse[g][:, g], w[:, g].T)) for g in groups])
    return _scores_from_rows(model, layout, images, add, score, "reconstruction")

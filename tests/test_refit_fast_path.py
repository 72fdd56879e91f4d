"""The refit's fast path (branches on their kept units alone, stored inputs, the last MLP on the
tokens the classifier reads, batched Gram products) against the refit as first written: the
masked full-width branches on all images at once, with float64 products, the input layers (qkv,
fc1) solved the same way."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import input_for, make_family

import vitcompact as vc
from vitcompact.pruning.refit import (Gram, RefitSettings, cross_validated_ridge, input_layer, input_rows,
                                     kept_columns, refit, ridge_solve)
from vitcompact.pruning.refit_scores import batch_moments, layer_scale, merged_moments, output_layer, read_tokens

SMALL = {"embed_dim": 32, "num_heads": 4}


def _branch(block, unit, h):
    if unit == "head":
        return block.ls1(block.attn(block.norm1(h)))
    return block.ls2(block.mlp(block.norm2(h)))


def _fit(x, target, old_weight, old_bias, settings, emphasis=None):
    """Ridge solve of target ≈ x Wᵀ + b (rows, ·), all rows in one batch; the ridge cross-validated
    with image i in fold i mod folds where `settings` fixes none."""
    gram = Gram(x.shape[-1], target.shape[-1], True)
    gram.add(x.flatten(0, -2), target.flatten(0, -2))
    ridge = settings.ridge
    if ridge is None:
        folds = [Gram(x.shape[-1], target.shape[-1], True) for _ in range(settings.folds)]
        for k, fold in enumerate(folds):
            fold.add(x[k::settings.folds].flatten(0, -2), target[k::settings.folds].flatten(0, -2))
        ridge = cross_validated_ridge(folds, old_weight, old_bias, settings.max_condition, emphasis)
    weight, bias, _ = ridge_solve(gram, old_weight, old_bias, ridge, settings.max_condition)
    return weight, bias


def _solve_input(block, dense_block, layout, kept, unit, streams, share, tokens, settings):
    """The input layer's fit: all tokens for qkv; for the last fc1 those the classifier reads."""
    pruned, dense, _ = streams
    read = slice(None) if tokens is None or unit == "head" else tokens
    pruned, dense = pruned[:, read], dense[:, read]
    (norm, layer), (dense_norm, dense_layer) = input_layer(block, unit), input_layer(dense_block, unit)
    rows = input_rows(layout, unit, kept_columns(layout, kept, unit))
    target = (share * dense_layer(dense_norm(dense)) + (1 - share) * dense_layer(dense_norm(pruned)))[..., rows]
    weight, bias = _fit(norm(pruned).double(), target.double(), dense_layer.weight[rows].double(),
                        dense_layer.bias[rows].double(), settings)
    layer.weight[rows] = weight.float()
    layer.bias[rows] = bias.float()


def _solve(block, dense_block, layout, kept, unit, streams, share, tokens, settings):
    pruned, dense, local = streams
    if settings.inputs and share > 0:
        _solve_input(block, dense_block, layout, kept, unit, streams, share, tokens, settings)
    layer = output_layer(block, unit)
    seen = []
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    _branch(block, unit, pruned)
    hook.remove()
    dense += _branch(dense_block, unit, dense)
    local += _branch(dense_block, unit, local)
    target = share * dense + (1 - share) * local - pruned
    gamma = layer_scale(block, unit)
    if gamma is not None:
        target /= gamma
    columns = kept_columns(layout, kept, unit)
    x = seen[0][..., columns]
    read = slice(None) if tokens is None else tokens
    weight, bias = _fit(x[:, read], target[:, read], layer.weight[:, columns].double(), layer.bias.double(), settings,
                        None if gamma is None else gamma.double().square())
    layer.weight.zero_()
    layer.weight[:, columns] = weight.float()
    layer.bias.copy_(bias)
    pruned += _branch(block, unit, pruned)


def reference_refit(model, masks, images, settings):
    dense = copy.deepcopy(model)
    masks.apply_(model)
    x = torch.cat(images)
    with torch.no_grad():
        start = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
        pruned, streams_dense = start.clone(), start.clone()
        for layout, kept in zip(masks.layout.blocks, masks.structure().blocks):
            tokens = read_tokens(model) if layout.index == len(model.blocks) - 1 else None
            streams = (pruned, streams_dense, pruned.clone())
            for unit in ("head", "neuron"):
                _solve(model.blocks[layout.index], dense.blocks[layout.index], layout, kept, unit, streams,
                       settings.global_share, tokens, settings)


GLOBAL = RefitSettings(target="global", ridge=1e-3, batch_size=24)
MIX = RefitSettings(target="mix", alpha=0.3, ridge=1e-3, batch_size=24)
# Cross-validated ridges, with batches that do not line up with the folds (fold = image mod 3).
CROSS = RefitSettings(target="global", folds=3, batch_size=20)


# At 0.25 the MLP's inputs are wider than the stream and recomputed, at 0.75 they are kept.
@pytest.mark.parametrize("family,settings,ratio", [("vit_tiny", GLOBAL, 0.25), ("deit_distilled", MIX, 0.75),
                                                   ("layerscale", MIX, 0.25), ("gap_no_cls", GLOBAL, 0.75),
                                                   ("qk_norm", GLOBAL, 0.5), ("vit_tiny", CROSS, 0.5),
                                                   ("layerscale", CROSS, 0.25)])
def test_fast_refit_equals_the_reference(family, settings, ratio):
    model = make_family(family, **SMALL)
    calib = [input_for(model, 32, seed=i) for i in range(5)]
    masks = vc.regroup(model, vc.PruneMasks.ones(model), vc.RegroupConfig(head_ratio=ratio, mlp_ratio=ratio,
                                                                         criteria="activation"), data=calib)
    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    refit(fast, masks, calib, settings)
    reference_refit(slow, masks, calib, settings)
    # The last MLP's fc1 and fc2, both fit on 160 class tokens at cross-validated ridges down to
    # 1e-5, amplify float32 rounding the most (1.7e-5 of fc2's largest weight, layerscale at 0.25).
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4 * float(q.detach().abs().max()), msg=name)


def test_float32_products_stay_close_to_float64_when_the_mean_dwarfs_the_spread():
    g = torch.Generator().manual_seed(0)
    x = 100 + torch.randn(4000, 9, generator=g)  # the covariance is 1e-4 of the raw second moment
    y = x[:, :3] @ torch.randn(3, 2, generator=g) + 0.1 * torch.randn(4000, 2, generator=g)
    exact, fast = Gram(9, 2, bias=True), Gram(9, 2, bias=True, products=torch.float32)
    for start in range(0, 4000, 700):
        exact.add(x[start:start + 700].double(), y[start:start + 700].double())
        fast.add(x[start:start + 700], y[start:start + 700])
    torch.testing.assert_close(fast.xx, exact.xx, rtol=1e-7, atol=0)
    torch.testing.assert_close(fast.xy, exact.xy, rtol=1e-7, atol=0)
    zero_w, zero_b = torch.zeros(2, 9), torch.zeros(2)
    w_fast, b_fast, _ = ridge_solve(fast, zero_w, zero_b, 1e-6, 1e12)
    w_exact, b_exact, _ = ridge_solve(exact, zero_w, zero_b, 1e-6, 1e12)
    torch.testing.assert_close(w_fast, w_exact, rtol=1e-4, atol=1e-5)


def test_moments_merged_over_batches_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    rows = 50 + torch.randn(1000, 5, generator=g, dtype=torch.float64)
    merged = None
    for start in range(0, 1000, 170):
        merged = merged_moments(merged, batch_moments(rows[start:start + 170]))
    count, mean, deviations = merged
    assert count == 1000
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(deviations / count, rows.var(0, correction=0))

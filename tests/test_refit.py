"""Refit (compaction without training): exactness, error reduction, Gram accumulation, masks kept
quasi-structured, bad calibration data, and the `activation` / `fisher` criteria."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import input_for, make_family
from timm.models.vision_transformer import VisionTransformer

import vitcompact as vc
from vitcompact.pruning import ScoreContext, score_units, select_units
from vitcompact.pruning.refit import (FALLBACK_RIDGE, RIDGE_GRID, Gram, RefitSettings, cross_validated_ridge,
                                     held_out_errors, refit, ridge_solve)

TARGETS = [RefitSettings(target="local"), RefitSettings(target="global"), RefitSettings(target="mix", alpha=0.3)]


def small_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5).eval()


def images(model, count: int, batch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    return [input_for(model, batch, seed + i) for i in range(count // batch)]


def pruned_masks(model, calib, ratio: float = 0.5, criteria: str = "activation") -> vc.PruneMasks:
    return vc.regroup(model, vc.PruneMasks.ones(model),
                      vc.RegroupConfig(head_ratio=ratio, mlp_ratio=ratio, criteria=criteria), data=calib)


@pytest.mark.parametrize("family", ["vit_tiny", "deit_distilled", "layerscale", "gap_no_cls"])
@pytest.mark.parametrize("settings", TARGETS, ids=lambda s: s.target)
def test_nothing_pruned_reproduces_the_dense_model(family, settings):
    model = make_family(family)
    dense = copy.deepcopy(model)
    report = refit(model, vc.PruneMasks.ones(model), images(model, 32), settings)
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    x = input_for(model, 8, seed=99)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert all(f.after < 1e-4 and not f.fell_back for f in report.branches + report.inputs)
    assert len(report.inputs) == (0 if settings.target == "local" else 2 * len(model.blocks))


def block_error(pruned, dense, x: torch.Tensor, index: int) -> float:
    """Relative error of block `index`'s output when both models get the dense model's input."""
    with torch.no_grad():
        h = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
        for block in dense.blocks[:index]:
            h = block(h)
        target = dense.blocks[index](h)
        return float((pruned.blocks[index](h) - target).norm() / target.norm())


@pytest.mark.parametrize("settings", TARGETS, ids=lambda s: s.target)
def test_refit_lowers_the_block_error_of_plain_removal(settings):
    dense = small_vit()
    calib = images(dense, 64)
    masks = pruned_masks(dense, calib)
    removed, refitted = copy.deepcopy(dense), copy.deepcopy(dense)
    masks.apply_(removed)
    report = refit(refitted, masks, calib, settings)
    held_out = input_for(dense, 32, seed=123)  # not seen by the refit
    plain, fitted = block_error(removed, dense, held_out, 0), block_error(refitted, dense, held_out, 0)
    assert fitted < 0.8 * plain, (plain, fitted)
    assert all(f.after < f.before for f in report.branches), report.branches
    assert not report.fallbacks


@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_a_branch_with_every_unit_removed_is_refit_to_the_mean_of_the_dense_branch(branch):
    # A latency budget may remove a whole branch (block removal). Block 0 keeps no head (or no
    # neuron): the branch becomes its output layer's bias alone, which the refit sets to the mean
    # over the calibration tokens of what the dense branch adds (block 0 sees the dense stream).
    dense = small_vit()
    calib = images(dense, 32)
    masks = vc.PruneMasks.ones(dense)
    names = ("attn.qkv", "attn.proj") if branch == "attention" else ("mlp.fc1", "mlp.fc2")
    for name in names:
        masks.masks[f"blocks.0.{name}.weight"].zero_()
    model = copy.deepcopy(dense)
    report = refit(model, masks, calib)
    with torch.no_grad():
        added = torch.cat([_added(dense, x, branch) for x in calib]).flatten(0, -2).double().mean(0)
    output = model.get_submodule(f"blocks.0.{names[1]}")
    torch.testing.assert_close(output.bias.double(), added, rtol=1e-4, atol=1e-6)
    assert not any(model.get_submodule(f"blocks.0.{name}").weight.any() for name in names)
    fit = next(f for f in report.branches if f.block == 0 and f.branch == branch)
    assert fit.kept == 0 and fit.after < fit.before
    vc.compact(model, masks)  # and the refit model compacts, the branch a constant


def _added(model, x: torch.Tensor, branch: str) -> torch.Tensor:
    """What block 0's `branch` adds to the dense model's stream on images `x`."""
    block, h = model.blocks[0], embedded(model, x)
    if branch == "attention":
        return block.attn(block.norm1(h))
    return block.mlp(block.norm2(h + block.attn(block.norm1(h))))


def test_gram_accumulated_in_batches_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 7, generator=g), torch.randn(200, 3, generator=g)
    whole, parts = Gram(7, 3, bias=True), Gram(7, 3, bias=True)
    whole.add(x, y)
    for start in range(0, 200, 37):
        parts.add(x[start:start + 37], y[start:start + 37])
    assert parts.rows == whole.rows == 200
    for a, b in ((parts.xx, whole.xx), (parts.xy, whole.xy), (parts.yy, whole.yy)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def test_ridge_solve_matches_least_squares_and_falls_back_when_ill_conditioned():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    gram = Gram(6, 4, bias=True)
    gram.add(x, x @ w.T + b)
    weight, bias, fell_back = ridge_solve(gram, torch.zeros(4, 6), torch.zeros(4), 0.0, 1e10)
    assert not fell_back
    torch.testing.assert_close(weight, w)
    torch.testing.assert_close(bias, b)
    collinear = Gram(2, 4, bias=True)
    collinear.add(torch.cat([x[:, :1], 2 * x[:, :1]], dim=1), x[:, :4])
    weight, bias, fell_back = ridge_solve(collinear, torch.ones(4, 2), torch.zeros(4), 0.0, 1e10)
    assert fell_back and torch.equal(weight, torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(bias, x[:, :4].mean(0) - 3 * x[:, 0].mean())  # mean residual zero


def fold_grams(x: torch.Tensor, y: torch.Tensor, folds: int) -> list[Gram]:
    grams = [Gram(x.shape[1], y.shape[1], bias=True) for _ in range(folds)]
    for k, gram in enumerate(grams):
        gram.add(x[k::folds], y[k::folds])
    return grams


def test_gram_total_and_without_are_the_equations_of_those_rows():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(90, 5, generator=g, dtype=torch.float64), torch.randn(90, 2, generator=g, dtype=torch.float64)
    folds = fold_grams(x, y, 3)
    whole, rest = Gram(5, 2, bias=True), Gram(5, 2, bias=True)
    whole.add(x, y)
    rest.add(torch.cat([x[0::3], x[2::3]]), torch.cat([y[0::3], y[2::3]]))
    total = Gram.total(folds)
    for got, want in ((total, whole), (total.without(folds[1]), rest)):
        assert got.rows == want.rows
        for a, b in ((got.xx, want.xx), (got.xy, want.xy), (got.yy, want.yy)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def test_held_out_errors_equal_explicit_ridge_fits_on_the_other_folds():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 3, generator=g, dtype=torch.float64) + torch.randn(60, 3, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    grid = (0.0, 0.1, 2.0)
    expected = []
    for ridge in grid:
        error = 0.0
        for k in range(3):
            train = torch.ones(60, dtype=torch.bool)
            train[k::3] = False
            xt, yt = x[train], y[train]
            scale = (ridge * xt.square().sum(0).mean()) ** 0.5  # the penalty is relative to the mean diagonal
            # min ||Y - X Wᵀ - b||² + λ||W - W0||², the bias unpenalised, as one augmented least squares
            a = torch.cat([torch.cat([xt, torch.ones(len(xt), 1, dtype=x.dtype)], 1),
                           torch.cat([scale * torch.eye(4, dtype=x.dtype), torch.zeros(4, 1, dtype=x.dtype)], 1)])
            solution = torch.linalg.lstsq(a, torch.cat([yt, scale * w0.T])).solution
            error += float((y[k::3] - x[k::3] @ solution[:4] - solution[4]).square().sum())
        expected.append(error)
    got = held_out_errors(fold_grams(x, y, 3), w0, b0, 1e10, grid=grid)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-9, atol=0)
    assert len(set(got)) == 3


def test_cross_validation_keeps_weights_the_data_cannot_improve_and_follows_data_that_can():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    few = torch.randn(24, 8, generator=g, dtype=torch.float64)
    noisy = few @ w0.T + 3 * torch.randn(24, 3, generator=g, dtype=torch.float64)  # w0 is already right
    assert cross_validated_ridge(fold_grams(few, noisy, 4), w0, torch.zeros(3), 1e10) == RIDGE_GRID[-1]
    many = torch.randn(400, 8, generator=g, dtype=torch.float64)
    exact = many @ torch.randn(3, 8, generator=g, dtype=torch.float64).T  # w0 is wrong, the data say how
    assert cross_validated_ridge(fold_grams(many, exact, 4), w0, torch.zeros(3), 1e10) == RIDGE_GRID[0]
    assert cross_validated_ridge(fold_grams(many, exact, 1), w0, torch.zeros(3), 1e10) == FALLBACK_RIDGE


def embedded(model, x: torch.Tensor) -> torch.Tensor:
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def assert_ridge_fit(layer: torch.nn.Linear, rows: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                     old: torch.nn.Linear, ridge: float) -> None:
    """`layer`'s `rows` are the ridge fit of `target`'s `rows` by x Wᵀ + b (both (images, tokens, ·)),
    pulled towards `old`'s rows by `ridge` times the mean diagonal of xᵀx, the bias unpenalised:
    solved here from the explicit matrices in float64."""
    x = torch.cat([x.flatten(0, 1).double(), torch.ones(x.shape[0] * x.shape[1], 1, dtype=torch.float64)], dim=1)
    y = target[..., rows].flatten(0, 1).double()
    k = x.shape[1] - 1
    system = x.T @ x
    penalty = torch.zeros(k + 1, dtype=torch.float64)
    penalty[:k] = ridge * system.diagonal()[:k].mean()
    start = torch.cat([old.weight[rows].double().T, old.bias[rows].double()[None]])
    solution = torch.linalg.solve(system + torch.diag(penalty), x.T @ y + penalty[:, None] * start)
    torch.testing.assert_close(layer.weight[rows].double(), solution[:k].T, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(layer.bias[rows].double(), solution[k], rtol=1e-3, atol=1e-4)


def test_input_refit_is_the_least_squares_fit_of_the_dense_pre_activations():
    dense = small_vit()
    calib = images(dense, 64)
    masks = pruned_masks(dense, calib)
    model = copy.deepcopy(dense)
    report = refit(model, masks, calib, RefitSettings(ridge=1e-4))
    kept = masks.structure().blocks
    x = torch.cat(calib)
    with torch.no_grad():
        h_p, h_d = embedded(model, x), embedded(dense, x)
        # Block 0's attention sees the dense stream itself: the fit is exact (up to the rounding
        # of a residual computed from the Gram's sums).
        b_p, b_d = model.blocks[0], dense.blocks[0]
        assert report.inputs[0].after < 1e-3
        # Block 0's fc1, after the (refit) attention branch: the fit of the dense pre-activations.
        a_p, a_d = h_p + b_p.attn(b_p.norm1(h_p)), h_d + b_d.attn(b_d.norm1(h_d))
        assert_ridge_fit(b_p.mlp.fc1, torch.tensor(kept[0].neurons), b_p.norm2(a_p), b_d.mlp.fc1(b_d.norm2(a_d)),
                         b_d.mlp.fc1, 1e-4)
        # Block 1's qkv (the kept heads' q, k and v rows) on the refit block 0's output, all tokens.
        heads, dim = torch.tensor(kept[1].heads), dense.blocks[1].attn.head_dim
        columns = (heads[:, None] * dim + torch.arange(dim)).flatten()
        rows = (torch.arange(3)[:, None] * dense.embed_dim + columns).flatten()
        assert_ridge_fit(model.blocks[1].attn.qkv, rows, model.blocks[1].norm1(b_p(h_p)),
                         dense.blocks[1].attn.qkv(dense.blocks[1].norm1(b_d(h_d))), dense.blocks[1].attn.qkv, 1e-4)
    assert [(f.block, f.branch) for f in report.inputs] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    assert all(f.after < f.before for f in report.inputs[1:])


def test_without_input_refit_qkv_and_fc1_stay_the_masked_dense_ones():
    dense = small_vit()
    calib = images(dense, 32)
    masks = pruned_masks(dense, calib)
    masked = masks.apply_(copy.deepcopy(dense))
    for settings in (RefitSettings(inputs=False), RefitSettings(target="local")):
        model = copy.deepcopy(dense)
        assert refit(model, masks, calib, settings).inputs == []
        for name in ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias"):
            for block, reference in zip(model.blocks, masked.blocks):
                assert torch.equal(block.get_parameter(name), reference.get_parameter(name)), name
    assert vc.RefitConfig().settings().inputs and not vc.RefitConfig(refit_inputs=False).settings().inputs


def test_refit_reports_the_ridge_of_each_layer():
    model = small_vit()
    calib = images(model, 48)
    masks = pruned_masks(model, calib)
    chosen = refit(copy.deepcopy(model), masks, calib).branches
    assert len(chosen) == 4 and all(f.ridge in RIDGE_GRID for f in chosen)
    fixed = refit(copy.deepcopy(model), masks, calib, RefitSettings(ridge=0.02)).branches
    assert [f.ridge for f in fixed] == [0.02] * 4
    assert RefitSettings().ridge is None and vc.RefitConfig().settings().ridge is None


@pytest.mark.parametrize("family", ["vit_tiny", "deit_distilled", "layerscale", "gap_no_cls"])
def test_refit_model_stays_quasi_structured_and_compacts_exactly(family):
    model = make_family(family)
    calib = images(model, 32)
    masks = pruned_masks(model, calib, ratio=0.4)
    refit(model, masks.structure(), calib)  # a Structure works as well as masks
    assert vc.PruneMasks.from_weights(model) == masks
    small = vc.compact(model, masks)
    x = input_for(model, 8, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_labels_are_ignored_and_num_images_caps_the_data():
    dense = small_vit()
    calib = images(dense, 48)
    masks = pruned_masks(dense, calib)
    with_labels, plain, capped = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    refit(with_labels, masks, [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib])
    report = refit(plain, masks, calib)
    capped_report = refit(capped, masks, calib + [input_for(dense, 16, seed=50)], RefitSettings(num_images=48))
    assert report.images == capped_report.images == 48
    for a, b, c in zip(with_labels.parameters(), plain.parameters(), capped.parameters()):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_forced_fallback_keeps_weights_and_compensates_bias():
    dense = small_vit()
    calib = images(dense, 32)
    masks = pruned_masks(dense, calib)
    model = copy.deepcopy(dense)
    report = refit(model, masks, calib, RefitSettings(max_condition=1.0 + 1e-9))
    assert len(report.branches) == len(report.inputs) == 4
    assert report.fallbacks == [f"block {b} {branch}" for b in (0, 1) for branch in ("attention", "mlp")] + \
        [f"block {b} {branch} input" for b in (0, 1) for branch in ("attention", "mlp")]
    masked = masks.apply_(copy.deepcopy(dense))
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(p, dict(masked.named_parameters())[name]), name
    assert all(f.after <= f.before + 1e-9 for f in report.branches + report.inputs)


def test_nan_in_activations_is_a_data_error_naming_the_block_and_changes_nothing():
    model = small_vit()
    before = copy.deepcopy(model.state_dict())
    calib = images(model, 32)
    calib[1][3, 0, 2, 2] = float("nan")
    masks = pruned_masks(model, images(model, 32))
    with pytest.raises(vc.DataError, match="block 0"):
        refit(model, masks, calib)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


@pytest.mark.parametrize("calibration,message", [
    ([], "no images"),
    ([torch.zeros(0, 3, 16, 16)], "no images"),
    ([torch.zeros(4, 1, 16, 16)], "1x16x16"),
    ([torch.zeros(4, 16, 16)], "float image tensors"),
])
def test_bad_calibration_data_is_a_data_error(calibration, message):
    model = small_vit()
    with pytest.raises(vc.DataError, match=message):
        refit(model, vc.PruneMasks.ones(model), calibration)


@pytest.mark.parametrize("field,value", [("target", "dense"), ("alpha", 1.5), ("ridge", -1.0),
                                         ("max_condition", 1.0), ("batch_size", 0), ("num_images", 0),
                                         ("folds", 1)])
def test_settings_refuse_bad_values(field, value):
    with pytest.raises(vc.ConfigError, match=field if field != "target" else "refit target"):
        RefitSettings(**{field: value})


@pytest.mark.parametrize("criteria", ["activation", "fisher", "reconstruction"])
def test_criteria_scores_feed_selection(criteria):
    model = make_family("layerscale")
    calib = [input_for(model, 8, seed=i) for i in range(2)]  # images only: no labels needed
    assert vc.CRITERIA.get(criteria).needs_data
    element = vc.regroup(model, vc.PruneMasks.ones(model),
                         vc.RegroupConfig(target="head", head_ratio=0.5, criteria="magnitude"))
    scores = score_units(model, element, criteria, ScoreContext(calib))
    structure = element.structure()
    for (heads, neurons), kept in zip(scores, structure.blocks):
        assert heads.shape == (kept.num_heads,) and neurons.shape == (kept.hidden,)
        assert bool((heads >= 0).all() & torch.isfinite(heads).all() & torch.isfinite(neurons).all())
        removed = sorted(set(range(kept.num_heads)) - set(kept.heads))
        assert bool((heads[removed] == 0).all()) and bool((heads[kept.heads] > 0).all())
    for mode in ("layer-wise", "global"):
        kept = select_units([s[1] for s in scores], 0.5, mode)
        assert sum(k.numel() for k in kept) == sum(s[1].numel() for s in scores) // 2
        masks = vc.regroup(model, element, vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5, criteria=criteria,
                                                            mode=mode), data=calib)
        assert masks.is_quasi_structured()


def test_reconstruction_score_is_the_error_left_when_a_unit_is_removed_and_the_rest_refit():
    """With no ridge the score is exactly (1/rows) min ||y - X_kept W' - b'||², y the output layer's
    own output: what removing the unit costs after the best least-squares refit of the others. Rows:
    every token, but only the class token in the last block (all that the head reads)."""
    from vitcompact.pruning.refit_scores import reconstruction_scores, unit_inputs
    model = small_vit()
    layout = vc.vit_layout(model)
    calib = images(model, 160)  # the last block's 160 class-token rows against its 128 neurons
    rows = {}

    def record(block, unit, x):
        x = x.detach()[:, :1] if block.index == layout.blocks[-1].index else x.detach()
        rows.setdefault((block.index, unit), []).append(x.reshape(-1, x.shape[-1]).double())
    with torch.no_grad(), unit_inputs(model, layout, record):
        for x in calib:
            model(x)
    scores = reconstruction_scores(model, layout, calib, ridge=0.0)
    for block, (heads, neurons) in zip(layout.blocks, scores):
        for unit, got, size in (("head", heads, block.head_dim), ("neuron", neurons, 1)):
            x = torch.cat(rows[(block.index, unit)])
            layer = model.blocks[block.index].attn.proj if unit == "head" else model.blocks[block.index].mlp.fc2
            y = x @ layer.weight.detach().double().T + layer.bias.detach().double()
            for unit_index in (0, 1):  # two units of each kind: the brute-force refit is slow
                removed = set(range(unit_index * size, (unit_index + 1) * size))
                kept = [c for c in range(x.shape[1]) if c not in removed]
                design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
                fit = torch.linalg.lstsq(design, y).solution
                left = (y - design @ fit).square().sum() / len(x)
                assert float(got[unit_index]) == pytest.approx(float(left), rel=1e-3), (block.index, unit)


def test_fisher_scores_do_not_depend_on_how_many_images_share_a_backward_pass(monkeypatch):
    """Each image's mask gradient is its own, so splitting a batch into passes (to bound memory)
    gives the scores of one pass over the whole batch."""
    from vitcompact.pruning import refit_scores
    model = small_vit()
    layout = vc.vit_layout(model)
    calib = images(model, 32)
    split = refit_scores.fisher_scores(model, layout, calib)  # 8 images a pass
    monkeypatch.setattr(refit_scores, "FISHER_IMAGES_PER_PASS", 1000)
    whole = refit_scores.fisher_scores(model, layout, calib)
    assert refit_scores.FISHER_IMAGES_PER_PASS != 8 and len(calib[0]) == 16
    for (h1, n1), (h2, n2) in zip(split, whole):
        torch.testing.assert_close(h1, h2, rtol=1e-5, atol=0)
        torch.testing.assert_close(n1, n2, rtol=1e-5, atol=0)

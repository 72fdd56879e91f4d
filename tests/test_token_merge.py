"""Token merging: the setting, the schedule, the merge against ToMe's own algorithm, dense and compact
models, ONNX export of both graphs (parity, no scatter), and static INT8 of a merged graph."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import input_for, make_family, randomize_

import vitcompact as vc
from vitcompact.errors import ConfigError
from vitcompact.export import ExportConfig, Int8Config, to_int8, to_onnx
from vitcompact.export.verify import ort_session
from vitcompact.models import ConstantBranch
from vitcompact.models.token_merge import (TokenMergeConfig, bipartite_merge, get_token_merge, merge_schedule,
                                           merge_tokens, model_token_counts, token_counts)

SCATTERS = {"Scatter", "ScatterElements", "ScatterND"}


def digits(seed: int = 0, depth: int = 4) -> torch.nn.Module:
    """vit-digits: 16 patches and a class token, 4 blocks (or `depth`); biases randomised so merges show."""
    torch.manual_seed(seed)
    return randomize_(vc.create_model("vit-digits", num_classes=10, depth=depth), seed)


def compact_digits(seed: int = 0, depth: int = 4) -> torch.nn.Module:
    """vit-digits pruned to half its heads and neurons, block 0 without any head (a ConstantBranch)."""
    model = digits(seed, depth)
    masks = vc.regroup(model, vc.magnitude_prune(model, rate=0.5),
                       vc.RegroupConfig(target="both", head_ratio=0.5, mlp_ratio=0.5))
    masks.masks["blocks.0.attn.qkv.weight"][:] = False
    masks.masks["blocks.0.attn.proj.weight"][:] = False
    small = vc.compact(model, masks).eval()
    assert isinstance(small.blocks[0].attn, ConstantBranch)
    assert small.blocks[1].attn.num_heads < model.blocks[1].attn.num_heads
    return small


def recorded_tokens(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[int], list[int]]:
    """Tokens each block's attention and MLP saw (the inputs of norm1 and norm2)."""
    seen: dict[str, list[int]] = {"attn": [], "mlp": []}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: seen[key].append(args[0].shape[1]))
             for block in model.blocks for m, key in ((block.norm1, "attn"), (block.norm2, "mlp"))]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen["attn"], seen["mlp"]


def tome_reference(x, size, metric, r, protected):
    """ToMe's `bipartite_soft_matching` + `merge_wavg` (scatter_reduce), with the prefix kept out of
    matching and the kept tokens in order, as ToMe orders them when it protects a class token."""
    front, front_size = x[:, :protected], size[:, :protected]
    x, size, metric = x[:, protected:], size[:, protected:], metric[:, protected:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :].sort(dim=1)[0], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        return torch.cat([unm, dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")], dim=1)

    merged_size = merge(size)
    return torch.cat([front, merge(x * size) / merged_size], 1), torch.cat([front_size, merged_size], 1)


# The setting and its schedule

def test_config_round_trips_and_refuses_unknown_keys():
    config = TokenMergeConfig(r=3, schedule="decreasing", protect_cls=True, proportional_attention=False)
    assert TokenMergeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown key.*ratio"):
        TokenMergeConfig.from_dict({"r": 2, "ratio": 0.5})
    with pytest.raises(ConfigError, match="r must be an integer"):
        TokenMergeConfig.from_dict({"r": 2.5})


@pytest.mark.parametrize("kwargs, message", [
    ({"r": -1}, "token merge r must be >= 0"),
    ({"r": 2, "schedule": "cosine"}, "unknown token merge schedule 'cosine'; choose one of: constant, decreasing"),
    ({"r": 2, "protect_cls": 1}, "protect_cls must be true or false"),
])
def test_bad_setting_is_one_line_config_error(kwargs, message):
    with pytest.raises(ConfigError) as error:
        TokenMergeConfig(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("depth", [1, 4, 12])
def test_decreasing_schedule_runs_from_2r_to_0(depth):
    merges = merge_schedule(depth, TokenMergeConfig(r=7, schedule="decreasing"))
    assert len(merges) == depth
    if depth == 1:
        assert merges == [7]
    else:
        assert merges[0] == 14 and merges[-1] == 0
        assert all(a >= b for a, b in zip(merges, merges[1:]))
        assert abs(sum(merges) - 7 * depth) <= depth  # about the constant schedule's total
    assert merge_schedule(depth, TokenMergeConfig(r=7)) == [7] * depth


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_too_large_r_names_the_block_and_the_largest_r_that_fits(schedule):
    tokens, depth = 197, 12
    largest = max(r for r in range(100) if _fits(tokens, depth, TokenMergeConfig(r=r, schedule=schedule)))
    counts = token_counts(tokens, depth, TokenMergeConfig(r=largest, schedule=schedule))
    assert len(counts) == depth and counts[0] == tokens
    with pytest.raises(ConfigError) as error:
        token_counts(tokens, depth, TokenMergeConfig(r=largest + 1, schedule=schedule))
    message = str(error.value)
    assert f"r={largest + 1}" in message and f"use r <= {largest}" in message and "\n" not in message


def _fits(tokens: int, depth: int, config: TokenMergeConfig) -> bool:
    try:
        token_counts(tokens, depth, config)
    except ConfigError:
        return False
    return True


# The merge itself

@pytest.mark.parametrize("protected", [0, 1, 5])
def test_merge_equals_tome_and_keeps_the_weighted_sum(protected):
    g = torch.Generator().manual_seed(protected)
    x, metric = torch.randn(3, 30, 8, generator=g), torch.randn(3, 30, 6, generator=g)
    size = torch.randint(1, 4, (3, 30, 1), generator=g).float()
    r = (30 - protected) // 2
    out, out_size = bipartite_merge(x, size, metric, r, protected)
    want, want_size = tome_reference(x, size, metric, r, protected)
    assert out.shape == (3, 30 - r, 8)
    torch.testing.assert_close(out, want)
    assert torch.equal(out_size, want_size)
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1))
    # Token-major (the token-matrix graph's layout) merges the same tokens.
    rows, row_size = bipartite_merge(x.transpose(0, 1), size.transpose(0, 1), metric, r, protected, token_dim=0)
    torch.testing.assert_close(rows.transpose(0, 1), out)
    assert torch.equal(row_size.transpose(0, 1), out_size)


def test_protected_class_token_is_never_merged():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    metric[:, 0] = metric[:, 2]  # the class token's best match is perfect: it would merge first
    out, size = bipartite_merge(x, None, metric, 4, protected=1)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(size[:, 0], torch.ones(2, 1))
    unprotected, unprotected_size = bipartite_merge(x, None, metric, 4, protected=0)
    assert not torch.equal(unprotected[:, 0], x[:, 0])
    assert unprotected_size.sum() == size.sum() == 2 * 9


# Models

def test_r0_is_exactly_the_model():
    model, images = digits(), input_for(digits(), 3)
    with torch.no_grad():
        want = model(images)
        assert torch.equal(merge_tokens(model, TokenMergeConfig(r=0))(images), want)
        merge_tokens(model, TokenMergeConfig(r=2))
        assert not torch.equal(model(images), want)
        merge_tokens(model, None)
        assert torch.equal(model(images), want)
    assert get_token_merge(model) is None and "forward_features" not in vars(model)


# Prefix tokens: class and distillation (deit_distilled), registers (reg4), none (gap_no_cls).
BUILDS = {"dense": digits, "compact": compact_digits,
          **{family: (lambda family=family: make_family(family, depth=4))
             for family in ("deit_distilled", "reg4", "gap_no_cls", "qk_norm", "layerscale")}}


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
@pytest.mark.parametrize("build", list(BUILDS))
def test_tokens_per_block_follow_the_schedule(build, schedule):
    model = BUILDS[build]()
    config = TokenMergeConfig(r=2, schedule=schedule)
    merge_tokens(model, config)
    attn, mlp = recorded_tokens(model, input_for(model, 2))
    counts = token_counts(model.patch_embed.num_patches + model.num_prefix_tokens, 4, config,
                          model.num_prefix_tokens)
    assert attn == counts == model_token_counts(model)
    assert mlp == [n - r for n, r in zip(counts, merge_schedule(4, config))]


def test_weights_and_their_names_stay():
    model = digits()
    before = copy.deepcopy(model.state_dict())
    merge_tokens(model, TokenMergeConfig(r=3))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    twin = merge_tokens(digits(seed=1), TokenMergeConfig(r=3))
    twin.load_state_dict(after, strict=True)
    images = input_for(model, 2)
    with torch.no_grad():
        assert torch.equal(twin(images), model(images))


def test_fused_and_explicit_attention_agree_and_proportional_attention_counts():
    model, images = merge_tokens(digits(), TokenMergeConfig(r=3)), input_for(digits(), 4)
    with torch.no_grad():
        outputs = []
        for fused in (True, False):
            for block in model.blocks:
                block.attn.fused_attn = fused
            outputs.append(model(images))
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
        merge_tokens(model, TokenMergeConfig(r=3, proportional_attention=False))
        assert not torch.allclose(model(images), outputs[1])


def test_merging_model_trains():
    model = merge_tokens(digits(), TokenMergeConfig(r=2)).train()
    model(input_for(model, 4)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks."))


def test_bad_model_settings_leave_the_model_alone():
    model = digits()
    with pytest.raises(ConfigError, match=r"r=5 is larger than half .* block 2 .* use r <= 3"):
        merge_tokens(model, TokenMergeConfig(r=5))
    with pytest.raises(ConfigError, match="protect_cls=False would merge the model's 1 prefix token"):
        merge_tokens(model, TokenMergeConfig(r=2, protect_cls=False))
    assert get_token_merge(model) is None and "forward_features" not in vars(model)


# Export

@pytest.fixture(scope="module", params=[(kind, graph) for kind in ("dense", "compact")
                                        for graph in ("token-matrix", "timm")], ids="-".join)
def exported(request, tmp_path_factory):
    # Fewer blocks than vit-digits' 4 (exporting a merging graph takes ~2 s a block): the dense model's
    # 2 blocks both merge; the compact model's 3 merge 4 tokens (the head-less block), 2 (a block of
    # pruned heads), then none.
    kind, graph = request.param
    if kind == "dense":
        model = merge_tokens(digits(depth=2), TokenMergeConfig(r=3))
    else:
        model = merge_tokens(compact_digits(depth=3), TokenMergeConfig(r=2, schedule="decreasing"))
    path = tmp_path_factory.mktemp(f"{kind}-{graph}") / "model.onnx"
    return model, to_onnx(model, path, ExportConfig(graph=graph, optimize="off"))


def test_export_matches_pytorch_without_scatter(exported):
    model, result = exported
    assert result.parity.passed and sorted(result.parity.max_abs_diff) == [1, 3]
    assert result.parity.worst <= 1e-4
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert not ops & SCATTERS
    assert {"TopK", "GatherElements"} <= ops  # the graph does merge
    (inp,) = ort_session(result.path).get_inputs()
    assert inp.shape[1:] == [1, 8, 8]


def test_static_int8_of_a_merged_graph_runs(exported, bundle, tmp_path):
    model, result = exported
    int8 = to_int8(result.path, tmp_path / "model.int8.onnx",
                   Int8Config(mode="static", calib_batches=2, max_accuracy_drop=None), data=bundle)
    ops = [node.op_type for node in onnx.load(str(int8.path)).graph.node]
    assert "QuantizeLinear" in ops and not set(ops) & SCATTERS
    images = next(iter(bundle.val))[0].numpy()
    logits = ort_session(int8.path).run(None, {"images": images})[0]
    assert logits.shape == (len(images), 10) and np.isfinite(logits).all()

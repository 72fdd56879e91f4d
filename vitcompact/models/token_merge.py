"""Token merging (ToMe, Bolya et al. 2023) as a setting of a timm ViT: fewer tokens in every block.

After each block's attention, `bipartite_merge` splits the mergeable tokens alternately into sets
A and B, matches every A token to its most similar B token (cosine similarity of the attention keys,
averaged over heads), and merges the `r` best-matched A tokens into their B tokens by size-weighted
average. Token sizes (how many patches a token stands for) are tracked; with proportional attention
each key's logit gets `log(size)`, so a merged token weighs as much as the tokens it replaced.

The prefix tokens (class, distillation, register) are kept out of matching and stay in front, where
timm's head reads them; a model that averages its tokens (global_pool "avg") averages the merged
tokens unweighted, as ToMe does. How many tokens enter each block depends only on the input size and the
setting (`token_counts`), so an exported graph keeps static shapes. The merge is written as gathers
and a one-hot matrix product, without scatter reductions, so TensorRT takes the exported graph too.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, UnsupportedModelError
from ..validate import integer
from .adapter import check_vit
from .layers import ConstantBranch
from .merge_config import TokenMergeConfig  # noqa: F401  (re-exported)
from .record import get_record, set_record

def merge_schedule(depth: int, config: TokenMergeConfig) -> list[int]:
    """Tokens merged in each of `depth` blocks.

    "constant": `r` in every block. "decreasing": block b of L merges floor(2r·(L-1-b)/(L-1)), from
    2r in block 0 down to 0 in the last block (a single block merges r).
    """
    integer("depth", depth, 1)
    r = config.r
    if config.schedule == "constant" or depth == 1:
        return [r] * depth
    return [2 * r * (depth - 1 - b) // (depth - 1) for b in range(depth)]


def _first_overflow(num_tokens: int, merges: list[int], protected: int) -> tuple[int, int] | None:
    """The first block (index, tokens entering it) that would merge more than half of its
    mergeable tokens; None when every block is fine."""
    tokens = num_tokens
    for block, r in enumerate(merges):
        if r > (tokens - protected) // 2:
            return block, tokens
        tokens -= r
    return None


def token_counts(num_tokens: int, depth: int, config: TokenMergeConfig | None,
                 prefix_tokens: int = 1) -> list[int]:
    """Tokens entering each of `depth` blocks of a ViT that starts with `num_tokens` tokens (patches
    plus `prefix_tokens`); block b's MLP sees `counts[b] - merge_schedule(depth, config)[b]`.

    Raises ConfigError when a block would merge more than half of its mergeable tokens (the tokens
    outside the protected prefix), naming the largest r that fits.
    """
    integer("num_tokens", num_tokens, 1)
    integer("prefix_tokens", prefix_tokens, 0, num_tokens)
    if config is None or not config.enabled:
        return [num_tokens] * integer("depth", depth, 1)
    merges = merge_schedule(depth, config)
    protected = prefix_tokens if config.protect_cls else 0
    overflow = _first_overflow(num_tokens, merges, protected)
    if overflow is not None:
        block, tokens = overflow
        fits = next(r for r in range(config.r - 1, -1, -1)
                    if _first_overflow(num_tokens, merge_schedule(depth, replace(config, r=r)), protected) is None)
        merged = "is" if merges[block] == config.r else f"merges {merges[block]} tokens ({config.schedule} schedule),"
        raise ConfigError(f"token merge r={config.r} {merged} larger than half the {tokens - protected} mergeable "
                          f"tokens of block {block} ({tokens} tokens, {protected} protected); use r <= {fits}")
    counts = [num_tokens]
    for r in merges[:-1]:
        counts.append(counts[-1] - r)
    return counts


def get_token_merge(model: nn.Module) -> TokenMergeConfig | None:
    """The model's token merging setting (from its `ModelRecord`); None when it merges no tokens."""
    return get_record(model).token_merge


def set_token_merge(model: nn.Module, config: TokenMergeConfig | None) -> None:
    """Record the setting in the model's record (None or r=0: off). `merge_tokens` is the door for users."""
    config = config if config is not None and config.enabled else None
    if config != get_token_merge(model):  # turning merging off gives a foreign model no record
        set_record(model, token_merge=config)


def model_token_counts(model: nn.Module, config: TokenMergeConfig | None = None) -> list[int]:
    """`token_counts` for `model` at its input size, with `config` or else the model's own setting."""
    config = config if config is not None else get_token_merge(model)
    return token_counts(model.patch_embed.num_patches + model.num_prefix_tokens, len(model.blocks), config,
                        model.num_prefix_tokens)


@dataclass(frozen=True)
class MergePlan:
    """What one forward pass merges: tokens per block, how many prefix tokens stay out of matching,
    and whether attention is proportional."""

    merges: tuple[int, ...]
    protected: int
    proportional: bool


def merge_plan(model: nn.Module, num_tokens: int) -> MergePlan:
    """The plan for a forward pass of `model` on `num_tokens` tokens (no merges when merging is off).
    Checked here too, since a model with a dynamic image size sees other token counts."""
    config, depth = get_token_merge(model), len(model.blocks)
    if config is None:
        return MergePlan((0,) * depth, 0, False)
    token_counts(num_tokens, depth, config, model.num_prefix_tokens)
    return MergePlan(tuple(merge_schedule(depth, config)), model.num_prefix_tokens if config.protect_cls else 0,
                     config.proportional_attention)


def _tokens(x: torch.Tensor, token_dim: int, start: int, stop: int | None = None, step: int = 1) -> torch.Tensor:
    return x[(slice(None),) * token_dim + (slice(start, stop, step),)]


def _take(x: torch.Tensor, index: torch.Tensor, token_dim: int) -> torch.Tensor:
    """The tokens of `x` at `index` (batch, k): a GatherElements, tokens staying at `token_dim`."""
    if token_dim == 0:
        index = index.transpose(0, 1)
    return x.gather(token_dim, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _batch_first(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    return x if token_dim == 1 else x.transpose(0, 1)


def _match(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of mergeable tokens (batch, tokens, dim): A = even tokens, B = odd.

    Returns the A tokens that stay, in their order (batch, |A|-r); the A tokens merged away
    (batch, r); and the B token each of those merges into (batch, r).
    """
    # A sum of squares, an argmax and a sum where `norm`, `max` and `any` would do: onnxruntime's
    # shape inference (run before static INT8) has no rule for ReduceL2 and ReduceMax with their
    # axes as an input, as opset 18 writes them.
    metric = metric / (metric * metric).sum(dim=-1, keepdim=True).sqrt()
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    best_b = scores.argmax(dim=-1, keepdim=True)
    best = scores.gather(-1, best_b).squeeze(-1)
    merged = best.topk(r, dim=-1).indices
    into = best_b.squeeze(-1).gather(1, merged)
    # Distinct sort keys (position, pushed back by |A| when merged) keep the kept tokens in order
    # with no tie for the exporter's TopK to break differently.
    positions = torch.arange(a.shape[1], device=metric.device)
    is_merged = (merged.unsqueeze(-1) == positions).to(metric.dtype).sum(dim=1)
    keys = positions.to(metric.dtype) + is_merged * a.shape[1]
    kept = keys.topk(a.shape[1] - r, dim=-1, largest=False).indices
    return kept, merged, into


def bipartite_merge(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
                    protected: int = 1, token_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `r` tokens of `x` away; returns the tokens and their sizes (same layout, width 1).

    `x` has its tokens at `token_dim` (1: (batch, tokens, width), 0: (tokens, batch, width)); `size`
    likewise, None meaning every token is one patch. `metric` (batch, tokens, dim) is what tokens are
    matched on. The first `protected` tokens stay as they are; the output is those, then the kept A
    tokens in order, then the B tokens, each the size-weighted average of what merged into it.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    kept, merged, into = _match(metric[:, protected:], r)
    x_a, x_b = _tokens(x, token_dim, protected, step=2), _tokens(x, token_dim, protected + 1, step=2)
    size_a, size_b = _tokens(size, token_dim, protected, step=2), _tokens(size, token_dim, protected + 1, step=2)
    # (batch, |B|, r) one-hot: which B token each merged A token goes into; a product, not a scatter.
    assign = (into.unsqueeze(1) == torch.arange(x_b.shape[token_dim], device=x.device).view(1, -1, 1)).to(x.dtype)
    moved_size = _take(size_a, merged, token_dim)
    moved = _take(x_a, merged, token_dim) * moved_size
    merged_size = size_b + _batch_first(assign @ _batch_first(moved_size, token_dim), token_dim)
    x_b = (x_b * size_b + _batch_first(assign @ _batch_first(moved, token_dim), token_dim)) / merged_size
    parts = [(_take(x_a, kept, token_dim), _take(size_a, kept, token_dim)), (x_b, merged_size)]
    if protected:
        parts.insert(0, (_tokens(x, token_dim, 0, protected), _tokens(size, token_dim, 0, protected)))
    return torch.cat([p[0] for p in parts], dim=token_dim), torch.cat([p[1] for p in parts], dim=token_dim)


def log_size_bias(size: torch.Tensor | None, token_dim: int = 1) -> torch.Tensor | None:
    """Proportional attention: log(size) of each key as an additive logit bias (batch, 1, 1, tokens)."""
    if size is None:
        return None
    return _batch_first(size, token_dim).log().transpose(1, 2).unsqueeze(1)


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention.forward` (no mask) with a logit bias; also returns the keys (batch, heads,
    tokens, dim). The same operations as timm's, so a block without bias computes what timm does."""
    batch, tokens, _ = x.shape
    attn_dim = attn.num_heads * attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            weights = weights + bias
        out = attn.attn_drop(weights.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(out))), k


def merge_step(x: torch.Tensor, size: torch.Tensor | None, keys: torch.Tensor | None, r: int, plan: MergePlan,
               token_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block's merge after its attention: on the keys averaged over heads, or, in a block whose
    attention branch was removed (no keys), on the tokens themselves."""
    if not r:
        return x, size
    metric = keys.mean(dim=1) if keys is not None else _batch_first(x, token_dim)
    return bipartite_merge(x, size, metric, r, plan.protected, token_dim)


def _merging_forward_features(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                              is_causal: bool = False) -> torch.Tensor:
    """`VisionTransformer.forward_features` with the blocks merging tokens as `merge_plan` says."""
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("token merging takes no attention mask; turn merging off to pass one")
    x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
    plan, size = merge_plan(self, x.shape[1]), None
    for block, r in zip(self.blocks, plan.merges):
        bias = log_size_bias(size) if plan.proportional else None
        if isinstance(block.attn, ConstantBranch):
            out, keys = block.attn(block.norm1(x)), None
        else:
            out, keys = _attention(block.attn, block.norm1(x), bias)
        x = x + block.drop_path1(block.ls1(out))
        x, size = merge_step(x, size, keys, r, plan)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return self.norm(x)


def _installed(model: nn.Module) -> bool:
    return getattr(vars(model).get("forward_features"), "__func__", None) is _merging_forward_features


def check_token_merge(model: nn.Module, config: TokenMergeConfig) -> None:
    """Raise ConfigError when `model`, at its input size, cannot merge as `config` says: a block
    left with fewer than 2r mergeable tokens, or prefix tokens its head reads given up to merging."""
    if config.enabled and not config.protect_cls and model.num_prefix_tokens:
        raise ConfigError(f"protect_cls=False would merge the model's {model.num_prefix_tokens} prefix token(s) "
                          "(class, distillation, registers), which its head reads at fixed positions; "
                          "keep protect_cls=True")
    model_token_counts(model, config)


def merge_tokens(model: nn.Module, config: TokenMergeConfig | None) -> nn.Module:
    """Make `model` (a dense or compact timm VisionTransformer) merge tokens as `config` says, in
    place; None or r=0 turns merging off and leaves exactly the model's own forward.

    Only the instance's `forward_features` changes; parameters and their names stay, so weights
    save and load as before. The model's input size must leave every block at least 2r mergeable
    tokens (ConfigError otherwise).
    """
    check_vit(model)
    if config is None or not config.enabled:
        set_token_merge(model, None)
        if _installed(model):
            del model.forward_features
        return model
    check_token_merge(model, config)
    set_token_merge(model, config)
    if not _installed(model):
        model.forward_features = types.MethodType(_merging_forward_features, model)
    return model

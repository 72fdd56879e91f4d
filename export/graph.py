"""Which graph of a timm ViT the exporter traces: the token matrix (default) or timm's own.

"token-matrix" computes timm's function with the blocks on a (tokens·batch, width) matrix. timm's
blocks work on (batch, tokens, width) tensors, which torch's exporter writes as MatMul plus Add for
every linear layer, with q, k, v split by a 5-D permute, a Split, three Squeezes and three
Transposes. On the matrix each linear layer is one Gemm that holds its bias, so onnxruntime runs a
static INT8 layer as QuantizeLinear + QGemm instead of QuantizeLinear + MatMulIntegerToFloat + Add,
and q, k, v come from one reshape and one split (see `_attention`). vit-cifar-tiny's compact graph
has 195 operators against 263 (160 against 235 once onnxruntime has fused what it can; 197 against
272 in static INT8); README "ONNX" has the measured speed-ups.

"timm" traces the model's own forward. onnxruntime's transformer optimiser fuses residual adds into
SkipLayerNormalization only on 3-D tensors, so `--optimize on` has something to fuse only there;
on onnxruntime CPU its fused graph measured slower than either plain graph.

A model that merges tokens (`vitcompact.models.token_merge`) merges in both graphs: "timm" traces
its merging `forward_features`, "token-matrix" merges on the token-major view of its rows. The token
counts are fixed by the input size, so every shape but the batch stays static.

Both spell attention out as softmax(q·kᵀ)·v: the exporter writes the fused kernel
(scaled_dot_product_attention) with shape arithmetic for the dynamic batch, 380 operators against
299 for vit-cifar-tiny's timm graph, 2 % slower in FP32 and 9 % slower in static INT8.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn as nn

from vitcompact.models import ConstantBranch
from vitcompact.models.token_merge import log_size_bias, merge_plan, merge_step

GRAPHS = ("token-matrix", "timm")


def _attention(attn: nn.Module, x: torch.Tensor, batch: int, tokens: int,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm `Attention` (no mask, eval) on token-matrix rows; returns token-matrix rows and the keys
    (batch, heads, tokens, dim), which token merging matches on (None for a removed branch).

    The rows are token-major, so q, k and v come out of one split as (tokens, batch, heads, dim)
    and reach the two products through permutes onnxruntime folds into its FusedMatMul (as
    transposed batch dimensions); batch-major rows needed a Transpose each for q, k and v.
    `bias` (batch, 1, 1, tokens) is added to the logits: proportional attention of merged tokens.
    """
    if isinstance(attn, ConstantBranch):
        return attn(x), None
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(tokens, batch, 3 * heads, head_dim).split(heads, dim=2)
    q, k = attn.q_norm(q.permute(1, 2, 0, 3)), attn.k_norm(k.permute(1, 2, 0, 3))
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    weights = attn.attn_drop(logits.softmax(dim=-1))
    out = (weights @ v.permute(1, 2, 0, 3)).permute(2, 0, 1, 3).reshape(tokens * batch, heads * head_dim)
    return attn.proj_drop(attn.proj(attn.norm(out))), k


def _token_matrix_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`VisionTransformer.forward` (no mask), its blocks on the (tokens·batch, width) matrix.

    With token merging on, each block merges after its attention on the (tokens, batch, width) view
    of the rows, so the matrix stays token-major and only its row count shrinks."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch, tokens, width = x.shape
    x = x.transpose(0, 1).reshape(tokens * batch, width)
    plan, size = merge_plan(model, tokens), None
    for block, r in zip(model.blocks, plan.merges):
        bias = log_size_bias(size, token_dim=0) if plan.proportional else None
        out, keys = _attention(block.attn, block.norm1(x), batch, tokens, bias)
        x = x + block.drop_path1(block.ls1(out))
        if r:
            rows, size = merge_step(x.reshape(tokens, batch, width), size, keys, r, plan, token_dim=0)
            tokens -= r
            x = rows.reshape(tokens * batch, width)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x.reshape(tokens, batch, width).transpose(0, 1)))


@contextlib.contextmanager
def traced_as(model: nn.Module, graph: str) -> Iterator[nn.Module]:
    """`model` computing through the `graph` forward while the exporter traces it; as it was after.

    Only the attention modules' `fused_attn` flags (off, for timm's own forward) and, for the token
    matrix, the instance's `forward` change, so the ONNX weights keep the model's parameter names. Callers check the model with `vit_layout`
    first: a timm VisionTransformer of pre-norm Blocks, fused-qkv Attention and a two-layer Mlp.
    """
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    own_forward = vars(model).get("forward")
    for m, _ in fused:
        m.fused_attn = False
    if graph == "token-matrix":
        model.forward = types.MethodType(_token_matrix_forward, model)
    try:
        yield model
    finally:
        for m, value in fused:
            m.fused_attn = value
        if own_forward is not None:
            model.forward = own_forward
        else:
            vars(model).pop("forward", None)

"""Small modules that stand in for a branch of a block once all of its units are removed."""

from __future__ import annotations

import torch
import torch.nn as nn


class ConstantBranch(nn.Module):
    """A residual branch whose every unit was removed: it adds a constant vector, or nothing.

    The removed units' constant contribution (biases behind unmasked outgoing weights) is folded
    into `value`; when that is zero the module holds no parameter and adds nothing.
    """

    def __init__(self, dim: int, has_value: bool):
        super().__init__()
        self.dim = dim
        self.value = nn.Parameter(torch.zeros(dim)) if has_value else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.value is None:
            return x.new_zeros(())
        return self.value.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, constant={'yes' if self.value is not None else 'none'}"

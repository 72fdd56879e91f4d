"""RSST's penalty strength λ(t): one registry of growth schedules, counted in global steps.

`t` is the number of optimiser steps since the current pruning state began (λ restarts every
state), `T` the state's total number of steps, `base` the scale and `cap` the ceiling: every
schedule returns `min(cap, base * g(t))` with its own growth `g`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..registry import Registry
from ..validate import in_range

Growth = Callable[[int, int, float], float]


def _expm1(x: float) -> float:
    # Past e^700 a float overflows; any such λ is far above every sensible cap anyway.
    return math.expm1(min(x, 700.0))

LAMBDA_SCHEDULES: Registry[Growth] = Registry("lambda schedule")


@LAMBDA_SCHEDULES.register("x")
def linear(t: int, T: int, k: float) -> float:
    """g(t) = t"""
    return float(t)


@LAMBDA_SCHEDULES.register("x^2")
def square(t: int, T: int, k: float) -> float:
    """g(t) = t^2"""
    return float(t) ** 2


@LAMBDA_SCHEDULES.register("x^3")
def cube(t: int, T: int, k: float) -> float:
    """g(t) = t^3"""
    return float(t) ** 3


@LAMBDA_SCHEDULES.register("exp")
def exponential(t: int, T: int, k: float) -> float:
    """g(t) = e^(t/T) - 1"""
    return _expm1(t / T)


@LAMBDA_SCHEDULES.register("exp_custom")
def exp_custom(t: int, T: int, k: float) -> float:
    """g(t) = (e^(t/T) - 1) / (e - 1): normalised so g(T) = 1, λ reaches `base` at the state's end."""
    return _expm1(t / T) / math.expm1(1.0)


@LAMBDA_SCHEDULES.register("exp_custom_exponents")
def exp_custom_exponents(t: int, T: int, k: float) -> float:
    """g(t) = (e^(k t/T) - 1) / (e^k - 1): like `exp_custom` with steepness k (flat, then steep)."""
    return _expm1(k * t / T) / _expm1(k)


@dataclass(frozen=True)
class LambdaSchedule:
    """λ(t) = min(cap, base * g(t)). With `base=None` the base is chosen so λ reaches `cap` half-way
    through the state (t = T/2), which keeps the default strength independent of dataset size."""

    name: str = "x"
    cap: float = 1.0
    base: float | None = None
    exponent: float = 4.0

    def __post_init__(self) -> None:
        LAMBDA_SCHEDULES.get(self.name)
        in_range("lambda cap", self.cap, 0.0, low_open=True)
        if self.base is not None:
            in_range("lambda base", self.base, 0.0, low_open=True)
        # exp(k) overflows a double past k = 709; 100 is already a step function.
        in_range("lambda exponent k", self.exponent, 0.0, 100.0, low_open=True)

    def base_for(self, T: int) -> float:
        if self.base is not None:
            return self.base
        half = LAMBDA_SCHEDULES.get(self.name)(max(1, T // 2), max(1, T), self.exponent)
        return self.cap / half

    def __call__(self, t: int, T: int) -> float:
        T = max(1, T)
        return min(self.cap, self.base_for(T) * LAMBDA_SCHEDULES.get(self.name)(t, T, self.exponent))

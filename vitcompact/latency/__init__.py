"""Latency: the backends that run a model, the one timing loop, the per-block latency table and the
budget a structure is pruned to, with the report of what it delivers.

    request = BudgetRequest(target_speedup=2.0, deploy_batch=8)
    budget = request.budget(model)                 # the model's latency table, measured or cached
    report = budget_report(dense, compact, budget, request)
"""

from .backends import BACKENDS, Backend, BackendOptions, backend_names, check_backend, make_backend
from .budget import BLOCK_REMOVAL, BUDGET_AXES, Allocation, BudgetRequest, LatencyBudget, allocate
from .environment import environment, physical_cores
from .report import MISS_TOLERANCE, budget_missed, budget_report, measure_speedup, write_budget_report
from .sources import BenchModel
from .stats import LatencyStats, SpeedUp, latency_stats, speedup_interval
from .table import LatencyTable, TableTiming, latency_table, measure_table
from .timing import Timing, measure_pair

__all__ = [
    "BACKENDS", "Backend", "BackendOptions", "backend_names", "check_backend", "make_backend", "BLOCK_REMOVAL",
    "BUDGET_AXES", "Allocation",
    "BudgetRequest", "LatencyBudget", "allocate", "environment", "physical_cores", "MISS_TOLERANCE",
    "budget_missed", "budget_report",
    "measure_speedup", "write_budget_report", "BenchModel", "LatencyStats", "SpeedUp", "latency_stats",
    "speedup_interval", "LatencyTable", "TableTiming", "latency_table", "measure_table", "Timing", "measure_pair",
]
